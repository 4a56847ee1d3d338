"""The analysis of a search history, with no model needed: best plan under the limit, Pareto
front, timing, hypervolume."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from bo_search.budget import SizeLimit
from bo_search.search.history import OLD_TEST_SPLIT_FORMATS, HistoryRow, LoadedHistory, pareto_front, read_history
from bo_search.search.metric_registry import val_score
from bo_search.types import UserError

SEARCH_KINDS = ("modelsize", "throughput", "pareto")


#: relative difference between the history's perplexity and the report's re-measurement that means
#: the report evaluates with other settings than the search did
CONSISTENCY_TOLERANCE = 2e-3


@dataclass(frozen=True)
class ReportOptions:
    """What to report and export."""

    out_dir: Path
    trial: int | None = None  # trial to export; None = the best feasible
    evaluate: bool = True  # measure baselines and missing held-out perplexities with a model
    size_limit: float | None = None  # GB; None = recorded in the history, else inferred
    ppl_limit: float | None = None  # perplexity limit of a throughput search
    baselines: tuple[str, ...] | None = None  # uniform specs ("fp", "4:64", ...); None = derived from the space
    save_checkpoint: bool = False
    torchao_device: str = "cpu"
    gguf: Path | None = None  # write the exported trial as this GGUF (a ggml plan on a GGUF checkpoint)
    force: bool = False  # overwrite an existing --gguf file

    def __post_init__(self) -> None:
        if self.size_limit is not None and not self.size_limit > 0:
            raise UserError(f"--model_size_constraint must be positive, got {self.size_limit}")
        if self.ppl_limit is not None and not self.ppl_limit > 1:
            raise UserError(f"--ppl_limit must be above 1 (a perplexity), got {self.ppl_limit}")
        if self.torchao_device not in ("cpu", "cuda"):
            raise UserError(f"--torchao_device {self.torchao_device!r}: use cpu or cuda")
        if self.trial is not None and self.trial < 0:
            raise UserError(f"--trial must be a trial index (0 or more), got {self.trial}")


@dataclass(frozen=True)
class Limit:
    """The search's constraint: exact when given or recorded, else a bracket inferred from the history."""

    value: float | None = None
    low: float | None = None  # inferred: the largest evaluated size (it fit) ...
    high: float | None = None  # ... and the smallest proposal refused as over the limit
    source: str = ""

    @property
    def known(self) -> bool:
        return self.value is not None

    def holds_size(self, gb: float | None) -> bool:
        """A size limit's rule for a recorded size (``SizeLimit.holds``, shared with the search)."""
        return self.value is not None and SizeLimit(self.value).holds(gb)


@dataclass(frozen=True)
class Timing:
    span_s: float  # first trial start to last row, from timestamps
    pauses: int  # gaps between rows far longer than a trial (a resumed search)
    paused_s: float
    evaluation_s: float  # quantize + evaluate, summed over evaluated trials (all workers)
    proposal_s: float  # summed over every proposal

    @property
    def active_s(self) -> float:
        return self.span_s - self.paused_s

    @property
    def proposal_share(self) -> float | None:
        return self.proposal_s / self.evaluation_s if self.evaluation_s > 0 else None


@dataclass
class Analysis:
    """Everything the report says that follows from the CSV alone."""

    path: Path
    rows: list[HistoryRow]
    skipped: list[tuple[int, str]]
    search: str
    model_id: str
    space_id: str
    completed: list[HistoryRow]
    failed: list[HistoryRow]
    infeasible: list[HistoryRow]
    abandoned: list[HistoryRow]
    limit: Limit
    feasible: list[HistoryRow]
    best: HistoryRow | None
    best_why: str
    front: list[HistoryRow]
    timing: Timing | None
    group_sizes: tuple[int, ...]
    symmetric: bool
    notes: list[str] = field(default_factory=list)
    #: finalists re-scored on the validation split when the search ended (status ``rescored``)
    rescored: list[HistoryRow] = field(default_factory=list)

    @property
    def by_throughput(self) -> bool:
        return self.search == "throughput"

    def row(self, trial: int) -> HistoryRow | None:
        rows = [r for r in self.rows if r.trial_index == trial]
        done = [r for r in rows if r.status == "completed"]
        if done:
            return done[0]
        return rows[0] if rows else None


