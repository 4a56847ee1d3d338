"""Per-layer sensitivity to quantization, and the predicted loss increase of every candidate setting.

Three methods (a registry: an unknown name gets "did you mean"), all on the calibration split, which
is disjoint from the search and held-out splits (see :mod:`bo_search.data`):

``fit``
    Diagonal Fisher ``F = mean over windows of g_w ** 2``, where ``g_w`` is the gradient of window
    ``w``'s mean next-token loss (logits at positions ``0..T-1`` predict tokens ``1..T``), with the
    targets sampled from the model (``--fisher_labels model``, the Fisher information; default) or
    taken from the text (``data``, the empirical Fisher). Every window is used once and has its own
    gradient (batched, per-window gradients from hooks): about 3 forward-equivalents per window.
    Predicted loss increase of a setting:
    ``0.5 * sum(F * dW ** 2)`` with ``dW`` that setting's real quantization error. Per-layer score:
    the Fisher trace ``sum(F)``.
``hessian``
    Per-layer Hessian trace by Hutchinson's estimator: each iteration draws one Rademacher vector
    over all scored layers and one calibration window (cycling), and computes a Hessian-vector
    product by double backward; ``v_l . (Hv)_l`` is an unbiased sample of layer ``l``'s trace. It
    stops when the layers' ranking is stable or the total is tight (``--stop_on rank``, default),
    when every layer's relative standard error (``layers``) or the total's (``total``) is below
    ``--tol``, or after ``--max_iter`` iterations, and records the errors. Predicted loss increase: ``0.5 * max(trace, 0) / numel * ||dW||^2``.
``measured``
    Quantize one slot of the space (a block, by default) at one candidate setting, everything else
    at full precision, and measure the mean KL divergence to the full-precision next-token
    predictions (``--metric kl``, default) or the mean NLL increase (``nll``) on the calibration
    windows; both come from the same forward passes and both are recorded. The blocks before
    the quantized one are replayed from a cached full-precision pass, which halves the cost.

The per-choice costs are additive across layers (a second-order Taylor expansion around the
full-precision weights); :mod:`bo_search.seeding` turns them into allocations under a size budget.

``python -m bo_search.sensitivity --method fit --output sens.json`` writes the JSON;
``python -m bo_search.sensitivity --compare fit.json hessian.json measured.json`` prints the Spearman
and Pearson correlations between methods.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bo_search.types import PER_CHANNEL, LayerQuant, QuantPlan, UserError, did_you_mean

log = logging.getLogger(__name__)

FORMAT = "bo_search.sensitivity/1"
#: bumped whenever a method's computation changes, so cached tables of the old code are not reused
#: (2: FIT costs in nats per token, the window-mean Fisher times the window's scored tokens)
COMPUTE_VERSION = 2
STOP_RULES = ("rank", "layers", "total")
MEASURED_METRICS = ("nll", "kl")
FISHER_LABELS = ("data", "model")
#: calibration windows per method when --nsamples is not given (measured costs one forward per slot and choice)
DEFAULT_NSAMPLES = {"fit": 8, "hessian": 8, "measured": 1}


def choice_key(lq: LayerQuant) -> str:
    """The cost-table key of a setting: ``"bits:group"`` (``":sym"`` appended for symmetric codes)."""
    return f"{lq.bits}:{lq.group_size}" + (":sym" if lq.symmetric else "")


# ---------------------------------------------------------------------------------------------
# Configuration and result types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SensitivityConfig:
    """How to compute sensitivity. ``nsamples`` = calibration windows of ``seq_len`` tokens."""

    method: str = "fit"
    nsamples: int | None = None
    seq_len: int = 512
    batch_size: int = 4
    max_iter: int = 100
    tol: float = 0.1
    stop_on: str = "rank"
    metric: str = "kl"
    fisher_labels: str = "model"
    seed: int = 0
    time_eval: bool = True  # also time one evaluation pass over the windows (for the cost ratio)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise did_you_mean(self.method, list(METHODS), "sensitivity method")
        if self.nsamples is not None and self.nsamples < 1:
            raise UserError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seq_len < 2:
            raise UserError(f"--max_seqlen must be at least 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be positive, got {self.batch_size}")
        if self.max_iter < 2:
            raise UserError(f"--max_iter must be at least 2 (a standard error needs two samples), got {self.max_iter}")
        if not 0 < self.tol < 1:
            raise UserError(f"--tol must be in (0, 1), got {self.tol}")
        if self.stop_on not in STOP_RULES:
            raise did_you_mean(self.stop_on, STOP_RULES, "stopping rule")
        if self.metric not in MEASURED_METRICS:
            raise did_you_mean(self.metric, MEASURED_METRICS, "measured metric")
        if self.fisher_labels not in FISHER_LABELS:
            raise did_you_mean(self.fisher_labels, FISHER_LABELS, "Fisher labels")

    @property
    def windows(self) -> int:
        return self.nsamples if self.nsamples is not None else DEFAULT_NSAMPLES[self.method]


@dataclass(frozen=True)
class Sensitivity:
    """Per-unit scores and per-unit per-choice predicted loss increases (nats per token).

    A unit is one linear layer (fit, hessian) or one slot of the space (measured); ``units`` maps
    each unit's name to the layer FQNs it covers, so nothing parses names.
    """

    method: str
    model: str
    model_id: str
    windows: Mapping[str, Any]
    scheme: Mapping[str, Any]
    units: Mapping[str, tuple[str, ...]]
    scores: Mapping[str, float]
    costs: Mapping[str, Mapping[str, float]]
    timings: Mapping[str, float] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    space: str = ""
    space_id: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise did_you_mean(self.method, list(METHODS), "sensitivity method")
        if set(self.costs) != set(self.units) or set(self.scores) != set(self.units):
            raise UserError("sensitivity: the units, scores and costs tables name different units")
        for unit, row in self.costs.items():
            for key, val in row.items():
                if not isinstance(val, (int, float)) or not math.isfinite(val):
                    raise UserError(f"sensitivity: cost of {unit} at {key} is {val!r}, not a finite number")

    @property
    def label(self) -> str:
        """The method with its variant, e.g. ``fit[model]``, ``measured[kl]``."""
        variant = {"fit": self.details.get("fisher_labels"), "measured": self.details.get("metric")}.get(self.method)
        return f"{self.method}[{variant}]" if variant else self.method

    # -- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "method": self.method,
            "model": self.model,
            "model_id": self.model_id,
            "space": self.space,
            "space_id": self.space_id,
            "windows": dict(self.windows),
            "scheme": dict(self.scheme),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "details": dict(self.details),
            "units": {u: list(f) for u, f in self.units.items()},
            "scores": dict(self.scores),
            "costs": {u: dict(row) for u, row in self.costs.items()},
        }

    def save(self, path: str | Path) -> None:
        from bo_search.cli import write_json

        write_json(path, self.to_json())

    @classmethod
    def from_json(cls, obj: Any, source: str = "<sensitivity>") -> Sensitivity:
        if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
            raise UserError(
                f'{source} is not a bo_search sensitivity JSON (expected "format": {FORMAT!r}); write one with python -m bo_search.sensitivity'
            )
        try:
            return cls(
                method=str(obj["method"]),
                model=str(obj["model"]),
                model_id=str(obj["model_id"]),
                windows=dict(obj["windows"]),
                scheme=dict(obj.get("scheme", {})),
                units={str(u): tuple(str(f) for f in fs) for u, fs in obj["units"].items()},
                scores={str(u): float(v) for u, v in obj["scores"].items()},
                costs={str(u): {str(k): float(v) for k, v in row.items()} for u, row in obj["costs"].items()},
                timings={str(k): float(v) for k, v in obj.get("timings", {}).items()},
                details=dict(obj.get("details", {})),
                space=str(obj.get("space", "")),
                space_id=str(obj.get("space_id", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{source} is a malformed sensitivity JSON ({type(err).__name__}: {err})") from err

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"sensitivity file not found: {p}")
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"sensitivity file {p} is not valid JSON: {err.msg} at line {err.lineno}") from err
        return cls.from_json(obj, str(p))

    # -- use ----------------------------------------------------------------------------------
    def check_model(self, model_id: str, model_name: str, layer_fqns: Sequence[str]) -> None:
        """Raise UserError unless this table was computed for the given model."""
        if self.model_id != model_id:
            raise UserError(
                f"the sensitivity JSON was computed for model {self.model} ({self.model_id}), not {model_name} ({model_id}); "
                f"recompute it with python -m bo_search.sensitivity --checkpoint ..."
            )
        known = set(layer_fqns)
        for unit, fqns in self.units.items():
            bad = [f for f in fqns if f not in known]
            if bad:
                raise UserError(f"the sensitivity JSON names layer {bad[0]!r} (unit {unit}), which the model does not have")

    def slot_costs(self, space: Any) -> list[dict[tuple[int, int], float]]:
        """Per slot of ``space``, the predicted cost of each allowed (bits, group_size): the sum of the
        costs of the units that tile the slot. UserError when the table cannot price the space."""
        unit_of: dict[str, str] = {f: u for u, fqns in self.units.items() for f in fqns}
        out: list[dict[tuple[int, int], float]] = []
        for slot in space.slots:
            where = f"block {slot.block}" + (f" group {slot.group!r}" if slot.group else "")
            missing = [f for f in slot.fqns if f not in unit_of]
            if missing:
                raise UserError(
                    f"the sensitivity JSON ({self.method}) has no entry for layer {missing[0]} ({where}): it was computed for another "
                    "model or for a subset of layers; recompute it for this model and space"
                )
            members = sorted({unit_of[f] for f in slot.fqns})
            for u in members:
                if not set(self.units[u]) <= set(slot.fqns):
                    raise UserError(
                        f"the sensitivity JSON ({self.method}) measured {u} as one unit, which spans several slots of the space "
                        f"{space.source}; recompute it with --parameters_list {space.source}"
                    )
            costs: dict[tuple[int, int], float] = {}
            for b in slot.bits.values:
                for g in slot.group_size.values:
                    lq = space.choice_setting(b, g)
                    if not lq.is_quantized:
                        costs[(b, g)] = 0.0
                        continue
                    total = 0.0
                    for u in members:
                        val = self.costs[u].get(choice_key(lq))
                        if val is None:
                            raise UserError(
                                f"the sensitivity JSON ({self.method}) has no cost for {choice_key(lq)} at {u}: it was computed for another "
                                f"parameter space ({self.space or 'unknown'}); recompute it with --parameters_list {space.source}"
                            )
                        total += val
                    costs[(b, g)] = total
            out.append(costs)
        return out

    def predicted(self, space: Any, values: Mapping[str, int], tables: list[dict[tuple[int, int], float]] | None = None) -> float:
        """Predicted loss increase of one parameter dict of ``space``."""
        tables = tables if tables is not None else self.slot_costs(space)
        full = space.complete(values)
        total = 0.0
        for slot, table in zip(space.slots, tables):
            lq = space.setting(slot, full)
            total += table[(lq.bits, lq.group_size)]
        return total


# ---------------------------------------------------------------------------------------------
# Pure computations
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _grad_on(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, b in zip(params, before):
            p.requires_grad_(b)


@contextlib.contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """Fused attention kernels have no double backward: use the eager implementation for HVPs."""
    impl = getattr(model.config, "_attn_implementation", None)
    switch = impl not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(impl)


def window_loss(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of windows ``ids`` (n, T + 1): logits of ids[:, :-1] predict ids[:, 1:]."""
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


