"""Bit-packed checkpoints: codes packed at their bit width, scales and zero points, written as
safetensors and read back; the sizes they take on disk are what :mod:`bo_search.sizes` predicts."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bo_search.backends import export_error
from bo_search.model import ModelLayers
from bo_search.types import LayerQuant, QuantPlan, UserError

if TYPE_CHECKING:
    pass
from bo_search.quant import (
    DEFAULT_SCHEME,
    DTYPE_BY_NAME,
    PlanApplier,
    QuantScheme,
    choose_qparams,
    effective_group,
    mse_clip_qparams,
    qrange,
    quantize_codes,
)
from bo_search.sizes import config_dtype_name


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


def quantize_layer_packed(
    w: torch.Tensor, lq: LayerQuant, scheme: QuantScheme, codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Packed tensors for one layer: ``codes`` (uint8 bit stream), ``scale`` and, if asymmetric, ``zero``.
    ``codes``: (codes, scale, zero) chosen by another quantizer (GPTQ) instead of plain rounding."""
    out_f, in_f = w.shape
    if codes is not None:
        q, scale, zp = codes
    else:
        g = effective_group(in_f, lq.group_size)
        wg = w.reshape(out_f, in_f // g, g).float()
        scale, zp = mse_clip_qparams(wg, lq, scheme) if scheme.mse_clip else choose_qparams(wg, lq.bits, lq.symmetric, scheme)
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
    quantizer: Any = None,
) -> Path:
    """Write ``model.safetensors`` with bit-packed quantized layers and every other tensor at its storage dtype.

    ``originals`` supplies unquantized weights when the model currently holds fake-quantized ones;
    ``quantizer`` (e.g. a ``gptq.GptqQuantizer``) chooses the codes, else plain rounding.
    """
    from safetensors.torch import save_file

    refusal = export_error(plan.values(), "packed")
    if refusal:
        raise UserError(refusal)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fp = DTYPE_BY_NAME[fp_dtype or config_dtype_name(model)]
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
            codes = quantizer.codes(fqn, w.detach().cpu(), lq) if quantizer is not None else None
            for key, val in quantize_layer_packed(w.detach().cpu(), lq, scheme, codes).items():
                out[f"{name}.{key}"] = val
        else:
            out[name] = t.detach().cpu().to(fp if t.is_floating_point() else t.dtype).contiguous()
    # Non-persistent buffers are not part of state_dict already.
    meta = {
        "format": PACKED_FORMAT,
        "plan": plan.dumps(),
        "scheme": json.dumps({"scale_dtype": scheme.scale_dtype, "zero_bits": scheme.zero_bits, "mse_clip": scheme.mse_clip}),
        "quantizer": json.dumps(quantizer.describe() if quantizer is not None else {"quantizer": "rtn"}),
        "tied": json.dumps(tied),
        "shapes": json.dumps({f: [infos[f].out_features, infos[f].in_features] for f in plan if plan[f].is_quantized}),
    }
    save_file(out, str(path / "model.safetensors"), metadata=meta)
    model.config.save_pretrained(str(path))
    return path / "model.safetensors"


def _packed_file(path: str | Path) -> Path:
    """The checkpoint's ``model.safetensors`` (``path`` is the file or its directory)."""
    file = Path(path)
    if file.is_dir():
        file = file / "model.safetensors"
    if not file.is_file():
        raise UserError(f"packed checkpoint not found: {file}")
    return file


def _packed_meta(file: Path, f: Any) -> dict[str, str]:
    """The open checkpoint's metadata; a UserError unless it is this package's packed format."""
    meta = f.metadata() or {}
    if meta.get("format") != PACKED_FORMAT:
        raise UserError(f"{file} is not a bo_search packed checkpoint (format {meta.get('format')!r})")
    return dict(meta)


def load_packed_codes(path: str | Path) -> dict[str, tuple[LayerQuant, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per quantized layer of a packed checkpoint: (setting, codes (out, in) int32 in the signed range,
    scale (out, n_groups) as stored, zero point (out, n_groups) int32; 0 for symmetric codes)."""
    from safetensors import safe_open

    file = _packed_file(path)
    with safe_open(str(file), framework="pt") as f:
        meta = _packed_meta(file, f)
        plan = QuantPlan.loads(meta["plan"])
        shapes = json.loads(meta["shapes"])
        out = {}
        for fqn, lq in plan.items():
            if not lq.is_quantized:
                continue
            out_f, in_f = shapes[fqn]
            qmin, _ = qrange(lq.bits)
            codes = unpack_bits(f.get_tensor(f"{fqn}.weight.codes"), lq.bits, out_f * in_f).add_(qmin).reshape(out_f, in_f)
            scale = f.get_tensor(f"{fqn}.weight.scale")
            zkey = f"{fqn}.weight.zero"
            zero = f.get_tensor(zkey).to(torch.int32) if zkey in f.keys() else torch.zeros(scale.shape, dtype=torch.int32)
            out[fqn] = (lq, codes, scale, zero)
    return out


def load_packed_state(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], QuantPlan]:
    """Read a packed checkpoint back into a plain (dequantized) state dict and its plan."""
    from safetensors import safe_open

    file = _packed_file(path)
    with safe_open(str(file), framework="pt") as f:
        meta = _packed_meta(file, f)
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