def load_history(path: str | Path) -> LoadedHistory:
    """Read a history for reporting: corrupt rows are skipped and listed; nothing valid is an error."""
    loaded = read_history(path, strict=False)
    if not loaded.rows:
        if loaded.skipped:
            line, why = loaded.skipped[0]
            raise UserError(f"history {path} has no readable trial: all {len(loaded.skipped)} row(s) are unreadable (line {line}: {why})")
        raise UserError(f"history {path} holds no trials (only a header): nothing to report yet")
    return loaded


def analyse(loaded: LoadedHistory, path: str | Path, opts: ReportOptions) -> Analysis:
    rows = loaded.rows
    notes: list[str] = []
    search = _search_kind(rows, notes)
    models = Counter(r.model_id for r in rows if r.model_id)
    model_id = models.most_common(1)[0][0] if models else ""
    if len(models) > 1:
        notes.append(f"the history holds trials of {len(models)} different models {sorted(models)}")
    spaces = Counter(r.space_id for r in rows if r.space_id)
    space_id = spaces.most_common(1)[0][0] if spaces else ""

    completed = [r for r in rows if r.status == "completed"]
    failed = [r for r in rows if r.status == "failed"]
    infeasible = [r for r in rows if r.status == "infeasible"]
    abandoned = [r for r in rows if r.status == "abandoned"]
    with_ppl = [r for r in completed if r.cal_PPL is not None]
    if len(with_ppl) < len(completed):
        notes.append(f"{len(completed) - len(with_ppl)} completed trial(s) have no perplexity and are not plotted")
    old = [r for r in completed if r.ppl_heldout is not None and r.format in OLD_TEST_SPLIT_FORMATS]
    if old:
        notes.append(
            f"{len(old)} held-out perplexities in this history were measured on the test split as it was before the validation "
            "split was carved out of it (history format /1-/2): not shown as held-out numbers; the report measures them again "
            "when it evaluates"
        )

    rescored = [r for r in rows if r.status == "rescored"]
    if search == "throughput":
        limit, feasible, best, best_why, front = _by_throughput(rows, with_ppl, opts)
    else:
        limit, feasible, best, best_why, front = _by_size(rows, completed, infeasible, with_ppl, search, opts)
        if search == "modelsize" and opts.trial is None:
            best, best_why = _validation_pick(rescored, completed, limit, best, best_why)
    group_sizes: set[int] = set()
    sym: set[bool] = set()
    for r in rows:
        for lq in r.plan.values():
            if lq.is_quantized:
                group_sizes.add(lq.group_size)
                sym.add(lq.symmetric)
    return Analysis(
        path=Path(path),
        rows=rows,
        skipped=list(loaded.skipped),
        search=search,
        model_id=model_id,
        space_id=space_id,
        completed=completed,
        failed=failed,
        infeasible=infeasible,
        abandoned=abandoned,
        limit=limit,
        feasible=feasible,
        best=best,
        best_why=best_why,
        front=front,
        timing=search_timing(rows),
        group_sizes=tuple(sorted(group_sizes, key=lambda g: (g == -1, g))),
        symmetric=sym == {True},
        notes=notes,
        rescored=rescored,
    )


def _search_kind(rows: Sequence[HistoryRow], notes: list[str]) -> str:
    kinds = Counter(r.search for r in rows if r.search)
    if kinds:
        search = kinds.most_common(1)[0][0]
        if len(kinds) > 1:
            notes.append(f"the history mixes search kinds {dict(kinds)}; reported as {search}")
    else:
        search = "throughput" if any(r.cal_throughput is not None for r in rows) else "modelsize"
    if search not in SEARCH_KINDS:
        notes.append(f"unknown search kind {search!r}: reported like a model-size search")
        search = "modelsize"
    return search


