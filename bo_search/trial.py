"""One loaded model ready to score plans, and ``run_trial(plan) -> TrialResult``.

A :class:`ModelContext` loads the model, tokenises the text and copies the original weights once;
each trial then applies a plan in place, evaluates, and (lazily) restores. Workers hold one context
for their whole life.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from bo_search.gguf_file import ggml_other_bits
from bo_search.model import discover_layers, load_model
from bo_search.runtime import TrialRuntime
from bo_search.types import QuantPlan, TrialResult, UserError, did_you_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """Everything needed to rebuild a ModelContext (in a worker process, say)."""

    checkpoint: str | None = None
    eval_text: str | None = None
    eval_tokens: int = 2048
    heldout_tokens: int = 4096
    #: tokens of the validation split the finalists are re-scored on (0: none)
    val_tokens: int = 8192
    max_seqlen: int = 512
    batch_size: int = 4
    scale_dtype: str = "float16"
    zero_bits: int = 16
    mse_clip: bool = False
    #: how the affine codes are chosen: rtn (plain rounding) or gptq (error compensation, bo_search.gptq)
    quantizer: str = "rtn"
    #: calibration tokens of GPTQ's Hessians
    gptq_tokens: int = 8192
    fp_dtype: str | None = None
    include_lm_head: bool = False
    device: str = "cpu"
    #: dtype the model is held and run in: auto = bfloat16 on CUDA, float32 on CPU (sizes never depend on it)
    compute_dtype: str = "auto"
    #: throughput searches: "" (none), "measured" (real kernels) or "predicted" (bytes / bandwidth)
    throughput_model: str = ""
    decode_tokens: int = 32
    prompt_tokens: int = 64
    decode_repeats: int = 5
    compile: bool = False
    #: the space is in llama.cpp types: size tensors outside the plan as the GGUF source stores them
    ggml_sizes: bool = False

    def __post_init__(self) -> None:
        if self.eval_tokens <= 0:
            raise UserError(f"--eval_tokens must be positive, got {self.eval_tokens}")
        if self.heldout_tokens < 0:
            raise UserError(f"--heldout_tokens must be zero or positive, got {self.heldout_tokens}")
        if self.val_tokens < 0:
            raise UserError(f"--val_tokens must be zero or positive, got {self.val_tokens}")
        if self.max_seqlen <= 1:
            raise UserError(f"--max_seqlen must be at least 2, got {self.max_seqlen}")
        if self.batch_size <= 0:
            raise UserError(f"--batch_size must be positive, got {self.batch_size}")
        if self.throughput_model:
            from bo_search.throughput import check_throughput_model

            check_throughput_model(self.throughput_model)
        from bo_search.quant import check_quantizer

        check_quantizer(self.quantizer)
        if self.quantizer != "rtn" and self.mse_clip:
            raise UserError(f"--mse_clip chooses plain rounding's clip ratios; it does not combine with --quantizer {self.quantizer}")
        if self.quantizer != "rtn" and self.throughput_model == "measured":
            raise UserError(
                f"--throughput_model measured times torchao kernels that re-round the weights with min/max, not --quantizer "
                f"{self.quantizer}'s codes; use --throughput_model predicted, or --quantizer rtn"
            )
        if self.gptq_tokens < 1:
            raise UserError(f"--gptq_tokens must be positive, got {self.gptq_tokens}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise did_you_mean(self.compute_dtype, COMPUTE_DTYPES, "--compute_dtype")
        if self.decode_tokens <= 0 or self.prompt_tokens <= 0 or self.decode_repeats <= 0:
            raise UserError("--decode_tokens, --prompt_tokens and --decode_repeats must be positive")

    @classmethod
    def from_args(cls, args: Any) -> EvalConfig:
        names = cls.__dataclass_fields__
        return cls(**{k: getattr(args, k) for k in names if hasattr(args, k)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype this config's model is loaded in, on this config's device."""
        name = self.compute_dtype
        if name == "auto":
            name = "bfloat16" if self.device.startswith("cuda") else "float32"
        return getattr(torch, name)


COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


