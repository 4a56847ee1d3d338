"""Error-compensating quantization in the affine int format: GPTQ (Frantar, Ashkboos, Hoefler and
Alistarh, 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), written here from the paper's description.

Same storage as plain rounding (``--quantizer rtn``): per group of ``g`` input columns one float16
scale and one integer zero point, codes in the signed ``bits`` range, so the packed checkpoint and
torchao's ``IntxWeightOnlyConfig`` hold the result unchanged. What differs is how the codes are
chosen: columns are rounded one at a time, and each column's rounding error is pushed onto the
columns not yet rounded, weighted by the inverse of the layer's input second moment
``H = E[x x^T]`` (the Hessian of the layer's output error), so that the error of the layer's
*output* on calibration text is small rather than the error of each weight.

- **Non-sequential, cached.** ``H`` is measured once per model and text on the full-precision model
  (calibration split only), one per distinct input (q/k/v share theirs). A layer's codes then depend
  only on that layer, its setting and the regulariser, so they are computed once per
  (layer, bits, group) and cached on disk for every trial and worker.
- **Static groups, act-order.** Columns are rounded in order of decreasing Hessian diagonal (the
  inputs with the most energy first), and every group's scale and zero point are chosen (min/max,
  as plain rounding does) from the original weights before any column is rounded, since columns are
  then visited out of group order. (Without act-order, columns go in order and a group's scale comes
  from the weights as updated when the group starts; measured worse, BENCHMARKS.md.)
- **The regulariser is chosen per model.** Compensation trusts ``H``; full trust over-fits the
  calibration activations of a full-precision model, which a quantized model does not reproduce.
  The regulariser shrinks ``H`` towards its mean diagonal, ``H + damp * mean(diag H) * I`` (with the
  ``mean`` variant, towards ``mean(diag H) * I + mu mu^T``, which keeps the input mean ``mu`` in the
  objective). ``damp`` is picked for each model and text by validation perplexity of uniform plans
  (:func:`choose_damp`); ``damp = inf`` is plain rounding, so the choice can fall back to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bo_search.model import cache_dir
from bo_search.quant import DEFAULT_SCHEME, QuantScheme, choose_qparams, effective_group, qrange, quantize_codes
from bo_search.types import LayerQuant, UserError

if TYPE_CHECKING:
    from bo_search.data import Windows
    from bo_search.model import ModelLayers
    from bo_search.trial import ModelContext

log = logging.getLogger(__name__)

#: bumped when the Hessians, the codes or the regulariser choice change, so old caches are not reused
GPTQ_VERSION = 1
#: the damping values tried per model (times the mean diagonal of H); inf = plain rounding
DAMP_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, math.inf)
#: validation tokens the damping is chosen on
CHOICE_TOKENS = 4096
#: bit widths of the uniform plans the damping is chosen on (with the probe group, see probe_group)
CHOICE_BITS = (3, 4)
#: Hessians need at least this many calibration tokens per input feature of the widest layer
MIN_TOKENS_PER_FEATURE = 2


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GptqConfig:
    """How GPTQ runs: calibration tokens for the Hessians, the variant, and the damping (``None``:
    chosen per model on validation text, the default; a number fixes it, for experiments)."""

    tokens: int = 8192
    #: columns by decreasing Hessian diagonal, groups fixed from the original weights: the product's
    #: variant (better than columns in order at 3 and 4 bits on the embedded model, BENCHMARKS.md)
    act_order: bool = True
    mean: bool = False
    damp: float | None = None

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise UserError(f"GPTQ calibration tokens must be positive, got {self.tokens}")
        if self.damp is not None and not self.damp > 0:
            raise UserError(f"GPTQ damping must be positive (inf = plain rounding), got {self.damp}")

    def key(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "act_order": self.act_order, "mean": self.mean}


@dataclass(frozen=True)
class Regulariser:
    """``H + damp * (mean(diag H) * I [+ mu mu^T])``; ``damp = inf``: no compensation (plain rounding)."""

    damp: float
    mean: bool = False
    act_order: bool = False

    @property
    def is_rtn(self) -> bool:
        return math.isinf(self.damp)

    def label(self) -> str:
        return "rtn" if self.is_rtn else f"damp {self.damp:g}" + (" +mean" if self.mean else "") + (" act-order" if self.act_order else "")

    def to_json(self) -> dict[str, Any]:
        return {"damp": "inf" if self.is_rtn else self.damp, "mean": self.mean, "act_order": self.act_order}


# ---------------------------------------------------------------------------------------------
# Hessians
# ---------------------------------------------------------------------------------------------


@dataclass
class Hessians:
    """Per distinct linear input: ``H = E[x x^T]`` and ``mu = E[x]`` over ``n_tokens`` calibration
    positions (float32); ``source[fqn]`` names the input a layer reads (q/k/v share one)."""

    h: dict[str, torch.Tensor]
    mu: dict[str, torch.Tensor]
    source: dict[str, str]
    n_tokens: int

    def of(self, fqn: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.source[fqn]
        return self.h[key], self.mu[key]

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"h.{k}": v.contiguous() for k, v in self.h.items()} | {f"mu.{k}": v.contiguous() for k, v in self.mu.items()}
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"source": json.dumps(self.source), "n_tokens": str(self.n_tokens)})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Hessians:
        from safetensors import safe_open

        h: dict[str, torch.Tensor] = {}
        mu: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k in f.keys():
                kind, _, name = k.partition(".")
                (h if kind == "h" else mu)[name] = f.get_tensor(k)
        return cls(h, mu, json.loads(meta["source"]), int(meta["n_tokens"]))


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (the layers after it are not needed)."""


