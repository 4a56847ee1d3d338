"""The CSV history: one row per trial, appended, flushed and fsynced as each trial ends; read back
for resume and reports; Pareto front.

Columns keep the original tool's metric names (``cal_PPL``, ``model_size``, ``cal_throughput``) and
add ours. The plan is one JSON column, ``quant_config`` (never a Python repr).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from bo_search.cli import check_output_path
from bo_search.search.lock import HistoryLock  # noqa: F401  (imported from here by the runner and tests)
from bo_search.types import QuantPlan, UserError

log = logging.getLogger(__name__)

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
    #: who proposed the plan: ``seed`` (``--initial_samples``), ``random`` (a random plan within the size
    #: limit, when Ax's model has no data to fit yet), ``repaired`` (an over-limit proposal moved to the
    #: nearest fitting plan), or the Ax generation node's name in lower case: ``thompson``, ``sobol``,
    #: ``bo`` (``?`` if Ax names none);
    #: a rescored row: its trial's source, or ``uniform`` for a uniform plan no trial evaluated
    source: str
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
    weights_id: str = ""  # content fingerprint of the weight files ("" = not recorded: an older history)
    eval_settings: str = ""  # JSON: the settings perplexities depend on (see search/identity.py; "" = not recorded)
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
#: the csv module's default field limit (131,072 characters) is a plan of about 1,650 layers
_FIELD_LIMIT = 2**31 - 1


def _allow_long_fields() -> None:
    if csv.field_size_limit() < _FIELD_LIMIT:
        csv.field_size_limit(_FIELD_LIMIT)


class HistoryWriter:
    """Appends rows to the CSV; each row is flushed and fsynced before ``append`` returns."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        check_output_path(self.path)
        self._fh: Any = None
        try:
            with _write_errors(self.path):
                if not new:
                    upgrade_header(self.path)
                self._fh = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115  (kept open for the search)
                self._writer = csv.DictWriter(self._fh, fieldnames=COLUMNS)
                if new:
                    self._writer.writeheader()
                    self._sync()
        except UserError:
            if self._fh is not None:
                with contextlib.suppress(OSError):
                    self._fh.close()  # its buffered header cannot be written either; the file is closed anyway
            raise

    def append(self, row: HistoryRow) -> None:
        with _write_errors(self.path):
            self._writer.writerow({k: ("" if v is None else v) for k, v in asdict(row).items()})
            self._sync()

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the file; a failing close (the last flush on a full disk) is a UserError, after the
        file handle is released."""
        try:
            self._fh.close()
        except OSError as err:
            raise UserError(_write_error_text(self.path, err)) from None


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """An OSError while writing the history (disk full, read-only, quota) -> one-line UserError."""
    try:
        yield
    except OSError as err:
        raise UserError(_write_error_text(path, err)) from None


def _write_error_text(path: Path, err: OSError) -> str:
    return (
        f"cannot write the history {path} ({err.strerror or err}); every row written before is kept: "
        "free space or fix the permissions, then run the same command to resume"
    )


def check_writable(path: Path) -> None:
    """A one-line UserError now, before any work, when the history could not be written later: an
    existing file is opened for appending (nothing is written), a new one's directory is checked."""
    try:
        if path.exists():
            with open(path, "a", encoding="utf-8"):
                pass
        elif not os.access(path.parent, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as err:
        raise UserError(
            f"cannot write the history {path} ({err.strerror or err}); pick another --history_output or fix its permissions"
        ) from None


def upgrade_header(path: Path) -> bool:
    """Rewrite a history whose header is not today's columns (an older format) with today's header,
    every row kept as it was (new columns empty): temp file, fsync, rename. True if it was rewritten."""
    _allow_long_fields()
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        if list(header) == COLUMNS:
            return False
        _refuse_unknown_columns(path, header)
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
    added = [c for c in COLUMNS if c not in header]
    log.warning("history %s: upgraded to %s (column(s) %s added; rows unchanged)", path, FORMAT_VERSION, ", ".join(added))
    return True


def _refuse_unknown_columns(path: Path, header: Sequence[str]) -> None:
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise UserError(f"history {path} has a column this version does not know ({unknown[0]!r}); it was written by a newer bo_search")


@dataclass(frozen=True)
class LoadedHistory:
    rows: list[HistoryRow]
    skipped: list[tuple[int, str]]  # (line number, reason)


def read_history(path: str | os.PathLike[str], strict: bool = True, repair_tail: bool = False) -> LoadedHistory:
    """Read a history CSV. ``strict``: a corrupt row is a UserError naming its line (for resume);
    otherwise corrupt rows are skipped and listed (for reports).

    ``repair_tail`` (resume, the history's writer): a last line without its newline that does not
    parse is a row cut off mid-write by a killed search. It is moved to a side file
    (``HISTORY.torn-N``, never overwriting one) with a one-line warning, the file keeps every
    complete row (rewritten atomically), and the trial runs again. Nothing is written before the
    header says the file is a bo_search history; a corrupt row anywhere else, the last complete
    line included, is an error and the file is left as it is."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"history file not found: {p}")
    _allow_long_fields()
    _check_header(p, writer=repair_tail)
    if repair_tail:
        _set_aside_torn_tail(p)
    rows: list[HistoryRow] = []
    skipped: list[tuple[int, str]] = []
    with open(p, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        try:
            for raw in reader:
                line = reader.line_num
                try:
                    rows.append(_parse_row(raw))
                except (ValueError, TypeError, KeyError, UserError) as err:
                    msg = f"history {p} line {line} is corrupt ({err})"
                    if strict:
                        raise UserError(msg + "; fix or delete that line, or start a new --history_output") from None
                    skipped.append((line, str(err)))
        except (csv.Error, UnicodeDecodeError) as err:
            raise UserError(
                f"history {p} cannot be read as CSV after line {reader.line_num} ({err}); start a new --history_output"
            ) from None
    return LoadedHistory(rows, skipped)


def _check_header(p: Path, writer: bool) -> list[str]:
    """The header row, checked before anything else touches the file: a UserError when the file is
    not UTF-8 text, empty, or not a bo_search history (``writer``: nor one with columns unknown to
    this version, which the writer would have to rewrite)."""
    try:
        with open(p, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
    except UnicodeDecodeError as err:
        raise UserError(
            f"history {p} is not a bo_search history (not UTF-8 text: {err.reason} at byte {err.start}); use a new --history_output"
        ) from None
    except csv.Error as err:
        raise UserError(f"history {p} is not a bo_search history (its first line is not CSV: {err}); use a new --history_output") from None
    if not header:
        raise UserError(f"history {p} is empty")
    missing = _REQUIRED - set(header)
    if missing:
        raise UserError(
            f"history {p} is not a bo_search history (no column {sorted(missing)[0]!r}); "
            "histories of the original torchao tool hold Python reprs and cannot be resumed: start a new --history_output"
        )
    if writer:
        _refuse_unknown_columns(p, header)
    return header


def _set_aside_torn_tail(p: Path) -> None:
    """See ``read_history``: only a last line without its newline can be torn (a cut may split a
    UTF-8 character: the bytes are kept as they are)."""
    with open(p, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        text = fh.read()
    if text.endswith("\n"):
        return  # every line is complete: a corrupt one is corruption, reported by read_history
    lines = text.splitlines(keepends=True)
    reader = csv.DictReader(lines)
    records: list[tuple[Mapping[str, str | None], int]] = []  # (row, physical line it ends on)
    try:
        for raw in reader:
            records.append((raw, reader.line_num))
    except csv.Error:
        return  # read_history reports it
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
    if not torn:  # an intact last row whose newline was cut off
        with open(p, "a", encoding="utf-8") as fh:
            fh.write("\n")
        return
    start = records[-2][1] if len(records) > 1 else 1  # the torn record begins after this line
    fragment, kept = "".join(lines[start:]), "".join(lines[:start])
    n = 1
    while p.with_name(f"{p.name}.torn-{n}").exists():
        n += 1
    side = p.with_name(f"{p.name}.torn-{n}")
    side.write_bytes(fragment.encode("utf-8", errors="surrogateescape"))
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write(kept)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)
    log.warning("history %s: its last row was cut off mid-write (the search was killed); set aside in %s, that trial runs again", p, side)


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
