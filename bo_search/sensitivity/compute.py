"""The method registry and ``compute``: a sensitivity table for a model and space."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from bo_search.sensitivity.fit import fisher_diagonal, fit_costs
from bo_search.sensitivity.hessian import hutchinson_traces, trace_costs
from bo_search.sensitivity.measured import measured_costs
from bo_search.sensitivity.table import METHOD_NAMES, Sensitivity, SensitivityConfig, _group_order, choice_key, layer_choices, slot_unit
from bo_search.types import UserError, did_you_mean

if TYPE_CHECKING:
    from bo_search.space import SearchSpace
    from bo_search.trial import ModelContext

log = logging.getLogger(__name__)


def _restrict(space: SearchSpace, blocks: Sequence[int] | None) -> list[Any]:
    return [s for s in space.slots if blocks is None or s.block in blocks]


def compute(
    ctx: ModelContext,
    space: SearchSpace,
    cfg: SensitivityConfig,
    blocks: Sequence[int] | None = None,
    progress: Callable[..., Any] | None = None,
) -> Sensitivity:
    """Run ``cfg.method`` on the model held by ``ctx`` (a trial.ModelContext) for the layers of ``space``
    (only the slots in ``blocks`` when given) and return the table."""
    from bo_search.data import split_windows

    if cfg.method not in METHODS:
        raise did_you_mean(cfg.method, list(METHODS), "sensitivity method")
    windows = split_windows(ctx.tok, ctx.corpus, "calibration", cfg.windows * cfg.seq_len, cfg.seq_len)
    slots = _restrict(space, blocks)
    if not slots:
        raise UserError(f"no slot of the space lies in blocks {list(blocks or [])}")
    all_choices = layer_choices(space)
    fqns = [f for s in slots for f in s.fqns]
    modules = dict(ctx.model.named_modules())
    weights = {f: modules[f].weight for f in fqns}
    ctx.applier.restore()
    t0 = time.perf_counter()
    out = METHODS[cfg.method](ctx, space, cfg, slots, weights, {f: all_choices[f] for f in fqns}, windows.ids, progress)
    compute_s = time.perf_counter() - t0
    units, scores, costs, details, timings = out
    timings = {"compute_s": compute_s, **timings}
    if cfg.time_eval:
        from bo_search.metrics import perplexity

        t1 = time.perf_counter()
        ppl = perplexity(ctx.model, windows, cfg.batch_size)
        timings["eval_pass_s"] = time.perf_counter() - t1
        timings["ratio_to_eval_pass"] = compute_s / max(timings["eval_pass_s"], 1e-9)
        for part in ("gradients_s", "hvp_s"):
            if part in timings:
                timings[part.removesuffix("_s") + "_ratio_to_eval_pass"] = timings[part] / max(timings["eval_pass_s"], 1e-9)
        details = {**details, "calibration_nll": ppl.nll}
    return Sensitivity(
        method=cfg.method,
        model=ctx.ref.name,
        model_id=ctx.ref.fingerprint,
        windows={
            "split": windows.split,
            "text": ctx.corpus.name,
            "corpus_id": ctx.corpus.fingerprint,
            "n_windows": int(windows.ids.shape[0]),
            "seq_len": windows.seq_len,
            "n_tokens": windows.n_tokens,
        },
        scheme={"scale_dtype": ctx.scheme.scale_dtype, "zero_bits": ctx.scheme.zero_bits, "mse_clip": ctx.scheme.mse_clip}
        | quantizer_key(ctx.quantizer_description()),
        units=units,
        scores=scores,
        costs=costs,
        timings=timings,
        details={**details, "config": {"seed": cfg.seed, "batch_size": cfg.batch_size}},
        space=str(space.source),
        space_id=space.fingerprint,
    )


def quantizer_key(desc: dict[str, Any]) -> dict[str, Any]:
    """The quantizer's part of a table's scheme and cache key: nothing for plain rounding (so tables
    cached before quantizers were recorded stay valid), else its description (name and regulariser)."""
    return {} if desc.get("quantizer", "rtn") == "rtn" else {"quantizer": desc}


_Out = tuple[dict[str, tuple[str, ...]], dict[str, float], dict[str, dict[str, float]], dict[str, Any], dict[str, float]]


def _run_fit(
    ctx: ModelContext, space: SearchSpace, cfg: SensitivityConfig, slots: Any, weights: Any, choices: Any, ids: torch.Tensor, progress: Any
) -> _Out:
    t0 = time.perf_counter()
    fisher = fisher_diagonal(ctx.model, list(weights), ids, cfg.batch_size, progress, labels=cfg.fisher_labels, seed=cfg.seed)
    # The squared gradient of a window's *mean* loss is the per-token Fisher / T (cross-token terms
    # vanish for model-sampled labels): times T, the costs are predicted nats per token.
    tokens = int(ids.shape[1]) - 1
    fisher = {f: v * tokens for f, v in fisher.items()}
    grad_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    costs = fit_costs(weights, fisher, choices, ctx.scheme, ctx.applier.quantizer, progress)
    scores = {f: float(fisher[f].sum(dtype=torch.float64)) for f in weights}
    return (
        {f: (f,) for f in weights},
        scores,
        costs,
        {"score": "Fisher trace sum(F)", "fisher_labels": cfg.fisher_labels},
        {"gradients_s": grad_s, "cost_table_s": time.perf_counter() - t1},
    )


def _run_hessian(
    ctx: ModelContext, space: SearchSpace, cfg: SensitivityConfig, slots: Any, weights: Any, choices: Any, ids: torch.Tensor, progress: Any
) -> _Out:
    t0 = time.perf_counter()
    est = hutchinson_traces(ctx.model, weights, ids, cfg.max_iter, cfg.tol, cfg.stop_on, cfg.seed, progress=progress)
    hvp_s = time.perf_counter() - t0
    if not est.converged:
        log.warning(
            "Hutchinson did not reach relative standard error %.3g on %s within %d iterations (worst layer %.3g, total %.3g)",
            cfg.tol,
            "every layer" if cfg.stop_on == "layers" else "the total",
            cfg.max_iter,
            max(est.rel_se.values()),
            est.total_rel_se,
        )
    t1 = time.perf_counter()
    costs = trace_costs(weights, est.traces, choices, ctx.scheme, ctx.applier.quantizer)
    details = {
        "score": "Hessian trace (Hutchinson)",
        "iterations": est.iterations,
        "converged": est.converged,
        "tol": cfg.tol,
        "stop_on": cfg.stop_on,
        "max_iter": cfg.max_iter,
        "rel_se": est.rel_se,
        "max_rel_se": max(est.rel_se.values()),
        "total_trace": est.total,
        "total_rel_se": est.total_rel_se,
    }
    return {f: (f,) for f in weights}, dict(est.traces), costs, details, {"hvp_s": hvp_s, "cost_table_s": time.perf_counter() - t1}


def _run_measured(
    ctx: ModelContext, space: SearchSpace, cfg: SensitivityConfig, slots: Any, weights: Any, choices: Any, ids: torch.Tensor, progress: Any
) -> _Out:
    blocks_fqn = ctx.layers.blocks_fqn
    blocks = ctx.model.get_submodule(blocks_fqn)
    units = {slot_unit(blocks_fqn, s): tuple(s.fqns) for s in slots}
    unit_blocks = {slot_unit(blocks_fqn, s): s.block for s in slots}
    unit_choices = {slot_unit(blocks_fqn, s): choices[s.fqns[0]] for s in slots}
    nll, kl, base = measured_costs(ctx.model, ctx.applier, blocks, ids, units, unit_blocks, unit_choices, cfg.batch_size, progress=progress)
    costs, other = (nll, kl) if cfg.metric == "nll" else (kl, nll)
    scores = {}
    for u in units:
        lowest = min((lq for lq in unit_choices[u] if lq.is_quantized), key=lambda lq: (lq.bits, -_group_order(lq.group_size)))
        scores[u] = costs[u][choice_key(lowest)]
    details = {
        "score": f"{cfg.metric} increase at the slot's fewest-bit, largest-group choice",
        "metric": cfg.metric,
        "full_precision_nll": base,
        f"{'kl' if cfg.metric == 'nll' else 'nll'}_costs": other,
        "evaluations": sum(len(v) for v in costs.values()),
    }
    return units, scores, costs, details, {}


METHODS: dict[str, Callable[..., _Out]] = {"fit": _run_fit, "hessian": _run_hessian, "measured": _run_measured}
assert tuple(METHODS) == METHOD_NAMES
