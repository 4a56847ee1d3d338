"""Perplexity: a fast built-in path and an lm_eval path that agree (used by trials, sensitivity,
the report and the ``evaluate`` CLI)."""

from __future__ import annotations

import difflib
import json
import logging
import math
from collections.abc import Sequence
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