@torch.no_grad()
def collect_hessians(
    model: Any,
    fqns: Sequence[str],
    ids: torch.Tensor,
    batch_size: int = 4,
    progress: Callable[..., Any] | None = None,
    stop_after: str | None = None,
) -> Hessians:
    """``E[x x^T]`` and ``E[x]`` of the inputs of the linears ``fqns`` over every position of the
    windows ``ids`` (n, T + 1; the last token is not fed, as in evaluation). Layers fed the very same
    tensor, one after the other, share one entry. ``stop_after``: a module whose forward ends the pass (sequential use)."""
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    means: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    last: list[Any] = [None, ""]  # the previous layer's input tensor (held, so identity is exact) and its entry
    count = 0

    def hook(fqn: str) -> Callable[..., None]:
        def fn(_mod: Any, args: tuple[Any, ...]) -> None:
            x = args[0]
            if x is last[0]:  # the same tensor as the layer before (q/k/v, gate/up): one entry
                source[fqn] = last[1]
                return
            last[0], last[1] = x, fqn
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            g = (flat.T @ flat).double()
            if fqn in sums:
                sums[fqn].add_(g)
                means[fqn].add_(flat.sum(0).double())
            else:
                sums[fqn] = g
                means[fqn] = flat.sum(0).double()
            source[fqn] = fqn

        return fn

    def stop(*_a: Any) -> None:
        raise _StopForward

    handles = [modules[f].register_forward_pre_hook(hook(f)) for f in fqns]
    if stop_after is not None:
        handles.append(modules[stop_after].register_forward_hook(stop))
    starts = range(0, ids.shape[0], batch_size)
    try:
        for s in progress(starts, desc="GPTQ Hessians") if progress else starts:
            batch = ids[s : s + batch_size, :-1].to(device)
            last[0] = None
            with contextlib.suppress(_StopForward):
                model(input_ids=batch, use_cache=False)
            count += batch.numel()
    finally:
        for h in handles:
            h.remove()
    missing = [f for f in fqns if f not in source]
    if missing:
        raise RuntimeError(f"GPTQ: layer {missing[0]} never ran in a forward pass")
    return Hessians({k: (v / count).float() for k, v in sums.items()}, {k: (v / count).float() for k, v in means.items()}, source, count)


