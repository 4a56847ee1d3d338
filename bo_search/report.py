"""``python -m bo_search.report HISTORY.csv``: what a finished (or interrupted) search is worth.

Writes, into ``--out`` (default ``HISTORY_report/``):

- ``tradeoff.png``: every completed trial, perplexity against model size (against throughput for
  throughput searches), the Pareto front, the seeds marked, the size limit, the best feasible plan,
  and uniform baselines (full precision, int8, int4, int3 at the space's group sizes) measured with the
  same evaluator; failed trials are left out and counted in the title;
- ``progress.png``: best feasible perplexity so far (throughput for throughput searches, front
  hypervolume for unconstrained Pareto searches) against trial number;
- ``report.md``: best feasible plan, Pareto table, baselines table, held-out perplexity of the best plan
  and of every Pareto point (computed when the history lacks it), failures, search time, proposal share;
- ``export_trial_N/``: the chosen trial (``--trial``, default the best feasible) as a plan JSON for
  ``bo_search.evaluate --config``, a torchao ``FqnToConfig``, llama.cpp ``--tensor-type`` arguments,
  and with ``--save_checkpoint`` a packed checkpoint that ``bo_search.export.load_quantized`` loads.

By default the report renders from the history alone, in seconds: the seeds' uniform plans stand in
for baselines, held-out perplexities are the ones the search recorded. ``--evaluate`` loads the model
and measures uniform baselines and missing held-out perplexities; those evaluations are cached in
``eval_cache.json`` keyed by the plan and the evaluation settings, so a second report costs seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bo_search.history import HistoryRow, LoadedHistory, pareto_front, read_history
from bo_search.types import LayerQuant, QuantPlan, UserError

log = logging.getLogger(__name__)

SEARCH_KINDS = ("modelsize", "throughput", "pareto")
#: source -> (marker, colour, legend label)
SOURCE_STYLE: dict[str, tuple[str, str, str]] = {
    "seed": ("D", "tab:orange", "seed"),
    "sobol": ("s", "tab:green", "Sobol"),
    "bo": ("o", "tab:blue", "BO proposal"),
    "repaired": ("^", "tab:purple", "BO proposal repaired to fit"),
    "random": ("v", "tab:brown", "random feasible fallback"),
}
OTHER_STYLE = ("x", "tab:gray", "other")
CACHE_NAME = "eval_cache.json"
CACHE_VERSION = 1
#: relative difference between the history's perplexity and the report's re-measurement that means
#: the report evaluates with other settings than the search did
CONSISTENCY_TOLERANCE = 2e-3


# ---------------------------------------------------------------------------------------------
# Options and the analysis of a history (no model needed)
# ---------------------------------------------------------------------------------------------


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

    if search == "throughput":
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
    else:
        limit = _size_limit(rows, completed, infeasible, search, opts)
        if limit.known:
            feasible = [r for r in with_ppl if r.model_size is not None and r.model_size <= (limit.value or 0.0) * (1 + 1e-9)]
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
    )


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


# ---------------------------------------------------------------------------------------------
# Model evaluations, cached
# ---------------------------------------------------------------------------------------------


class EvalCache:
    """Measurements keyed by plan and evaluation settings, in one JSON file written after each entry."""

    def __init__(self, path: Path, settings: dict[str, Any]):
        self.path = path
        self.settings = settings
        self.signature = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.entries: dict[str, Any] = {}
        self.hits = 0
        self.misses = 0
        self.written = 0
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
                    self.entries = data["entries"]
            except (OSError, json.JSONDecodeError) as err:
                log.warning("ignoring unreadable cache %s (%s)", path, err)

    def _key(self, kind: str, plan: QuantPlan) -> str:
        return f"{kind}:{hashlib.sha1((self.signature + plan.dumps()).encode()).hexdigest()[:24]}"

    def get(self, kind: str, plan: QuantPlan) -> Any:
        entry = self.entries.get(self._key(kind, plan))
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        return entry["value"]

    def put(self, kind: str, plan: QuantPlan, value: Any) -> None:
        from bo_search.cli import write_json

        self.entries[self._key(kind, plan)] = {"settings": self.signature, "value": value}
        self.written += 1
        write_json(self.path, {"version": CACHE_VERSION, "settings": {self.signature: self.settings}, "entries": self.entries})


def eval_settings(ctx: Any) -> dict[str, Any]:
    """What a measured number depends on (not batch size or device)."""
    return {
        "model": ctx.ref.fingerprint,
        **ctx.eval_description(),
        "mse_clip": ctx.scheme.mse_clip,
        "include_lm_head": ctx.cfg.include_lm_head,
    }


@dataclass(frozen=True)
class Baseline:
    """A uniform plan measured by the report."""

    setting: LayerQuant
    spec: str
    model_size_gb: float
    avg_bits: float
    ppl: float
    ppl_heldout: float | None

    @property
    def family(self) -> str:
        """Full precision ("fp") or the integer width, e.g. "int4"."""
        return f"int{self.setting.bits}" if self.setting.is_quantized else "fp"

    @property
    def grouping(self) -> str:
        """Group size and mapping, e.g. "g64" or "gch/sym"; empty for full precision."""
        lq = self.setting
        if not lq.is_quantized:
            return ""
        return f"g{lq.group_size if lq.group_size > 0 else 'ch'}" + ("/sym" if lq.symmetric else "")

    @property
    def short(self) -> str:
        return f"{self.family} {self.grouping}".strip()

    @property
    def label(self) -> str:
        return "full precision" if not self.setting.is_quantized else f"uniform {self.short}"


@dataclass
class Evaluation:
    """What the report measured with a model (or took from the cache)."""

    settings: dict[str, Any]
    baselines: list[Baseline] = field(default_factory=list)
    skipped_baselines: list[str] = field(default_factory=list)
    heldout: dict[int, float] = field(default_factory=dict)  # trial -> held-out perplexity
    heldout_source: dict[int, str] = field(default_factory=dict)  # "history" | "measured"
    check: tuple[int, float, float] | None = None  # (trial, history cal_PPL, re-measured)
    seconds: float = 0.0
    cache_hits: int = 0
    measured: int = 0

    @property
    def consistent(self) -> bool:
        return self.check is None or abs(self.check[2] / self.check[1] - 1) <= CONSISTENCY_TOLERANCE


def _measure(ctx: Any, cache: EvalCache, plan: QuantPlan, heldout: bool) -> dict[str, Any]:
    hit = cache.get("measure", plan)
    want_heldout = heldout and ctx.heldout_windows is not None
    if hit is not None and (not want_heldout or hit.get("ppl_heldout") is not None):
        return dict(hit)
    row = ctx.measure(plan, heldout=want_heldout)
    keep = {k: row[k] for k in ("model_size_gb", "avg_bits", "ppl", "ppl_sem", "nll", "ppl_heldout")}
    cache.put("measure", plan, keep)
    return keep


def _heldout(ctx: Any, cache: EvalCache, plan: QuantPlan) -> float | None:
    from bo_search.evaluate import perplexity

    if ctx.heldout_windows is None:
        return None
    for kind in ("measure", "heldout"):
        hit = cache.get(kind, plan)
        if hit is not None:
            value = hit.get("ppl_heldout") if kind == "measure" else hit
            if value is not None:
                return float(value)
    ctx.applier.apply(plan)
    try:
        value = perplexity(ctx.model, ctx.heldout_windows, ctx.cfg.batch_size).ppl
    finally:
        ctx.applier.restore()
    cache.put("heldout", plan, value)
    return value


def baseline_specs(an: Analysis, specs: Sequence[str] | None) -> list[str]:
    """Full precision, then int8, int4 and int3 at every group size the history's plans use."""
    if specs is not None:
        return list(specs)
    sym = ":sym" if an.symmetric else ""
    groups = an.group_sizes or (-1,)
    return ["fp"] + [f"{b}:{g}{sym}" for b in (8, 4, 3) for g in groups]


