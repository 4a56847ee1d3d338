"""Group-wise affine weight quantization: fake-quant primitives, in-place apply/restore of a plan,
and conversion to torchao configs (size accounting: :mod:`bo_search.sizes`; bit-packed checkpoints:
:mod:`bo_search.packing`).

The fake-quant path is written with fused whole-tensor ops and reproduces, bit for bit, what torchao's
``IntxWeightOnlyConfig(weight_dtype=torch.intN, granularity=PerGroup(g), mapping_type=...,
scale_dtype=torch.float16)`` stores (``tests/test_quant.py`` checks this). The arithmetic follows
torchao's ``choose_qparams_affine`` / ``quantize_affine`` / ``dequantize_affine``: the range always
includes zero, the zero point is an integer in the signed range, the scale is stored as float16.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from bo_search.backends import AFFINE, GGML, backend_for, export_error, register_builtin
from bo_search.model import LinearInfo, ModelLayers
from bo_search.types import FULL_PRECISION, PER_CHANNEL, LayerQuant, QuantPlan, UserError, did_you_mean, ggml_effective_type, ggml_row_bytes

DTYPE_BITS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16, torch.float64: 64}


DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class QuantScheme:
    """How quantized weights are stored: scale dtype, zero-point width, optional MSE clipping."""

    scale_dtype: str = "float16"
    zero_bits: int = 16
    mse_clip: bool = False
    #: clip ratios tried per group when ``mse_clip`` is on (1.0 = plain min/max)
    clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)

    def __post_init__(self) -> None:
        if self.scale_dtype not in DTYPE_BY_NAME:
            raise UserError(f"scale dtype {self.scale_dtype!r} is not one of {sorted(DTYPE_BY_NAME)}")
        if self.zero_bits not in (8, 16, 32):
            raise UserError(f"zero-point width {self.zero_bits} must be 8, 16 or 32 bits")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return DTYPE_BY_NAME[self.scale_dtype]

    @property
    def scale_bits(self) -> int:
        return DTYPE_BITS[self.torch_scale_dtype]


DEFAULT_SCHEME = QuantScheme()

#: how the affine scheme chooses its codes (``--quantizer``): ``rtn`` plain min/max rounding to
#: nearest; ``gptq`` GPTQ's error compensation (:mod:`bo_search.gptq`). Same storage format.
QUANTIZERS = ("rtn", "gptq")


def check_quantizer(name: str) -> str:
    if name not in QUANTIZERS:
        raise did_you_mean(name, QUANTIZERS, "quantizer")
    return name


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a ``bits``-bit code, as torchao's ``torch.intN`` dtypes use."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def effective_group(in_features: int, group_size: int) -> int:
    return in_features if group_size == PER_CHANNEL else group_size


def check_group(info: LinearInfo, lq: LayerQuant) -> None:
    """UserError when the setting cannot be applied to the layer (its backend's check)."""
    backend_for(lq).check(info, lq)


def check_affine_group(info: LinearInfo, lq: LayerQuant) -> None:
    """The affine backend's check: the group must divide the layer's input features."""
    if not lq.is_quantized:
        return
    g = effective_group(info.in_features, lq.group_size)
    if info.in_features % g:
        divisors = [d for d in (16, 32, 64, 96, 128, 192, 256, 384, 512) if info.in_features % d == 0]
        raise UserError(
            f"groupsize {g} does not divide in_features={info.in_features} of layer {info.fqn}: "
            f"ragged groups are rejected; use a divisor such as {divisors} or -1 (per channel)"
        )


def choose_qparams(
    wg: torch.Tensor, bits: int, symmetric: bool, scheme: QuantScheme = DEFAULT_SCHEME, clip: torch.Tensor | float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (``scheme.scale_dtype``) and integer zero point (float tensor holding ints) per group.

    ``wg`` is the weight viewed as (out_features, n_groups, group_size). Mirrors torchao's
    ``_choose_qparams_affine`` followed by the scale-dtype cast of ``IntxWeightOnlyConfig``.
    """
    qmin, qmax = qrange(bits)
    mn, mx = torch.aminmax(wg, dim=-1, keepdim=True)
    zero = torch.zeros((), dtype=wg.dtype, device=wg.device)
    mn = torch.minimum(mn, zero)
    mx = torch.maximum(mx, zero)
    if not (isinstance(clip, float) and clip == 1.0):
        mn = mn * clip
        mx = mx * clip
    eps = torch.finfo(wg.dtype).smallest_normal
    if symmetric:
        scale = torch.maximum(-mn, mx) / (float(qmax - qmin) / 2)
        zp = torch.full_like(scale, float(int((qmax + qmin + 1) / 2)))
        scale = scale.clamp(min=eps)
    else:
        scale = ((mx - mn) / float(qmax - qmin)).clamp(min=eps)
        zp = (qmin - torch.round(mn / scale)).clamp(qmin, qmax)
    scale = scale.to(scheme.torch_scale_dtype)
    # A group of zeros would give a scale that underflows to 0 in float16 (torchao then produces NaN);
    # keep such groups exactly zero instead.
    scale = scale.clamp(min=torch.finfo(scheme.torch_scale_dtype).tiny)
    return scale, zp


def quantize_codes(wg: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float) in [qmin, qmax], exactly as torchao's ``quantize_affine``."""
    qmin, qmax = qrange(bits)
    q = wg * (1.0 / scale)
    q.round_().add_(zp).clamp_(qmin, qmax)
    return q


def fake_quantize(w: torch.Tensor, lq: LayerQuant, scheme: QuantScheme = DEFAULT_SCHEME) -> torch.Tensor:
    """Quantize then dequantize a 2-D weight with one setting (by its backend); returns a new tensor of w's dtype."""
    if not lq.is_quantized:
        return w.clone()
    return backend_for(lq).fake_quantize(w, lq, scheme)


def affine_fake_quantize(w: torch.Tensor, lq: LayerQuant, scheme: QuantScheme = DEFAULT_SCHEME) -> torch.Tensor:
    """The affine backend: plain rounding to integer codes with a scale and zero point per group."""
    if not lq.is_quantized:
        return w.clone()
    out_f, in_f = w.shape
    g = effective_group(in_f, lq.group_size)
    if in_f % g:
        raise UserError(f"groupsize {g} does not divide in_features={in_f}")
    # No upcast: in a bf16/fp16 model the qparams are computed in the weight's dtype, with the same
    # type promotions as torchao's choose_qparams_affine / quantize_affine / dequantize_affine, so a
    # bf16 worker's fake quant equals torchao's bf16 result bit for bit (tests/test_quant.py).
    wg = w.reshape(out_f, in_f // g, g)
    if scheme.mse_clip:
        scale, zp = mse_clip_qparams(wg, lq, scheme)
    else:
        scale, zp = choose_qparams(wg, lq.bits, lq.symmetric, scheme)
    q = quantize_codes(wg, scale, zp, lq.bits)
    q.sub_(zp).mul_(scale)
    return q.reshape(out_f, in_f).to(w.dtype)


def mse_clip_qparams(wg: torch.Tensor, lq: LayerQuant, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the clip ratio from ``scheme.clip_grid`` that minimises ||W - Q(W)||^2."""

    def group_error(ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale, zp = choose_qparams(wg, lq.bits, lq.symmetric, scheme, clip=ratio)
        q = quantize_codes(wg, scale, zp, lq.bits)
        q.sub_(zp).mul_(scale).sub_(wg)
        return q.square_().sum(dim=-1, keepdim=True), scale, zp

    best_err, best_scale, best_zp = group_error(scheme.clip_grid[0])
    for ratio in scheme.clip_grid[1:]:
        err, scale, zp = group_error(ratio)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def quant_error(w: torch.Tensor, lq: LayerQuant, scheme: QuantScheme = DEFAULT_SCHEME) -> torch.Tensor:
    """Elementwise squared quantization error (W - Q(W))^2, float32."""
    return (w.float() - fake_quantize(w, lq, scheme).float()).square_()


class PlanApplier:
    """Applies plans to a model in place and restores it exactly.

    The original weights are copied once (to ``keep_on``, default the weights' own device). ``apply``
    only rewrites layers whose setting differs from what they hold now, so consecutive trials that
    share most of their plan cost little; ``restore`` copies the originals back bit for bit.
    """

    def __init__(
        self, model: Any, layers: ModelLayers, scheme: QuantScheme = DEFAULT_SCHEME, keep_on: str | None = None, quantizer: Any = None
    ):
        self.layers = layers
        self.scheme = scheme
        #: chooses the affine codes of a layer (``fake_quantize(fqn, w, lq)``, e.g. a ``gptq.GptqQuantizer``); None: plain rounding
        self.quantizer = quantizer
        modules = dict(model.named_modules())
        self._weights: dict[str, torch.nn.Parameter] = {}
        self._orig: dict[str, torch.Tensor] = {}
        for li in layers.linears:
            weight = modules[li.fqn].weight
            self._weights[li.fqn] = weight
            self._orig[li.fqn] = weight.detach().to(keep_on or weight.device, copy=True)
        self._current: dict[str, LayerQuant] = {f: FULL_PRECISION for f in self._weights}

    def check(self, plan: QuantPlan) -> None:
        infos = self.layers.by_fqn()
        unknown = [f for f in plan if f not in infos]
        if unknown:
            raise UserError(
                f"plan names {len(unknown)} unknown layer(s), e.g. {unknown[0]!r}; known layers look like {next(iter(infos))!r}"
            )
        for fqn, lq in plan.items():
            check_group(infos[fqn], lq)

    @torch.no_grad()
    def apply(self, plan: QuantPlan) -> int:
        """Set every layer to its planned setting. Returns the number of layers rewritten."""
        self.check(plan)
        changed = 0
        for fqn, weight in self._weights.items():
            target = plan.setting(fqn)
            if self._current[fqn] == target:
                continue
            orig = self._orig[fqn]
            if orig.device != weight.device:
                orig = orig.to(weight.device, non_blocking=True)
            weight.copy_(self.fake_quantize(fqn, orig, target) if target.is_quantized else orig)
            self._current[fqn] = target
            changed += 1
        return changed

    @torch.no_grad()
    def restore(self) -> None:
        for fqn, weight in self._weights.items():
            if self._current[fqn] != FULL_PRECISION:
                weight.copy_(self._orig[fqn])
                self._current[fqn] = FULL_PRECISION

    def original(self, fqn: str) -> torch.Tensor:
        return self._orig[fqn]

    def fake_quantize(self, fqn: str, w: torch.Tensor, lq: LayerQuant) -> torch.Tensor:
        """Layer ``fqn``'s weight ``w`` (its original) quantized and dequantized at ``lq`` by this applier's quantizer."""
        if self.quantizer is not None and lq.is_quantized and backend_for(lq).name == AFFINE:
            return self.quantizer.fake_quantize(fqn, w, lq)
        return fake_quantize(w, lq, self.scheme)


# ---------------------------------------------------------------------------------------------
# The built-in quantization backends (bo_search.backends)
# ---------------------------------------------------------------------------------------------


class AffineBackend:
    """Integer codes in the signed ``bits`` range with a scale (and an integer zero point when
    asymmetric) per group of ``group_size`` input features: torchao's ``IntxWeightOnlyConfig``."""

    name = AFFINE

    def claims(self, lq: LayerQuant) -> bool:
        return not lq.ggml_type

    def check(self, info: LinearInfo, lq: LayerQuant) -> None:
        check_affine_group(info, lq)

    def fake_quantize(self, w: torch.Tensor, lq: LayerQuant, scheme: QuantScheme) -> torch.Tensor:
        return affine_fake_quantize(w, lq, scheme)

    def layer_bits(self, info: LinearInfo, lq: LayerQuant, scheme: QuantScheme) -> int:
        g = effective_group(info.in_features, lq.group_size)
        groups = info.out_features * (info.in_features // g)
        code_bits = 8 * math.ceil(info.numel * lq.bits / 8)
        return code_bits + groups * (scheme.scale_bits + (0 if lq.symmetric else scheme.zero_bits))

    def export_error(self, lq: LayerQuant, target: str) -> str | None:
        return None


class GgmlBackend:
    """llama.cpp tensor types (``LayerQuant.of_ggml``): llama.cpp's own rounding, its exact bytes per
    block with its row fallback; exported as a GGUF file, not as a packed or torchao checkpoint."""

    name = GGML

    def claims(self, lq: LayerQuant) -> bool:
        return bool(lq.ggml_type)

    def check(self, info: LinearInfo, lq: LayerQuant) -> None:
        try:
            ggml_effective_type(lq.ggml_type, info.in_features)
        except UserError as err:
            raise UserError(f"layer {info.fqn}: {err}") from None

    def fake_quantize(self, w: torch.Tensor, lq: LayerQuant, scheme: QuantScheme) -> torch.Tensor:
        from bo_search import ggml

        return ggml.fake_quantize(w, lq.ggml_type)

    def layer_bits(self, info: LinearInfo, lq: LayerQuant, scheme: QuantScheme) -> int:
        return 8 * info.out_features * ggml_row_bytes(lq.ggml_type, info.in_features)

    def export_error(self, lq: LayerQuant, target: str) -> str | None:
        if target == "packed":
            return "a plan in llama.cpp types is saved as a GGUF file (report --gguf OUT.gguf), not as a packed checkpoint"
        return f"{lq.ggml_type} is a llama.cpp type, not a torchao one: export a ggml plan as GGUF (report --gguf out.gguf)"


register_builtin(AffineBackend(), GgmlBackend())


def torchao_layer_config(lq: LayerQuant, in_features: int, device: str = "cpu", scheme: QuantScheme = DEFAULT_SCHEME) -> Any:
    """The torchao config that stores this layer's setting, preferring a fast kernel on ``device``.

    CUDA: 4-bit asymmetric groups -> ``Int4WeightOnlyConfig`` (tinygemm), 8-bit per channel ->
    ``Int8WeightOnlyConfig``. Everything else (and every choice on CPU) -> ``IntxWeightOnlyConfig``,
    which stores unpacked int8 codes and matches the fake-quant numerics.
    """
    refusal = export_error([lq], "torchao")
    if refusal:
        raise UserError(refusal)
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, MappingType
    from torchao.quantization.granularity import PerAxis, PerGroup

    if not lq.is_quantized:
        return None
    if device.startswith("cuda") and has_fast_kernel(lq, device):
        if lq.bits == 4:
            return Int4WeightOnlyConfig(group_size=effective_group(in_features, lq.group_size))
        return Int8WeightOnlyConfig()
    gran = PerAxis(0) if lq.group_size == PER_CHANNEL else PerGroup(lq.group_size)
    return IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{lq.bits}"),
        granularity=gran,
        mapping_type=MappingType.SYMMETRIC if lq.symmetric else MappingType.ASYMMETRIC,
        scale_dtype=scheme.torch_scale_dtype,
    )


def has_fast_kernel(lq: LayerQuant, device: str) -> bool:
    """Whether a layer choice runs on a fast quantized kernel on ``device`` (CUDA tinygemm int4 / int8 weight-only)."""
    if not device.startswith("cuda") or not lq.is_quantized or backend_for(lq).name != AFFINE:
        return False
    if lq.bits == 4 and not lq.symmetric and lq.group_size in (32, 64, 128, 256):
        return True
    # 8-bit per channel runs as Int8WeightOnlyConfig (symmetric per-channel int8 on CUDA); the
    # perplexity of a measured trial is taken on that real model, so the mapping is honest.
    return lq.bits == 8 and lq.group_size == PER_CHANNEL


def torchao_fqn_config(plan: QuantPlan, layers: ModelLayers, device: str = "cpu", scheme: QuantScheme = DEFAULT_SCHEME) -> Any:
    """A torchao ``FqnToConfig`` applying ``plan`` with ``quantize_(model, cfg, filter_fn=None)``."""
    from torchao.quantization import FqnToConfig

    infos = layers.by_fqn()
    mapping = {}
    for fqn, lq in plan.items():
        cfg = torchao_layer_config(lq, infos[fqn].in_features, device, scheme)
        if cfg is not None:
            mapping[fqn] = cfg
    return FqnToConfig(fqn_to_config=mapping)


def uniform_plan(layers: ModelLayers | Iterable[str], lq: LayerQuant) -> QuantPlan:
    fqns = layers.fqns if isinstance(layers, ModelLayers) else tuple(layers)
    return QuantPlan.uniform(fqns, lq)
