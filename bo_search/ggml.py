"""llama.cpp's tensor types (ggml) as a quantization scheme: quantize a weight to a type's codes,
decode the codes exactly as a GGUF reader does, and pack them into the type's bytes.

Fake quantization is ``decode(quantize(w))``: the weights the search scores are, bit for bit, the
weights that the packed bytes decode to (``tests/test_ggml.py`` checks every type against the
``gguf`` package's own ``gguf.quants.dequantize``). Rows are quantized independently, in blocks
along the input dimension (llama.cpp's layout).

Block layouts and byte sizes are llama.cpp's (ggml-common.h), as the ``gguf`` package states them
(``GGML_QUANT_SIZES``). The block-32 quantizers (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) follow ggml's
reference rounding, and ``gguf.quants.quantize`` gives the same bytes. For the k-quants only
decoding is specified by the package; their quantizers here are ours: min/max per sub-block
(signed absmax for the symmetric Q3_K and Q6_K), sub-block scales rounded to the type's 4/6/8-bit
scale codes against a float16 super-block scale. They are simpler than llama.cpp's iterative
``make_qkx2_quants`` search, so a llama.cpp-quantized file of the same type is usually a little
more accurate; the numbers the search reports are those of *this* file.

A k-quant needs rows whose length is a multiple of 256. Like ``llama-quantize``, a row that is not
falls back to a block-32 type of at least as many bits: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0
(llama.cpp's own fallbacks), and Q2_K, Q3_K -> Q4_0 (as llama.cpp b11739's Q3_K_M writes them; some
llama.cpp versions use IQ4_NL, which has Q4_0's size and is not implemented here). Sizes count the
type actually written.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from bo_search.types import GGML_TYPES as TYPES
from bo_search.types import ggml_effective_type as effective_type

QK_K = 256
Codes = dict[str, torch.Tensor]

# ---------------------------------------------------------------------------------------------
# quantize -> codes; codes -> weights (float32, in the order of operations of gguf's decoder)
# ---------------------------------------------------------------------------------------------


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16)


def _inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    idx = x.abs().argmax(dim=-1, keepdim=True)
    return x.gather(-1, idx)


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), as ggml's reference Q8_0 uses."""
    a = x.abs()
    f = torch.floor(a)
    return torch.sign(x) * (f + torch.floor(2 * (a - f)))


