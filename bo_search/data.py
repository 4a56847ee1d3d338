"""Evaluation and calibration text: the embedded Wikipedia extract, local files, fixed windows.

The text is a list of documents. Each document goes, by a hash of its title (or of its text when it
has none), to one of four disjoint splits, so that no search reports its final number on the
windows it optimised or chose on:

======================  =======================================================================
``calibration`` (20%)   sensitivity scores (FIT, Hessian, measured) and seeding
``search`` (30%)        what every search trial is scored on (``cal_PPL``, ``kl``)
``validation`` (20%)    choosing the final plan among the search's finalists (``val_PPL``, ``val_kl``)
``test`` (30%)          held-out perplexity of the final plans (``ppl_heldout``), the only numbers reported
======================  =======================================================================

The shares are of hash buckets, so a text's actual shares vary (the embedded extract's 106 articles
fall 31/15/21/39). Calibration and search are the buckets they were before the validation split
existed; validation was carved out of the former test split (hence ``TEXT_VERSION`` 3).

Each split is tokenised once (documents joined by a blank line) and cached. Evaluation windows are
``n`` fixed, non-overlapping spans of ``seq_len`` tokens spread evenly over the split, each prefixed
with the tokenizer's BOS token (EOS when there is no BOS), as lm_eval's rolling log-likelihood does;
all ``seq_len`` tokens of a window are scored.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bo_search.model import cache_dir, load_tokenizer
from bo_search.types import UserError

log = logging.getLogger(__name__)

SPLITS = ("calibration", "search", "validation", "test")
_SPLIT_OF_BUCKET = ["calibration"] * 2 + ["search"] * 3 + ["validation"] * 2 + ["test"] * 3
#: how documents are assigned to splits, printed for a user's own text
SPLIT_RULE = "by a hash of each document's title (else its text) into 10 buckets: calibration 2, search 3, validation 2, test 3"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EMBEDDED_TEXT = "embedded:wikipedia"
PYDOC_TEXT = "pydoc"
#: part of the text and token cache keys: bump it when extraction, splitting or tokenisation changes
TEXT_VERSION = 3


@dataclass(frozen=True)
class Document:
    title: str
    text: str

    @property
    def split(self) -> str:
        key = self.title or self.text
        bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 10
        return _SPLIT_OF_BUCKET[bucket]


@dataclass(frozen=True)
class Corpus:
    name: str
    documents: tuple[Document, ...]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for d in self.documents:
            h.update(d.title.encode("utf-8"))
            h.update(b"\0")
            h.update(d.text.encode("utf-8"))
        return h.hexdigest()[:12]

    def split_documents(self, split: str) -> list[Document]:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}: use one of {SPLITS}")
        return [d for d in self.documents if d.split == split]


def _wikipedia_bz2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded text needs gensim: `pip install gensim==4.4.0`, or pass --eval_text FILE")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / WIKI_FILE
    if not path.is_file():
        raise UserError(f"the embedded Wikipedia extract {path} is missing: reinstall gensim==4.4.0")
    return path


def wikipedia_corpus() -> Corpus:
    """The English Wikipedia extract shipped in the gensim wheel (CC BY-SA), markup stripped, cached."""
    cached = cache_dir() / "text" / f"enwiki-gensim-v{TEXT_VERSION}.jsonl"
    if not cached.is_file():
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki

        docs = []
        with bz2.open(_wikipedia_bz2(), "rb") as fh:
            for title, text, _pageid in extract_pages(fh):
                if text.lstrip().lower().startswith("#redirect"):
                    continue
                clean = _tidy(filter_wiki(text))
                if clean:
                    docs.append({"title": title, "text": clean})
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        os.replace(tmp, cached)
        log.info("extracted %d Wikipedia articles to %s", len(docs), cached)
    docs = [json.loads(line) for line in cached.read_text(encoding="utf-8").splitlines()]
    return Corpus(EMBEDDED_TEXT, tuple(Document(d["title"], d["text"]) for d in docs))


def _tidy(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines()]
    out: list[str] = []
    for ln in lines:
        if ln or (out and out[-1]):
            out.append(ln)
    return "\n".join(out).strip()


def pydoc_corpus() -> Corpus:
    """The standard library's pydoc topics: a zero-install English text for unit tests."""
    from pydoc_data.topics import topics

    return Corpus(PYDOC_TEXT, tuple(Document(k, v.strip()) for k, v in sorted(topics.items())))


#: a plain text needs this many documents for the split by document to be meaningful
MIN_DOCUMENTS = 10
#: the last resort for a text without enough blank-line blocks or lines: contiguous ranges of about this many characters
CHUNK_CHARS = 2000


