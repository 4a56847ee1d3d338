"""Measured sensitivity: one slot quantized at a time, KL / NLL increase on the calibration windows."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from bo_search.sensitivity.table import choice_key
from bo_search.types import LayerQuant, QuantPlan


@contextlib.contextmanager
def _replay(blocks: Sequence[Any], outputs: Sequence[Any], upto: int) -> Iterator[None]:
    """Blocks ``0..upto-1`` return their recorded outputs instead of computing them."""
    try:
        for i in range(upto):
            blocks[i].forward = lambda *a, _out=outputs[i], **k: _out
        yield
    finally:
        for i in range(upto):
            blocks[i].__dict__.pop("forward", None)


@torch.inference_mode()
def measured_costs(
    model: Any,
    applier: Any,
    blocks: Sequence[Any],
    ids: torch.Tensor,
    units: Mapping[str, tuple[str, ...]],
    unit_blocks: Mapping[str, int],
    choices: Mapping[str, Sequence[LayerQuant]],
    batch_size: int = 4,
    replay: bool = True,
    progress: Callable[..., Any] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], float]:
    """Quantize one unit at a time at each of its choices (the rest full precision) and measure the
    mean NLL increase and the mean KL divergence to the full-precision predictions, per token.

    Returns (nll_costs, kl_costs, full-precision mean NLL). With ``replay`` the blocks before the
    unit's first block return outputs recorded in the full-precision pass.
    """
    device = next(model.parameters()).device
    batches = [ids[i : i + batch_size].to(device) for i in range(0, ids.shape[0], batch_size)]
    n_tok = ids.shape[0] * (ids.shape[1] - 1)
    applier.restore()
    recorded: list[list[Any]] = []
    ref_logp: list[torch.Tensor] = []
    base_nll = 0.0
    for b in batches:
        outs: list[Any] = [None] * len(blocks)
        hooks = [
            blk.register_forward_hook(lambda _m, _a, out, _i=i, _outs=outs: _outs.__setitem__(_i, out)) for i, blk in enumerate(blocks)
        ]
        try:
            logits = model(input_ids=b[:, :-1], use_cache=False).logits.float()
        finally:
            for h in hooks:
                h.remove()
        recorded.append(outs if replay else [])
        logp = torch.log_softmax(logits, dim=-1)
        ref_logp.append(logp)
        base_nll += float(F.nll_loss(logp.flatten(0, 1), b[:, 1:].flatten(), reduction="sum"))
    base = base_nll / n_tok
    nll_costs: dict[str, dict[str, float]] = {}
    kl_costs: dict[str, dict[str, float]] = {}
    jobs = [(u, lq) for u in units for lq in choices[u] if lq.is_quantized]
    for u, lq in progress(jobs, desc="measured (unit, choice)") if progress else jobs:
        applier.apply(QuantPlan({f: lq for f in units[u]}))
        upto = max(unit_blocks[u], 0) if replay else 0
        nll = kl = 0.0
        for b, outs, lp_ref in zip(batches, recorded, ref_logp):
            with _replay(blocks, outs, upto):
                logits = model(input_ids=b[:, :-1], use_cache=False).logits.float()
            lp = torch.log_softmax(logits, dim=-1)
            nll += float(F.nll_loss(lp.flatten(0, 1), b[:, 1:].flatten(), reduction="sum"))
            kl += float(F.kl_div(lp, lp_ref, log_target=True, reduction="sum"))
        nll_costs.setdefault(u, {})[choice_key(lq)] = nll / n_tok - base
        kl_costs.setdefault(u, {})[choice_key(lq)] = kl / n_tok
    applier.restore()
    return nll_costs, kl_costs, base
