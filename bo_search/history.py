"""The CSV history: one row per trial, appended, flushed and fsynced as each trial ends; read back
for resume and reports; Pareto front.

Columns keep the original tool's metric names (``cal_PPL``, ``model_size``, ``cal_throughput``) and
add ours. The plan is one JSON column, ``quant_config`` (never a Python repr).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bo_search.types import QuantPlan, UserError

FORMAT_VERSION = "bo_search.history/1"
STATUSES = ("completed", "failed", "infeasible", "abandoned")


@dataclass
class HistoryRow:
    trial_index: int
    status: str  # completed | failed | infeasible (over the size limit: never evaluated) | abandoned
    source: str  # seed | sobol | bo | baseline
    reason: str = ""
    cal_PPL: float | None = None  # perplexity on the search split
    cal_PPL_sem: float | None = None
    nll: float | None = None
    model_size: float | None = None  # GB = 1e9 bytes
    avg_bits: float | None = None
    cal_throughput: float | None = None  # tokens/s (measured or predicted, see throughput_kind)
    cal_throughput_sem: float | None = None
    throughput_kind: str = ""
    ppl_heldout: float | None = None
    quantize_s: float | None = None
    evaluate_s: float | None = None
    proposal_s: float | None = None
    worker_id: str = ""
    timestamp: float = field(default_factory=time.time)
    search: str = ""  # modelsize | throughput | pareto
    model_id: str = ""
    space_id: str = ""
    format: str = FORMAT_VERSION
    quant_config: str = "{}"  # the plan as QuantPlan JSON (last: it is long)

    @property
    def plan(self) -> QuantPlan:
        return QuantPlan.loads(self.quant_config)


COLUMNS = [f.name for f in fields(HistoryRow)]
_FLOATS = {f.name for f in fields(HistoryRow) if "float" in str(f.type)}
_REQUIRED = {"trial_index", "status", "quant_config"}


class HistoryWriter:
    """Appends rows to the CSV; each row is flushed and fsynced before ``append`` returns."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        from bo_search.cli import check_output_path

        check_output_path(self.path)
        self._fh = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115  (kept open for the search)
        self._writer = csv.DictWriter(self._fh, fieldnames=COLUMNS)
        if new:
            self._writer.writeheader()
            self._sync()

    def append(self, row: HistoryRow) -> None:
        self._writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
        self._sync()

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


@dataclass(frozen=True)
class LoadedHistory:
    rows: list[HistoryRow]
    skipped: list[tuple[int, str]]  # (line number, reason)


def read_history(path: str | os.PathLike[str], strict: bool = True) -> LoadedHistory:
    """Read a history CSV. ``strict``: a corrupt row is a UserError naming its line (for resume);
    otherwise corrupt rows are skipped and listed (for reports)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"history file not found: {p}")
    rows: list[HistoryRow] = []
    skipped: list[tuple[int, str]] = []
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        if not header:
            raise UserError(f"history {p} is empty")
        missing = _REQUIRED - set(header)
        if missing:
            raise UserError(
                f"history {p} is not a bo_search history (no column {sorted(missing)[0]!r}); "
                "histories of the original torchao tool hold Python reprs and cannot be resumed: start a new --history_output"
            )
        for raw in reader:
            line = reader.line_num
            try:
                rows.append(_parse_row(raw))
            except (ValueError, TypeError, KeyError, UserError) as err:
                msg = f"history {p} line {line} is corrupt ({err})"
                if strict:
                    raise UserError(msg + "; fix or delete that line, or start a new --history_output") from None
                skipped.append((line, str(err)))
    return LoadedHistory(rows, skipped)


def _parse_row(raw: Mapping[str, str | None]) -> HistoryRow:
    if None in raw:  # more fields than the header: a truncated or merged line
        raise ValueError("extra fields")
    kwargs: dict[str, Any] = {}
    for name in COLUMNS:
        val = raw.get(name)
        if val is None:
            if name in _REQUIRED:
                raise ValueError(f"missing {name}")
            continue
        if name == "trial_index":
            kwargs[name] = int(val)
        elif name in _FLOATS:
            kwargs[name] = float(val) if val != "" else None
            if kwargs[name] is not None and math.isnan(kwargs[name]):
                kwargs[name] = None
        else:
            kwargs[name] = val
    row = HistoryRow(**kwargs)
    if row.status not in STATUSES:
        raise ValueError(f"unknown status {row.status!r}")
    if row.format and row.format != FORMAT_VERSION:
        raise ValueError(f"written by an unsupported version ({row.format})")
    row.plan  # noqa: B018  (validates the JSON)
    if row.status == "completed" and (row.model_size is None or (row.cal_PPL is None and row.cal_throughput is None)):
        raise ValueError("a completed row without its metrics")
    return row


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when minimising both coordinates, sorted by the first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best_y = math.inf
    for i in order:
        if points[i][1] < best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def completed(rows: Iterable[HistoryRow]) -> list[HistoryRow]:
    return [r for r in rows if r.status == "completed"]


def to_json_line(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
