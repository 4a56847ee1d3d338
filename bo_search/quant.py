"""Group-wise affine weight quantization: fake-quant primitives, in-place apply/restore of a plan,
exact size accounting, bit-packed checkpoints, and conversion to torchao configs.

The fake-quant path is written with fused whole-tensor ops and reproduces, bit for bit, what torchao's
``IntxWeightOnlyConfig(weight_dtype=torch.intN, granularity=PerGroup(g), mapping_type=...,
scale_dtype=torch.float16)`` stores (``tests/test_quant.py`` checks this). The arithmetic follows
torchao's ``choose_qparams_affine`` / ``quantize_affine`` / ``dequantize_affine``: the range always
includes zero, the zero point is an integer in the signed range, the scale is stored as float16.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bo_search.model import LinearInfo, ModelLayers
from bo_search.types import FULL_PRECISION, PER_CHANNEL, LayerQuant, QuantPlan, UserError, ggml_effective_type, ggml_row_bytes

if TYPE_CHECKING:
    from bo_search.space import SearchSpace

_DTYPE_BITS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16, torch.float64: 64}
_DTYPE_BY_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class QuantScheme:
    """How quantized weights are stored: scale dtype, zero-point width, optional MSE clipping."""

    scale_dtype: str = "float16"
    zero_bits: int = 16
    mse_clip: bool = False
    #: clip ratios tried per group when ``mse_clip`` is on (1.0 = plain min/max)
    clip_grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)

    def __post_init__(self) -> None:
        if self.scale_dtype not in _DTYPE_BY_NAME:
            raise UserError(f"scale dtype {self.scale_dtype!r} is not one of {sorted(_DTYPE_BY_NAME)}")
        if self.zero_bits not in (8, 16, 32):
            raise UserError(f"zero-point width {self.zero_bits} must be 8, 16 or 32 bits")

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _DTYPE_BY_NAME[self.scale_dtype]

    @property
    def scale_bits(self) -> int:
        return _DTYPE_BITS[self.torch_scale_dtype]


DEFAULT_SCHEME = QuantScheme()


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of a ``bits``-bit code, as torchao's ``torch.intN`` dtypes use."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def effective_group(in_features: int, group_size: int) -> int:
    return in_features if group_size == PER_CHANNEL else group_size


def check_group(info: LinearInfo, lq: LayerQuant) -> None:
    if lq.ggml_type:
        try:
            ggml_effective_type(lq.ggml_type, info.in_features)
        except UserError as err:
            raise UserError(f"layer {info.fqn}: {err}") from None
        return
    if not lq.is_quantized:
        return
    g = effective_group(info.in_features, lq.group_size)
    if info.in_features % g:
        divisors = [d for d in (16, 32, 64, 96, 128, 192, 256, 384, 512) if info.in_features % d == 0]
        raise UserError(
            f"groupsize {g} does not divide in_features={info.in_features} of layer {info.fqn}: "
            f"ragged groups are rejected; use a divisor such as {divisors} or -1 (per channel)"
        )


# ---------------------------------------------------------------------------------------------
# Primitives (pure tensor functions)
# ---------------------------------------------------------------------------------------------


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
    """Quantize then dequantize a 2-D weight with one setting; returns a new tensor of w's dtype."""
    if lq.ggml_type:
        from bo_search import ggml

        return ggml.fake_quantize(w, lq.ggml_type)
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
        scale, zp = _mse_clip_qparams(wg, lq, scheme)
    else:
        scale, zp = choose_qparams(wg, lq.bits, lq.symmetric, scheme)
    q = quantize_codes(wg, scale, zp, lq.bits)
    q.sub_(zp).mul_(scale)
    return q.reshape(out_f, in_f).to(w.dtype)