# ---------------------------------------------------------------------------------------------
# The quantizer of one layer
# ---------------------------------------------------------------------------------------------


def inverse_factor(h: torch.Tensor, mu: torch.Tensor, reg: Regulariser, order: torch.Tensor | None = None) -> torch.Tensor:
    """The upper Cholesky factor ``U`` of ``(H_reg)^-1`` (float32), columns in ``order`` if given:
    row ``j`` of ``U`` spreads column ``j``'s rounding error over the columns after it."""
    hd = h.double()
    diag_mean = float(hd.diagonal().mean())
    if not diag_mean > 0:
        raise UserError("GPTQ: a layer's calibration inputs are all zero; its Hessian is empty")
    target = torch.eye(hd.shape[0], dtype=torch.float64) * diag_mean
    if reg.mean:
        m = mu.double()
        target = target + torch.outer(m, m)
    hr = hd + reg.damp * target
    if order is not None:
        hr = hr[order][:, order]
    chol = torch.linalg.cholesky(hr)
    inv = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(inv, upper=True).float()


def _block_width(g: int) -> int:
    """Columns rounded between two lazy updates: the group itself, or a divisor of it up to 256."""
    for b in range(min(g, 256), 0, -1):
        if g % b == 0:
            return b
    return 1


def _qparams(
    wg: torch.Tensor, qmin: torch.Tensor, qmax: torch.Tensor, symmetric: bool, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quant.choose_qparams`` with a code range per row (rows of several bit widths at once);
    the same arithmetic, so one bit width gives the same scale and zero point bit for bit."""
    mn, mx = torch.aminmax(wg, dim=-1, keepdim=True)
    zero = torch.zeros((), dtype=wg.dtype)
    mn = torch.minimum(mn, zero)
    mx = torch.maximum(mx, zero)
    eps = torch.finfo(wg.dtype).smallest_normal
    if symmetric:
        scale = torch.maximum(-mn, mx) / ((qmax - qmin) / 2)
        zp = torch.zeros_like(scale)  # int((qmax + qmin + 1) / 2) is 0 for every signed range
        scale = scale.clamp(min=eps)
    else:
        scale = ((mx - mn) / (qmax - qmin)).clamp(min=eps)
        zp = torch.maximum(torch.minimum(qmin - torch.round(mn / scale), qmax), qmin)
    scale = scale.to(scheme.torch_scale_dtype)
    scale = scale.clamp(min=torch.finfo(scheme.torch_scale_dtype).tiny)
    return scale, zp


@torch.no_grad()
def gptq_codes(
    w: torch.Tensor,
    u: torch.Tensor,
    bits: Sequence[int],
    group_size: int,
    symmetric: bool = False,
    scheme: QuantScheme = DEFAULT_SCHEME,
    order: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GPTQ codes of weight ``w`` (out, in) at each of ``bits`` (one pass for all: the rows of every
    bit width are rounded together), group ``group_size``: per bit width ``(codes, scale, zero)``
    shaped (out, n_groups, g) / (out, n_groups, 1) like ``quant.choose_qparams``; dequantized as
    ``(codes - zero) * scale``. ``u``: :func:`inverse_factor` in the same column ``order``."""
    out_f, in_f = w.shape
    g = effective_group(in_f, group_size)
    if in_f % g:
        raise UserError(f"groupsize {g} does not divide in_features={in_f}")
    k = len(bits)
    ng = in_f // g
    W = w.detach().float().cpu().repeat(k, 1)  # (k * out, in): every bit width's copy
    lo = torch.tensor([float(qrange(b)[0]) for b in bits]).repeat_interleave(out_f)
    hi = torch.tensor([float(qrange(b)[1]) for b in bits]).repeat_interleave(out_f)
    rows = W.shape[0]
    scale = torch.empty(rows, ng, 1, dtype=scheme.torch_scale_dtype)
    zp = torch.empty(rows, ng, 1)
    if order is not None:  # groups are fixed before any column moves (static groups)
        s0, z0 = _qparams(W.view(rows, ng, g), lo.view(-1, 1, 1), hi.view(-1, 1, 1), symmetric, scheme)
        scale.copy_(s0)
        zp.copy_(z0)
        W = W[:, order]
        col_group = torch.div(order, g, rounding_mode="floor")
    codes = torch.empty_like(W)
    B = _block_width(g)
    for b0 in range(0, in_f, B):
        b1 = b0 + B
        if order is None and b0 % g == 0:  # the group starts: its scale and zero from the updated weights
            gi = b0 // g
            s, z = _qparams(W[:, b0 : b0 + g].unsqueeze(1), lo.view(-1, 1, 1), hi.view(-1, 1, 1), symmetric, scheme)
            scale[:, gi : gi + 1] = s
            zp[:, gi : gi + 1] = z
        if order is None:
            gi = b0 // g
            s_blk = scale[:, gi, :].expand(rows, B)
            z_blk = zp[:, gi, :].expand(rows, B)
        else:
            cg = col_group[b0:b1]
            s_blk = scale[:, cg, 0]
            z_blk = zp[:, cg, 0]
        inv_blk = 1.0 / s_blk  # float16 reciprocal, as quant.quantize_codes computes it
        W1 = W[:, b0:b1].clone()
        E1 = torch.empty_like(W1)
        U1 = u[b0:b1, b0:b1]
        for j in range(B):
            col = W1[:, j]
            q = torch.round(col * inv_blk[:, j]).add_(z_blk[:, j]).clamp_(min=lo, max=hi)
            codes[:, b0 + j] = q
            err = (col - (q - z_blk[:, j]) * s_blk[:, j]).div_(U1[j, j])
            E1[:, j] = err
            if j + 1 < B:
                W1[:, j + 1 :].addr_(err, U1[j, j + 1 :], alpha=-1.0)
        if b1 < in_f:
            W[:, b1:].addmm_(E1, u[b0:b1, b1:], alpha=-1.0)
    if order is not None:
        codes = codes[:, torch.argsort(order)]
    out = []
    for i in range(k):
        r = slice(i * out_f, (i + 1) * out_f)
        out.append((codes[r].reshape(out_f, ng, g).contiguous(), scale[r].contiguous(), zp[r].contiguous()))
    return out


def rtn_codes(w: torch.Tensor, lq: LayerQuant, scheme: QuantScheme = DEFAULT_SCHEME) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain rounding's codes, scale and zero point (what ``quant.fake_quantize`` dequantizes)."""
    out_f, in_f = w.shape
    g = effective_group(in_f, lq.group_size)
    wg = w.detach().float().reshape(out_f, in_f // g, g)
    scale, zp = choose_qparams(wg, lq.bits, lq.symmetric, scheme)
    return quantize_codes(wg, scale, zp, lq.bits), scale, zp


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(codes - zero) * scale`` as (out, in), the arithmetic of ``quant.fake_quantize``."""
    out_f = codes.shape[0]
    return (codes - zp).mul_(scale).reshape(out_f, -1).to(dtype)


# ---------------------------------------------------------------------------------------------
# The per-model quantizer: codes per (layer, setting), cached on disk
# ---------------------------------------------------------------------------------------------


def setting_key(lq: LayerQuant) -> str:
    return f"{lq.bits}:{lq.group_size}" + (":sym" if lq.symmetric else "")


class GptqQuantizer:
    """Codes of every (layer, setting) under one model's Hessians and regulariser.

    Codes are read from ``code_dir`` (one safetensors file per layer and setting, written atomically
    by whichever process computed it first) or computed and written there. ``hessians`` is a loader,
    called only when a code must be computed."""

    name = "gptq"

    def __init__(
        self,
        hessians: Callable[[], Hessians],
        reg: Regulariser,
        code_dir: Path | None,
        scheme: QuantScheme = DEFAULT_SCHEME,
        info: dict[str, Any] | None = None,
    ):
        self.reg = reg
        self.scheme = scheme
        self.code_dir = code_dir
        self.info = dict(info or {})
        self._load_hessians = hessians
        self._hessians: Hessians | None = None
        self._factors: OrderedDict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.stats = {"computed": 0, "read": 0, "compute_s": 0.0, "read_s": 0.0}
        if code_dir is not None:
            code_dir.mkdir(parents=True, exist_ok=True)

    def describe(self) -> dict[str, Any]:
        """What the codes depend on besides the model and the setting (cache keys, history, exports)."""
        return {"quantizer": "gptq", **self.reg.to_json(), **self.info}

    @property
    def hessians(self) -> Hessians:
        if self._hessians is None:
            self._hessians = self._load_hessians()
        return self._hessians

    def _factor(self, fqn: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (self.hessians.source[fqn], self.reg.act_order)
        if key not in self._factors:
            h, mu = self.hessians.of(fqn)
            order = torch.argsort(h.diagonal(), descending=True) if self.reg.act_order else None
            self._factors[key] = (inverse_factor(h, mu, self.reg, order), order)
            while len(self._factors) > 4:
                self._factors.popitem(last=False)
        return self._factors[key]

    def _path(self, fqn: str, lq: LayerQuant) -> Path | None:
        if self.code_dir is None:
            return None
        return self.code_dir / f"{fqn}-{setting_key(lq).replace(':', '_')}.safetensors"

    def codes(self, fqn: str, w: torch.Tensor, lq: LayerQuant) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale, zero point) of layer ``fqn`` (original weight ``w``) at ``lq``."""
        return self.codes_many(fqn, w, [lq])[0]

    def codes_many(self, fqn: str, w: torch.Tensor, lqs: Sequence[LayerQuant]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The codes of several settings of one layer: cached ones read, the rest computed together."""
        if self.reg.is_rtn:
            return [rtn_codes(w, lq, self.scheme) for lq in lqs]
        found: dict[LayerQuant, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        t0 = time.perf_counter()
        for lq in lqs:
            path = self._path(fqn, lq)
            got = _read_codes(path) if path is not None and path.is_file() else None
            if got is not None:
                found[lq] = got
                self.stats["read"] += 1
        self.stats["read_s"] += time.perf_counter() - t0
        missing = [lq for lq in dict.fromkeys(lqs) if lq not in found]
        if missing:
            found.update(zip(missing, self.compute(fqn, w, missing)))
        return [found[lq] for lq in lqs]

    def fake_quantize_many(self, fqn: str, w: torch.Tensor, lqs: Sequence[LayerQuant]) -> list[torch.Tensor]:
        return [dequantize(*c, w.dtype) for c in self.codes_many(fqn, w, lqs)]

    def compute(self, fqn: str, w: torch.Tensor, lqs: Sequence[LayerQuant]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Compute (and cache) the codes of several settings of one layer; settings sharing a group
        size and symmetry are rounded in one pass."""
        t0 = time.perf_counter()
        u, order = self._factor(fqn)
        results: dict[LayerQuant, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        by_group: dict[tuple[int, bool], list[LayerQuant]] = {}
        for lq in lqs:
            by_group.setdefault((lq.group_size, lq.symmetric), []).append(lq)
        for (g, sym), group in by_group.items():
            for lq, res in zip(group, gptq_codes(w, u, [lq.bits for lq in group], g, sym, self.scheme, order)):
                results[lq] = res
        self.stats["computed"] += len(lqs)
        self.stats["compute_s"] += time.perf_counter() - t0
        for lq, res in results.items():
            path = self._path(fqn, lq)
            if path is not None:
                _write_codes(path, *res)
        return [results[lq] for lq in lqs]

    def fake_quantize(self, fqn: str, w: torch.Tensor, lq: LayerQuant) -> torch.Tensor:
        codes, scale, zp = self.codes(fqn, w, lq)
        return dequantize(codes, scale, zp, w.dtype)


def _write_codes(path: Path, codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({"codes": codes.to(torch.int8), "scale": scale, "zero": zp.to(torch.int8)}, str(tmp))
    os.replace(tmp, path)


def _read_codes(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    from safetensors.torch import load_file

    try:
        t = load_file(str(path))
    except Exception as err:  # a damaged cache file is recomputed
        log.warning("ignoring the GPTQ code cache file %s: %s", path, err)
        return None
    return t["codes"].float(), t["scale"], t["zero"].float()


# ---------------------------------------------------------------------------------------------
# Calibration of one model and text: Hessians, then the damping chosen on validation text
# ---------------------------------------------------------------------------------------------


def probe_group(layers: ModelLayers) -> int:
    """The group size of the uniform plans the damping is chosen on: 64 if it divides every layer, else
    the nearest group size that does, else per channel."""
    for g in (64, 32, 128, 96, 192, 256, 16):
        if all(li.in_features % g == 0 for li in layers.linears):
            return g
    return -1


@dataclass
class Calibration:
    """A model's GPTQ calibration: where its Hessians are, the damping chosen and the sweep behind it."""

    key: str
    hessian_path: str
    n_tokens: int
    damp: float
    sweep: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["damp"] = "inf" if math.isinf(self.damp) else self.damp
        for row in d["sweep"]:
            if isinstance(row.get("damp"), float) and math.isinf(row["damp"]):
                row["damp"] = "inf"
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Calibration:
        obj = dict(obj)
        obj["damp"] = float(obj["damp"])
        obj["sweep"] = [{**r, "damp": float(r["damp"])} for r in obj.get("sweep", [])]
        return cls(**obj)


def hessian_key(model_id: str, corpus_id: str, seq_len: int, tokens: int, fqns: Sequence[str]) -> str:
    """What the Hessians depend on: model, text, window length, calibration tokens, the layers."""
    blob = json.dumps([GPTQ_VERSION, model_id, corpus_id, seq_len, tokens, hashlib.sha1("|".join(fqns).encode()).hexdigest()])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def calibration_key(hkey: str, cfg: GptqConfig, scheme: QuantScheme) -> str:
    """... and the damping choice: the variant and the storage (scale dtype) the probes round in."""
    blob = json.dumps([hkey, cfg.key(), scheme.scale_dtype, scheme.zero_bits, DAMP_GRID, CHOICE_BITS, CHOICE_TOKENS])
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """One process computes a calibration; others wait, then read what it wrote."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def calibration_windows(ctx: ModelContext, cfg: GptqConfig) -> Windows:
    """The calibration split's windows for the Hessians; a UserError when the text is too short."""
    from bo_search.data import split_windows

    windows = split_windows(ctx.tok, ctx.corpus, "calibration", cfg.tokens, ctx.cfg.max_seqlen)
    widest = max(li.in_features for li in ctx.layers.linears)
    need = MIN_TOKENS_PER_FEATURE * widest
    if windows.n_tokens < need:
        raise UserError(
            f"GPTQ needs at least {need:,} calibration tokens for its Hessians ({MIN_TOKENS_PER_FEATURE} per input feature of the "
            f"widest layer, {widest}); the calibration split of {ctx.corpus.name} has {windows.n_tokens:,} in windows of "
            f"{ctx.cfg.max_seqlen}: give a longer --eval_text (the calibration split gets about 20% of its documents)"
        )
    return windows


def uniform_nlls(ctx: ModelContext, quantizer: GptqQuantizer, lqs: Sequence[LayerQuant], windows: Windows) -> list[float]:
    """Mean NLL per token on ``windows`` with every planned linear at each of ``lqs`` under
    ``quantizer`` (each layer's settings rounded in one pass; the model is left at full precision)."""
    from bo_search.metrics import perplexity

    modules = dict(ctx.model.named_modules())
    codes = {  # held as int8 codes (a quarter of float32)
        li.fqn: [(c.to(torch.int8), sc, z) for c, sc, z in quantizer.codes_many(li.fqn, ctx.applier.original(li.fqn), lqs)]
        for li in ctx.layers.linears
    }
    out = []
    try:
        for i, _lq in enumerate(lqs):
            with torch.no_grad():
                for li in ctx.layers.linears:
                    orig = ctx.applier.original(li.fqn)
                    c, sc, z = codes[li.fqn][i]
                    modules[li.fqn].weight.copy_(dequantize(c.float(), sc, z, orig.dtype))
            out.append(perplexity(ctx.model, windows, ctx.cfg.batch_size).nll)
    finally:
        with torch.no_grad():
            for li in ctx.layers.linears:
                modules[li.fqn].weight.copy_(ctx.applier.original(li.fqn))
    return out


def choose_damp(
    ctx: ModelContext,
    hessians: Hessians,
    cfg: GptqConfig,
    grid: Sequence[float] = DAMP_GRID,
    bits: Sequence[int] = CHOICE_BITS,
    tokens: int = CHOICE_TOKENS,
    progress: Callable[..., Any] | None = None,
) -> tuple[float, list[dict[str, Any]]]:
    """The damping with the lowest mean validation NLL over uniform plans at ``bits`` (group
    :func:`probe_group`), over ``grid`` and then the half-decades beside the best finite value.
    Returns (damp, the sweep's rows)."""
    from bo_search.data import split_windows

    windows = split_windows(ctx.tok, ctx.corpus, "validation", tokens, ctx.cfg.max_seqlen)
    g = probe_group(ctx.layers)
    lqs = [LayerQuant(b, g) for b in bits]
    rows: list[dict[str, Any]] = []
    scores: dict[float, float] = {}

    def run(damp: float) -> None:
        q = GptqQuantizer(lambda: hessians, Regulariser(damp, cfg.mean, cfg.act_order), None, ctx.scheme)
        t0 = time.perf_counter()
        nlls = uniform_nlls(ctx, q, lqs, windows)
        secs = (time.perf_counter() - t0) / len(lqs)
        for lq, nll in zip(lqs, nlls):
            rows.append({"damp": damp, "setting": lq.label(), "val_nll": nll, "val_ppl": math.exp(nll), "seconds": secs})
        scores[damp] = sum(nlls) / len(nlls)

    for d in progress(list(grid), desc="GPTQ damping") if progress else grid:
        run(d)
    finite = {d: s for d, s in scores.items() if math.isfinite(d)}
    if finite:
        best = min(finite, key=lambda d: finite[d])
        for d in (best / math.sqrt(10), best * math.sqrt(10)):
            if not any(math.isclose(d, x) for x in scores):
                run(d)
    chosen = min(scores, key=lambda d: scores[d])
    return chosen, rows


def _paths(
    model_id: str, corpus_id: str, seq_len: int, cfg: GptqConfig, scheme: QuantScheme, fqns: Sequence[str]
) -> tuple[str, Path, Path, Path]:
    """(calibration key, its JSON, the Hessians' file, the lock) in the cache."""
    hkey = hessian_key(model_id, corpus_id, seq_len, cfg.tokens, fqns)
    key = calibration_key(hkey, cfg, scheme)
    root = cache_dir() / "gptq"
    return key, root / f"{model_id}-{key}.json", root / f"{model_id}-{hkey}-hessians.safetensors", root / f"{model_id}-{hkey}.lock"


def _read_calibration(meta: Path, hpath: Path) -> Calibration | None:
    if not (meta.is_file() and hpath.is_file()):
        return None
    try:
        return Calibration.from_json(json.loads(meta.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as err:
        log.warning("ignoring the GPTQ calibration %s: %s", meta, err)
        return None


def description(cal: Calibration, cfg: GptqConfig) -> dict[str, Any]:
    """What a model's GPTQ codes depend on besides the layer and its setting (recorded and keyed)."""
    reg = Regulariser(cal.damp, cfg.mean, cfg.act_order)
    return {"quantizer": "gptq", **reg.to_json(), "calibration": cal.key, "tokens": cal.n_tokens}


def cached_description(eval_cfg: Any, ref: Any, layers: ModelLayers) -> dict[str, Any] | None:
    """:func:`description` of a model and text already calibrated (read from the cache, no model
    loaded), or None."""
    from bo_search.data import load_corpus

    cfg = GptqConfig(tokens=eval_cfg.gptq_tokens)
    scheme = QuantScheme(scale_dtype=eval_cfg.scale_dtype, zero_bits=eval_cfg.zero_bits)
    _key, meta, hpath, _lock = _paths(
        ref.fingerprint, load_corpus(eval_cfg.eval_text).fingerprint, eval_cfg.max_seqlen, cfg, scheme, layers.fqns
    )
    cal = _read_calibration(meta, hpath)
    return description(cal, cfg) if cal is not None else None


def calibrate(ctx: ModelContext, cfg: GptqConfig, progress: Callable[..., Any] | None = None) -> Calibration:
    """The model's calibration, from the cache or computed now (Hessians on the calibration split,
    the damping chosen on the validation split) and cached; one process computes, others wait."""
    key, meta, hpath, lock = _paths(ctx.ref.fingerprint, ctx.corpus.fingerprint, ctx.cfg.max_seqlen, cfg, ctx.scheme, ctx.layers.fqns)
    root = meta.parent
    with _file_lock(lock):
        cal = _read_calibration(meta, hpath)
        if cal is not None and cfg.damp is None:
            return cal
        windows = calibration_windows(ctx, cfg)
        ctx.applier.restore()
        t0 = time.perf_counter()
        computed = not hpath.is_file()
        if computed:
            print(
                f"GPTQ: Hessians of {len(ctx.layers.linears)} linears on {windows.n_tokens:,} calibration tokens (once per model and text)",
                flush=True,
            )
            hess = collect_hessians(ctx.model, ctx.layers.fqns, windows.ids, ctx.cfg.batch_size, progress)
            hess.save(hpath)
        else:
            hess = Hessians.load(hpath)
        hess_s = time.perf_counter() - t0
        timing = {"hessians_s" if computed else "hessians_read_s": hess_s}
        if cfg.damp is not None:
            return Calibration(key, str(hpath), hess.n_tokens, cfg.damp, [], timing, cfg.key())
        print(f"GPTQ: choosing the damping on {CHOICE_TOKENS:,} validation tokens (once per model and text)", flush=True)
        t1 = time.perf_counter()
        damp, sweep = choose_damp(ctx, hess, cfg, progress=progress)
        cal = Calibration(key, str(hpath), hess.n_tokens, damp, sweep, {**timing, "choice_s": time.perf_counter() - t1}, cfg.key())
        root.mkdir(parents=True, exist_ok=True)
        tmp = meta.with_name(meta.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cal.to_json(), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, meta)
        print(f"GPTQ: damping {damp:g} chosen on validation ({cal.timings['choice_s']:.0f} s; Hessians {hess_s:.0f} s)", flush=True)
        return cal


def make_quantizer(ctx: ModelContext, cfg: GptqConfig, progress: Callable[..., Any] | None = None) -> GptqQuantizer:
    """The GPTQ quantizer of ``ctx``'s model and text (calibrating first if needed)."""
    cal = calibrate(ctx, cfg, progress)
    reg = Regulariser(cal.damp, cfg.mean, cfg.act_order)
    codes = None if reg.is_rtn else cache_dir() / "gptq" / f"codes-{ctx.ref.fingerprint}-{cal.key}-{_reg_id(reg)}"
    path = Path(cal.hessian_path)
    return GptqQuantizer(lambda: Hessians.load(path), reg, codes, ctx.scheme, {"calibration": cal.key, "tokens": cal.n_tokens})


def _reg_id(reg: Regulariser) -> str:
    return hashlib.sha1(json.dumps(reg.to_json(), sort_keys=True).encode()).hexdigest()[:10]
