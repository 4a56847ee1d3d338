"""Model evaluations for the report, cached on disk: uniform baselines, held-out perplexity of the
best plan and of the front."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bo_search import cli
from bo_search.cli import write_json
from bo_search.report.analysis import CONSISTENCY_TOLERANCE, Analysis
from bo_search.search.history import OLD_TEST_SPLIT_FORMATS, HistoryRow
from bo_search.types import LayerQuant, QuantPlan, UserError

if TYPE_CHECKING:
    from bo_search.trial import ModelContext

log = logging.getLogger(__name__)

CACHE_NAME = "eval_cache.json"


CACHE_VERSION = 1


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
        self.entries[self._key(kind, plan)] = {"settings": self.signature, "value": value}
        self.written += 1
        write_json(self.path, {"version": CACHE_VERSION, "settings": {self.signature: self.settings}, "entries": self.entries})


def eval_settings(ctx: ModelContext) -> dict[str, Any]:
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


def _measure(ctx: ModelContext, cache: EvalCache, plan: QuantPlan, heldout: bool) -> dict[str, Any]:
    hit = cache.get("measure", plan)
    want_heldout = heldout and ctx.heldout_windows is not None
    if hit is not None and (not want_heldout or hit.get("ppl_heldout") is not None):
        return dict(hit)
    row = ctx.measure(plan, heldout=want_heldout)
    keep = {k: row[k] for k in ("model_size_gb", "avg_bits", "ppl", "ppl_sem", "nll", "ppl_heldout")}
    cache.put("measure", plan, keep)
    return keep


def _heldout(ctx: ModelContext, cache: EvalCache, plan: QuantPlan) -> float | None:
    from bo_search.metrics import perplexity

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


def _check_plan(ctx: ModelContext, plan: QuantPlan, what: str) -> None:
    try:
        ctx.applier.check(plan)
    except UserError as err:
        hint = (
            " (was the search run with --include_lm_head or another --checkpoint? pass the search's model flags)"
            if "unknown layer" in str(err)
            else ""
        )
        raise UserError(f"{what}: {err}{hint}") from None


def evaluate(an: Analysis, ctx: ModelContext, out_dir: Path, specs: Sequence[str] | None, export_row: HistoryRow | None) -> Evaluation:
    """Baselines, the consistency check and every missing held-out perplexity, through the cache."""
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
            m = _measure(ctx, cache, item.plan, heldout=_recorded_heldout(item) is None)
            ev.check = (item.trial_index, float(item.cal_PPL), float(m["ppl"]))
            if m.get("ppl_heldout") is not None and _recorded_heldout(item) is None:
                ev.heldout[item.trial_index] = float(m["ppl_heldout"])
                ev.heldout_source[item.trial_index] = "measured"
        elif kind == "heldout":
            if _recorded_heldout(item) is not None:
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


def _recorded_heldout(row: HistoryRow) -> float | None:
    """A row's held-out perplexity if it was measured on today's test split."""
    return None if row.format in OLD_TEST_SPLIT_FORMATS else row.ppl_heldout


def heldout_direct(ctx: ModelContext, plan: QuantPlan) -> float:
    from bo_search.metrics import perplexity

    if ctx.heldout_windows is None:
        raise ValueError("held-out perplexity needs a context loaded with held-out windows")
    ctx.applier.apply(plan)
    try:
        return perplexity(ctx.model, ctx.heldout_windows, ctx.cfg.batch_size).ppl
    finally:
        ctx.applier.restore()