def _q_sym32(levels: int) -> Callable[[torch.Tensor], Codes]:
    def quant(x: torch.Tensor) -> Codes:  # Q4_0 (levels 16), Q5_0 (32)
        d = _signed_absmax(x) / -(levels // 2)
        q = torch.trunc(x * _inv(d) + (levels // 2 + 0.5)).clamp(0, levels - 1)
        return {"d": _f16(d), "q": q.to(torch.uint8)}

    return quant


def _q_asym32(levels: int) -> Callable[[torch.Tensor], Codes]:
    def quant(x: torch.Tensor) -> Codes:  # Q4_1 (16), Q5_1 (32)
        mx = x.max(dim=-1, keepdim=True).values
        mn = x.min(dim=-1, keepdim=True).values
        d = (mx - mn) / (levels - 1)
        q = torch.trunc((x - mn) * _inv(d) + 0.5).clamp(0, levels - 1)
        return {"d": _f16(d), "m": _f16(mn), "q": q.to(torch.uint8)}

    return quant


def _q_q8_0(x: torch.Tensor) -> Codes:
    d = x.abs().max(dim=-1, keepdim=True).values / 127
    q = _roundf(x * _inv(d))
    return {"d": _f16(d), "q": q.to(torch.int8)}


def _q_kasym(sub: int, qmax: int, smax: int) -> Callable[[torch.Tensor], Codes]:
    """Q2_K (sub 16, q 0..3, 4-bit scales), Q4_K (32, 0..15, 6-bit), Q5_K (32, 0..31, 6-bit):
    per sub-block w ~ d*sc*q - dmin*m with m >= 0."""

    def quant(x: torch.Tensor) -> Codes:
        n = x.shape[0]
        xs = x.reshape(n, QK_K // sub, sub)
        off = (-xs.min(dim=-1).values).clamp(min=0)
        scale = (xs.max(dim=-1).values + off) / qmax
        d = _f16(scale.max(dim=-1, keepdim=True).values / smax)
        dmin = _f16(off.max(dim=-1, keepdim=True).values / smax)
        sc = torch.round(scale * _inv(d.float())).clamp(0, smax)
        m = torch.round(off * _inv(dmin.float())).clamp(0, smax)
        dl = (d.float() * sc).unsqueeze(-1)
        ml = (dmin.float() * m).unsqueeze(-1)
        q = torch.round((xs + ml) * _inv(dl)).clamp(0, qmax)
        return {"d": d, "dmin": dmin, "sc": sc.to(torch.uint8), "m": m.to(torch.uint8), "q": q.reshape(n, QK_K).to(torch.uint8)}

    return quant


def _q_ksym(qlo: int, qhi: int, slo: int, shi: int) -> Callable[[torch.Tensor], Codes]:
    """Q3_K (q -4..3, scales -32..31), Q6_K (q -32..31, scales -128..127); sub-blocks of 16."""

    def quant(x: torch.Tensor) -> Codes:
        n = x.shape[0]
        xs = x.reshape(n, QK_K // 16, 16)
        s = _signed_absmax(xs).squeeze(-1) / qlo  # the extreme weight maps to the most negative code
        d = _f16(s.abs().max(dim=-1, keepdim=True).values / shi)
        sc = torch.round(s * _inv(d.float())).clamp(slo, shi)
        dl = (d.float() * sc).unsqueeze(-1)
        q = torch.round(xs * _inv(dl)).clamp(qlo, qhi)
        return {"d": d, "sc": sc.to(torch.int16), "q": q.reshape(n, QK_K).to(torch.int16)}

    return quant


def _dec_sym32(offset: int) -> Callable[[Codes], torch.Tensor]:
    def dec(c: Codes) -> torch.Tensor:
        return c["d"].float() * (c["q"].to(torch.int16) - offset).float()

    return dec


def _dec_asym32(c: Codes) -> torch.Tensor:
    return c["d"].float() * c["q"].float() + c["m"].float()


def _dec_q8_0(c: Codes) -> torch.Tensor:
    return c["q"].float() * c["d"].float()


def _dec_kasym(sub: int) -> Callable[[Codes], torch.Tensor]:
    def dec(c: Codes) -> torch.Tensor:
        n = c["q"].shape[0]
        dl = (c["d"].float() * c["sc"].float()).unsqueeze(-1)
        ml = (c["dmin"].float() * c["m"].float()).unsqueeze(-1)
        return (dl * c["q"].reshape(n, QK_K // sub, sub).float() - ml).reshape(n, QK_K)

    return dec


def _dec_ksym(c: Codes) -> torch.Tensor:
    n = c["q"].shape[0]
    dl = (c["d"].float() * c["sc"].float()).unsqueeze(-1)
    return (dl * c["q"].reshape(n, QK_K // 16, 16).float()).reshape(n, QK_K)


_QUANT: dict[str, Callable[[torch.Tensor], Codes]] = {
    "Q4_0": _q_sym32(16),
    "Q5_0": _q_sym32(32),
    "Q4_1": _q_asym32(16),
    "Q5_1": _q_asym32(32),
    "Q8_0": _q_q8_0,
    "Q2_K": _q_kasym(16, 3, 15),
    "Q4_K": _q_kasym(32, 15, 63),
    "Q5_K": _q_kasym(32, 31, 63),
    "Q3_K": _q_ksym(-4, 3, -32, 31),
    "Q6_K": _q_ksym(-32, 31, -128, 127),
}
_DECODE: dict[str, Callable[[Codes], torch.Tensor]] = {
    "Q4_0": _dec_sym32(8),
    "Q5_0": _dec_sym32(16),
    "Q4_1": _dec_asym32,
    "Q5_1": _dec_asym32,
    "Q8_0": _dec_q8_0,
    "Q2_K": _dec_kasym(16),
    "Q4_K": _dec_kasym(32),
    "Q5_K": _dec_kasym(32),
    "Q3_K": _dec_ksym,
    "Q6_K": _dec_ksym,
}


def quantize(w: torch.Tensor, name: str) -> tuple[str, Codes]:
    """Codes of a 2-D weight (out, in) in the type written for its rows: (that type, codes per block)."""
    eff = effective_type(name, w.shape[-1])
    if eff == "F16":
        return eff, {"w": w.detach().to(torch.float16)}
    t = TYPES[eff]
    blocks = w.detach().to(torch.float32).reshape(-1, t.block)
    return eff, _QUANT[eff](blocks)


def decode(eff: str, codes: Codes, shape: tuple[int, ...]) -> torch.Tensor:
    if eff == "F16":
        return codes["w"].float().reshape(shape)
    return _DECODE[eff](codes).reshape(shape)


def fake_quantize(w: torch.Tensor, name: str) -> torch.Tensor:
    """The float32 weights the type's bytes decode to, in ``w``'s dtype and shape."""
    eff, codes = quantize(w, name)
    return decode(eff, codes, tuple(w.shape)).to(w.dtype)


# ---------------------------------------------------------------------------------------------
# codes -> the type's bytes (llama.cpp's block layouts)
# ---------------------------------------------------------------------------------------------


def _u8(x: torch.Tensor) -> np.ndarray:
    return x.numpy().astype(np.uint8)


def _f16_bytes(d: torch.Tensor) -> np.ndarray:
    return d.numpy().astype(np.float16).reshape(d.shape[0], -1).view(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> 16 bytes: byte j holds code j (low nibble) and code j+16 (high nibble)."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits32(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit codes -> 4 bytes: bit j of the little-endian uint32 is bit 4 of code j."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins -> Q4_K/Q5_K's 12 bytes."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _bitplanes(bits: np.ndarray) -> np.ndarray:
    """(n, 8, 32) single bits -> 32 bytes: bit j of byte b is bits[:, j, b]."""
    out = np.zeros((bits.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        out |= (bits[:, j] & 1).astype(np.uint8) << j
    return out


def _crumbs(q: np.ndarray) -> np.ndarray:
    """(n, 256) 2-bit codes -> 64 bytes: value h*128 + s*32 + b sits at bits 2s of byte h*32 + b."""
    q = (q & 3).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def pack(eff: str, codes: Codes) -> np.ndarray:
    """The codes' bytes: (number of blocks, type_size) uint8."""
    if eff == "F16":
        return codes["w"].numpy().astype(np.float16).reshape(-1, 1).view(np.uint8)
    d = _f16_bytes(codes["d"])
    if eff in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        q = _u8(codes["q"])
        parts = [d] + ([_f16_bytes(codes["m"])] if eff in ("Q4_1", "Q5_1") else [])
        if eff in ("Q5_0", "Q5_1"):
            parts.append(_high_bits32(q))
        return np.concatenate(parts + [_nibbles(q)], axis=1)
    if eff == "Q8_0":
        return np.concatenate([d, codes["q"].numpy().astype(np.int8).view(np.uint8)], axis=1)
    if eff == "Q2_K":
        q = _u8(codes["q"])
        scales = (_u8(codes["sc"]) & 0x0F) | (_u8(codes["m"]) << 4)
        return np.concatenate([scales, _crumbs(q), d, _f16_bytes(codes["dmin"])], axis=1)
    if eff in ("Q4_K", "Q5_K"):
        q = _u8(codes["q"]).reshape(-1, 4, 2, 32)  # sub-block 2c + t, element b -> nibble t of byte c*32 + b
        qs = ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(-1, 128)
        parts = [d, _f16_bytes(codes["dmin"]), _k_scales(_u8(codes["sc"]), _u8(codes["m"]))]
        if eff == "Q5_K":
            hi = ((_u8(codes["q"]) >> 4) & 1).reshape(-1, 8, 32)  # bit j of byte b: sub-block j, element b
            parts.append(_bitplanes(hi))
        return np.concatenate(parts + [qs], axis=1)
    if eff == "Q3_K":
        qv = codes["q"].numpy()
        hmask = _bitplanes((qv >= 0).astype(np.uint8).reshape(-1, 8, 32))  # the high bit is set for codes 0..3
        ql = np.asarray(np.where(qv >= 0, qv, qv + 4)).astype(np.uint8)
        s6 = (codes["sc"].numpy() + 32).astype(np.uint8)
        scales = np.empty((s6.shape[0], 12), dtype=np.uint8)
        scales[:, 0:8] = (s6[:, :8] & 0x0F) | ((s6[:, 8:] & 0x0F) << 4)
        hi2 = (s6 >> 4) & 3  # bits 2t of byte 8 + c hold scale t*4 + c
        scales[:, 8:12] = hi2[:, 0:4] | (hi2[:, 4:8] << 2) | (hi2[:, 8:12] << 4) | (hi2[:, 12:16] << 6)
        return np.concatenate([hmask, _crumbs(ql), scales, d], axis=1)
    if eff == "Q6_K":
        q6 = (codes["q"].numpy() + 32).astype(np.uint8)
        lo = (q6 & 0x0F).reshape(-1, 2, 2, 64)  # value h*128 + t*64 + b: nibble t of byte h*64 + b
        ql6 = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
        hi4 = (q6 >> 4).reshape(-1, 2, 4, 32)  # value h*128 + s*32 + b: bits 2s of byte h*32 + b
        qh = (hi4[:, :, 0] | (hi4[:, :, 1] << 2) | (hi4[:, :, 2] << 4) | (hi4[:, :, 3] << 6)).reshape(-1, 64)
        sc = codes["sc"].numpy().astype(np.int8).view(np.uint8)
        return np.concatenate([ql6, qh, sc, d], axis=1)
    raise AssertionError(eff)


def pack_weight(w: torch.Tensor, name: str) -> tuple[str, np.ndarray]:
    """A 2-D weight (out, in) as the bytes of the type written for it: (type, (out, row bytes) uint8)."""
    eff, codes = quantize(w, name)
    return eff, pack(eff, codes).reshape(w.shape[0], -1)
