"""Hessian trace per layer by Hutchinson's estimator, with its stopping rules."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bo_search.sensitivity.fit import _eager_attention, _grad_on, window_loss
from bo_search.sensitivity.table import choice_key
from bo_search.types import LayerQuant


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson trace estimates with their relative standard errors."""

    traces: dict[str, float]
    rel_se: dict[str, float]
    total: float
    total_rel_se: float
    iterations: int
    converged: bool


def _rel_se(samples: torch.Tensor) -> torch.Tensor:
    """Relative standard error of the mean along dim 0 (inf where the mean is 0)."""
    n = samples.shape[0]
    mean = samples.mean(0)
    se = samples.std(0, unbiased=True) / math.sqrt(n)
    return torch.where(mean != 0, se / mean.abs(), torch.full_like(mean, math.inf))


def _spearman_t(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().to(torch.float64)
    rb = b.argsort().argsort().to(torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else 1.0


def hutchinson_should_stop(s: torch.Tensor, n_win: int, tol: float, stop_on: str) -> bool:
    """The stopping test on the samples so far (iterations x layers); see ``hutchinson_traces``."""
    total_err = _rel_se(s.sum(1, keepdim=True))
    if stop_on == "rank":
        # split-half reliability: the ranking from the odd iterations against the even ones
        # (disjoint samples, so agreement is not shared noise)
        stable = s.shape[0] >= 2 * max(2, n_win) and _spearman_t(s[0::2].mean(0), s[1::2].mean(0)) >= 1 - tol
        return stable or bool((total_err < tol).all())
    err = _rel_se(s) if stop_on == "layers" else total_err
    return bool((err < tol).all())


def hutchinson_sample(model: Any, params: Sequence[torch.nn.Parameter], ids: torch.Tensor, vs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``v_l . (H v)_l`` for each parameter ``l`` (float64), H the Hessian of the mean loss of ``ids``
    with respect to ``params``, by double backward. Needs gradients enabled on ``params``."""
    loss = window_loss(model, ids)
    grads = torch.autograd.grad(loss, list(params), create_graph=True)
    hvs = torch.autograd.grad(grads, list(params), grad_outputs=list(vs))
    return torch.tensor([float((v * h).sum(dtype=torch.float64)) for v, h in zip(vs, hvs)], dtype=torch.float64)


def hutchinson_traces(
    model: Any,
    weights: Mapping[str, torch.nn.Parameter],
    ids: torch.Tensor,
    max_iter: int = 100,
    tol: float = 0.1,
    stop_on: str = "rank",
    seed: int = 0,
    min_iter: int | None = None,
    progress: Callable[..., Any] | None = None,
) -> TraceEstimate:
    """Per-layer trace of the Hessian of the mean next-token loss over the windows ``ids``.

    Iteration k uses window ``k mod n`` and a fresh Rademacher vector over every layer in ``weights``;
    at least ``min_iter`` iterations (default: one per window, and 4) run before the stopping test.

    Stopping rules: ``rank`` (default) stops when the layers' ranking is stable (Spearman correlation of
    the per-layer means of the odd and of the even iterations at least ``1 - tol``) or the total is
    tight (its relative standard error below ``tol``): what an allocation uses is the ranking and the
    scale. ``layers``: every layer's relative standard error below ``tol`` (slow: single layers'
    estimates are noisy); ``total``: the total's.
    """
    device = next(iter(weights.values())).device
    params = list(weights.values())
    names = list(weights)
    gen = torch.Generator().manual_seed(seed)
    n_win = ids.shape[0]
    min_iter = min(max_iter, max(4, n_win) if min_iter is None else max(2, min_iter))
    samples: list[torch.Tensor] = []
    converged = False
    bar = progress(range(max_iter), desc="Hutchinson iterations") if progress else None
    with _grad_on(params), _eager_attention(model):
        for k in range(max_iter):
            vs = [(torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(device=device, dtype=p.dtype) for p in params]
            samples.append(hutchinson_sample(model, params, ids[k % n_win : k % n_win + 1].to(device), vs))
            del vs
            if bar is not None:
                bar.update(1)
            if k + 1 >= min_iter and hutchinson_should_stop(torch.stack(samples), n_win, tol, stop_on):
                converged = True
                break
    if bar is not None:
        bar.close()
    s = torch.stack(samples)
    mean = s.mean(0)
    rel = _rel_se(s)
    total_rel = float(_rel_se(s.sum(1, keepdim=True))[0])
    return TraceEstimate(
        traces={f: float(m) for f, m in zip(names, mean)},
        rel_se={f: float(r) for f, r in zip(names, rel)},
        total=float(mean.sum()),
        total_rel_se=total_rel,
        iterations=len(samples),
        converged=converged,
    )


def trace_costs(
    weights: Mapping[str, torch.Tensor],
    traces: Mapping[str, float],
    choices: Mapping[str, Sequence[LayerQuant]],
    scheme: Any,
    quantizer: Any = None,
) -> dict[str, dict[str, float]]:
    """``0.5 * max(trace, 0) / numel * ||dW||^2`` per layer and choice (dW from ``quantizer`` when given)."""
    from bo_search.quant import quant_error

    out: dict[str, dict[str, float]] = {}
    for fqn, lqs in choices.items():
        w = weights[fqn].detach()
        per_weight = max(traces[fqn], 0.0) / w.numel()
        quantized = [lq for lq in lqs if lq.is_quantized]
        if quantizer is not None:
            errs = [(w.float() - q.float()).square_() for q in quantizer.fake_quantize_many(fqn, w, quantized)]
        else:
            errs = [quant_error(w, lq, scheme) for lq in quantized]
        out[fqn] = {choice_key(lq): 0.5 * per_weight * float(e.sum(dtype=torch.float64)) for lq, e in zip(quantized, errs)}
    return out