def split_plain_text(raw: str) -> tuple[list[str], str]:
    """Documents of a plain text and the rule that found them: blank-line blocks when there are at
    least ``MIN_DOCUMENTS``, else non-empty lines when there are that many, else contiguous ranges of
    about ``CHUNK_CHARS`` characters cut at whitespace (at least ``MIN_DOCUMENTS`` of them). The same
    text always gives the same documents, so its splits stay fixed and disjoint."""
    blocks = [b.strip() for b in raw.replace("\r\n", "\n").split("\n\n") if b.strip()]
    if len(blocks) >= MIN_DOCUMENTS:
        return blocks, "blank-line separated blocks"
    lines = [ln.strip() for ln in raw.splitlines() if ln.strip()]
    if len(lines) >= MIN_DOCUMENTS:
        return lines, "one document per line"
    text = " ".join(raw.split())
    size = max(1, min(CHUNK_CHARS, len(text) // MIN_DOCUMENTS))
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind(" ", start + 1, end + 1)
            end = cut if cut > start else end
        chunk = text[start:end].strip()
        if chunk:
            chunks.append(chunk)
        start = end
    return chunks, f"contiguous ranges of about {size} characters"


def file_corpus(path: str | os.PathLike[str]) -> Corpus:
    """A local text: ``.jsonl`` (one document per line, field ``text``, optional ``title``) or plain
    text (documents by ``split_plain_text``). Prints the rule and the number of documents."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--eval_text file not found: {p}")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"--eval_text {p} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    docs: list[Document] = []
    if p.suffix == ".jsonl":
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj["text"] if "text" in obj else obj["page"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f'{p}:{lineno}: each JSONL line must be an object with a "text" field ({err})') from err
            docs.append(Document(str(obj.get("title", "")), str(text)))
        rule = "JSONL, one document per line"
    else:
        parts, rule = split_plain_text(raw)
        docs = [Document(f"#{i}" if rule.startswith("contiguous") else "", t) for i, t in enumerate(parts)]
    if not docs:
        raise UserError(f"--eval_text {p} holds no text")
    counts = {s: sum(d.split == s for d in docs) for s in SPLITS}
    # a warning, so the user sees it by default: how their file was cut into documents is worth a look
    log.warning(
        "--eval_text %s: %d documents (%s); split %s; documents per split %s",
        p,
        len(docs),
        rule,
        SPLIT_RULE,
        ", ".join(f"{s} {counts[s]}" for s in SPLITS),
    )
    return Corpus(str(p), tuple(docs))


def load_corpus(eval_text: str | None) -> Corpus:
    if eval_text in (None, "", EMBEDDED_TEXT, "wikipedia"):
        return wikipedia_corpus()
    if eval_text == PYDOC_TEXT:
        return pydoc_corpus()
    return file_corpus(str(eval_text))


# ---------------------------------------------------------------------------------------------
# Tokens and windows
# ---------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tok: Any) -> str:
    try:
        blob = tok.backend_tokenizer.to_str()
    except AttributeError:
        blob = json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:12]


def prefix_token_id(tok: Any) -> int:
    """The token each window is prefixed with: BOS, else EOS (lm_eval's choice)."""
    for tid in (tok.bos_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    raise UserError("the tokenizer has neither a BOS nor an EOS token to prefix evaluation windows with")


def token_stream(tok: Any, corpus: Corpus, split: str) -> torch.Tensor:
    """All tokens of one split (1-D int64), tokenised once and cached on disk."""
    path = cache_dir() / "tokens" / f"{corpus.fingerprint}-{tokenizer_fingerprint(tok)}-{split}-v{TEXT_VERSION}.pt"
    if path.is_file():
        return torch.load(path)
    docs = corpus.split_documents(split)
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for i, d in enumerate(docs):
        if i:
            ids.extend(sep)
        ids.extend(tok(d.text, add_special_tokens=False)["input_ids"])
    stream = torch.tensor(ids, dtype=torch.long)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(stream, tmp)
    os.replace(tmp, path)
    return stream


@dataclass(frozen=True)
class Windows:
    """Fixed evaluation windows: ``ids`` is (n, seq_len + 1), column 0 the prefix token."""

    ids: torch.Tensor
    split: str
    starts: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        """Scored tokens."""
        return self.ids.shape[0] * (self.ids.shape[1] - 1)

    @property
    def seq_len(self) -> int:
        return self.ids.shape[1] - 1


def make_windows(stream: torch.Tensor, n_tokens: int, seq_len: int, prefix_id: int, split: str = "search", what: str = "text") -> Windows:
    """``ceil(n_tokens / seq_len)`` non-overlapping windows spread evenly over ``stream``."""
    if n_tokens <= 0:
        raise UserError(f"the number of evaluation tokens must be positive, got {n_tokens}")
    if seq_len <= 0:
        raise UserError(f"the window length must be positive, got {seq_len}")
    available = stream.numel() // seq_len
    if available < 1:
        share = _SPLIT_OF_BUCKET.count(split) / len(_SPLIT_OF_BUCKET) if split in SPLITS else 1.0
        raise UserError(
            f"the {split} split of {what} has {stream.numel()} tokens, fewer than one window of {seq_len}: it gets about "
            f"{100 * share:.0f}% of the documents, so the text needs at least about {math.ceil(seq_len / share)} tokens; "
            "give a longer text or a smaller --max_seqlen"
        )
    n = math.ceil(n_tokens / seq_len)
    if n > available:
        log.warning(
            "the %s split holds only %d windows of %d tokens; using all of them (%d tokens)", split, available, seq_len, available * seq_len
        )
        n = available
    # Spread n windows evenly over the stream: window k starts at slot floor(k * available / n).
    starts = tuple((k * available // n) * seq_len for k in range(n))
    body = torch.stack([stream[s : s + seq_len] for s in starts])
    prefix = torch.full((n, 1), prefix_id, dtype=torch.long)
    return Windows(torch.cat([prefix, body], dim=1), split, starts)


def check_splits(checkpoint: str | None, eval_text: str | None, splits: tuple[str, ...], seq_len: int) -> None:
    """Before any worker starts: each of ``splits`` holds at least one window of ``seq_len`` tokens
    (a UserError saying how long the text must be otherwise). Tokens are cached for the workers."""
    tok = load_tokenizer(checkpoint)
    corpus = load_corpus(eval_text)
    for split in splits:
        make_windows(token_stream(tok, corpus, split), seq_len, seq_len, prefix_token_id(tok), split, corpus.name)


def split_windows(tok: Any, corpus: Corpus, split: str, n_tokens: int, seq_len: int) -> Windows:
    return make_windows(token_stream(tok, corpus, split), n_tokens, seq_len, prefix_token_id(tok), split, corpus.name)
