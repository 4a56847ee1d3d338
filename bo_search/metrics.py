"""Perplexity: a fast built-in path and an lm_eval path that agree (used by trials, sensitivity,
the report and the ``evaluate`` CLI)."""

from __future__ import annotations

import difflib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bo_search.data import Windows
from bo_search.model import cache_dir
from bo_search.types import Perplexity, UserError

log = logging.getLogger(__name__)


@torch.inference_mode()
def window_nll(model: Any, windows: Windows, batch_size: int = 4) -> torch.Tensor:
    """Summed next-token NLL (nats) of each window's ``seq_len`` scored tokens, float64 per window."""
    device = next(model.parameters()).device
    ids = windows.ids
    sums = torch.empty(ids.shape[0], dtype=torch.float64)
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
        sums[start : start + batch.shape[0]] = nll.view(batch.shape[0], -1).sum(dim=1).double().cpu()
    return sums


#: next-token probabilities of the full-precision model kept per scored position for the KL objective
#: (the rest of the vocabulary is one "other" bucket; see :class:`Reference`)
KL_TOP_K = 256


@dataclass(frozen=True)
class Reference:
    """The full-precision model's outputs on fixed windows, computed once per worker.

    ``nll``: mean next-token NLL per window. ``top_ids``/``top_logp``: per scored position, the ``k``
    most likely next tokens and their log-probabilities (int32 and float32: 8 bytes per entry, so
    ``n_tokens * k * 8`` bytes whatever the vocabulary; 8,192 tokens at k = 256 are 17 MB, where full
    float16 distributions would be 0.8 GB at a 49k vocabulary and 4.3 GB at 262k).

    The KL of a quantized model is measured between the two distributions coarsened to those ``k``
    tokens plus one bucket for the rest of the vocabulary. That is a lower bound of the full KL (a
    coarsening never increases it) and close to it when the top ``k`` hold most of the mass: on the
    embedded model at k = 256 it is 91-93% of the full KL, with per-window correlation above 0.997
    (BENCHMARKS.md, the KL objective)."""

    nll: torch.Tensor  # (n_windows,) float64
    top_ids: torch.Tensor  # (n_windows, seq_len, k) int32
    top_logp: torch.Tensor  # (n_windows, seq_len, k) float32

    @property
    def nbytes(self) -> int:
        return self.top_ids.numel() * 4 + self.top_logp.numel() * 4 + self.nll.numel() * 8


@dataclass(frozen=True)
class Score:
    """One model's measurement on fixed windows: mean NLL per window and, against a reference, the
    NLL increase and the KL divergence per window. Means and standard errors across windows."""

    nll_w: torch.Tensor  # (n_windows,) mean NLL per token in each window
    seq_len: int
    delta_w: torch.Tensor | None = None  # nll_w - reference nll per window
    kl_w: torch.Tensor | None = None  # mean KL(full precision || model) per token in each window

    @property
    def n_windows(self) -> int:
        return int(self.nll_w.numel())

    @property
    def perplexity(self) -> Perplexity:
        return Perplexity.from_nll(float(self.nll_w.mean()), _sem(self.nll_w), self.n_windows * self.seq_len, self.n_windows)

    @property
    def kl(self) -> float | None:
        return None if self.kl_w is None else float(self.kl_w.mean())

    @property
    def kl_sem(self) -> float | None:
        return None if self.kl_w is None else _sem(self.kl_w)

    @property
    def delta_sem(self) -> float | None:
        """Standard error of the NLL increase over full precision across windows: how much the
        plan's score would move on other text, with the text's own difficulty taken out."""
        return None if self.delta_w is None else _sem(self.delta_w)


