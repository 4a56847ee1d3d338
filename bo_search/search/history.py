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
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bo_search.cli import check_output_path
from bo_search.types import QuantPlan, UserError

FORMAT_VERSION = "bo_search.history/3"
#: formats this code reads; /1 lacks the goal and limit columns, /2 the KL, noise and validation
#: columns; both are upgraded in place on resume (rows kept as they were, new columns empty)
READABLE_FORMATS = ("bo_search.history/1", "bo_search.history/2", FORMAT_VERSION)
#: rows of these formats measured ``ppl_heldout`` on the test split before the validation split was
#: carved out of it (half of the text then, 30% now): not comparable with today's held-out numbers
OLD_TEST_SPLIT_FORMATS = ("bo_search.history/1", "bo_search.history/2")
#: ``rescored``: a finalist re-measured on the validation split when a search ended (not a trial: its
#: ``trial_index`` is the trial whose plan it is, or -1 for a plan no trial evaluated)
STATUSES = ("completed", "failed", "infeasible", "abandoned", "rescored")
TRIAL_STATUSES = STATUSES[:4]


@dataclass
class HistoryRow:
    trial_index: int
    status: str  # completed | failed | infeasible (over the size limit: never evaluated) | abandoned | rescored
    source: str  # seed | thompson | sobol | bo | repaired | random; rescored rows: that trial's source, or uniform
    reason: str = ""  # why a trial failed or was not evaluated; for a rescored row, its role (finalist, best seed, ...)
    cal_PPL: float | None = None  # perplexity on the search split
    cal_PPL_sem: float | None = None  # its standard error across the search windows (mostly the text's own spread)
    nll: float | None = None
    #: standard error across the search windows of the NLL increase over full precision: the noise of
    #: this plan's score as an estimate of its damage on other text
    nll_delta_sem: float | None = None
    kl: float | None = None  # mean KL(full precision || plan) per token on the search split, nats
    kl_sem: float | None = None
    model_size: float | None = None  # GB = 1e9 bytes
    avg_bits: float | None = None
    cal_throughput: float | None = None  # tokens/s (measured or predicted, see throughput_kind)
    cal_throughput_sem: float | None = None
    throughput_kind: str = ""
    ppl_heldout: float | None = None  # perplexity on the test split (final numbers only)
    ppl_heldout_sem: float | None = None
    val_PPL: float | None = None  # rescored rows: perplexity on the validation split
    val_nll_delta_sem: float | None = None
    val_kl: float | None = None
    val_kl_sem: float | None = None
    val_tokens: int | None = None  # scored tokens of the validation measurement
    quantize_s: float | None = None
    evaluate_s: float | None = None
    proposal_s: float | None = None
    worker_id: str = ""
    timestamp: float = field(default_factory=time.time)
    search: str = ""  # modelsize | throughput | pareto
    model_id: str = ""
    space_id: str = ""
    quantizer: str = ""  # how the affine codes were chosen (--quantizer); "" = written before it was recorded: rtn
    goal: str = ""  # e.g. "min nll s.t. model_size_gb <= limit"
    limit_metric: str = ""  # model_size_gb | ppl | "" (Pareto: none)
    limit: float | None = None  # the limit in force when the row was written (GB or perplexity)
    format: str = FORMAT_VERSION
    quant_config: str = "{}"  # the plan as QuantPlan JSON (last: it is long)

    @property
    def plan(self) -> QuantPlan:
        return QuantPlan.loads(self.quant_config)


COLUMNS = [f.name for f in fields(HistoryRow)]
_FLOATS = {f.name for f in fields(HistoryRow) if "float" in str(f.type)}
_OPTIONAL_INTS = {f.name for f in fields(HistoryRow) if str(f.type) == "int | None"}
_REQUIRED = {"trial_index", "status", "quant_config"}


class HistoryWriter:
    """Appends rows to the CSV; each row is flushed and fsynced before ``append`` returns."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        check_output_path(self.path)
        if not new:
            upgrade_header(self.path)
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


def upgrade_header(path: Path) -> bool:
    """Rewrite a history whose header is not today's columns (an older format) with today's header,
    every row kept as it was (new columns empty): temp file, fsync, rename. True if it was rewritten."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        if list(header) == COLUMNS:
            return False
        unknown = [h for h in header if h not in COLUMNS]
        if unknown:
            raise UserError(f"history {path} has a column this version does not know ({unknown[0]!r}); it was written by a newer bo_search")
        rows = list(reader)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (r.get(k) or "") for k in COLUMNS})
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    print(f"history {path}: upgraded to {FORMAT_VERSION} (new columns added, empty for the old rows; rows unchanged)", flush=True)
    return True


