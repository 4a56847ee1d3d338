"""What every command that plans needs, with no weights loaded: the model structure (on the meta
device), the parameter space, the exact size model and the size range the space spans.

The searches extend it with their history (:class:`bo_search.search.runner.Setup`); sensitivity and
``seed`` use it as it is."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bo_search.budget import SizeLimit, SlotTable
from bo_search.gguf_file import ggml_other_bits
from bo_search.model import discover_layers
from bo_search.model import load_structure as load_meta_model
from bo_search.space import build_space, default_space_spec, load_space
from bo_search.types import QuantPlan, UserError

if TYPE_CHECKING:
    from bo_search.model import CheckpointRef, ModelLayers
    from bo_search.sizes import SizeModel
    from bo_search.space import SearchSpace
    from bo_search.trial import EvalConfig

#: the size limit of a search and of ``seed`` when neither --model_size_constraint nor --avg_bits is given
DEFAULT_AVG_BITS = 4.25

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_SPACE = REPO_ROOT / "parameter_spaces" / "smollm2_135m_per_block.json"


@dataclass
class Structure:
    """The model structure, the space and sizes. ``min_gb``/``max_gb``: the smallest and largest plan
    of the space; ``fp_gb``: full precision; ``slots``: the space's per-slot size table, built once
    here (``budget.SlotTable``; attach a prior with ``slots.with_prior``)."""

    eval_cfg: EvalConfig
    layers: ModelLayers
    space: SearchSpace
    size_model: SizeModel
    ref: CheckpointRef
    min_gb: float
    max_gb: float
    fp_gb: float
    slots: SlotTable

    @property
    def n_weights(self) -> int:
        """Weights of the quantizable linears (what average bits per weight divide by)."""
        return sum(li.numel for li in self.layers.linears)


def resolve_space(parameters_list: str | None, layers: ModelLayers, ref: CheckpointRef) -> SearchSpace:
    """``--parameters_list``, else the shipped space of the embedded model, else one (bits, group) per block."""

    if parameters_list:
        return load_space(parameters_list, layers)
    if ref.hf_dir is None and ref.gguf is not None and ref.name.startswith("embedded") and EMBEDDED_SPACE.is_file():
        return load_space(EMBEDDED_SPACE, layers)
    return build_space(default_space_spec(layers), layers, "<default per-block space>")


def load_structure(args: argparse.Namespace) -> Structure:
    """Flags (``--checkpoint``, ``--include_lm_head``, ``--parameters_list``, the scheme and
    evaluation flags) -> the structure, the space and the size model."""
    from bo_search.quant import QuantScheme
    from bo_search.sizes import SizeModel
    from bo_search.trial import EvalConfig

    eval_cfg = EvalConfig.from_args(args)
    model, ref = load_meta_model(args.checkpoint)
    layers = discover_layers(model, include_lm_head=args.include_lm_head)
    space = resolve_space(args.parameters_list, layers, ref)
    in_space = {f for slot in space.slots for f in slot.fqns}
    outside = [li.fqn for li in layers.linears if li.block < 0 and li.fqn not in in_space]
    if outside:
        raise UserError(
            f"--include_lm_head: the parameter space has no setting for {outside[0]} (spaces choose settings per decoder block), "
            "so it would stay unquantized and only be untied; leave out --include_lm_head (evaluate --uniform does quantize it)"
        )
    scheme = QuantScheme(scale_dtype=args.scale_dtype, zero_bits=args.zero_bits, mse_clip=args.mse_clip)
    if space.is_ggml:
        if eval_cfg.quantizer != "rtn":
            raise UserError(
                f"--quantizer {eval_cfg.quantizer} chooses codes of the affine int scheme; {space.source} is in llama.cpp types, "
                "which round as llama.cpp does (leave out --quantizer)"
            )
        eval_cfg = dataclasses.replace(eval_cfg, ggml_sizes=True)
    size_model = SizeModel(
        model,
        layers,
        scheme,
        args.fp_dtype or ref.storage_dtype,
        stored_other_bits=ggml_other_bits(space.is_ggml, ref, layers),
    )
    slots = SlotTable.build(space, size_model)
    lo, hi = slots.bounds_gb()
    fp = size_model.report(QuantPlan()).gb
    return Structure(eval_cfg, layers, space, size_model, ref, lo, hi, fp, slots)


def structure_setup(args: argparse.Namespace) -> Structure:
    """The model structure (meta device), space and sizes for a command that does not search; the
    scheme flags a command lacks take the search's defaults."""
    ns = argparse.Namespace(**vars(args))
    for k, v in {"include_lm_head": False, "scale_dtype": "float16", "zero_bits": 16, "mse_clip": False, "fp_dtype": None}.items():
        if not hasattr(ns, k):
            setattr(ns, k, v)
    return load_structure(ns)


def size_limit(st: Structure, size_gb: float | None, avg_bits: float | None) -> SizeLimit:
    """The size limit of ``--model_size_constraint`` or ``--avg_bits`` (default ``DEFAULT_AVG_BITS``),
    checked against the space: UserError when no plan fits or full precision already does."""
    if size_gb is not None and avg_bits is not None:
        raise UserError("give either --model_size_constraint or --avg_bits, not both")
    if size_gb is None:
        limit = SizeLimit.from_avg_bits(DEFAULT_AVG_BITS if avg_bits is None else avg_bits, st.size_model.other_bits, st.n_weights)
    else:
        limit = SizeLimit(size_gb)
    if limit.gb < st.min_gb:
        raise UserError(
            f"size limit {limit.gb:.6g} GB is below the smallest plan of the space ({st.min_gb:.6g} GB): no configuration can fit; raise the limit"
        )
    if limit.gb >= st.fp_gb:
        raise UserError(
            f"size limit {limit.gb:.6g} GB is not below the full-precision size ({st.fp_gb:.6g} GB): nothing to search; pick a smaller limit"
        )
    return limit
