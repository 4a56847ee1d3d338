"""Any reasonable local text splits into calibration/search/test documents: blank-line blocks,
else lines, else contiguous ranges; JSONL by line. Splits are disjoint and fixed."""

import json
import logging

import pytest

from bo_search.data import SPLITS, file_corpus, split_plain_text, split_windows
from bo_search.types import UserError


def _sentences(n):
    from pydoc_data.topics import topics

    text = " ".join(v.replace("\n", " ") for _, v in sorted(topics.items()))
    words = text.split()
    return [" ".join(words[i * 40 : (i + 1) * 40]) for i in range(n)]


def _warned(caplog):
    """The split note as the user sees it: a warning of bo_search.data (setup_logging shows bo_search's
    warnings on stderr; its info lines only with --verbose)."""
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "bo_search.data" and r.levelno >= logging.WARNING)


def _check(path, rule_word, n_docs=None):
    c = file_corpus(str(path))
    again = file_corpus(str(path))
    assert [d.text for d in c.documents] == [d.text for d in again.documents]  # fixed for the same file
    assert [d.split for d in c.documents] == [d.split for d in again.documents]
    parts = {s: c.split_documents(s) for s in SPLITS}
    assert all(parts[s] for s in SPLITS), {s: len(v) for s, v in parts.items()}  # every split has documents
    assert sum(len(v) for v in parts.values()) == len(c.documents)  # disjoint and complete
    if n_docs is not None:
        assert len(c.documents) == n_docs
    return c


def test_one_document_per_line(tmp_path, caplog):
    p = tmp_path / "lines.txt"
    p.write_text("\n".join(_sentences(60)) + "\n")
    _check(p, "line", 60)
    assert "60 documents (one document per line)" in _warned(caplog)


def test_blank_line_blocks(tmp_path, caplog):
    p = tmp_path / "blocks.txt"
    sents = _sentences(120)
    p.write_text("\n\n".join("\n".join(sents[3 * i : 3 * i + 3]) for i in range(40)))
    _check(p, "blank", 40)
    assert "(blank-line separated blocks)" in _warned(caplog)


def test_single_document_falls_back_to_contiguous_ranges(tmp_path, caplog):
    p = tmp_path / "book.txt"
    p.write_text(" ".join(_sentences(200)))
    c = _check(p, "contiguous")
    assert "contiguous ranges" in _warned(caplog)
    # the ranges tile the text in order
    assert " ".join(d.text for d in c.documents) == " ".join(p.read_text().split())


def test_jsonl(tmp_path, caplog):
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps({"title": f"t{i}", "text": s}) + "\n" for i, s in enumerate(_sentences(40))))
    _check(p, "JSONL", 40)
    assert "JSONL" in _warned(caplog)


def test_rules_in_order():
    assert split_plain_text("a\n\nb")[1].startswith("contiguous")  # 2 blocks, 2 lines: too few
    assert split_plain_text("\n".join(f"line {i}" for i in range(12)))[1] == "one document per line"
    assert split_plain_text("\n\n".join(f"block {i}" for i in range(12)))[1] == "blank-line separated blocks"


def test_too_short_text_says_how_many_tokens(tmp_path, tiny_ctx):
    p = tmp_path / "short.txt"
    p.write_text("just a few words here and there")
    with pytest.raises(UserError, match=r"needs at least about \d+ tokens") as err:
        split_windows(tiny_ctx.tok, file_corpus(str(p)), "search", 64, 64)
    assert "\n" not in str(err.value)