def sample_labels(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One draw per row from ``softmax(logits)`` by inverse CDF (torch.multinomial is 10x slower here)."""
    cdf = torch.softmax(logits.float(), -1).cumsum_(-1)
    u = torch.rand(cdf.shape[0], 1, generator=gen, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def fisher_diagonal(
    model: Any,
    fqns: Sequence[str],
    ids: torch.Tensor,
    batch_size: int = 4,
    progress: Callable[..., Any] | None = None,
    labels: str = "model",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Mean over windows (rows of ``ids``) of the squared gradient of each window's mean next-token
    loss, for the weights of the linear layers ``fqns``.

    ``labels="model"`` (default): the targets are sampled from the model's own next-token
    distribution (one draw per position, ``seed``), which makes this the Fisher information: the
    score of a sampled label has zero mean, so the cross-token terms of a window's squared gradient
    vanish in expectation and the estimate is the per-token Fisher diagonal / T. ``labels="data"``:
    the text's own next tokens (the empirical Fisher, the original tool's choice); its cross-token
    terms do not vanish and, on SmolLM2, let a few outlier tokens dominate (see the README figures).

    Windows are batched, and the per-window weight gradients come from hooks: a linear layer's
    gradient for window n is ``sum_t delta[n, t] outer x[n, t]`` (output gradient times input), one
    batched matmul, the same work autograd's own weight gradient would do. Autograd only propagates
    activation gradients (from a leaf at the embedding output), so one batch costs about one forward
    and one backward pass.
    """
    if labels not in FISHER_LABELS:
        raise did_you_mean(labels, FISHER_LABELS, "Fisher labels")
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    modules = dict(model.named_modules())
    lins = {f: modules[f] for f in fqns}
    for f, mod in lins.items():
        if not isinstance(mod, torch.nn.Linear):
            raise TypeError(f"{f} is a {type(mod).__name__}, not a torch.nn.Linear")
    device = next(model.parameters()).device
    acc = {f: torch.zeros_like(mod.weight, dtype=torch.float32) for f, mod in lins.items()}
    seen: dict[str, int] = {}

    def capture(fqn: str) -> Callable[..., None]:
        def hook(_mod: Any, args: tuple[Any, ...], out: torch.Tensor) -> None:
            seen[fqn] = seen.get(fqn, 0) + 1
            x = args[0].detach()

            def on_grad(g: torch.Tensor) -> None:
                xs = x.reshape(x.shape[0], -1, x.shape[-1]).float()
                gs = g.reshape(g.shape[0], -1, g.shape[-1]).float()
                per_window = torch.bmm(gs.transpose(1, 2), xs)  # (n, out, in)
                acc[fqn].add_(per_window.square_().sum(0))

            if out.requires_grad:
                out.register_hook(on_grad)

        return hook

    leaves: list[torch.Tensor] = []

    def leaf(_mod: Any, _args: Any, out: torch.Tensor) -> torch.Tensor:
        t = out.detach().requires_grad_(True)
        leaves.append(t)
        return t

    handles = [mod.register_forward_hook(capture(f)) for f, mod in lins.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(leaf))
    starts = range(0, ids.shape[0], batch_size)
    try:
        with torch.enable_grad():
            for start in progress(starts, desc="FIT batches") if progress else starts:
                batch = ids[start : start + batch_size].to(device)
                leaves.clear()
                seen.clear()
                logits = model(input_ids=batch[:, :-1], use_cache=False).logits.flatten(0, 1).float()
                if labels == "model":
                    target = sample_labels(logits.detach(), gen)
                else:
                    target = batch[:, 1:].flatten()
                # the sum over windows of each window's mean loss: its gradient in window n's activations is window n's
                loss = F.cross_entropy(logits, target, reduction="sum") / (batch.shape[1] - 1)
                torch.autograd.grad(loss, leaves)
                if any(c != 1 for c in seen.values()) or len(seen) != len(lins):
                    raise RuntimeError("FIT expects every scored linear layer to run exactly once per forward pass")
                del logits, loss
    finally:
        for h in handles:
            h.remove()
    n = ids.shape[0]
    return {f: a.div_(n) for f, a in acc.items()}


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


def fit_costs(
    weights: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor], choices: Mapping[str, Sequence[LayerQuant]], scheme: Any
) -> dict[str, dict[str, float]]:
    """``0.5 * sum(F * dW^2)`` per layer and choice (dW = the choice's real quantization error)."""
    from bo_search.quant import quant_error

    out: dict[str, dict[str, float]] = {}
    for fqn, lqs in choices.items():
        w = weights[fqn].detach()
        f = fisher[fqn]
        out[fqn] = {choice_key(lq): 0.5 * float((quant_error(w, lq, scheme) * f).sum(dtype=torch.float64)) for lq in lqs if lq.is_quantized}
    return out