def _mse_clip_qparams(wg: torch.Tensor, lq: LayerQuant, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
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


# ---------------------------------------------------------------------------------------------
# Applying a plan to a model held in memory
# ---------------------------------------------------------------------------------------------


class PlanApplier:
    """Applies plans to a model in place and restores it exactly.

    The original weights are copied once (to ``keep_on``, default the weights' own device). ``apply``
    only rewrites layers whose setting differs from what they hold now, so consecutive trials that
    share most of their plan cost little; ``restore`` copies the originals back bit for bit.
    """

    def __init__(self, model: Any, layers: ModelLayers, scheme: QuantScheme = DEFAULT_SCHEME, keep_on: str | None = None):
        self.layers = layers
        self.scheme = scheme
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
            weight.copy_(fake_quantize(orig, target, self.scheme) if target.is_quantized else orig)
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


# ---------------------------------------------------------------------------------------------
# Size accounting
# ---------------------------------------------------------------------------------------------


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
        dtype = fp_dtype or _config_dtype_name(model)
        if dtype not in _DTYPE_BY_NAME:
            raise UserError(f"storage dtype {dtype!r} is not one of {sorted(_DTYPE_BY_NAME)}")
        self.fp_dtype = dtype
        self.fp_bits = _DTYPE_BITS[_DTYPE_BY_NAME[dtype]]
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
        if lq.ggml_type:  # the type's exact bytes per block, k-quant fallback applied
            return 8 * info.out_features * ggml_row_bytes(lq.ggml_type, info.in_features)
        if not lq.is_quantized:
            return info.numel * self.fp_bits
        g = effective_group(info.in_features, lq.group_size)
        groups = info.out_features * (info.in_features // g)
        code_bits = 8 * math.ceil(info.numel * lq.bits / 8)
        meta = groups * (self.scheme.scale_bits + (0 if lq.symmetric else self.scheme.zero_bits))
        return code_bits + meta

    def report(self, plan: QuantPlan) -> SizeReport:
        qbits = 0
        for li in self.layers.linears:
            qbits += self.layer_bits(li, plan.setting(li.fqn))
        n = sum(li.numel for li in self.layers.linears)
        return SizeReport(total_bytes=(qbits + self.other_bits) / 8, quantized_weight_bits=qbits, n_planned_weights=n)

    def gb(self, plan: QuantPlan) -> float:
        return self.report(plan).gb


def _config_dtype_name(model: Any) -> str:
    dtype = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, str) and dtype in _DTYPE_BY_NAME:
        return dtype
    return str(next(model.parameters()).dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Bit-packed checkpoints
# ---------------------------------------------------------------------------------------------


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer codes (< 2**bits) into a little-endian bit stream of uint8."""
    flat = codes.reshape(-1).to(torch.int32)
    shifts = torch.arange(bits, dtype=torch.int32, device=flat.device)
    bitplane = ((flat.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)
    pad = (-bitplane.numel()) % 8
    if pad:
        bitplane = torch.cat([bitplane, bitplane.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32, device=flat.device)).to(torch.uint8)
    return (bitplane.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device)
    bitplane = ((packed.to(torch.int32).unsqueeze(1) >> shifts) & 1).reshape(-1)[: numel * bits]
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=packed.device)
    return (bitplane.reshape(numel, bits) * weights).sum(dim=1, dtype=torch.int32)


_ZERO_DTYPES = {8: torch.int8, 16: torch.int16, 32: torch.int32}


def quantize_layer_packed(w: torch.Tensor, lq: LayerQuant, scheme: QuantScheme) -> dict[str, torch.Tensor]:
    """Packed tensors for one layer: ``codes`` (uint8 bit stream), ``scale`` and, if asymmetric, ``zero``."""
    out_f, in_f = w.shape
    g = effective_group(in_f, lq.group_size)
    wg = w.reshape(out_f, in_f // g, g).float()
    scale, zp = _mse_clip_qparams(wg, lq, scheme) if scheme.mse_clip else choose_qparams(wg, lq.bits, lq.symmetric, scheme)
    q = quantize_codes(wg, scale, zp, lq.bits)
    qmin, _ = qrange(lq.bits)
    tensors = {"codes": pack_bits((q - qmin).to(torch.int32), lq.bits), "scale": scale.reshape(out_f, -1).contiguous()}
    if not lq.symmetric:
        tensors["zero"] = zp.reshape(out_f, -1).to(_ZERO_DTYPES[scheme.zero_bits]).contiguous()
    return tensors


def dequantize_layer_packed(
    tensors: Mapping[str, torch.Tensor], lq: LayerQuant, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    out_f, in_f = shape
    g = effective_group(in_f, lq.group_size)
    qmin, _ = qrange(lq.bits)
    q = unpack_bits(tensors["codes"], lq.bits, out_f * in_f).to(torch.float32).add_(qmin)
    q = q.reshape(out_f, in_f // g, g)
    scale = tensors["scale"].reshape(out_f, -1, 1)
    if "zero" in tensors:
        q.sub_(tensors["zero"].reshape(out_f, -1, 1).to(torch.float32))
    else:
        qmax_plus = (1 << (lq.bits - 1)) - 1
        q.sub_(float(int((qmax_plus + qmin + 1) / 2)))
    return q.mul_(scale).reshape(out_f, in_f).to(dtype)


PACKED_FORMAT = "bo_search.packed/1"


def save_packed(
    model: Any,
    layers: ModelLayers,
    plan: QuantPlan,
    path: str | Path,
    scheme: QuantScheme = DEFAULT_SCHEME,
    fp_dtype: str | None = None,
    originals: PlanApplier | None = None,
) -> Path:
    """Write ``model.safetensors`` with bit-packed quantized layers and every other tensor at its storage dtype.

    ``originals`` supplies unquantized weights when the model currently holds fake-quantized ones.
    """
    from safetensors.torch import save_file

    if any(lq.ggml_type for lq in plan.values()):
        raise UserError("a plan in llama.cpp types is saved as a GGUF file (report --gguf OUT.gguf), not as a packed checkpoint")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fp = _DTYPE_BY_NAME[fp_dtype or _config_dtype_name(model)]
    infos = layers.by_fqn()
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    data_ptrs: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, t in state.items():
        ptr = t.data_ptr()
        if ptr in data_ptrs:
            tied[name] = data_ptrs[ptr]
            continue
        data_ptrs[ptr] = name
        fqn = name.removesuffix(".weight")
        lq = plan.setting(fqn) if name.endswith(".weight") and fqn in infos else None
        if lq is not None and lq.is_quantized:
            w = originals.original(fqn) if originals is not None else t
            for key, val in quantize_layer_packed(w.detach().cpu(), lq, scheme).items():
                out[f"{name}.{key}"] = val
        else:
            out[name] = t.detach().cpu().to(fp if t.is_floating_point() else t.dtype).contiguous()
    # Non-persistent buffers are not part of state_dict already.
    meta = {
        "format": PACKED_FORMAT,
        "plan": plan.dumps(),
        "scheme": json.dumps({"scale_dtype": scheme.scale_dtype, "zero_bits": scheme.zero_bits, "mse_clip": scheme.mse_clip}),
        "tied": json.dumps(tied),
        "shapes": json.dumps({f: [infos[f].out_features, infos[f].in_features] for f in plan if plan[f].is_quantized}),
    }
    save_file(out, str(path / "model.safetensors"), metadata=meta)
    model.config.save_pretrained(str(path))
    return path / "model.safetensors"


def load_packed_state(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], QuantPlan]:
    """Read a packed checkpoint back into a plain (dequantized) state dict and its plan."""
    from safetensors import safe_open

    file = Path(path)
    if file.is_dir():
        file = file / "model.safetensors"
    if not file.is_file():
        raise UserError(f"packed checkpoint not found: {file}")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != PACKED_FORMAT:
            raise UserError(f"{file} is not a bo_search packed checkpoint (format {meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    plan = QuantPlan.loads(meta["plan"])
    shapes = json.loads(meta["shapes"])
    state: dict[str, torch.Tensor] = {}
    for fqn, lq in plan.items():
        if not lq.is_quantized:
            continue
        parts = {k: tensors.pop(f"{fqn}.weight.{k}") for k in ("codes", "scale", "zero") if f"{fqn}.weight.{k}" in tensors}
        state[f"{fqn}.weight"] = dequantize_layer_packed(parts, lq, tuple(shapes[fqn]), dtype)
    for name, t in tensors.items():
        state[name] = t.to(dtype) if t.is_floating_point() else t
    for name, src in json.loads(meta["tied"]).items():
        state[name] = state[src]
    return state, plan


# ---------------------------------------------------------------------------------------------
# torchao conversion (real kernels and export)
# ---------------------------------------------------------------------------------------------


def torchao_layer_config(lq: LayerQuant, in_features: int, device: str = "cpu", scheme: QuantScheme = DEFAULT_SCHEME) -> Any:
    """The torchao config that stores this layer's setting, preferring a fast kernel on ``device``.

    CUDA: 4-bit asymmetric groups -> ``Int4WeightOnlyConfig`` (tinygemm), 8-bit per channel ->
    ``Int8WeightOnlyConfig``. Everything else (and every choice on CPU) -> ``IntxWeightOnlyConfig``,
    which stores unpacked int8 codes and matches the fake-quant numerics.
    """
    if lq.ggml_type:
        raise UserError(f"{lq.ggml_type} is a llama.cpp type, not a torchao one: export a ggml plan as GGUF (report --gguf out.gguf)")
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
    if not device.startswith("cuda") or not lq.is_quantized or lq.ggml_type:
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


def slot_choices(space: SearchSpace) -> list[list[tuple[int, int]]]:
    """Per slot of a SearchSpace, every allowed (bits, group_size) pair."""
    return [[(b, g) for b in slot.bits.values for g in slot.group_size.values] for slot in space.slots]


def space_size_bounds(space: SearchSpace, size_model: SizeModel) -> tuple[float, float]:
    """Exact smallest and largest model size (GB) over all plans of a space (size is additive over slots)."""
    infos = size_model.layers.by_fqn()
    lo = hi = size_model.other_bits
    planned = {f for slot in space.slots for f in slot.fqns}
    for li in size_model.layers.linears:  # layers outside the space stay at full precision
        if li.fqn not in planned:
            lo += size_model.layer_bits(li, FULL_PRECISION)
            hi += size_model.layer_bits(li, FULL_PRECISION)
    for slot, choices in zip(space.slots, slot_choices(space)):
        costs = [sum(size_model.layer_bits(infos[f], space.choice_setting(b, g)) for f in slot.fqns) for b, g in choices]
        lo += min(costs)
        hi += max(costs)
    return lo / 8 / 1e9, hi / 8 / 1e9