def _sem(v: torch.Tensor) -> float:
    n = v.numel()
    return float(v.double().std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


@torch.inference_mode()
def reference(model: Any, windows: Windows, batch_size: int = 4, k: int = KL_TOP_K) -> Reference:
    """The full-precision model's per-window NLL and top-``k`` next-token log-probabilities."""
    device = next(model.parameters()).device
    ids = windows.ids
    n, t = ids.shape[0], windows.seq_len
    k = min(k, int(model.config.vocab_size) if hasattr(model, "config") else k)
    nll = torch.empty(n, dtype=torch.float64)
    top_ids = torch.empty((n, t, k), dtype=torch.int32)
    top_logp = torch.empty((n, t, k), dtype=torch.float32)
    for start in range(0, n, batch_size):
        batch = ids[start : start + batch_size].to(device)
        logp = F.log_softmax(model(input_ids=batch[:, :-1], use_cache=False).logits.float(), dim=-1)
        tok = logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
        nll[start : start + batch.shape[0]] = (-tok.double().mean(dim=1)).cpu()
        vals, idx = logp.topk(k, dim=-1)
        top_ids[start : start + batch.shape[0]] = idx.to(torch.int32).cpu()
        top_logp[start : start + batch.shape[0]] = vals.cpu()
    return Reference(nll, top_ids, top_logp)


@torch.inference_mode()
def score(model: Any, windows: Windows, batch_size: int = 4, ref: Reference | None = None) -> Score:
    """Per-window mean NLL, and with ``ref`` (the same windows' full-precision outputs) the NLL
    increase and the coarsened KL(full precision || model) per window (see :class:`Reference`)."""
    device = next(model.parameters()).device
    ids = windows.ids
    n = ids.shape[0]
    nll = torch.empty(n, dtype=torch.float64)
    kl = torch.empty(n, dtype=torch.float64) if ref is not None else None
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        batch = ids[start:stop].to(device)
        logp = F.log_softmax(model(input_ids=batch[:, :-1], use_cache=False).logits.float(), dim=-1)
        nll[start:stop] = (-logp.gather(-1, batch[:, 1:, None]).squeeze(-1).double().mean(dim=1)).cpu()
        if ref is not None and kl is not None:
            kl[start:stop] = coarse_kl(
                ref.top_logp[start:stop].to(device), logp.gather(-1, ref.top_ids[start:stop].to(device).long())
            ).cpu()
    delta = nll - ref.nll if ref is not None else None
    return Score(nll, windows.seq_len, delta, kl)


def coarse_kl(p_top: torch.Tensor, q_top: torch.Tensor) -> torch.Tensor:
    """Mean KL(p || q) per window over positions, both distributions coarsened to the top-k tokens of
    p plus one bucket for the rest. ``p_top``, ``q_top``: (windows, positions, k) log-probabilities."""
    p = p_top.double().exp()
    q = q_top.double().exp()
    p_rest = 1.0 - p.sum(-1)
    p_rest = torch.where(p_rest > 1e-6, p_rest, torch.zeros_like(p_rest))  # below: rounding residue of float32 log-probs
    q_rest = (1.0 - q.sum(-1)).clamp_min(1e-12)
    per_pos = (p * (p_top.double() - q_top.double())).sum(-1)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), torch.zeros_like(p_rest))
    return (per_pos + rest).mean(dim=-1)


def perplexity(model: Any, windows: Windows, batch_size: int = 4) -> Perplexity:
    """Token-level perplexity over fixed windows, with the standard error of the mean NLL across windows."""
    sums = window_nll(model, windows, batch_size)
    per_window = sums / windows.seq_len
    n = per_window.numel()
    nll = float(per_window.mean())
    sem = float(per_window.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return Perplexity.from_nll(nll, sem, windows.n_tokens, n)


# ---------------------------------------------------------------------------------------------
# lm_eval path
# ---------------------------------------------------------------------------------------------

LOCAL_TASK = "bo_search_text"


def windows_as_documents(tok: Any, windows: Windows) -> list[str]:
    return [tok.decode(row[1:].tolist()) for row in windows.ids]


def _hflm(model: Any, tok: Any, max_length: int, batch_size: int = 1) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length)


def lm_eval_token_perplexity(model: Any, tok: Any, windows: Windows) -> dict[str, float]:
    """Token and word perplexity of the windows' text through lm_eval's rolling log-likelihood."""
    from lm_eval.api.instance import Instance

    docs = windows_as_documents(tok, windows)
    lm = _hflm(model, tok, max_length=windows.seq_len + 1)
    reqs = [Instance(request_type="loglikelihood_rolling", doc={"page": d}, arguments=(d,), idx=i) for i, d in enumerate(docs)]
    lls = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    n_tok = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)
    n_words = sum(len(d.split()) for d in docs)
    total = -float(sum(lls))
    return {"token_perplexity": math.exp(total / n_tok), "word_perplexity": math.exp(total / n_words), "tokens": n_tok}


def _write_local_task(tok: Any, windows: Windows) -> Path:
    """A lm_eval task over the windows' text (same YAML shape as lm_eval's wikitext, no hub access)."""

    folder = (
        cache_dir()
        / "lm_eval_tasks"
        / f"{windows.split}-{windows.ids.shape[0]}x{windows.seq_len}-{abs(hash(windows.ids.numpy().tobytes())) % 10**12}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"page": d}) + "\n" for d in windows_as_documents(tok, windows)), encoding="utf-8")
    (folder / f"{LOCAL_TASK}.yaml").write_text(
        f"""task: {LOCAL_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data.resolve()))}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
        encoding="utf-8",
    )
    return folder


def lm_eval_tasks(model: Any, tok: Any, tasks: Sequence[str], windows: Windows, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm_eval tasks by name. ``bo_search_text`` is the local task over ``windows``; other names
    must be lm_eval tasks whose data is available locally."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder = _write_local_task(tok, windows)
    others = [t for t in tasks if t != LOCAL_TASK]
    tm = TaskManager(include_path=str(folder), include_defaults=bool(others))
    known = set(tm.all_tasks)
    for t in tasks:
        if t not in known:
            hint = difflib.get_close_matches(t, sorted(known), n=3)
            raise UserError(
                f"unknown lm_eval task {t!r}" + (f"; did you mean {', '.join(hint)}?" if hint else f"; the local task is {LOCAL_TASK!r}")
            )
    lm = _hflm(model, tok, max_length=windows.seq_len + 1)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, log_samples=False, verbosity="WARNING")
    except (ConnectionError, OSError) as err:
        raise UserError(f"lm_eval task data is not available offline: {err}") from err
    results: dict[str, dict[str, float]] = {}
    for name, metrics in (out or {}).get("results", {}).items():
        results[name] = {k.split(",")[0]: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
    return results
