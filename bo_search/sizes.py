"""Exact size accounting: the bytes a plan takes as stored (packed codes, scales, zero points and
every unquantized tensor at its storage dtype), per layer (a space's per-slot table of them is
``budget.SlotTable``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from bo_search.backends import backend_for
from bo_search.model import LinearInfo, ModelLayers
from bo_search.quant import DEFAULT_SCHEME, DTYPE_BITS, DTYPE_BY_NAME, QuantScheme
from bo_search.types import LayerQuant, QuantPlan, UserError


@dataclass(frozen=True)
class SizeReport:
    total_bytes: float
    quantized_weight_bits: float  # packed codes + scales + zeros of the planned layers
    n_planned_weights: int  # weights in the planned (quantizable) layers

    @property
    def gb(self) -> float:
        """Decimal gigabytes (1e9 bytes)."""
        return self.total_bytes / 1e9

    @property
    def avg_bits(self) -> float:
        """Average bits per weight of the quantizable layers, scales and zero points included."""
        return self.quantized_weight_bits / max(1, self.n_planned_weights)


class SizeModel:
    """Exact storage size of a model under a plan.

    bytes = for each quantizable layer: packed code bits (numel x bits, rounded up to whole bytes per
    layer) + one scale per group (``scheme.scale_bits``) + one zero point per group when asymmetric
    (``scheme.zero_bits``); layers left unquantized count at their storage dtype; plus every other
    tensor of the model (embeddings, norms, biases, an untied lm_head) at its storage dtype. Tied
    tensors are counted once. Storage dtype = the checkpoint's ``config.dtype`` (the dtype it was
    saved in), or ``fp_dtype`` when given.
    """

    def __init__(
        self,
        model: Any,
        layers: ModelLayers,
        scheme: QuantScheme = DEFAULT_SCHEME,
        fp_dtype: str | None = None,
        stored_other_bits: int | None = None,
    ):
        """``stored_other_bits``: the tensors outside the plan as a file stores them (a GGUF export
        copies them unchanged), instead of every float tensor at the storage dtype."""
        self.layers = layers
        self.scheme = scheme
        dtype = fp_dtype or config_dtype_name(model)
        if dtype not in DTYPE_BY_NAME:
            raise UserError(f"storage dtype {dtype!r} is not one of {sorted(DTYPE_BY_NAME)}")
        self.fp_dtype = dtype
        self.fp_bits = DTYPE_BITS[DTYPE_BY_NAME[dtype]]
        planned = {id(dict(model.named_modules())[li.fqn].weight) for li in layers.linears}
        seen: set[int] = set()
        other = 0
        for t in list(model.parameters()) + list(model.buffers()):
            key = id(t)
            if key in seen:
                continue
            seen.add(key)
            if key in planned:
                continue
            if t.is_floating_point():
                other += t.numel() * self.fp_bits
            else:
                other += t.numel() * t.element_size() * 8
        # Non-persistent buffers (rotary inv_freq) are not stored in a checkpoint.
        nonpersistent = 0
        for mod in model.modules():
            for name in getattr(mod, "_non_persistent_buffers_set", ()):
                buf = mod._buffers.get(name)
                if buf is not None and id(buf) in seen:
                    nonpersistent += buf.numel() * (self.fp_bits if buf.is_floating_point() else buf.element_size() * 8)
        self.other_bits = other - nonpersistent if stored_other_bits is None else stored_other_bits
        self._infos = layers.by_fqn()

    def layer_bits(self, info: LinearInfo, lq: LayerQuant) -> int:
        if not lq.is_quantized:
            return info.numel * self.fp_bits
        return backend_for(lq).layer_bits(info, lq, self.scheme)

    def report(self, plan: QuantPlan) -> SizeReport:
        qbits = 0
        for li in self.layers.linears:
            qbits += self.layer_bits(li, plan.setting(li.fqn))
        n = sum(li.numel for li in self.layers.linears)
        return SizeReport(total_bytes=(qbits + self.other_bits) / 8, quantized_weight_bits=qbits, n_planned_weights=n)

    def gb(self, plan: QuantPlan) -> float:
        return self.report(plan).gb


def config_dtype_name(model: Any) -> str:
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, str) and dtype in DTYPE_BY_NAME:
        return dtype
    return str(next(model.parameters()).dtype).removeprefix("torch.")