def _check_plan(ctx: Any, plan: QuantPlan, what: str) -> None:
    try:
        ctx.applier.check(plan)
    except UserError as err:
        hint = (
            " (was the search run with --include_lm_head or another --checkpoint? pass the search's model flags)"
            if "unknown layer" in str(err)
            else ""
        )
        raise UserError(f"{what}: {err}{hint}") from None


def evaluate(an: Analysis, ctx: Any, out_dir: Path, specs: Sequence[str] | None, export_row: HistoryRow | None) -> Evaluation:
    """Baselines, the consistency check and every missing held-out perplexity, through the cache."""
    from bo_search import cli
    from bo_search.quant import uniform_plan

    t0 = time.perf_counter()
    settings = eval_settings(ctx)
    cache = EvalCache(out_dir / CACHE_NAME, settings)
    ev = Evaluation(settings=settings)
    trials: list[HistoryRow] = []
    for r in ([an.best] if an.best else []) + an.front + ([export_row] if export_row else []):
        if r is not None and r.trial_index not in {t.trial_index for t in trials}:
            trials.append(r)
    for r in trials:
        _check_plan(ctx, r.plan, f"trial {r.trial_index} of {an.path.name}")
    jobs: list[tuple[str, Any]] = []
    if an.best is not None and an.best.cal_PPL is not None:
        jobs.append(("check", an.best))
    jobs += [("heldout", r) for r in trials]
    for spec in baseline_specs(an, specs):
        lq = cli.parse_uniform(spec)
        plan = uniform_plan(ctx.layers, lq)
        try:
            ctx.applier.check(plan)
        except UserError as err:
            ev.skipped_baselines.append(f"{spec}: {err}")
            continue
        jobs.append(("baseline", (spec, lq, plan)))
    for kind, item in cli.progress(jobs, desc="report evaluations"):
        if kind == "check":
            m = _measure(ctx, cache, item.plan, heldout=item.ppl_heldout is None)
            ev.check = (item.trial_index, float(item.cal_PPL), float(m["ppl"]))
            if m.get("ppl_heldout") is not None and item.ppl_heldout is None:
                ev.heldout[item.trial_index] = float(m["ppl_heldout"])
                ev.heldout_source[item.trial_index] = "measured"
        elif kind == "heldout":
            if item.ppl_heldout is not None:
                ev.heldout[item.trial_index] = item.ppl_heldout
                ev.heldout_source[item.trial_index] = "history"
            elif item.trial_index not in ev.heldout:
                value = _heldout(ctx, cache, item.plan)
                if value is not None:
                    ev.heldout[item.trial_index] = value
                    ev.heldout_source[item.trial_index] = "measured"
        else:
            spec, lq, plan = item
            m = _measure(ctx, cache, plan, heldout=True)
            ev.baselines.append(Baseline(lq, spec, float(m["model_size_gb"]), float(m["avg_bits"]), float(m["ppl"]), m.get("ppl_heldout")))
    ev.cache_hits = cache.hits
    ev.measured = cache.written
    ev.seconds = time.perf_counter() - t0
    if not ev.consistent and ev.check is not None:
        log.warning(
            "trial %d: perplexity %.4f in the history but %.4f re-measured: the report evaluates with other settings than the search",
            *ev.check,
        )
    return ev


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _style(source: str) -> tuple[str, str, str]:
    return SOURCE_STYLE.get(source, OTHER_STYLE)


def _fmt_gb(v: float) -> str:
    return f"{v:.4g} GB"


def _annotate(ax: Any, x: float, y: float, text: str, color: str, dx: float, dy: float, fontsize: float) -> Any:
    leader = {"arrowstyle": "-", "lw": 0.5, "color": color, "shrinkA": 0, "shrinkB": 4} if abs(dy) > 10 else None
    return ax.annotate(
        text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, color=color,
        ha="left" if dx > 0 else "right", va="bottom", zorder=6, arrowprops=leader,
        bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75},
    )  # fmt: skip


