"""Decode throughput: measured on real quantized kernels, or predicted from the bytes each token reads.

Measured: batch-1 greedy decode of ``new_tokens`` tokens after a fixed prompt, on the model with
real torchao-quantized weights. Warm-up (and ``torch.compile`` when asked) is excluded; the device
is synchronised before every timestamp; the next token is chosen on the device (no host round
trip inside the loop); the median of ``repeats`` runs is reported with its standard error.

Predicted: decode is memory bound, so time per token = bytes of weights read per token / memory
bandwidth, with the bandwidth measured once on the machine (cached). Every linear weight (lm_head
included, quantized or not) and every norm is read once per token; the embedding table only one
row (unless tied to lm_head, then it is read as lm_head). Values are labelled ``predicted``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from bo_search.model import ModelLayers, cache_dir
from bo_search.quant import has_fast_kernel, torchao_fqn_config
from bo_search.sizes import SizeModel
from bo_search.types import QuantPlan, did_you_mean

log = logging.getLogger(__name__)

THROUGHPUT_MODELS = ("measured", "predicted", "llamacpp")  # llamacpp: bo_search.runtime


@dataclass(frozen=True)
class Throughput:
    tokens_per_s: float
    sem: float  # standard error of tokens_per_s
    kind: str  # measured | predicted
    repeats: int = 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_once(model: Any, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds for ``new_tokens`` greedy decode steps after prefilling ``prompt`` (1, L)."""
    from transformers import DynamicCache

    device = prompt.device
    cache = DynamicCache()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(dim=-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1:].argmax(dim=-1)  # stays on the device: no host sync in the loop
    _sync(device)
    return time.perf_counter() - t0


def measure_decode(model: Any, prompt: torch.Tensor, new_tokens: int = 64, repeats: int = 5, warmup: int = 1) -> Throughput:
    for _ in range(warmup):
        decode_once(model, prompt, min(new_tokens, 8))
    rates = [new_tokens / decode_once(model, prompt, new_tokens) for _ in range(repeats)]
    sem = statistics.stdev(rates) / math.sqrt(len(rates)) if len(rates) > 1 else float("nan")
    return Throughput(statistics.median(rates), sem, "measured", repeats)


class RealKernels:
    """Swap a plan's layers to torchao quantized weights and back, on a model held by a worker.

    ``restore`` puts back the very Parameter objects the model held before ``apply`` (not copies):
    a :class:`~bo_search.quant.PlanApplier` keeps references to them, so after a measured trial its
    fake quantization and restore still write into the tensors the model runs."""

    def __init__(self, model: Any, layers: ModelLayers, originals: Any, device: str):
        self.model, self.layers, self.originals, self.device = model, layers, originals, device
        self._held: dict[str, torch.nn.Parameter] = {}  # fqn -> the Parameter the model held before apply

    def apply(self, plan: QuantPlan, scheme: Any) -> None:
        from torchao.quantization import quantize_

        self.restore()
        cfg = torchao_fqn_config(plan, self.layers, self.device, scheme)
        modules = dict(self.model.named_modules())
        # quantize_ replaces weights; start from the exact originals (the model may hold fake-quant)
        try:
            for fqn in cfg.fqn_to_config:
                self._held[fqn] = modules[fqn].weight
                modules[fqn].weight = torch.nn.Parameter(self.originals(fqn).to(self.device).clone(), requires_grad=False)
            quantize_(self.model, cfg, filter_fn=None)
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        modules = dict(self.model.named_modules())
        for fqn, weight in self._held.items():
            modules[fqn].weight = weight
        self._held = {}


def layers_without_kernel(plan: QuantPlan, device: str) -> list[str]:
    return [f for f, lq in plan.items() if lq.is_quantized and not has_fast_kernel(lq, device)]


# ---------------------------------------------------------------------------------------------
# Predicted
# ---------------------------------------------------------------------------------------------


def measure_bandwidth(size_mb: int = 512, repeats: int = 5) -> float:
    """Sustained read bandwidth in bytes/s (median of summing a large float32 buffer), cached."""
    path = cache_dir() / "bandwidth.json"
    if path.is_file():
        try:
            return float(json.loads(path.read_text())["bytes_per_s"])
        except (ValueError, KeyError):
            pass
    x = torch.ones(size_mb * 1024 * 1024 // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    bw = x.numel() * 4 / statistics.median(times)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bytes_per_s": bw, "threads": torch.get_num_threads(), "buffer_mb": size_mb}))
    return bw


class BytesModel:
    """Predicted decode tokens/s = bandwidth / bytes read per token."""

    def __init__(self, model: Any, size_model: SizeModel, bandwidth: float):
        self.size_model = size_model
        self.bandwidth = bandwidth
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        tied = head is not None and emb is not None and head.weight is emb.weight
        emb_bits = emb.weight.numel() * size_model.fp_bits if emb is not None else 0
        row_bits = emb.weight.shape[1] * size_model.fp_bits if emb is not None else 0
        # other_bits counts the embedding table once; per token only one row of it is read,
        # except when lm_head shares it (then the whole table is read for the logits).
        self.fixed_bits = size_model.other_bits - (0 if tied else emb_bits - row_bits)

    def bytes_per_token(self, plan: QuantPlan) -> float:
        qbits = sum(self.size_model.layer_bits(li, plan.setting(li.fqn)) for li in self.size_model.layers.linears)
        return (qbits + self.fixed_bits) / 8

    def predict(self, plan: QuantPlan) -> Throughput:
        return Throughput(self.bandwidth / self.bytes_per_token(plan), 0.0, "predicted")


def check_throughput_model(name: str) -> str:
    if name not in THROUGHPUT_MODELS:
        raise did_you_mean(name, THROUGHPUT_MODELS, "--throughput_model")
    return name