class _Choice(NamedTuple):
    """What a search kind makes of its trials: the limit, the trials within it, the best one and why, the front."""

    limit: Limit
    feasible: list[HistoryRow]
    best: HistoryRow | None
    best_why: str
    front: list[HistoryRow]


def _by_throughput(rows: Sequence[HistoryRow], with_ppl: list[HistoryRow], opts: ReportOptions) -> _Choice:
    """Limit, feasible trials, the best one and why, the front: highest throughput under the perplexity limit."""
    limit = _ppl_limit(rows, opts)
    measured = [r for r in with_ppl if r.cal_throughput is not None]
    feasible = [r for r in measured if limit.value is None or (r.cal_PPL or math.inf) <= limit.value]
    best = max(feasible, key=lambda r: r.cal_throughput or -math.inf) if feasible else None
    best_why = "highest throughput" + (
        f" with perplexity <= {limit.value:.4g}" if limit.known else " (perplexity limit unknown: pass --ppl_limit)"
    )
    pts = [(-(r.cal_throughput or 0.0), r.cal_PPL or math.inf) for r in measured]
    front = [measured[i] for i in pareto_front(pts)]
    front.sort(key=lambda r: r.cal_throughput or 0.0)
    return _Choice(limit, feasible, best, best_why, front)


def _by_size(
    rows: Sequence[HistoryRow],
    completed: list[HistoryRow],
    infeasible: list[HistoryRow],
    with_ppl: list[HistoryRow],
    search: str,
    opts: ReportOptions,
) -> _Choice:
    """The same for a size (or Pareto) search: lowest perplexity within the size limit."""
    limit = _size_limit(rows, completed, infeasible, search, opts)
    if limit.known:
        feasible = [r for r in with_ppl if limit.holds_size(r.model_size)]
    else:
        feasible = list(with_ppl)  # a size search evaluates only plans under its limit
    best = min(feasible, key=lambda r: r.cal_PPL or math.inf) if feasible else None
    if search == "pareto" and not limit.known:
        best_why = "lowest perplexity of any size (no size limit: pass --model_size_constraint GB to choose under a budget)"
    else:
        best_why = "lowest perplexity" + (
            f" within {limit.value:.6g} GB" if limit.known else " among evaluated trials (all fit the search's limit)"
        )
    pts = [(r.model_size or 0.0, r.cal_PPL or math.inf) for r in with_ppl]
    front = [with_ppl[i] for i in pareto_front(pts)]
    return _Choice(limit, feasible, best, best_why, front)


def objective_of(rows: Sequence[HistoryRow]) -> str:
    """The search's objective as its rows record it ("min kl s.t. ..." -> kl; nll otherwise)."""
    goals = Counter(r.goal.split()[1] for r in rows if r.goal.startswith("min ") and len(r.goal.split()) > 1)
    return goals.most_common(1)[0][0] if goals else "nll"


def _validation_pick(
    rescored: list[HistoryRow], completed: list[HistoryRow], limit: Limit, best: HistoryRow | None, best_why: str
) -> tuple[HistoryRow | None, str]:
    """The search's final pick: among the finalists re-scored on the validation split (the latest
    validation size, within the limit), the best by the search's objective. Reported as its trial's
    row (or the rescored row of a uniform plan no trial evaluated)."""
    if not rescored:
        return best, best_why
    latest = max(rescored, key=lambda r: r.timestamp).val_tokens
    cands = [r for r in rescored if r.val_tokens == latest and (not limit.known or limit.holds_size(r.model_size or 0.0))]
    if not cands:
        return best, best_why
    objective = objective_of(rescored)
    pick = min(cands, key=lambda r: val_score(r, objective))
    trial = next((r for r in completed if r.trial_index == pick.trial_index and r.plan == pick.plan), None)
    why = f"best by validation {objective} ({latest:,} tokens) among the {len(cands)} finalists re-scored when the search ended"
    return trial or pick, why