class HistoryLock:
    """One writer per history: ``HISTORY.lock`` holds the writer's process id; a second search
    refuses with the holder's pid; a lock left by a dead process is taken over."""

    def __init__(self, history: str | os.PathLike[str]):
        self.path = Path(str(history) + ".lock")
        self.held = False

    def acquire(self) -> HistoryLock:
        import atexit

        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = _lock_pid(self.path)
                if pid is not None and _alive(pid):
                    raise UserError(
                        f"history {self.path.with_suffix('')} is in use by another search (process {pid}, lock {self.path}); "
                        "wait for it to finish or use another --history_output"
                    ) from None
                self.path.unlink(missing_ok=True)  # its holder is gone: recover it
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            self.held = True
            atexit.register(self.release)
            return self
        raise UserError(f"cannot take the lock {self.path}; remove it if no search is running")

    def release(self) -> None:
        if self.held and _lock_pid(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


def _lock_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LoadedHistory:
    rows: list[HistoryRow]
    skipped: list[tuple[int, str]]  # (line number, reason)


def read_history(path: str | os.PathLike[str], strict: bool = True, repair_tail: bool = False) -> LoadedHistory:
    """Read a history CSV. ``strict``: a corrupt row is a UserError naming its line (for resume);
    otherwise corrupt rows are skipped and listed (for reports).

    ``repair_tail`` (resume): a corrupt *last* record is a row cut off mid-write by a killed search.
    It is moved to a side file (``HISTORY.torn-N``, never overwriting one) with a one-line warning,
    the file keeps every complete row (rewritten atomically), and the trial runs again. A corrupt
    row anywhere else is still an error."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"history file not found: {p}")
    if repair_tail:
        _set_aside_torn_tail(p)
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


def _set_aside_torn_tail(p: Path) -> None:
    with open(p, newline="", encoding="utf-8") as fh:
        text = fh.read()
    lines = text.splitlines(keepends=True)
    reader = csv.DictReader(lines)
    if not reader.fieldnames:
        return
    records: list[tuple[Mapping[str, str | None], int]] = []  # (row, physical line it ends on)
    for raw in reader:
        records.append((raw, reader.line_num))
    if not records:
        return
    for rec, _ in records[:-1]:
        try:
            _parse_row(rec)
        except (ValueError, TypeError, KeyError, UserError):
            return  # a corrupt row in the middle: read_history reports it
    try:
        _parse_row(records[-1][0])
        torn = False
    except (ValueError, TypeError, KeyError, UserError):
        torn = True
    if not torn:
        if not text.endswith("\n"):  # an intact last row whose newline was cut off
            with open(p, "a", encoding="utf-8") as fh:
                fh.write("\n")
        return
    start = records[-2][1] if len(records) > 1 else 1  # the torn record begins after this line
    fragment, kept = "".join(lines[start:]), "".join(lines[:start])
    n = 1
    while p.with_name(f"{p.name}.torn-{n}").exists():
        n += 1
    side = p.with_name(f"{p.name}.torn-{n}")
    side.write_text(fragment, encoding="utf-8")
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        fh.write(kept)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)
    print(
        f"warning: history {p}: its last row was cut off mid-write (the search was killed); set aside in {side}, that trial runs again",
        file=sys.stderr,
        flush=True,
    )


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
        elif name in _OPTIONAL_INTS:
            kwargs[name] = int(val) if val != "" else None
        elif name in _FLOATS:
            kwargs[name] = float(val) if val != "" else None
            if kwargs[name] is not None and math.isnan(kwargs[name]):
                kwargs[name] = None
        else:
            kwargs[name] = val
    row = HistoryRow(**kwargs)
    if row.status not in STATUSES:
        raise ValueError(f"unknown status {row.status!r}")
    if row.format and row.format not in READABLE_FORMATS:
        raise ValueError(f"written by an unsupported version ({row.format})")
    row.plan  # noqa: B018  (validates the JSON)
    if row.status == "completed" and (row.model_size is None or (row.cal_PPL is None and row.cal_throughput is None)):
        raise ValueError("a completed row without its metrics")
    return row


def update_rows(path: Path, match: Callable[[Mapping[str, str]], bool], values: Mapping[str, Any]) -> int:
    """Set ``values`` in every row ``match`` accepts (e.g. a measured held-out perplexity): rewritten
    to a temp file, fsynced, renamed. Returns the number of rows changed."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    n = 0
    for r in rows:
        if match(r):
            r.update({k: ("" if v is None else repr(v) if isinstance(v, float) else str(v)) for k, v in values.items()})
            n += 1
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return n


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
