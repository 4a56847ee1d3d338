"""FIT: the diagonal Fisher on the calibration split and the predicted loss increase of each setting."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from bo_search.sensitivity.table import FISHER_LABELS, choice_key
from bo_search.types import LayerQuant, did_you_mean

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


def _gradient_hooks(
    model: Any, lins: dict[str, torch.nn.Module], acc: dict[str, torch.Tensor], seen: dict[str, int]
) -> tuple[list[Any], list[torch.Tensor]]:
    """Hooks that add each window's squared weight gradient into ``acc`` (counting calls in
    ``seen``), and a leaf at the embedding output for autograd to stop at; returns the handles and
    the list that collects each batch's leaves."""

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

    handles: list[Any] = [mod.register_forward_hook(capture(f)) for f, mod in lins.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(leaf))
    return handles, leaves


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

    handles, leaves = _gradient_hooks(model, lins, acc, seen)
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


def fit_costs(
    weights: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    choices: Mapping[str, Sequence[LayerQuant]],
    scheme: Any,
    quantizer: Any = None,
    progress: Callable[..., Any] | None = None,
) -> dict[str, dict[str, float]]:
    """``0.5 * sum(F * dW^2)`` per layer and choice (dW = the choice's real quantization error, from
    ``quantizer`` when given: the codes the trials will use, e.g. GPTQ's)."""
    from bo_search.quant import quant_error

    out: dict[str, dict[str, float]] = {}
    items = list(choices.items())
    for fqn, lqs in progress(items, desc="FIT cost table") if progress and quantizer is not None else items:
        w = weights[fqn].detach()
        f = fisher[fqn]
        quantized = [lq for lq in lqs if lq.is_quantized]
        if quantizer is not None:
            errs = [(w.float() - q.float()).square_() for q in quantizer.fake_quantize_many(fqn, w, quantized)]
        else:
            errs = [quant_error(w, lq, scheme) for lq in quantized]
        out[fqn] = {choice_key(lq): 0.5 * float((e * f).sum(dtype=torch.float64)) for lq, e in zip(quantized, errs)}
    return out
