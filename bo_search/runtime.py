"""Measure GGUF files and ggml plans with llama.cpp's own kernels, on this project's windows.

A ggml plan is written as a GGUF file (:mod:`bo_search.gguf_write`, the bytes the search scored),
loaded by llama.cpp (:mod:`bo_search.llamacpp`, the only module that talks to it), and measured:
perplexity on the same fixed windows as :func:`bo_search.metrics.perplexity` (same tokens, same
prefix, every position scored), and batch-1 decode tokens/s with a warm-up, a fixed thread count
and the spread over repeats. A plan that llama.cpp cannot run (a setting outside llama.cpp's types,
a row length that fits no block of its type) is refused before any file is written.

The perplexity llama.cpp computes differs a little from ours on the same weights: its CPU kernels
quantize the activations to 8 bits inside each quantized dot product (F16 weights: activations in
F16). ``tests/test_llamacpp.py`` measures and bounds that difference.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bo_search import llamacpp
from bo_search.gguf_file import open_reader
from bo_search.gguf_write import CONVERT_HINT, PackCache, export_gguf
from bo_search.types import Perplexity, QuantPlan, UserError, ggml_effective_type

if TYPE_CHECKING:
    from bo_search.data import Windows
    from bo_search.model import ModelLayers
    from bo_search.throughput import Throughput
    from bo_search.trial import ModelContext

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "llamacpp")


def check_plan(plan: QuantPlan, layers: ModelLayers) -> None:
    """A plan llama.cpp can run: every planned linear in a llama.cpp type whose blocks fit its rows."""
    by_fqn = layers.by_fqn()
    affine = [f for f, lq in plan.items() if not lq.ggml_type]
    if affine or not plan:
        example = f"{affine[0]} is {plan.setting(affine[0]).label()}" if affine else "the plan is empty"
        raise UserError(
            "llama.cpp runs plans in llama.cpp tensor types (a ggml-scheme space, or --uniform Q4_K, Q8_0, ...); "
            f"{len(affine) or 'no'} layer(s) are not ({example})"
        )
    for fqn, lq in plan.items():
        li = by_fqn.get(fqn)
        if li is None:
            raise UserError(f"the plan names {fqn}, which is not a linear layer of this model")
        try:
            ggml_effective_type(lq.ggml_type, li.in_features)
        except UserError as err:
            raise UserError(f"layer {fqn}: {err}") from None


def perplexity(model: llamacpp.LlamaModel, windows: Windows) -> Perplexity:
    """Token-level perplexity of llama.cpp's logits over fixed windows (as ``metrics.perplexity``)."""
    if windows.seq_len > model.n_ctx:
        raise UserError(f"windows of {windows.seq_len} tokens exceed llama.cpp's context of {model.n_ctx}")
    per_window = model.window_nll(windows.ids.numpy()) / windows.seq_len
    n = len(per_window)
    nll = float(per_window.mean())
    sem = float(per_window.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return Perplexity.from_nll(nll, sem, windows.n_tokens, n)


def tensor_bytes(path: str | Path) -> int:
    """Bytes of a GGUF's tensor data, read with the ``gguf`` package (what a plan's size counts)."""
    try:
        reader = open_reader(path)
    except Exception as err:  # the gguf package raises several types on a malformed file
        raise UserError(f"{path} is not a readable GGUF file ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    return sum(int(t.n_bytes) for t in reader.tensors)


def check_vocab(model: llamacpp.LlamaModel, tok: Any) -> None:
    n = len(tok)
    if model.n_vocab < n:
        raise UserError(
            f"{model.path.name} has a vocabulary of {model.n_vocab} tokens, the checkpoint's tokenizer {n}: "
            "pass the --checkpoint it was made from"
        )


@dataclass(frozen=True)
class FileMeasurement:
    """One GGUF measured in llama.cpp."""

    path: Path
    file_bytes: int
    tensor_bytes: int
    ppl: Perplexity | None
    ppl_heldout: Perplexity | None
    timing: llamacpp.DecodeTiming | None

    def row(self) -> dict[str, Any]:
        t = self.timing
        return {
            "file_mb": round(self.file_bytes / 1e6, 3),
            "model_size_gb": round(self.tensor_bytes / 1e9, 6),
            "ppl": self.ppl.ppl if self.ppl else None,
            "ppl_heldout": self.ppl_heldout.ppl if self.ppl_heldout else None,
            "tok_s": t.tokens_per_s if t else None,
            "tok_s_sem": t.sem if t else None,
            "threads": t.threads if t else None,
        }


@dataclass(frozen=True)
class DecodeSpec:
    """How decode speed is timed: prompt and new tokens, untimed warm-up runs, timed repeats, threads."""

    prompt_tokens: int = 64
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 1
    threads: int = 1

    def __post_init__(self) -> None:
        if min(self.prompt_tokens, self.new_tokens, self.repeats, self.threads) < 1 or self.warmup < 0:
            raise UserError("decode timing needs prompt and new tokens, repeats and threads >= 1, and warm-up >= 0")


def measure_file(
    path: str | Path,
    windows: Windows | None,
    heldout: Windows | None,
    decode: DecodeSpec | None,
    tok: Any = None,
    threads: int = 1,
    prompt: Sequence[int] | None = None,
) -> FileMeasurement:
    """Perplexity on ``windows`` (and ``heldout``) and decode speed of one GGUF in llama.cpp; the
    decode prompt is ``prompt``, else the start of the first window."""
    path = Path(path)
    size = tensor_bytes(path)
    spans = [w.seq_len for w in (windows, heldout) if w is not None]
    n_ctx = max(spans + ([decode.prompt_tokens + decode.new_tokens] if decode else []) + [8])
    with llamacpp.LlamaModel(path, n_ctx=n_ctx, threads=decode.threads if decode else threads) as m:
        if tok is not None:
            check_vocab(m, tok)
        ppl = perplexity(m, windows) if windows is not None else None
        held = perplexity(m, heldout) if heldout is not None else None
        timing = None
        if decode is not None:
            if prompt is None:
                src = windows if windows is not None else heldout
                if src is None:
                    raise UserError("decode timing needs a window of text for its prompt")
                prompt = [int(t) for t in src.ids[0, : decode.prompt_tokens]]
            timing = m.time_decode(prompt, decode.new_tokens, decode.repeats, decode.warmup)
    return FileMeasurement(path, path.stat().st_size, size, ppl, held, timing)


class PlanWriter:
    """Writes ggml plans of one GGUF checkpoint as files in a private temporary directory (each
    (tensor, type) quantized once), for llama.cpp to load; :meth:`close` removes them."""

    def __init__(self, source: str | Path | None, layers: ModelLayers, workdir: str | Path | None = None):
        if source is None:
            raise UserError(f"llama.cpp needs a GGUF checkpoint; the checkpoint is a Hugging Face directory: {CONVERT_HINT}")
        self.source, self.layers = Path(source), layers
        self.cache: PackCache = PackCache()
        self.dir = Path(tempfile.mkdtemp(prefix="bo_search_llamacpp_", dir=workdir))
        self._n = 0

    def write(self, plan: QuantPlan, name: str | None = None) -> Path:
        check_plan(plan, self.layers)
        self._n += 1
        out = self.dir / (name or f"plan{self._n}.gguf")
        export_gguf(self.source, plan, self.layers, out, force=True, cache=self.cache)
        return out

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PlanWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class TrialRuntime:
    """A worker's llama.cpp measurements of search trials: the plan written as GGUF, its perplexity on
    the search windows and its decode speed from that same file (with the worker's thread count)."""

    def __init__(self, ctx: ModelContext, threads: int):
        llamacpp.check_available()
        n = os.cpu_count() or 1
        if n >= 2 and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(range(1, n)))  # off the first core, where acc_throughput pins the driver
        self.ctx = ctx
        self.writer = PlanWriter(ctx.ref.gguf, ctx.layers)
        cfg = ctx.cfg
        self.decode = DecodeSpec(cfg.prompt_tokens, cfg.decode_tokens, cfg.decode_repeats, 1, threads)

    def measure(self, plan: QuantPlan) -> tuple[Throughput, Perplexity]:
        from bo_search.throughput import Throughput

        path = self.writer.write(plan, "trial.gguf")
        try:
            m = measure_file(path, self.ctx.search_windows, None, self.decode, self.ctx.tok)
        finally:
            path.unlink(missing_ok=True)
        assert m.ppl is not None and m.timing is not None
        t = m.timing
        return Throughput(t.tokens_per_s, t.sem, "llamacpp", len(t.rates)), m.ppl


def measure_plans(
    ctx: ModelContext,
    plans: Sequence[tuple[str, QuantPlan]],
    files: Sequence[str | Path],
    decode: DecodeSpec | None,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Rows for ``evaluate --runtime llamacpp``: each plan written as GGUF and each given GGUF file,
    measured in llama.cpp on ``ctx``'s search and held-out windows."""
    import time

    for _label, plan in plans:  # every plan is checked before any file is written
        check_plan(plan, ctx.layers)
    rows: list[dict[str, Any]] = []
    items: list[tuple[str, QuantPlan | Path]] = [*plans, *((Path(f).name, Path(f)) for f in files)]
    writer = PlanWriter(ctx.ref.gguf, ctx.layers) if plans else None
    try:
        for label, item in progress(items) if progress else items:
            t0 = time.perf_counter()
            path = item if isinstance(item, Path) else writer.write(item) if writer else item
            assert isinstance(path, Path)
            m = measure_file(path, ctx.search_windows, ctx.heldout_windows, decode, ctx.tok)
            if not isinstance(item, Path):
                path.unlink(missing_ok=True)
            rows.append({"config": label, **m.row(), "seconds": round(time.perf_counter() - t0, 2)})
    finally:
        if writer is not None:
            writer.close()
    return rows