def trace_costs(
    weights: Mapping[str, torch.Tensor], traces: Mapping[str, float], choices: Mapping[str, Sequence[LayerQuant]], scheme: Any
) -> dict[str, dict[str, float]]:
    """``0.5 * max(trace, 0) / numel * ||dW||^2`` per layer and choice."""
    from bo_search.quant import quant_error

    out: dict[str, dict[str, float]] = {}
    for fqn, lqs in choices.items():
        w = weights[fqn].detach()
        per_weight = max(traces[fqn], 0.0) / w.numel()
        out[fqn] = {
            choice_key(lq): 0.5 * per_weight * float(quant_error(w, lq, scheme).sum(dtype=torch.float64)) for lq in lqs if lq.is_quantized
        }
    return out


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


# ---------------------------------------------------------------------------------------------
# Running a method on a loaded model
# ---------------------------------------------------------------------------------------------


def layer_choices(space: Any) -> dict[str, tuple[LayerQuant, ...]]:
    """Every setting the space allows for each layer FQN."""
    out: dict[str, tuple[LayerQuant, ...]] = {}
    for slot in space.slots:
        lqs = tuple(space.choice_setting(b, g) for b in slot.bits.values for g in slot.group_size.values)
        for f in slot.fqns:
            out[f] = tuple(dict.fromkeys(out.get(f, ()) + lqs))
    return out


