"""``python -m bo_search.acc_throughput``: highest decode throughput under a perplexity limit.

Throughput is measured on real torchao kernels (``--throughput_model measured``, the default on
CUDA) or predicted from the bytes each decoded token reads and the measured memory bandwidth
(``predicted``, the default on CPU, where torchao's quantized linears are slower than dense fp32
and a measured search would honestly choose no quantization). Predicted values are labelled as such
in the CSV (``throughput_kind``) and in every printout.

``--throughput_model llamacpp`` (a ggml space on a GGUF checkpoint) measures each trial in llama.cpp:
the plan is written as a GGUF, and its perplexity on the search split and its batch-1 decode
tokens/s (warm-up, the worker's fixed thread count, median of repeats with its standard error) come
from that same file on llama.cpp's kernels (:mod:`bo_search.runtime`). Timings must not share cores
with an evaluation: such a search runs one worker, pinned to the cores the driver leaves free (the
driver, whose Ax work overlaps the trials, is pinned to the first core).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bo_search import cli, llamacpp
from bo_search.budget import SizeLimit
from bo_search.search import flags, runner, seeding
from bo_search.search.experiment import Goal
from bo_search.structure import load_structure
from bo_search.types import QuantPlan, UserError

if TYPE_CHECKING:
    from bo_search.search.workers import WorkerPool
    from bo_search.space import SearchSpace, Slot

THROUGHPUT_SPACE = runner.REPO_ROOT / "parameter_spaces" / "smollm2_135m_throughput.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bo_search.acc_throughput",
        description="Bayesian-optimisation search for the per-layer plan with the highest batch-1 decode throughput whose perplexity "
        "on the search split stays under a limit. Resumes from its CSV history.",
    )
    g = p.add_argument_group("throughput")
    g.add_argument(
        "--ppl_constraint",
        default="+5%",
        help="perplexity limit: absolute (e.g. 7.5) or relative to full precision (e.g. +3%%); default +5%%",
    )
    g.add_argument(
        "--throughput_model",
        default=None,
        choices=["measured", "predicted", "llamacpp"],
        help="measured on real torchao kernels (default on CUDA), predicted from bytes read per token (default on CPU), "
        "or llamacpp: each trial's GGUF timed in llama.cpp, its perplexity from that file (a ggml space on a GGUF checkpoint, one worker)",
    )
    g.add_argument(
        "--fallback_predicted",
        action="store_true",
        help="with --throughput_model llamacpp: if llama.cpp cannot be loaded, search on the predicted model instead (say so) rather than stop",
    )
    g.add_argument("--decode_tokens", type=int, default=32, help="new tokens per timed decode (default 32)")
    g.add_argument("--prompt_tokens", type=int, default=64, help="prompt length before decoding (default 64)")
    g.add_argument(
        "--decode_repeats", type=int, default=5, help="timed repeats; the median is reported with its standard error (default 5)"
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model for measured decoding (compile time is excluded)")
    flags.add_search_args(p, default_history="runs/acc_throughput_history.csv")
    return p


def parse_limit(spec: str) -> tuple[float, bool]:
    """'7.5' -> (7.5, False); '+3%' -> (0.03, True)."""
    s = spec.strip()
    try:
        if s.endswith("%"):
            rel = float(s.rstrip("%")) / 100
            if not rel >= 0 or not math.isfinite(rel):  # negative, nan or inf
                raise ValueError
            return rel, True
        value = float(s)
    except ValueError:
        raise UserError(
            f"--ppl_constraint {spec!r}: give a perplexity (e.g. 7.5) or a relative allowance over full precision (e.g. +3%)"
        ) from None
    if not math.isfinite(value) or value <= 1:
        raise UserError(f"--ppl_constraint {spec!r}: a perplexity limit must be above 1")
    return value, False


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_main(_main, build_parser(), argv)


def _main(args: argparse.Namespace) -> int:
    value, relative = parse_limit(args.ppl_constraint)
    if args.throughput_model is None:
        args.throughput_model = "measured" if args.device.startswith("cuda") else "predicted"
    if args.throughput_model == "llamacpp":
        _check_llamacpp(args)
    if args.throughput_model == "llamacpp":
        st = load_structure(args)  # checked before the history is touched
        if not st.space.is_ggml or st.ref.gguf is None:
            raise UserError(
                "--throughput_model llamacpp measures plans in llama.cpp types: use a ggml space (e.g. "
                "parameter_spaces/smollm2_135m_ggml_per_block.json) on a GGUF checkpoint"
            )
    if args.parameters_list is None and args.checkpoint is None and THROUGHPUT_SPACE.is_file():
        args.parameters_list = str(THROUGHPUT_SPACE)
    setup = runner.prepare(args, "throughput")
    try:
        return _search(setup, args, value, relative)
    finally:
        setup.release()


def _search(setup: runner.Setup, args: argparse.Namespace, value: float, relative: bool) -> int:
    from bo_search.throughput import layers_without_kernel

    kind = args.throughput_model
    what = {
        "predicted": " (bytes read per token / measured memory bandwidth; not a timing)",
        "measured": " (real torchao kernels, timed)",
        "llamacpp": " (each trial's GGUF timed in llama.cpp; perplexity from the same file)",
    }
    print(f"throughput model: {kind}{what[kind]}")
    if kind == "measured":
        choices = {lq for slot in setup.space.slots for lq in _slot_settings(slot, setup.space)}
        device = "cuda" if args.device.startswith("cuda") else "cpu"
        slow = sorted({lq.label() for lq in choices if layers_without_kernel(QuantPlan({"x": lq}), device)})
        if slow:
            print(
                f"warning: on {device}, these choices have no fast kernel (stored unpacked by torchao, no speed-up): {', '.join(slow)}",
                file=sys.stderr,
            )

    def goal(pool: WorkerPool) -> Goal:
        [fp] = pool.measure([QuantPlan()])
        limit = fp["ppl"] * (1 + value) if relative else value
        print(
            f"full precision: perplexity {fp['ppl']:.4f} on the search split; limit {limit:.4f}"
            + (f" (+{100 * value:g}%)" if relative else "")
        )
        if limit < fp["ppl"]:
            raise UserError(
                f"--ppl_constraint {limit:.4g} is below the full-precision perplexity {fp['ppl']:.4g} on the search split: no plan can meet it"
            )
        return Goal(objective="throughput", minimize=False, constraint_metric="ppl", limit=limit, search="throughput")

    seeds = (
        seeding.seeds_for(setup, args.initial_samples, SizeLimit(setup.max_gb))
        if args.initial_samples not in ("uniform",)
        else seeding.ladder_seeds(setup)
    )
    return runner.run_search(setup, goal, seeds, row_extra={"throughput_kind": kind})


def _check_llamacpp(args: argparse.Namespace) -> None:
    """Before anything is written: llama.cpp loads (else one line naming the install step, or the
    predicted model when asked for), one worker, and the driver kept off the worker's cores."""
    import os

    try:
        llamacpp.check_available()
    except UserError as err:
        if not args.fallback_predicted:
            raise UserError(
                f"{err}; or pass --throughput_model predicted (or --fallback_predicted) to search on predicted throughput"
            ) from None
        print(f"warning: {err}; --fallback_predicted: searching on predicted throughput instead", file=sys.stderr)
        args.throughput_model = "predicted"
        return
    if args.num_workers != 1 or args.gpu_list or getattr(args, "gpus", None) or args.ray_address:
        raise UserError(
            "--throughput_model llamacpp runs one local worker (--num_workers 1): timings from workers sharing the cores are noise"
        )
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) >= 2:
        os.sched_setaffinity(0, {cores[0]})  # the driver (and Ray's own processes) on the first core


def _slot_settings(slot: Slot, space: SearchSpace) -> list[Any]:
    return [space.choice_setting(b, g) for b, g in slot.choices]


if __name__ == "__main__":
    sys.exit(main())