def _recorded_limit(rows: Sequence[HistoryRow]) -> float | None:
    """The limit recorded in the history: the one in force for its latest row (a search continued
    with --change_limit records the new limit on the rows written after the change)."""
    latest = max((r for r in rows if r.limit is not None), key=lambda r: r.timestamp, default=None)
    return latest.limit if latest is not None else None


def _size_limit(
    rows: Sequence[HistoryRow], completed: Sequence[HistoryRow], infeasible: Sequence[HistoryRow], search: str, opts: ReportOptions
) -> Limit:
    if opts.size_limit is not None:
        return Limit(value=opts.size_limit, source="--model_size_constraint")
    if search == "modelsize":
        recorded = _recorded_limit(rows)
        if recorded is not None:
            return Limit(value=recorded, source="history")
        fit = [r.model_size for r in completed if r.model_size is not None]
        over = [r.model_size for r in infeasible if r.model_size is not None]
        if fit and over and min(over) > max(fit):
            return Limit(low=max(fit), high=min(over), source="inferred")
    return Limit()


def _ppl_limit(rows: Sequence[HistoryRow], opts: ReportOptions) -> Limit:
    if opts.ppl_limit is not None:
        return Limit(value=opts.ppl_limit, source="--ppl_limit")
    recorded = _recorded_limit(rows)
    return Limit(value=recorded, source="history") if recorded is not None else Limit()


def search_timing(rows: Sequence[HistoryRow]) -> Timing | None:
    """Wall time from the first trial's start to the last row; pauses (a killed and resumed search)
    are gaps between consecutive rows longer than max(300 s, 10 x the median trial time)."""
    if not rows:
        return None
    durations = [(r.quantize_s or 0.0) + (r.evaluate_s or 0.0) for r in rows if r.status in ("completed", "failed")]
    starts = [r.timestamp - (r.quantize_s or 0.0) - (r.evaluate_s or 0.0) - (r.proposal_s or 0.0) for r in rows]
    stamps = sorted(r.timestamp for r in rows)
    span = max(stamps) - min(starts + stamps)
    typical = statistics.median(durations) if durations else 0.0
    threshold = max(300.0, 10 * typical)
    gaps = [b - a for a, b in zip(stamps, stamps[1:]) if b - a > threshold]
    return Timing(
        span_s=max(0.0, span),
        pauses=len(gaps),
        paused_s=sum(g - typical for g in gaps),
        evaluation_s=sum(durations),
        proposal_s=sum(r.proposal_s or 0.0 for r in rows),
    )


def choose_export_row(an: Analysis, trial: int | None) -> HistoryRow | None:
    """The trial to export: ``trial`` if given (it must have completed), else the best feasible."""
    if trial is None:
        return an.best
    row = an.row(trial)
    if row is None:
        indices = sorted({r.trial_index for r in an.rows})
        raise UserError(
            f"--trial {trial}: no such trial in {an.path.name} (it holds trials {indices[0]}..{indices[-1]}"
            + (f"; the best feasible is {an.best.trial_index})" if an.best else ")")
        )
    if row.status != "completed":
        what = {
            "failed": f"failed ({row.reason or 'no reason recorded'})",
            "infeasible": "was over the size limit and never evaluated",
            "abandoned": "was abandoned when the search stopped",
        }.get(row.status, row.status)
        raise UserError(
            f"--trial {trial} {what}; choose a completed trial" + (f", e.g. the best feasible {an.best.trial_index}" if an.best else "")
        )
    return row


def hypervolume_2d(points: Sequence[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both coordinates minimised) and bounded by ``ref``."""
    front = sorted(points[i] for i in pareto_front(points))
    area = 0.0
    prev_y = ref[1]
    for x, y in front:
        if x >= ref[0] or y >= prev_y:
            continue
        area += (ref[0] - x) * (prev_y - y)
        prev_y = y
    return area