def slot_unit(blocks_fqn: str, slot: Any) -> str:
    """Unit name of a slot: its block's FQN, plus the group name for finer granularities."""
    return f"{blocks_fqn}.{slot.block}" + (f".{slot.group}" if slot.group else "")


def _restrict(space: Any, blocks: Sequence[int] | None) -> list[Any]:
    return [s for s in space.slots if blocks is None or s.block in blocks]


def compute(
    ctx: Any, space: Any, cfg: SensitivityConfig, blocks: Sequence[int] | None = None, progress: Callable[..., Any] | None = None
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
        from bo_search.evaluate import perplexity

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
        scheme={"scale_dtype": ctx.scheme.scale_dtype, "zero_bits": ctx.scheme.zero_bits, "mse_clip": ctx.scheme.mse_clip},
        units=units,
        scores=scores,
        costs=costs,
        timings=timings,
        details={**details, "config": {"seed": cfg.seed, "batch_size": cfg.batch_size}},
        space=str(space.source),
        space_id=space.fingerprint,
    )


_Out = tuple[dict[str, tuple[str, ...]], dict[str, float], dict[str, dict[str, float]], dict[str, Any], dict[str, float]]


def _run_fit(
    ctx: Any, space: Any, cfg: SensitivityConfig, slots: Any, weights: Any, choices: Any, ids: torch.Tensor, progress: Any
) -> _Out:
    t0 = time.perf_counter()
    fisher = fisher_diagonal(ctx.model, list(weights), ids, cfg.batch_size, progress, labels=cfg.fisher_labels, seed=cfg.seed)
    # The squared gradient of a window's *mean* loss is the per-token Fisher / T (cross-token terms
    # vanish for model-sampled labels): times T, the costs are predicted nats per token.
    tokens = int(ids.shape[1]) - 1
    fisher = {f: v * tokens for f, v in fisher.items()}
    grad_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    costs = fit_costs(weights, fisher, choices, ctx.scheme)
    scores = {f: float(fisher[f].sum(dtype=torch.float64)) for f in weights}
    return (
        {f: (f,) for f in weights},
        scores,
        costs,
        {"score": "Fisher trace sum(F)", "fisher_labels": cfg.fisher_labels},
        {"gradients_s": grad_s, "cost_table_s": time.perf_counter() - t1},
    )