def _place_labels(
    ax: Any,
    items: list[tuple[float, float, str, str]],
    obstacles: Sequence[tuple[float, float]] = (),
    vlines: Sequence[float] = (),
    fontsize: float = 7.5,
) -> None:
    """Annotate points without overlapping text: for each label try offsets (nearest first) and keep
    the first whose box is inside the axes and clear of the labels already placed, of the plotted
    points (``obstacles``) and of vertical lines at ``vlines``; if none is clear, the offset with the
    least overlap. Labels far from their point get a thin leader line."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    r = 5.0 * fig.dpi / 72  # about a marker's radius, in pixels
    blocked: list[Any] = []
    for px, py in ax.transData.transform(list(obstacles)) if obstacles else []:
        blocked.append(Bbox([[px - r, py - r], [px + r, py + r]]))
    for x in vlines:
        px = ax.transData.transform((x, ax.get_ylim()[0]))[0]
        blocked.append(Bbox([[px - 1, axbox.y0], [px + 1, axbox.y1]]))
    offsets = [(dx, dy) for dy in (4, -11, 14, -21, 24, -31, 34, -41, 46, -53, 58, -65, 72, -79) for dx in (6, -6)]

    def overlap(a: Any, b: Any) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    for x, y, text, color in items:
        best: tuple[float, tuple[int, int]] | None = None
        for dx, dy in offsets:
            ann = _annotate(ax, x, y, text, color, dx, dy, fontsize)
            box = ann.get_window_extent(renderer)
            ann.remove()
            outside = max(0.0, axbox.x0 - box.x0) + max(0.0, box.x1 - axbox.x1) + max(0.0, axbox.y0 - box.y0) + max(0.0, box.y1 - axbox.y1)
            score = sum(overlap(box, b) for b in blocked) + 1e4 * outside
            if best is None or score < best[0]:
                best = (score, (dx, dy))
            if score == 0:
                break
        assert best is not None
        ann = _annotate(ax, x, y, text, color, *best[1], fontsize)
        blocked.append(ann.get_window_extent(renderer))


def _edge_groups(items: Sequence[Baseline], rel: float = 0.03) -> list[list[Baseline]]:
    """Baselines pinned to the same edge, grouped when their perplexities are within ``rel``."""
    groups: list[list[Baseline]] = []
    for b in sorted(items, key=lambda b: b.ppl):
        if groups and b.ppl <= groups[-1][0].ppl * (1 + rel):
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def _edge_label(group: Sequence[Baseline]) -> str:
    parts: dict[str, list[str]] = {}  # "int8" -> ["g32", "g64"]; "fp" -> [""]
    for b in sorted(group, key=lambda b: b.model_size_gb):
        parts.setdefault(b.family, []).append(b.grouping)
    names = ", ".join(fam + (" " + "/".join(g for g in gs if g) if any(gs) else "") for fam, gs in parts.items())
    lo, hi = min(b.model_size_gb for b in group), max(b.model_size_gb for b in group)
    size = f"{lo:.4g} GB" if lo == hi else f"{lo:.4g}-{hi:.4g} GB"
    p_lo, p_hi = min(b.ppl for b in group), max(b.ppl for b in group)
    ppl = f"{p_lo:.4g}" if f"{p_lo:.4g}" == f"{p_hi:.4g}" else f"{p_lo:.4g}-{p_hi:.4g}"
    return f"{names}:\n{size}, ppl {ppl}"


def _limits(values: Sequence[float], pad: float = 0.08) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = hi - lo if hi > lo else max(abs(hi) * 0.05, 1e-9)
    return lo - pad * span, hi + pad * span


def plot_tradeoff(an: Analysis, ev: Evaluation | None, path: Path) -> Path:
    """Perplexity against size (or throughput) of every completed trial, front, limit, baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = an.by_throughput
    pts = [r for r in an.completed if r.cal_PPL is not None and (r.cal_throughput if thr else r.model_size) is not None]

    def xval(r: HistoryRow) -> float:
        return float((r.cal_throughput if thr else r.model_size) or 0.0)

    fig, ax = plt.subplots(figsize=(11, 6.2), dpi=130)
    baselines = list(ev.baselines) if ev is not None else []
    ys = [float(r.cal_PPL or 0.0) for r in pts] + [b.ppl for b in baselines]
    if not pts:
        ax.text(0.5, 0.5, "no completed trial to plot", transform=ax.transAxes, ha="center", va="center", fontsize=12)
    log_y = bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 4
    if log_y:
        ax.set_yscale("log")

    # trials by source (seeds first so BO points are drawn on top)
    order = ["seed", "sobol", "random", "repaired", "bo"]
    sources = sorted({r.source for r in pts}, key=lambda s: order.index(s) if s in order else len(order))
    for src in sources:
        group = [r for r in pts if r.source == src]
        marker, color, label = _style(src)
        ax.scatter(
            [xval(r) for r in group], [float(r.cal_PPL or 0.0) for r in group], marker=marker, s=46 if src == "seed" else 34,
            c=color, edgecolors="black" if src == "seed" else None, linewidths=0.6, alpha=0.9, zorder=3,
            label=f"{label} ({len(group)})",
        )  # fmt: skip

    # Pareto front
    if len(an.front) >= 1:
        fx = [xval(r) for r in an.front]
        fy = [float(r.cal_PPL or 0.0) for r in an.front]
        ax.step(
            fx,
            fy,
            where="pre" if thr else "post",
            color="black",
            lw=1.2,
            alpha=0.8,
            zorder=2,
            label=f"Pareto front ({len(an.front)} trials)",
        )
        ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="black", linewidths=1.0, zorder=4)

    # best feasible
    if an.best is not None and an.best in pts:
        top = an.best
        what = f"{top.cal_throughput:.1f} tok/s" if thr else _fmt_gb(float(top.model_size or 0.0))
        ax.scatter([xval(top)], [float(top.cal_PPL or 0.0)], marker="*", s=320, c="gold", edgecolors="black", linewidths=0.9, zorder=5,
                   label=f"best feasible: trial {top.trial_index}, ppl {top.cal_PPL:.2f} at {what}")  # fmt: skip

    # x range from the trials (and the limit); baselines far outside are pinned to the edge
    xs = [xval(r) for r in pts]
    lim = an.limit
    if not thr:
        xs += [v for v in (lim.value, lim.low, lim.high) if v is not None]
    if xs:
        core_lo, core_hi = min(xs), max(xs)
        span = core_hi - core_lo if core_hi > core_lo else max(core_hi * 0.05, 1e-9)
        reach = (core_lo - 1.5 * span, core_hi + 1.5 * span)
    else:
        reach = (-math.inf, math.inf)

    labels: list[tuple[float, float, str, str]] = []
    if baselines and not thr:
        near = [b for b in baselines if reach[0] <= b.model_size_gb <= reach[1]]
        far = [b for b in baselines if b not in near]
        all_x = xs + [b.model_size_gb for b in near]
        x_lo, x_hi = _limits(all_x) if all_x else (0.0, 1.0)
        ax.scatter(
            [b.model_size_gb for b in near],
            [b.ppl for b in near],
            marker="X",
            s=70,
            c="black",
            zorder=4,
            label="uniform baseline (same evaluator)",
        )
        for b in near:
            labels.append((b.model_size_gb, b.ppl, b.short, "black"))
        if far:
            right = [b for b in far if b.model_size_gb > reach[1]]
            left = [b for b in far if b.model_size_gb < reach[0]]
            if right:
                ax.scatter([x_hi] * len(right), [b.ppl for b in right], marker=">", s=60, c="dimgray", zorder=4, clip_on=False,
                           label="baseline beyond the right edge (size in label)")  # fmt: skip
                for grp in _edge_groups(right):
                    labels.append((x_hi, grp[0].ppl, _edge_label(grp), "dimgray"))
            if left:
                ax.scatter([x_lo] * len(left), [b.ppl for b in left], marker="<", s=60, c="dimgray", zorder=4, clip_on=False,
                           label="baseline beyond the left edge (size in label)")  # fmt: skip
                for grp in _edge_groups(left):
                    labels.append((x_lo, grp[0].ppl, _edge_label(grp), "dimgray"))
        ax.set_xlim(x_lo, x_hi)
    elif xs:
        ax.set_xlim(*_limits(xs))
    if baselines and thr:
        for b in baselines:
            ax.axhline(b.ppl, color="dimgray", lw=0.8, ls=":", zorder=1)
            labels.append((ax.get_xlim()[0], b.ppl, f"{b.short}: ppl {b.ppl:.2f}", "dimgray"))

    # limit
    if thr and lim.known:
        ax.axhline(float(lim.value or 0.0), color="tab:red", ls="--", lw=1.2, zorder=1, label=f"perplexity limit {lim.value:.4g}")
    elif not thr and lim.known:
        ax.axvline(
            float(lim.value or 0.0), color="tab:red", ls="--", lw=1.2, zorder=1, label=f"size limit {float(lim.value or 0.0):.6g} GB"
        )
    elif not thr and lim.low is not None and lim.high is not None:
        ax.axvspan(lim.low, lim.high, color="tab:red", alpha=0.15, lw=0, zorder=0,
                   label=f"size limit (inferred: {lim.low:.5g}-{lim.high:.5g} GB)")  # fmt: skip

    if thr:
        kind = {r.throughput_kind for r in pts if r.throughput_kind}
        ax.set_xlabel("throughput (tokens/s" + (f", {'/'.join(sorted(kind))}" if kind else "") + ")")
    else:
        ax.set_xlabel("model size (GB = 10^9 bytes: packed codes + scales + zero points + unquantized tensors)")
        _bits_axis(ax, an)
    ax.set_ylabel("perplexity on the search split" + (" (log scale)" if log_y else ""))
    if log_y:
        _log_axis(ax.yaxis, ys)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    not_shown = len(an.failed) + len(an.abandoned)
    title = f"{an.path.name}: {len(pts)} completed trials ({an.search} search)"
    sub = [
        f"{len(an.failed)} failed" + (f", {len(an.abandoned)} abandoned" if an.abandoned else "") + " (not shown)"
        if not_shown
        else "no failed trials"
    ]
    if an.infeasible:
        sub.append(f"{len(an.infeasible)} proposal{'s' if len(an.infeasible) > 1 else ''} over the limit, never evaluated")
    if an.skipped:
        sub.append(f"{len(an.skipped)} corrupt rows skipped")
    ax.set_title(title + "\n" + "; ".join(sub), fontsize=10, pad=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, borderaxespad=0.0)
    fig.tight_layout()
    if labels:
        obstacles = [(xval(r), float(r.cal_PPL or 0.0)) for r in pts] + [(x, y) for x, y, _t, _c in labels]
        vlines = [lim.value] if lim.known and not thr else []
        _place_labels(ax, labels, obstacles, [float(v) for v in vlines if v is not None])
    fig.savefig(path)
    plt.close(fig)
    return path


