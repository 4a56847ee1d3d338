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

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_SPACE = REPO_ROOT / "parameter_spaces" / "smollm2_135m_per_block.json"


@dataclass
class Structure:
    """The model structure, the space and sizes. ``min_gb``/``max_gb``: the smallest and largest plan
    of the space; ``fp_gb``: full precision."""

    eval_cfg: EvalConfig
    layers: ModelLayers
    space: SearchSpace
    size_model: SizeModel
    ref: CheckpointRef
    min_gb: float
    max_gb: float
    fp_gb: float


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
    from bo_search.sizes import SizeModel, space_size_bounds
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
    lo, hi = space_size_bounds(space, size_model)
    fp = size_model.report(QuantPlan()).gb
    return Structure(eval_cfg, layers, space, size_model, ref, lo, hi, fp)