def _run_hessian(
    ctx: Any, space: Any, cfg: SensitivityConfig, slots: Any, weights: Any, choices: Any, ids: torch.Tensor, progress: Any
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
    costs = trace_costs(weights, est.traces, choices, ctx.scheme)
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
    ctx: Any, space: Any, cfg: SensitivityConfig, slots: Any, weights: Any, choices: Any, ids: torch.Tensor, progress: Any
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


def _group_order(g: int) -> float:
    return math.inf if g == PER_CHANNEL else float(g)


METHODS: dict[str, Callable[..., _Out]] = {"fit": _run_fit, "hessian": _run_hessian, "measured": _run_measured}


# ---------------------------------------------------------------------------------------------
# Cached sensitivity for the search driver (--initial_samples auto)
# ---------------------------------------------------------------------------------------------


def cache_key(
    cfg: SensitivityConfig, model_id: str, corpus_id: str, space_id: str, scheme: Mapping[str, Any], include_lm_head: bool
) -> str:
    """Everything the table depends on: model, method and its settings, calibration windows, space, scheme."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("nsamples", "batch_size", "time_eval")}
    blob = json.dumps(
        [FORMAT, COMPUTE_VERSION, model_id, settings, cfg.windows, corpus_id, space_id, dict(sorted(scheme.items())), include_lm_head]
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cached_sensitivity(
    eval_cfg: Any,
    ref: Any,
    layers: Any,
    space: Any,
    method: str = "fit",
    nsamples: int | None = None,
    progress: Callable[..., Any] | None = None,
) -> tuple[Sensitivity, Path, bool]:
    """The sensitivity table for this model, space, scheme and calibration windows: read from
    ``cache_dir()/sensitivity/`` when present, else computed (model loaded here) and written there.
    Returns (table, path, whether it came from the cache)."""
    from bo_search.cli import write_json
    from bo_search.data import load_corpus
    from bo_search.model import cache_dir
    from bo_search.trial import EvalConfig, ModelContext

    cfg = SensitivityConfig(method=method, nsamples=nsamples, seq_len=eval_cfg.max_seqlen, batch_size=eval_cfg.batch_size, time_eval=False)
    corpus = load_corpus(eval_cfg.eval_text)
    scheme = {"scale_dtype": eval_cfg.scale_dtype, "zero_bits": eval_cfg.zero_bits, "mse_clip": eval_cfg.mse_clip}
    key = cache_key(cfg, ref.fingerprint, corpus.fingerprint, space.fingerprint, scheme, eval_cfg.include_lm_head)
    path = cache_dir() / "sensitivity" / f"{ref.fingerprint}-{method}-{key}.json"
    if path.is_file():
        try:
            sens = Sensitivity.load(path)
            sens.check_model(ref.fingerprint, ref.name, layers.fqns)
            sens.slot_costs(space)
            return sens, path, True
        except UserError as err:
            log.warning("ignoring the cached sensitivity %s: %s", path, err)
    ctx = ModelContext(replace(EvalConfig(**eval_cfg.to_dict()), eval_tokens=cfg.seq_len, heldout_tokens=0), heldout=False)
    sens = compute(ctx, space, cfg, progress=progress)
    del ctx
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, sens.to_json())
    return sens, path, False


# ---------------------------------------------------------------------------------------------
# Comparing methods
# ---------------------------------------------------------------------------------------------


def correlations(tables: Mapping[str, Sensitivity], space: Any) -> list[dict[str, Any]]:
    """Pairwise Spearman and Pearson correlations between methods, on the costs aggregated to the
    space's slots: over every (slot, choice), and across slots at each choice (mean over choices)."""
    from scipy.stats import pearsonr, spearmanr

    per = {name: t.slot_costs(space) for name, t in tables.items()}
    names = list(per)
    rows: list[dict[str, Any]] = []
    keys = [k for k in per[names[0]][0]]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            xa = [per[a][s][k] for s in range(len(space.slots)) for k in keys if k in per[a][s] and (k[0] != 16)]
            xb = [per[b][s][k] for s in range(len(space.slots)) for k in keys if k in per[b][s] and (k[0] != 16)]
            across_s, across_p = [], []
            for k in keys:
                if k[0] == 16:
                    continue
                va = [per[a][s][k] for s in range(len(space.slots)) if k in per[a][s]]
                vb = [per[b][s][k] for s in range(len(space.slots)) if k in per[b][s]]
                if len(va) > 2 and len(set(va)) > 1 and len(set(vb)) > 1:
                    across_s.append(float(spearmanr(va, vb).statistic))
                    across_p.append(float(pearsonr(va, vb).statistic))
            rows.append(
                {
                    "pair": f"{a} vs {b}",
                    "spearman_all": float(spearmanr(xa, xb).statistic),
                    "pearson_all": float(pearsonr(xa, xb).statistic),
                    "spearman_across_slots": sum(across_s) / len(across_s) if across_s else None,
                    "pearson_across_slots": sum(across_p) / len(across_p) if across_p else None,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from bo_search import cli

    p = argparse.ArgumentParser(
        prog="python -m bo_search.sensitivity",
        description="Per-layer quantization sensitivity (FIT, Hessian trace, measured) on the calibration split, with the predicted "
        "loss increase of every candidate (bits, groupsize) of the parameter space; or --compare tables of several methods.",
    )
    p.add_argument("--method", default="fit", help=f"one of {', '.join(METHODS)} (default fit)")
    cli.add_model_args(p)
    g = p.add_argument_group("calibration")
    g.add_argument(
        "--eval_text", default=None, metavar="PATH", help="text whose calibration split is used (default: the embedded Wikipedia extract)"
    )
    g.add_argument(
        "--nsamples",
        type=int,
        default=None,
        help="calibration windows, each used once (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_NSAMPLES.items()) + ")",
    )
    g.add_argument("--max_seqlen", type=int, default=512, help="window length in tokens (default 512)")
    g.add_argument("--batch_size", type=int, default=4, help="windows per forward pass for measured and the timing pass (default 4)")
    g.add_argument(
        "--parameters_list",
        default=None,
        metavar="SPACE.json",
        help="the space whose choices are priced (default: the search's default space)",
    )
    g.add_argument("--num_layers", type=int, default=None, help="score only blocks 0..N-1")
    g.add_argument("--layer_id", type=int, default=None, help="score only this block")
    h = p.add_argument_group("hessian")
    h.add_argument("--max_iter", type=int, default=100, help="most Hutchinson iterations (default 100)")
    h.add_argument("--tol", type=float, default=0.1, help="stop when the relative standard error is below this (default 0.1)")
    h.add_argument(
        "--stop_on",
        default="rank",
        choices=STOP_RULES,
        help="Hessian stopping rule: rank (default): the per-layer ranking is stable (Spearman >= 1 - tol between the odd and the even "
        "iterations' means) or the total's relative error < tol; layers: every layer's relative error < tol (slow); total: the total's",
    )
    h.add_argument("--seed", type=int, default=0, help="random seed of the Rademacher vectors and the sampled labels (default 0)")
    m = p.add_argument_group("measured")
    m.add_argument(
        "--metric",
        default="kl",
        choices=MEASURED_METRICS,
        help="cost = mean KL divergence to the full-precision predictions (default; far less noisy) or mean NLL increase; both are recorded",
    )
    f = p.add_argument_group("fit")
    f.add_argument(
        "--fisher_labels",
        default="model",
        choices=FISHER_LABELS,
        help="targets of the gradients: sampled from the model (default; the Fisher information) or the text's (empirical Fisher)",
    )
    p.add_argument("--output", default=None, metavar="SENS.json", help="write the table here")
    p.add_argument("--compare", nargs="+", default=None, metavar="SENS.json", help="print correlations between these tables and exit")
    return p


def original_tool_main(method: str, prog: str, description: str, argv: Sequence[str] | None, extra: Sequence[str] = ()) -> int:
    """The torchao prototype's ``fit.py`` / ``hessian_vhp.py`` command lines (``scripts/``), mapped
    onto ``--method fit|hessian``; flags they did not have pass through to this module's CLI."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--checkpoint", default=None, help="Hugging Face checkpoint directory or .gguf (default: the embedded model)")
    p.add_argument("--max_seqlen", type=int, default=None, help="calibration window length (default 512)")
    p.add_argument(
        "--max_iter",
        type=int,
        default=None,
        help="most Hutchinson iterations (default 100)"
        if method == "hessian"
        else "accepted for compatibility; FIT uses every window once",
    )
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 8)")
    p.add_argument("--num_layers", type=int, default=None, help="score only blocks 0..N-1 (default: all)")
    if "layer_id" in extra:
        p.add_argument("--layer_id", type=int, default=None, help="estimate only this block (default: all blocks in one run)")
    p.add_argument("--output", default=f"{method}_sensitivity.json", help=f"JSON output (default {method}_sensitivity.json)")
    args, rest = p.parse_known_args(argv)
    flags = ["checkpoint", "max_seqlen", "nsamples", "num_layers", *extra]
    if method == "hessian":
        flags.append("max_iter")
    elif args.max_iter is not None and args.max_iter != 1:
        print(
            f"note: --max_iter {args.max_iter} has no effect: the original repeated the same passes, which gives identical "
            "gradients; every calibration window is used once",
            file=sys.stderr,
        )
    out = ["--method", method, "--output", args.output]
    for flag in flags:
        if getattr(args, flag) is not None:
            out += [f"--{flag}", str(getattr(args, flag))]
    return main(out + rest)


def structure_setup(args: argparse.Namespace) -> Any:
    """The search driver's view (model structure on the meta device, space, sizes) for a CLI that
    does not search: ``runner.prepare`` with an empty history."""
    import os

    from bo_search import runner

    ns = argparse.Namespace(**vars(args))
    for k, v in {"num_trials": 1, "max_failure_rate": 0.5, "history_output": os.devnull, "resume": False}.items():
        setattr(ns, k, v)
    for k, v in {"include_lm_head": False, "scale_dtype": "float16", "zero_bits": 16, "mse_clip": False, "fp_dtype": None}.items():
        if not hasattr(ns, k):
            setattr(ns, k, v)
    return runner.prepare(ns, "seed", take_lock=False)


def _blocks(args: argparse.Namespace, n_blocks: int) -> list[int] | None:
    if args.num_layers is not None and not 1 <= args.num_layers <= n_blocks:
        raise UserError(f"--num_layers {args.num_layers}: the model has {n_blocks} blocks (use 1..{n_blocks})")
    limit = args.num_layers or n_blocks
    if args.layer_id is not None:
        if not 0 <= args.layer_id < limit:
            raise UserError(f"--layer_id {args.layer_id} is out of range: blocks are 0..{limit - 1}")
        return [args.layer_id]
    return list(range(args.num_layers)) if args.num_layers else None


def main(argv: Sequence[str] | None = None) -> int:
    from bo_search import cli

    return cli.run_main(_main, build_parser(), argv)


def _main(args: argparse.Namespace) -> int:
    from bo_search import cli
    from bo_search.trial import EvalConfig, ModelContext

    if args.method not in METHODS:
        raise did_you_mean(args.method, list(METHODS), "sensitivity method")
    if args.output:
        cli.check_output_path(args.output)
    setup = structure_setup(args)
    if args.compare:
        return _compare(args, setup)
    cfg = SensitivityConfig(
        method=args.method,
        nsamples=args.nsamples,
        seq_len=args.max_seqlen,
        batch_size=args.batch_size,
        max_iter=args.max_iter,
        tol=args.tol,
        stop_on=args.stop_on,
        metric=args.metric,
        fisher_labels=args.fisher_labels,
        seed=args.seed,
    )
    blocks = _blocks(args, setup.layers.n_blocks)
    eval_cfg = replace(EvalConfig.from_args(args), eval_tokens=args.max_seqlen, heldout_tokens=0)
    ctx = ModelContext(eval_cfg, heldout=False)
    print(
        f"model {ctx.ref.name}: {len(ctx.layers.linears)} linears in {ctx.layers.n_blocks} blocks; space {setup.space.source}; "
        f"method {cfg.method} on {cfg.windows} calibration windows of {cfg.seq_len} tokens",
        flush=True,
    )
    sens = compute(ctx, setup.space, cfg, blocks, progress=cli.progress)
    _print_summary(sens)
    if args.output:
        sens.save(args.output)
        print(f"wrote {args.output}")
    return 0


def _print_summary(sens: Sensitivity) -> None:
    t = sens.timings
    w = sens.windows
    line = f"{sens.method}: {w['n_windows']} windows x {w['seq_len']} tokens in {t['compute_s']:.1f} s"
    if "eval_pass_s" in t:
        line += f"; one evaluation pass over the same tokens {t['eval_pass_s']:.1f} s; ratio {t['ratio_to_eval_pass']:.2f}"
        if "gradients_s" in t:
            line += f" (gradient passes {t['gradients_s']:.1f} s = {t['gradients_ratio_to_eval_pass']:.2f} evaluation passes, cost table {t['cost_table_s']:.1f} s)"
        if "hvp_s" in t:
            line += f" (Hessian-vector products {t['hvp_s']:.1f} s, cost table {t['cost_table_s']:.1f} s)"
    print(line)
    d = sens.details
    if sens.method == "hessian":
        print(
            f"Hutchinson: {d['iterations']} iterations ({'converged' if d['converged'] else 'NOT converged'} at tol {d['tol']} on {d['stop_on']}); "
            f"worst layer relative standard error {d['max_rel_se']:.3f}, total trace {d['total_trace']:.4g} +- {100 * d['total_rel_se']:.1f}%"
        )
    if sens.method == "measured":
        print(f"{d['evaluations']} evaluations; full-precision calibration NLL {d['full_precision_nll']:.4f}")
    top = sorted(sens.scores.items(), key=lambda kv: -kv[1])[:5]
    print("most sensitive: " + ", ".join(f"{u} ({v:.3g})" for u, v in top))


def _compare(args: argparse.Namespace, setup: Any) -> int:
    from bo_search import cli

    tables: dict[str, Sensitivity] = {}
    for path in args.compare:
        sens = Sensitivity.load(path)
        sens.check_model(setup.ref.fingerprint, setup.ref.name, setup.layers.fqns)
        name = sens.label if sens.label not in tables else f"{sens.label}:{Path(path).name}"
        tables[name] = sens
    if len(tables) < 2:
        raise UserError("--compare needs at least two sensitivity JSON files")
    rows = correlations(tables, setup.space)
    print(cli.table(rows, ["pair", "spearman_all", "pearson_all", "spearman_across_slots", "pearson_across_slots"]))
    if args.output:
        cli.write_json(args.output, {"space": setup.space.source, "files": list(args.compare), "correlations": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