def _log_axis(axis: Any, values: Sequence[float]) -> None:
    """Plain numbers on a log axis; minor ticks labelled too when the range spans few decades."""
    from matplotlib.ticker import FuncFormatter

    decades = math.log10(max(values) / min(values)) if values and min(values) > 0 else 3.0
    mantissas = (2, 3, 4, 5, 6, 7, 8, 9) if decades < 1.3 else (2, 3, 5) if decades < 2.5 else ()

    def minor(v: float, _pos: Any) -> str:
        if v <= 0:
            return ""
        mant = v / 10 ** math.floor(math.log10(v))
        return f"{v:g}" if any(abs(mant - m) < 1e-6 for m in mantissas) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def _bits_axis(ax: Any, an: Analysis) -> None:
    """A top axis in average bits per quantized weight (size is affine in it: one line through the rows)."""
    pairs = sorted({(r.model_size, r.avg_bits) for r in an.rows if r.model_size is not None and r.avg_bits is not None})
    if len(pairs) < 2 or pairs[-1][0] == pairs[0][0]:
        return
    (s0, b0), (s1, b1) = pairs[0], pairs[-1]
    slope = (b1 - b0) / (s1 - s0)
    if slope <= 0 or any(abs(b0 + slope * (s - s0) - b) > 0.02 for s, b in pairs):
        return
    top = ax.secondary_xaxis("top", functions=(lambda s: b0 + slope * (s - s0), lambda b: s0 + (b - b0) / slope))
    top.set_xlabel("average bits per quantized weight (scales and zero points included)", fontsize=9)


