"""Putting the report together: analysis, evaluations, plots, exports and the Markdown."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bo_search.report.analysis import Analysis, ReportOptions, analyse, choose_export_row, load_history
from bo_search.report.baselines import Evaluation, evaluate
from bo_search.report.bundle import ExportResult, write_exports
from bo_search.report.markdown import render_markdown
from bo_search.report.plots import plot_progress, plot_tradeoff
from bo_search.types import UserError

if TYPE_CHECKING:
    from bo_search.model import ModelLayers
    from bo_search.trial import ModelContext

log = logging.getLogger(__name__)


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
    history: str | Path,
    opts: ReportOptions,
    ctx: ModelContext | None = None,
    layers: ModelLayers | None = None,
    model_type: str | None = None,
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
    ev = None
    if opts.evaluate:
        if ctx is None:
            raise ValueError("opts.evaluate needs the model context ctx")
        ev = evaluate(an, ctx, out, opts.baselines, export_row)
    tradeoff = plot_tradeoff(an, ev, out / "tradeoff.png")
    progress = plot_progress(an, ev, out / "progress.png")
    exp = None
    if export_row is not None:
        held = ev.heldout.get(export_row.trial_index) if ev is not None else export_row.ppl_heldout
        exp = write_exports(an, export_row, out, opts, ctx, layers, model_type, held)
    md = out / "report.md"
    md.write_text(render_markdown(an, ev, exp, [tradeoff, progress], out) + "\n", encoding="utf-8")
    return ReportResult(out, md, tradeoff, progress, an, ev, exp)
