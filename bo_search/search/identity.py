"""What a history's numbers depend on beyond the model's name and the parameter space: the content of
the weights and the evaluation settings. Both are recorded on every row (``weights_id``,
``eval_settings``) and checked when a search resumes, so that one history never mixes perplexities
that cannot be compared.

- Other weights (same names and shapes, other values: a retrained checkpoint): refused.
- Another text, number of search tokens, window length or quantizer (``--eval_text``,
  ``--eval_tokens``, ``--max_seqlen``, ``--mse_clip``, ``--quantizer``): refused; the same plan
  scores differently.
- Another compute dtype (``--compute_dtype``, or ``auto`` resolving differently, e.g. GPU workers then
  CPU ones): continued only with ``--change_compute_dtype``; the numbers differ slightly and each row
  records its dtype.
- Rows written before these columns existed are taken as matching, with a one-line note.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bo_search.types import UserError

if TYPE_CHECKING:
    from bo_search.model import CheckpointRef
    from bo_search.search.history import HistoryRow
    from bo_search.trial import EvalConfig

#: recorded settings, in the order messages list them; each is the flag of the same name
EVAL_KEYS = ("eval_text", "eval_tokens", "max_seqlen", "mse_clip", "quantizer", "compute_dtype")
#: a setting's value in rows written before it was recorded (rows before --quantizer rounded plainly)
RECORDED_BEFORE = {"quantizer": "rtn"}
#: settings a history may change with consent (the numbers stay comparable, if not identical)
CONSENT_FLAGS = {"compute_dtype": "--change_compute_dtype"}
#: test-only, read as the worker pool reads it (bo_search.search.workers.TEST_GPU_AS_CPU_ENV)
_GPU_AS_CPU_ENV = "BO_SEARCH_TEST_GPU_AS_CPU"


def text_id(eval_text: str | None) -> str:
    """``NAME@CONTENT``: the text's name and a hash of its content (a local file: of its bytes)."""
    from bo_search.data import EMBEDDED_TEXT, PYDOC_TEXT, load_corpus

    if eval_text in (None, "", EMBEDDED_TEXT, "wikipedia", PYDOC_TEXT):
        corpus = load_corpus(eval_text)
        return f"{corpus.name}@{corpus.fingerprint}"
    p = Path(str(eval_text)).expanduser()
    try:
        digest = hashlib.sha1(p.read_bytes()).hexdigest()[:12]
    except OSError as err:
        raise UserError(f"--eval_text {p}: cannot read it ({err.strerror or err})") from None
    return f"{p.name}@{digest}"


def worker_compute_dtype(cfg: EvalConfig, on_gpu: bool) -> str:
    """The dtype the workers will compute in: ``--compute_dtype``, ``auto`` resolved for the device the
    pool gives them (``cuda:0`` for GPU workers, else ``cpu``)."""
    device = "cuda:0" if on_gpu and not os.environ.get(_GPU_AS_CPU_ENV) else "cpu"
    return str(dataclasses.replace(cfg, device=device).torch_dtype).removeprefix("torch.")


def eval_settings(cfg: EvalConfig, on_gpu: bool) -> dict[str, Any]:
    return {
        "eval_text": text_id(cfg.eval_text),
        "eval_tokens": cfg.eval_tokens,
        "max_seqlen": cfg.max_seqlen,
        "mse_clip": bool(cfg.mse_clip),
        "quantizer": cfg.quantizer,
        "compute_dtype": worker_compute_dtype(cfg, on_gpu),
    }


def row_fields(ref: CheckpointRef, settings: dict[str, Any]) -> dict[str, str]:
    """The two history columns of every row this run writes."""
    return {"weights_id": ref.weights_id, "eval_settings": json.dumps(settings, sort_keys=True, separators=(",", ":"))}


def recorded_quantizer(row: HistoryRow) -> str:
    """The ``--quantizer`` a row was scored with (``rtn`` for rows from before it was recorded)."""
    return str(_recorded(row).get("quantizer", RECORDED_BEFORE["quantizer"]))


def _recorded(row: HistoryRow) -> dict[str, Any]:
    if not row.eval_settings:
        return {}
    try:
        obj = json.loads(row.eval_settings)
    except ValueError:
        raise UserError(
            f"history row of trial {row.trial_index}: eval_settings is not JSON ({row.eval_settings[:60]!r}); fix that cell"
        ) from None
    return obj if isinstance(obj, dict) else {}


def _same(key: str, old: Any, new: Any) -> bool:
    if key == "eval_text":  # the content decides, not where the file lies now
        return str(old).rpartition("@")[2] == str(new).rpartition("@")[2]
    return bool(old == new)


def _flag_value(key: str, value: Any) -> str:
    if key == "mse_clip":
        return "--mse_clip" if value else "no --mse_clip"
    if key == "eval_text":
        return f"--eval_text {str(value).rpartition('@')[0]} (content {str(value).rpartition('@')[2]})"
    return f"--{key} {value}"


def check_history(path: Path, rows: Sequence[HistoryRow], ref: CheckpointRef, settings: dict[str, Any], args: Any) -> None:
    """Refuse (UserError, one line) a history written on other weights or under other evaluation
    settings; a changed compute dtype needs ``--change_compute_dtype``. Prints one note when rows
    predate these columns."""
    unknown = 0
    for r in rows:
        if not r.weights_id or not r.eval_settings:
            unknown += 1
        if r.weights_id and r.weights_id != ref.weights_id:
            raise UserError(
                f"history {path} trial {r.trial_index} was evaluated on other weights (content {r.weights_id}; {ref.name} now has "
                f"{ref.weights_id}: same names and sizes, other values); its numbers do not apply: use a new --history_output"
            )
        rec = _recorded(r)
        if rec:
            rec = {**RECORDED_BEFORE, **rec}
        for key in EVAL_KEYS:
            if key in CONSENT_FLAGS or key not in rec or _same(key, rec[key], settings[key]):
                continue
            raise UserError(
                f"history {path} trial {r.trial_index} was scored with {_flag_value(key, rec[key])}, this run with "
                f"{_flag_value(key, settings[key])}: the same plan scores differently, so they cannot share a search; "
                f"pass {_flag_value(key, rec[key])} or use a new --history_output"
            )
    for key, flag in CONSENT_FLAGS.items():
        _check_consent(path, rows, settings, key, flag, bool(getattr(args, flag.removeprefix("--"), False)))
    if unknown:
        print(
            f"note: history {path}: {unknown} row(s) were written before weights and evaluation settings were recorded; "
            "they are taken to match this run",
            flush=True,
        )


def _check_consent(path: Path, rows: Sequence[HistoryRow], settings: dict[str, Any], key: str, flag: str, consent: bool) -> None:
    """The latest row that records ``key`` decides (as --change_limit does for the limit)."""
    for r in reversed(rows):
        rec = _recorded(r)
        if key not in rec:
            continue
        if not _same(key, rec[key], settings[key]) and not consent:
            raise UserError(
                f"history {path} was evaluated with {_flag_value(key, rec[key])} (trial {r.trial_index}), this run with "
                f"{_flag_value(key, settings[key])}: perplexities differ slightly; pass {_flag_value(key, rec[key])}, add {flag} "
                "to continue in the new one (recorded per row), or use a new --history_output"
            )
        return