def plot_progress(an: Analysis, ev: Evaluation | None, path: Path) -> Path:
    """Best feasible value so far against trial number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = an.by_throughput
    evaluated = sorted((r for r in an.completed if r.cal_PPL is not None), key=lambda r: r.trial_index)
    feasible = {r.trial_index for r in an.feasible}
    fig, ax = plt.subplots(figsize=(9, 5), dpi=130)
    hv_mode = an.search == "pareto" and not an.limit.known
    if not evaluated:
        ax.text(0.5, 0.5, "no completed trial", transform=ax.transAxes, ha="center", va="center", fontsize=12)
    elif hv_mode:
        sizes = [float(r.model_size or 0.0) for r in evaluated]
        logs = [math.log(float(r.cal_PPL or 1.0)) for r in evaluated]
        ref = (max(sizes) * 1.001, max(logs) * 1.001 if max(logs) > 0 else 1.0)
        hv = [hypervolume_2d(list(zip(sizes[: i + 1], logs[: i + 1])), ref) for i in range(len(evaluated))]
        ax.step([r.trial_index for r in evaluated], hv, where="post", color="black", lw=1.5, label="front hypervolume so far")
        ax.set_ylabel("hypervolume (GB x log perplexity, reference = worst seen)")
    else:
        value = [float((r.cal_throughput if thr else r.cal_PPL) or 0.0) for r in evaluated]
        order = ["seed", "sobol", "random", "repaired", "bo"]
        for src in sorted({r.source for r in evaluated}, key=lambda s: order.index(s) if s in order else len(order)):
            marker, color, label = _style(src)
            idx = [i for i, r in enumerate(evaluated) if r.source == src]
            ax.scatter([evaluated[i].trial_index for i in idx], [value[i] for i in idx], marker=marker, c=color, s=30, alpha=0.75,
                       edgecolors="black" if src == "seed" else None, linewidths=0.5, label=f"{label} ({len(idx)})", zorder=3)  # fmt: skip
        best_x, best_y = [], []
        cur: float | None = None
        for r, v in zip(evaluated, value):
            if r.trial_index in feasible and v > 0 and (cur is None or (v > cur if thr else v < cur)):
                cur = float(v)
            if cur is not None:
                best_x.append(r.trial_index)
                best_y.append(cur)
        if best_x:
            ax.step(best_x, best_y, where="post", color="black", lw=1.6, zorder=4, label=f"best feasible so far ({best_y[-1]:.4g})")
        if ev is not None and not thr:
            fits = [b for b in ev.baselines if an.limit.known and b.model_size_gb <= (an.limit.value or 0.0)] or (
                [b for b in ev.baselines if an.best is not None and b.model_size_gb <= (an.best.model_size or 0.0) * 1.0001]
            )
            if fits:
                ub = min(fits, key=lambda b: b.ppl)
                ax.axhline(
                    ub.ppl,
                    color="tab:red",
                    ls="--",
                    lw=1.0,
                    label=f"best uniform baseline that fits: {ub.short} ({ub.ppl:.4g})",
                )
        vals = [v for v in value if v is not None]
        if not thr and vals and min(vals) > 0 and max(vals) / min(vals) > 4:
            ax.set_yscale("log")
            _log_axis(ax.yaxis, vals)
        ax.set_ylabel(
            "throughput (tokens/s)" if thr else "perplexity on the search split" + (" (log scale)" if ax.get_yscale() == "log" else "")
        )
    ax.set_xlabel("trial number (order proposed; gaps are proposals over the limit, never evaluated)" if an.infeasible else "trial number")
    what = "throughput" if thr else ("Pareto-front hypervolume" if hv_mode else "perplexity")
    ax.set_title(f"{an.path.name}: best feasible {what} so far ({len(evaluated)} completed, {len(an.failed)} failed)", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Exports and the Markdown report
# ---------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    trial: int
    directory: Path
    plan_json: Path
    torchao_json: Path
    llama_args: Path
    llama_script: Path
    ggml_types: dict[str, int]
    gguf_notes: list[str]
    checkpoint: Path | None = None
    checkpoint_check: dict[str, float] | None = None


def write_exports(
    an: Analysis, row: HistoryRow, out_dir: Path, opts: ReportOptions, ctx: Any, layers: Any, model_type: str | None, heldout: float | None
) -> ExportResult:
    from bo_search import export

    d = out_dir / f"export_trial_{row.trial_index}"
    d.mkdir(parents=True, exist_ok=True)
    plan = row.plan
    info = {
        "trial_index": row.trial_index,
        "source": row.source,
        "cal_PPL": row.cal_PPL,
        "ppl_heldout": heldout,
        "model_size_gb": row.model_size,
        "avg_bits": row.avg_bits,
        "cal_throughput": row.cal_throughput,
        "model_id": row.model_id,
        "space_id": row.space_id,
        "history": str(an.path),
    }
    from bo_search.cli import write_json

    plan_json = d / "plan.json"
    write_json(plan_json, export.plan_document(plan, **info))
    in_features = {li.fqn: li.in_features for li in layers.linears} if layers is not None else None
    scheme = ctx.scheme if ctx is not None else None
    tao = export.torchao_document(plan, in_features, opts.torchao_device, scheme)
    tao_json = d / "torchao_config.json"
    write_json(tao_json, tao)
    types, notes = export.gguf_tensor_types(plan, layers, model_type)
    args_path = d / "llama_cpp_tensor_types.txt"
    is_ggml = bool(plan) and all(lq.ggml_type for lq in plan.values())
    disclaimer = export.GGUF_EXACT if is_ggml else export.GGUF_DISCLAIMER
    header = [
        f"# bo_search trial {row.trial_index} of {an.path.name}: llama-quantize --tensor-type arguments, one per tensor.",
        f"# {disclaimer}",
    ]
    header += [f"# note: {n}" for n in notes]
    per_note = sorted({t.note for t in types if t.note})
    header += [f"# note: {n}" for n in per_note]
    args_path.write_text("\n".join(header + [t.arg for t in types]) + "\n", encoding="utf-8")
    script = d / "llama_quantize.sh"
    script.write_text(
        "#!/bin/sh\n"
        f"# {disclaimer}\n"
        "# usage: sh llama_quantize.sh MODEL-F16.gguf OUT.gguf   (llama.cpp's llama-quantize on PATH)\n"
        + export.llama_quantize_command(types, src='"${1:?input f16/f32 GGUF}"', dst='"${2:?output GGUF}"')
        + "\n",
        encoding="utf-8",
    )
    result = ExportResult(
        trial=row.trial_index,
        directory=d,
        plan_json=plan_json,
        torchao_json=tao_json,
        llama_args=args_path,
        llama_script=script,
        ggml_types=dict(Counter(t.ggml_type for t in types).most_common()),
        gguf_notes=notes + per_note,
    )
    if opts.save_checkpoint:
        if ctx is None:
            raise UserError("--save_checkpoint needs the model: pass --checkpoint (the search's model)")
        ckpt = export.save_checkpoint(ctx, plan, d / "checkpoint", info)
        result.checkpoint = ckpt
        if opts.evaluate and ctx.heldout_windows is not None:
            from bo_search.evaluate import perplexity

            model, _tok = export.load_quantized(ckpt)
            loaded = perplexity(model, ctx.heldout_windows, ctx.cfg.batch_size).ppl
            del model
            ref = heldout if heldout is not None else _heldout_direct(ctx, plan)
            result.checkpoint_check = {"ppl_heldout_plan": ref, "ppl_heldout_checkpoint": loaded, "rel_diff": loaded / ref - 1}
            if abs(loaded / ref - 1) > 0.005:
                log.warning("exported checkpoint held-out perplexity %.4f differs from the plan's %.4f by more than 0.5%%", loaded, ref)
    return result


def _heldout_direct(ctx: Any, plan: QuantPlan) -> float:
    from bo_search.evaluate import perplexity

    ctx.applier.apply(plan)
    try:
        return perplexity(ctx.model, ctx.heldout_windows, ctx.cfg.batch_size).ppl
    finally:
        ctx.applier.restore()


def _dur(s: float) -> str:
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _num(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "-"
    if abs(v) >= 10000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.2f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bits_histogram(plan: QuantPlan) -> dict[int, int]:
    return dict(sorted(Counter(lq.bits for lq in plan.values()).items()))


def render_markdown(an: Analysis, ev: Evaluation | None, export_res: ExportResult | None, images: Sequence[Path], out_dir: Path) -> str:
    thr = an.by_throughput
    heldout = dict(ev.heldout) if ev is not None else {}
    for r in an.rows:
        if r.ppl_heldout is not None and r.status == "completed":
            heldout.setdefault(r.trial_index, r.ppl_heldout)
    kind_text = {
        "modelsize": "lowest perplexity under a model size limit",
        "throughput": "highest throughput under a perplexity limit",
        "pareto": "perplexity / size Pareto front",
    }[an.search]
    out = [f"# Search report: `{an.path.name}`", ""]
    by_src = Counter(r.source for r in an.completed)
    out.append(
        f"- **History**: `{an.path}`: {len(an.rows)} rows"
        + (f", **{len(an.skipped)} corrupt rows skipped** (listed below)" if an.skipped else "")
    )
    out.append(f"- **Search**: {an.search} ({kind_text}); model `{an.model_id or '?'}`, space `{an.space_id or '?'}`")
    out.append(
        f"- **Trials**: {len(an.completed)} completed (by source: "
        + ", ".join(f"{n} {_style(s)[2]}" for s, n in by_src.most_common())
        + f"), **{len(an.failed)} failed**, {len(an.infeasible)} over-limit proposal(s) (never evaluated), {len(an.abandoned)} abandoned"
    )
    lim = an.limit
    if thr:
        out.append(
            f"- **Perplexity limit**: {lim.value:.4g} ({lim.source})"
            if lim.known
            else "- **Perplexity limit**: not recorded in the history (pass `--ppl_limit`)"
        )
    elif lim.known:
        out.append(f"- **Size limit**: {lim.value:.6g} GB ({lim.source})")
    elif lim.low is not None:
        out.append(
            f"- **Size limit**: not recorded in the history; between {lim.low:.6g} GB (largest evaluated plan) and {lim.high:.6g} GB "
            "(smallest proposal refused as over the limit). Pass `--model_size_constraint GB` to draw it exactly."
        )
    elif an.search == "modelsize":
        out.append("- **Size limit**: not recorded in the history (pass `--model_size_constraint GB`)")
    t = an.timing
    if t is not None:
        pause = (
            f" including {t.pauses} pause(s) of {_dur(t.paused_s)} (the search was resumed); active {_dur(t.active_s)}" if t.pauses else ""
        )
        share = f"{100 * t.proposal_share:.1f}% of evaluation time" if t.proposal_share is not None else "no evaluation time recorded"
        out.append(f"- **Search time**: {_dur(t.span_s)} from the first trial's start to the last row{pause} (timestamps)")
        out.append(
            f"- **Proposal time**: {_dur(t.proposal_s)} in total = {share} ({_dur(t.evaluation_s)} of quantize + evaluate summed over workers)"
        )
    if ev is not None:
        s = ev.settings
        out.append(
            f"- **Report evaluations**: text `{s.get('text')}`, {s.get('search_tokens')} search tokens, {s.get('heldout_tokens')} held-out tokens, "
            f"windows of {s.get('seq_len')}; {ev.measured} new measurement(s), {ev.cache_hits} from the cache (`{CACHE_NAME}`), {_dur(ev.seconds)}"
        )
        if ev.check is not None:
            tr, hist, now = ev.check
            verdict = (
                "consistent with the search"
                if ev.consistent
                else "**NOT consistent with the search: baselines are not comparable; rerun with the search's --eval_tokens/--eval_text/--max_seqlen and model flags**"
            )
            out.append(f"- **Evaluator check**: trial {tr} perplexity {hist:.4f} in the history, {now:.4f} re-measured: {verdict}")
    else:
        out.append(
            "- **Report evaluations**: none (rendered from the history alone; `--evaluate` measures baselines): held-out perplexities only where the history has them"
        )
    for n in an.notes:
        out.append(f"- Note: {n}")
    out.append("")
    for img in images:
        out.append(f"![{img.stem}]({img.relative_to(out_dir).as_posix()})")
        out.append("")

    # best
    b = an.best
    out.append("## Best feasible plan")
    out.append("")
    if b is None:
        out.append("No completed trial is feasible" + (" under the given limit." if lim.known else "."))
    else:
        out.append(f"Trial **{b.trial_index}** ({_style(b.source)[2]}): {an.best_why}.")
        out.append("")
        cols = ["model size (GB)", "avg bits", "perplexity (search split)", "perplexity (held-out)"] + (
            ["throughput (tok/s)"] if b.cal_throughput is not None else []
        )
        vals = [
            f"{b.model_size:.6g}" if b.model_size is not None else "-",
            _num(b.avg_bits),
            _num(b.cal_PPL),
            _num(heldout.get(b.trial_index)),
        ]
        if b.cal_throughput is not None:
            vals.append(_num(b.cal_throughput))
        out.append(_md_table(cols, [vals]))
        out.append("")
        if ev is not None and ev.baselines and b.model_size is not None:
            cap = lim.value if lim.known else b.model_size * 1.0001
            fits = [x for x in ev.baselines if x.model_size_gb <= (cap or 0.0)]
            if fits:
                ub = min(fits, key=lambda x: x.ppl)
                bh, uh = heldout.get(b.trial_index), ub.ppl_heldout
                comp = f"{100 * (1 - (b.cal_PPL or 0.0) / ub.ppl):.1f}% lower perplexity on the search split"
                if bh is not None and uh is not None:
                    comp += f" and {100 * (1 - bh / uh):.1f}% on held-out text ({bh:.2f} vs {uh:.2f})"
                out.append(f"Against the best uniform plan that fits the same budget, **{ub.label}** ({ub.model_size_gb:.6g} GB): {comp}.")
                out.append("")
        widths = bits_histogram(b.plan)
        out.append("Bit widths (layers): " + ", ".join(f"{k if k != 16 else 'fp16/32 (unquantized)'} bits: {v}" for k, v in widths.items()))
        out.append("")
        out.append(_md_table(["setting", "layers"], [[k, v] for k, v in b.plan.histogram().items()]))
        out.append("")

    # front
    out.append(f"## Pareto front ({len(an.front)} trials)")
    out.append("")
    if an.front:
        head = (
            ["trial", "source"]
            + (["throughput (tok/s)"] if thr else [])
            + ["model size (GB)", "avg bits", "perplexity (search)", "perplexity (held-out)", "bit widths (layers)"]
        )
        rows_md = []
        for r in an.front:
            hb = ", ".join(f"{k}b:{v}" for k, v in bits_histogram(r.plan).items())
            mark = " (best)" if b is not None and r.trial_index == b.trial_index else ""
            rows_md.append(
                [f"{r.trial_index}{mark}", _style(r.source)[2]]
                + ([_num(r.cal_throughput)] if thr else [])
                + [
                    f"{r.model_size:.6g}" if r.model_size is not None else "-",
                    _num(r.avg_bits),
                    _num(r.cal_PPL),
                    _num(heldout.get(r.trial_index)),
                    hb,
                ]
            )
        out.append(_md_table(head, rows_md))
    else:
        out.append("No completed trial.")
    out.append("")

    # baselines
    out.append("## Uniform baselines")
    out.append("")
    if ev is None:
        out.append("Not evaluated (the report renders from the history alone; `--evaluate` measures them).")
    elif ev.baselines:
        out.append("Measured by this report with the same evaluator (search split and held-out split).")
        out.append("")
        out.append(
            _md_table(
                ["config", "model size (GB)", "avg bits", "perplexity (search)", "perplexity (held-out)"],
                [[x.label, f"{x.model_size_gb:.6g}", _num(x.avg_bits), _num(x.ppl), _num(x.ppl_heldout)] for x in ev.baselines],
            )
        )
    for skipped in ev.skipped_baselines if ev is not None else []:
        out.append(f"- skipped {skipped}")
    out.append("")

    if an.failed:
        out.append(f"## Failed trials ({len(an.failed)})")
        out.append("")
        out.append(
            _md_table(
                ["trial", "source", "reason"],
                [[r.trial_index, _style(r.source)[2], (r.reason or "-").replace("|", "/")[:160]] for r in an.failed],
            )
        )
        out.append("")
    if an.skipped:
        out.append(f"## Skipped rows ({len(an.skipped)})")
        out.append("")
        out += [f"- line {line}: {why}" for line, why in an.skipped]
        out.append("")

    if export_res is not None:
        e = export_res
        rel = e.directory.relative_to(out_dir).as_posix()
        out.append(f"## Export of trial {e.trial}")
        out.append("")
        out.append(f"- `{rel}/plan.json`: `python -m bo_search.evaluate --config {e.plan_json}`")
        out.append(f"- `{rel}/torchao_config.json`: torchao `FqnToConfig` (per layer: config class and arguments); apply with:")
        out.append("")
        out.append("```python")
        out.append(_apply_snippet(e.torchao_json))
        out.append("```")
        out.append("")
        types = ", ".join(f"{k} x{v}" for k, v in e.ggml_types.items())
        out.append(
            f"- `{rel}/llama_cpp_tensor_types.txt` and `{rel}/llama_quantize.sh`: llama.cpp `--tensor-type NAME=TYPE` per tensor ({types})."
        )
        out.append("  **Nearest mapping, not identical numerics**: llama.cpp's block formats differ from bo_search's codes.")
        for n in e.gguf_notes:
            out.append(f"  - {n}")
        if e.checkpoint is not None:
            out.append(
                f"- `{rel}/checkpoint/`: packed weights + config + tokenizer; `from bo_search.export import load_quantized; model, tok = load_quantized('{e.checkpoint}')`"
            )
            if e.checkpoint_check is not None:
                c = e.checkpoint_check
                out.append(
                    f"  - reloaded and checked: held-out perplexity {c['ppl_heldout_checkpoint']:.4f} vs {c['ppl_heldout_plan']:.4f} for the plan ({100 * c['rel_diff']:+.3f}%)"
                )
        out.append("")
    return "\n".join(out)


def _apply_snippet(path: Path) -> str:
    from bo_search.export import TORCHAO_APPLY

    return TORCHAO_APPLY.format(path=path.as_posix())


# ---------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------


@dataclass
class ReportResult:
    out_dir: Path
    markdown: Path
    tradeoff_png: Path
    progress_png: Path
    analysis: Analysis
    evaluation: Evaluation | None
    export: ExportResult | None


def check_model(an: Analysis, fingerprint: str, checkpoint: str) -> None:
    if an.model_id and an.model_id != fingerprint:
        raise UserError(
            f"{an.path.name} was searched on model {an.model_id}, but {checkpoint} is model {fingerprint}: "
            "pass the search's --checkpoint (or leave out --evaluate to report from the CSV alone)"
        )


def build_report(
    history: str | Path, opts: ReportOptions, ctx: Any = None, layers: Any = None, model_type: str | None = None
) -> ReportResult:
    """Analyse ``history``, evaluate with ``ctx`` (a ModelContext of the search's model) when
    ``opts.evaluate``, and write plots, Markdown and exports into ``opts.out_dir``."""
    loaded = load_history(history)
    an = analyse(loaded, history, opts)
    export_row = choose_export_row(an, opts.trial)
    if (opts.evaluate or opts.save_checkpoint) and ctx is None:
        raise UserError("evaluation needs the model: pass a ModelContext, or leave out --evaluate")
    if ctx is not None:
        check_model(an, ctx.ref.fingerprint, ctx.ref.name)
        layers = ctx.layers
        model_type = getattr(ctx.model.config, "model_type", None)
    out = opts.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for line, why in an.skipped:
        log.warning("%s line %d skipped: %s", an.path.name, line, why)
    ev = evaluate(an, ctx, out, opts.baselines, export_row) if opts.evaluate else None
    tradeoff = plot_tradeoff(an, ev, out / "tradeoff.png")
    progress = plot_progress(an, ev, out / "progress.png")
    exp = None
    if export_row is not None:
        held = ev.heldout.get(export_row.trial_index) if ev is not None else export_row.ppl_heldout
        exp = write_exports(an, export_row, out, opts, ctx, layers, model_type, held)
    md = out / "report.md"
    md.write_text(render_markdown(an, ev, exp, [tradeoff, progress], out) + "\n", encoding="utf-8")
    return ReportResult(out, md, tradeoff, progress, an, ev, exp)


def build_parser() -> argparse.ArgumentParser:
    from bo_search import cli

    p = argparse.ArgumentParser(
        prog="python -m bo_search.report",
        description="Plots, a Markdown report and exports from a search history (size, throughput or Pareto search; finished or interrupted). "
        "Pass the search's model and evaluation flags so baselines are measured the same way.",
    )
    p.add_argument("history", metavar="HISTORY.csv", help="history written by bo_search.acc_modelsize / acc_throughput / pareto")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: HISTORY_report/ next to the history)")
    p.add_argument("--trial", type=int, default=None, metavar="N", help="trial to export (default: the best feasible)")
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="load the model and measure uniform baselines and missing held-out perplexities (cached; minutes the first time). "
        "Default: render from the history alone, in seconds",
    )
    p.add_argument("--no_eval", action="store_true", help="render from the history alone (the default; kept for old command lines)")
    p.add_argument(
        "--model_size_constraint",
        type=float,
        default=None,
        metavar="GB",
        help="size limit to draw and to choose the best plan under (default: inferred)",
    )
    p.add_argument("--ppl_limit", type=float, default=None, help="perplexity limit of a throughput search")
    p.add_argument(
        "--baselines",
        nargs="+",
        default=None,
        metavar="BITS:GROUPSIZE",
        help="uniform baselines (default: fp, then 8, 4 and 3 bits at every group size the history's plans use)",
    )
    p.add_argument(
        "--save_checkpoint",
        action="store_true",
        help="also write the exported trial as a packed checkpoint (loads with bo_search.export.load_quantized)",
    )
    p.add_argument(
        "--gguf",
        default=None,
        metavar="OUT.gguf",
        help="write the exported trial as a GGUF file llama.cpp and transformers load: a plan searched in llama.cpp types "
        "(a ggml space) on a GGUF checkpoint; metadata and tokenizer are copied from the checkpoint",
    )
    p.add_argument("--force", action="store_true", help="let --gguf overwrite an existing file")
    p.add_argument(
        "--torchao_device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="torchao export: cpu = IntxWeightOnlyConfig everywhere (default); cuda = int4/int8 kernels where possible",
    )
    cli.add_model_args(p)
    cli.add_eval_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from bo_search import cli

    return cli.run_main(_main, build_parser(), argv)


def _structure(checkpoint: str | None, include_lm_head: bool, model_id: str) -> tuple[Any, str | None]:
    """Layer shapes and model_type without loading weights (for --no_eval exports); (None, None) if unavailable."""
    from bo_search.model import discover_layers, load_structure, resolve_checkpoint

    try:
        ref = resolve_checkpoint(checkpoint)
        if model_id and ref.fingerprint != model_id:
            log.warning("--checkpoint %s is not the history's model (%s): exports use generic names", ref.name, model_id)
            return None, None
        model, _ref = load_structure(checkpoint)
        return discover_layers(model, include_lm_head=include_lm_head), getattr(model.config, "model_type", None)
    except UserError as err:
        log.warning("model structure unavailable (%s): exports use generic names", err)
        return None, None


def _main(args: argparse.Namespace) -> int:
    from bo_search import cli
    from bo_search.model import resolve_checkpoint
    from bo_search.trial import ModelContext

    history = Path(args.history).expanduser()
    out = Path(args.out).expanduser() if args.out else history.with_name(history.stem + "_report")
    cli.check_output_path(out)
    opts = ReportOptions(
        out_dir=out,
        trial=args.trial,
        evaluate=bool(args.evaluate) and not args.no_eval,
        size_limit=args.model_size_constraint,
        ppl_limit=args.ppl_limit,
        baselines=tuple(args.baselines) if args.baselines else None,
        save_checkpoint=args.save_checkpoint,
        torchao_device=args.torchao_device,
        gguf=Path(args.gguf).expanduser() if args.gguf else None,
        force=args.force,
    )
    loaded = load_history(history)
    an = analyse(loaded, history, opts)
    export_row = choose_export_row(an, opts.trial)  # a bad --trial fails before any model is loaded
    if opts.gguf is not None:
        _check_gguf_request(opts, export_row, args.checkpoint)
    for line, why in an.skipped:
        print(f"warning: {history.name} line {line} skipped ({why})", file=sys.stderr)
    ctx = None
    layers = model_type = None
    if opts.evaluate or opts.save_checkpoint:
        ref = resolve_checkpoint(args.checkpoint)
        check_model(an, ref.fingerprint, ref.name)
        ctx = ModelContext.from_args(args, heldout=args.heldout_tokens > 0)
    else:
        layers, model_type = _structure(args.checkpoint, args.include_lm_head, an.model_id)
    res = build_report(history, opts, ctx, layers, model_type)
    a = res.analysis
    print(
        f"{len(a.completed)} completed, {len(a.failed)} failed, {len(a.infeasible)} over the limit, {len(a.skipped)} corrupt rows skipped"
    )
    if a.best is not None:
        held = res.evaluation.heldout.get(a.best.trial_index) if res.evaluation else a.best.ppl_heldout
        print(
            f"best feasible trial {a.best.trial_index}: size {a.best.model_size:.6g} GB, perplexity {a.best.cal_PPL:.4f}"
            + (f", held-out {held:.4f}" if held is not None else "")
        )
    print(f"Pareto front: {len(a.front)} trials")
    if res.evaluation is not None:
        from bo_search import cli

        ev = res.evaluation
        print(cli.table([{"config": b.label, "model_size_gb": b.model_size_gb, "avg_bits": b.avg_bits, "ppl": b.ppl, "ppl_heldout": b.ppl_heldout} for b in ev.baselines],
                        ["config", "model_size_gb", "avg_bits", "ppl", "ppl_heldout"]))  # fmt: skip
        if not ev.consistent and ev.check is not None:
            print(
                f"warning: trial {ev.check[0]} re-measured at {ev.check[2]:.4f} (history {ev.check[1]:.4f}): pass the search's evaluation flags",
                file=sys.stderr,
            )
    print(f"wrote {res.markdown}, {res.tradeoff_png.name}, {res.progress_png.name}")
    if res.export is not None:
        print(f"exported trial {res.export.trial} to {res.export.directory}")
    if opts.gguf is not None and export_row is not None:
        _write_gguf(opts, export_row, args.checkpoint, args.include_lm_head, history)
    return 0


def _check_gguf_request(opts: ReportOptions, row: HistoryRow | None, checkpoint: str | None) -> None:
    """Everything --gguf needs, checked before any output is written."""
    from bo_search.gguf_export import CONVERT_HINT, check_gguf_plan
    from bo_search.model import resolve_checkpoint

    assert opts.gguf is not None
    if opts.gguf.exists() and not opts.force:
        raise UserError(f"{opts.gguf} exists; pass --force to overwrite it, or choose another --gguf path")
    if row is None:
        raise UserError("--gguf: the history has no completed trial to export")
    check_gguf_plan(row.plan)
    ref = resolve_checkpoint(checkpoint)
    if ref.gguf is None:
        raise UserError(f"--gguf: the checkpoint {ref.name} is a Hugging Face directory; {CONVERT_HINT}")


def _write_gguf(opts: ReportOptions, row: HistoryRow, checkpoint: str | None, include_lm_head: bool, history: Path) -> None:
    from bo_search.gguf_export import export_gguf
    from bo_search.model import discover_layers, load_structure

    assert opts.gguf is not None
    model, ref = load_structure(checkpoint)
    layers = discover_layers(model, include_lm_head=include_lm_head)
    info = {"trial_index": row.trial_index, "history": history.name, "cal_PPL": row.cal_PPL, "model_size_gb": row.model_size}
    res = export_gguf(ref.gguf, row.plan, layers, opts.gguf, force=opts.force, info=info)
    predicted = (row.model_size or 0.0) * 1e9 + res.metadata_bytes
    print(
        f"wrote {res.path}: {res.file_bytes:,} bytes (tensors {res.tensor_bytes:,}, the searched size {(row.model_size or 0) * 1e9:,.0f}; "
        f"with the source's {res.metadata_bytes:,} bytes of metadata predicted {predicted:,.0f}, "
        f"{100 * (res.file_bytes / predicted - 1):+.3f}%); types {res.types}"
    )


if __name__ == "__main__":
    sys.exit(main())
