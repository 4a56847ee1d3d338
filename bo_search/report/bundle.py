"""The export bundle of one trial (``export_trial_N/``): plan JSON, torchao config, llama.cpp
arguments and, on request, a packed checkpoint."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bo_search.cli import write_json
from bo_search.report import export
from bo_search.report.analysis import Analysis, ReportOptions
from bo_search.report.baselines import heldout_direct
from bo_search.search.history import HistoryRow
from bo_search.search.identity import recorded_quantizer
from bo_search.types import QuantPlan, UserError

if TYPE_CHECKING:
    from bo_search.model import ModelLayers
    from bo_search.trial import ModelContext

log = logging.getLogger(__name__)


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
    an: Analysis,
    row: HistoryRow,
    out_dir: Path,
    opts: ReportOptions,
    ctx: ModelContext | None,
    layers: ModelLayers | None,
    model_type: str | None,
    heldout: float | None,
) -> ExportResult:
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

    plan_json = d / "plan.json"
    write_json(plan_json, export.plan_document(plan, **info))
    in_features = {li.fqn: li.in_features for li in layers.linears} if layers is not None else None
    scheme = ctx.scheme if ctx is not None else None
    tao = export.torchao_document(plan, in_features, opts.torchao_device, scheme, recorded_quantizer(row))
    tao_json = d / "torchao_config.json"
    write_json(tao_json, tao)
    types, notes = export.gguf_tensor_types(plan, layers, model_type)
    args_path, script, per_note = _write_llama_cpp(d, an, row, types, notes)
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
        _save_checkpoint(result, ctx, plan, d, info, opts.evaluate, heldout)
    return result


def _write_llama_cpp(
    d: Path, an: Analysis, row: HistoryRow, types: list[export.GgufTensorType], notes: list[str]
) -> tuple[Path, Path, list[str]]:
    """``llama_cpp_tensor_types.txt`` and ``llama_quantize.sh``; returns them and the per-tensor notes."""
    plan = row.plan
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
    return args_path, script, per_note


def _save_checkpoint(
    result: ExportResult, ctx: ModelContext, plan: QuantPlan, d: Path, info: dict[str, Any], evaluate: bool, heldout: float | None
) -> None:
    """The packed checkpoint; with ``evaluate``, reloaded and its held-out perplexity checked against the plan's."""
    ckpt = export.save_checkpoint(ctx, plan, d / "checkpoint", info)
    result.checkpoint = ckpt
    if evaluate and ctx.heldout_windows is not None:
        from bo_search.metrics import perplexity

        model, _tok = export.load_quantized(ckpt)
        loaded = perplexity(model, ctx.heldout_windows, ctx.cfg.batch_size).ppl
        del model
        ref = heldout if heldout is not None else heldout_direct(ctx, plan)
        result.checkpoint_check = {"ppl_heldout_plan": ref, "ppl_heldout_checkpoint": loaded, "rel_diff": loaded / ref - 1}
        if abs(loaded / ref - 1) > 0.005:
            log.warning("exported checkpoint held-out perplexity %.4f differs from the plan's %.4f by more than 0.5%%", loaded, ref)