class ModelContext:
    """A model held in memory with its layers, size accounting and evaluation windows."""

    def __init__(self, cfg: EvalConfig, heldout: bool = True):
        from bo_search.data import load_corpus, split_windows
        from bo_search.quant import PlanApplier, QuantScheme
        from bo_search.sizes import SizeModel

        self.cfg = cfg
        t0 = time.perf_counter()
        self.model, self.tok, self.ref = load_model(cfg.checkpoint, device=cfg.device, dtype=cfg.torch_dtype)
        if cfg.include_lm_head:
            _untie_lm_head(self.model)
        self.layers = discover_layers(self.model, include_lm_head=cfg.include_lm_head)
        self.scheme = QuantScheme(scale_dtype=cfg.scale_dtype, zero_bits=cfg.zero_bits, mse_clip=cfg.mse_clip)
        self.applier = PlanApplier(self.model, self.layers, self.scheme, keep_on="cpu" if cfg.device.startswith("cuda") else None)

        self.size_model = SizeModel(
            self.model,
            self.layers,
            self.scheme,
            cfg.fp_dtype or self.ref.storage_dtype,
            stored_other_bits=ggml_other_bits(cfg.ggml_sizes, self.ref, self.layers),
        )
        self.corpus = load_corpus(cfg.eval_text)
        self.search_windows = split_windows(self.tok, self.corpus, "search", cfg.eval_tokens, cfg.max_seqlen)
        self.heldout_windows = (
            split_windows(self.tok, self.corpus, "test", cfg.heldout_tokens, cfg.max_seqlen) if heldout and cfg.heldout_tokens > 0 else None
        )
        if cfg.quantizer == "gptq":
            from bo_search.gptq import GptqConfig, make_quantizer

            self.applier.quantizer = make_quantizer(self, GptqConfig(tokens=cfg.gptq_tokens))
        self.load_s = time.perf_counter() - t0
        self._bytes_model: Any = None
        self._llamacpp: Any = None
        self._compiled = False
        self._search_ref: Any = None
        self._val: Any = None  # (validation windows, their reference), built at the first re-score

    def search_reference(self) -> Any:
        """The full-precision model's outputs on the search windows (computed once, with the model
        restored to full precision first): what a trial's KL and NLL increase are measured against."""
        from bo_search.metrics import reference

        if self._search_ref is None:
            self.applier.restore()
            self._search_ref = reference(self.model, self.search_windows, self.cfg.batch_size)
        return self._search_ref

    def validation(self) -> tuple[Any, Any]:
        """The validation windows and the full-precision reference on them (built once, on first use)."""
        from bo_search.data import split_windows
        from bo_search.metrics import reference

        if self._val is None:
            if self.cfg.val_tokens <= 0:
                raise UserError("re-scoring finalists needs validation tokens: --val_tokens is 0")
            windows = split_windows(self.tok, self.corpus, "validation", self.cfg.val_tokens, self.cfg.max_seqlen)
            self.applier.restore()
            self._val = (windows, reference(self.model, windows, self.cfg.batch_size))
        return self._val

    def rescore(self, plan: QuantPlan, split: str, with_search: bool = False) -> dict[str, Any]:
        """A finalist measured on the ``validation`` split (perplexity, NLL increase and KL against
        full precision) or the ``test`` split (perplexity): means, standard errors across windows,
        and the per-window values (for paired comparisons between plans). ``with_search``: also its
        search-split score (``search``: ppl, nll, kl and their standard errors), for a plan that
        was never a trial."""
        from bo_search.metrics import score

        if split == "validation":
            windows, ref = self.validation()
        elif split == "test":
            if self.heldout_windows is None:
                raise UserError("held-out perplexity needs test tokens: --heldout_tokens is 0")
            windows, ref = self.heldout_windows, None
        else:
            raise ValueError(f"unknown split {split!r}")
        search_ref = self.search_reference() if with_search else None
        t0 = time.perf_counter()
        self.applier.apply(plan)
        try:
            sc = score(self.model, windows, self.cfg.batch_size, ref)
            on_search = score(self.model, self.search_windows, self.cfg.batch_size, search_ref) if with_search else None
        finally:
            self.applier.restore()
        ppl = sc.perplexity
        extra: dict[str, Any] = {}
        if on_search is not None:
            sp = on_search.perplexity
            extra["search"] = {"ppl": sp.ppl, "ppl_sem": sp.ppl_sem, "nll": sp.nll, "nll_delta_sem": on_search.delta_sem,
                               "kl": on_search.kl, "kl_sem": on_search.kl_sem}  # fmt: skip
        return {
            **extra,
            "split": split,
            "ppl": ppl.ppl,
            "nll": ppl.nll,
            "nll_sem": ppl.nll_sem,
            "nll_delta_sem": sc.delta_sem,
            "kl": sc.kl,
            "kl_sem": sc.kl_sem,
            "tokens": ppl.n_tokens,
            "nll_w": sc.nll_w.tolist(),
            "kl_w": sc.kl_w.tolist() if sc.kl_w is not None else None,
            "seconds": time.perf_counter() - t0,
        }

    def throughput(self, plan: QuantPlan) -> tuple[Any, Any]:
        """(Throughput, Perplexity) of a plan per ``cfg.throughput_model``. Measured: on the model with
        real torchao kernels, perplexity measured on that same model. Predicted: from bytes read per
        token; the perplexity is the fake-quant one (numerically identical to torchao's Intx layers)."""
        from bo_search.metrics import perplexity
        from bo_search.throughput import BytesModel, RealKernels, measure_bandwidth, measure_decode

        if self.cfg.throughput_model == "llamacpp":  # the plan's GGUF in llama.cpp: perplexity and speed from that file
            if self._llamacpp is None:
                self._llamacpp = TrialRuntime(self, threads=torch.get_num_threads())
            return self._llamacpp.measure(plan)
        if self.cfg.throughput_model == "predicted":
            if self._bytes_model is None:
                self._bytes_model = BytesModel(self.model, self.size_model, measure_bandwidth())
            self.applier.apply(plan)
            return self._bytes_model.predict(plan), perplexity(self.model, self.search_windows, self.cfg.batch_size)
        self.applier.restore()
        kernels = RealKernels(self.model, self.layers, self.applier.original, self.cfg.device)
        kernels.apply(plan, self.scheme)
        try:
            model = self.model
            if self.cfg.compile:
                model = torch.compile(self.model, dynamic=True)
            ppl = perplexity(model, self.search_windows, self.cfg.batch_size)
            prompt = self.search_windows.ids[:1, : self.cfg.prompt_tokens + 1].to(self.cfg.device)
            tp = measure_decode(model, prompt, self.cfg.decode_tokens, self.cfg.decode_repeats)
        finally:
            kernels.restore()
        return tp, ppl

    @classmethod
    def from_args(cls, args: Any, heldout: bool = True) -> ModelContext:
        return cls(EvalConfig.from_args(args), heldout=heldout)

    def eval_description(self) -> dict[str, Any]:
        from bo_search.data import TEXT_VERSION

        return {
            "text": self.corpus.name,
            "text_version": TEXT_VERSION,  # the splits' definition (v3: validation carved out of test)
            "search_tokens": self.search_windows.n_tokens,
            "heldout_tokens": self.heldout_windows.n_tokens if self.heldout_windows else 0,
            "seq_len": self.search_windows.seq_len,
            "scale_dtype": self.scheme.scale_dtype,
            "zero_bits": self.scheme.zero_bits,
            "quantizer": self.quantizer_description(),
            "storage_dtype": self.size_model.fp_dtype,
            "size_unit": "GB = 1e9 bytes",
        }

    def quantizer_description(self) -> dict[str, Any]:
        """How the affine codes are chosen (``{"quantizer": "rtn"}``, or GPTQ with its regulariser)."""
        q = self.applier.quantizer
        return q.describe() if q is not None else {"quantizer": "rtn", **({"mse_clip": True} if self.scheme.mse_clip else {})}

    def measure(self, plan: QuantPlan, heldout: bool = False) -> dict[str, Any]:
        """Size and perplexity of one plan (model restored afterwards)."""
        from bo_search.metrics import perplexity

        size = self.size_model.report(plan)
        t0 = time.perf_counter()
        self.applier.apply(plan)
        t1 = time.perf_counter()
        try:
            ppl = perplexity(self.model, self.search_windows, self.cfg.batch_size)
            held = (
                perplexity(self.model, self.heldout_windows, self.cfg.batch_size) if heldout and self.heldout_windows is not None else None
            )
        finally:
            t2 = time.perf_counter()
            self.applier.restore()
        row: dict[str, Any] = {
            "model_size_gb": round(size.gb, 6),
            "avg_bits": round(size.avg_bits, 4),
            "ppl": ppl.ppl,
            "ppl_sem": ppl.ppl_sem,
            "nll": ppl.nll,
            "nll_sem": ppl.nll_sem,
            "ppl_heldout": held.ppl if held else None,
            "quantize_s": t1 - t0,
            "evaluate_s": t2 - t1,
            "restore_s": time.perf_counter() - t2,
        }
        return row

    def run_trial(self, trial_index: int, plan: QuantPlan, worker_id: str = "") -> TrialResult:
        """Apply, evaluate on the search split; any exception becomes a failed result with its reason.

        The model is left holding this plan (restoring is deferred: the next trial rewrites only the
        layers whose setting changes, which is what makes per-trial quantization cheap).
        """
        from bo_search.metrics import score

        t0 = time.perf_counter()
        quantize_s = evaluate_s = 0.0
        sc = None
        try:
            size = self.size_model.report(plan)
            ref = None if self.cfg.throughput_model else self.search_reference()
            t0 = time.perf_counter()
            self.applier.apply(plan)
            quantize_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            tp = None
            if self.cfg.throughput_model:
                tp, ppl = self.throughput(plan)
            else:
                sc = score(self.model, self.search_windows, self.cfg.batch_size, ref)
                ppl = sc.perplexity
            evaluate_s = time.perf_counter() - t1
            if not torch.isfinite(torch.tensor(ppl.nll)):
                raise FloatingPointError(f"non-finite loss ({ppl.nll}) on the search windows")
        except Exception as err:  # a trial must end as completed or failed-with-reason
            self.safe_restore()
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:500]
            log.warning("trial %d failed: %s\n%s", trial_index, reason, traceback.format_exc())
            return TrialResult(trial_index, "failed", reason=reason, quantize_s=quantize_s, evaluate_s=evaluate_s, worker_id=worker_id)
        metrics = {"nll": ppl.nll, "ppl": ppl.ppl, "model_size_gb": size.gb, "avg_bits": size.avg_bits}
        # the sem of nll is that of its increase over full precision (the text's own spread taken out):
        # the noise of the score as an estimate of the plan's damage; ppl keeps the plain window spread
        sems = {"ppl": ppl.ppl_sem}
        if sc is not None and sc.kl is not None:
            metrics["kl"] = sc.kl
            sems["kl"] = sc.kl_sem  # type: ignore[assignment]
            sems["nll"] = sc.delta_sem  # type: ignore[assignment]
        if tp is not None:
            metrics["throughput"] = tp.tokens_per_s
            sems["throughput"] = tp.sem
        return TrialResult(
            trial_index,
            "completed",
            metrics=metrics,
            sems=sems,
            quantize_s=quantize_s,
            evaluate_s=evaluate_s,
            worker_id=worker_id,
        )

    def safe_restore(self) -> None:
        try:
            self.applier.restore()
        except Exception:  # restoring copies saved tensors; if even that fails the worker is replaced
            log.exception("restore failed")


def _untie_lm_head(model: Any) -> None:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False


def ensure_calibrated(eval_cfg: EvalConfig, ref: Any, layers: Any) -> None:
    """Before workers start: calibrate a ``--quantizer gptq`` model and text here, once (loading the
    model), unless the cache already holds it, so that workers only read it."""
    from bo_search.gptq import cached_description

    if eval_cfg.quantizer != "gptq" or cached_description(eval_cfg, ref, layers) is not None:
        return
    ctx = ModelContext(replace(eval_cfg, heldout_tokens=0), heldout=False)
    del ctx
