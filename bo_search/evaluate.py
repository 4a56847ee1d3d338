"""``python -m bo_search.evaluate``: for each configuration, its exact size, average bits per
quantized weight and perplexity on the search and held-out splits, also written as JSON.

``--runtime llamacpp`` measures in llama.cpp instead: each ggml plan is written as a GGUF (and each
``--gguf FILE`` is taken as it is), and its perplexity on the same windows and its batch-1 decode
tokens/s come from llama.cpp's kernels (:mod:`bo_search.runtime`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bo_search import cli, llamacpp
from bo_search.metrics import LOCAL_TASK, lm_eval_tasks
from bo_search.runtime import DecodeSpec, measure_plans, tensor_bytes
from bo_search.types import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bo_search.evaluate",
        description="Measure the exact size and the perplexity of quantization configurations. "
        "With no --config/--uniform/--sample, evaluates full precision and uniform 8, 4, 3 and 2-bit plans.",
    )
    cli.add_model_args(p)
    cli.add_eval_args(p)
    g = p.add_argument_group("configurations (any mix; each is one row of the table)")
    g.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="PLAN.json",
        help="a plan JSON written by a search (HISTORY.best_plan.json) or by bo_search.report (HISTORY_report/export_trial_N/plan.json)",
    )
    g.add_argument(
        "--uniform",
        nargs="+",
        default=[],
        metavar="BITS:GROUPSIZE",
        help="uniform plans, e.g. 8:64 4:32 3:64; 'fp' (or 16) for full precision; groupsize -1 = per channel; add ':sym' for symmetric; "
        "or a llama.cpp tensor type (Q4_K, Q8_0, ...; on a GGUF checkpoint)",
    )
    g.add_argument("--parameters_list", metavar="SPACE.json", help="parameter space used to decode --sample")
    g.add_argument(
        "--initial_samples",
        metavar="SAMPLES.json",
        help="seed-format samples file for --sample (default: the file named by the space, if any)",
    )
    g.add_argument(
        "--sample",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="evaluate initial sample N (0-based) decoded through --parameters_list",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        metavar="TASK",
        help=f"also run lm_eval tasks: {LOCAL_TASK!r} (the search windows' text, word/byte perplexity) or any task whose data is local",
    )
    p.add_argument("--output", metavar="RESULTS.json", help="write the table as JSON (keys model_size_gb, avg_bits, ppl, ppl_heldout, ...)")
    r = p.add_argument_group("runtime")
    r.add_argument(
        "--runtime",
        default="torch",
        choices=["torch", "llamacpp"],
        help="torch (default): the plan fake-quantized in the model; llamacpp: the plan written as a GGUF and run by llama.cpp "
        "(ggml plans: --uniform Q4_K, --config of a ggml search, --sample of a ggml space; and --gguf files), with decode tokens/s",
    )
    r.add_argument(
        "--gguf",
        action="append",
        default=[],
        metavar="FILE.gguf",
        help="--runtime llamacpp: also measure this GGUF file as it is (e.g. one written by report --gguf or by llama-quantize)",
    )
    r.add_argument("--threads", type=int, default=1, help="--runtime llamacpp: llama.cpp threads for perplexity and decoding (default 1)")
    r.add_argument("--decode_tokens", type=int, default=32, help="--runtime llamacpp: new tokens per timed decode (default 32)")
    r.add_argument("--prompt_tokens", type=int, default=64, help="--runtime llamacpp: prompt before decoding (default 64)")
    r.add_argument(
        "--decode_repeats",
        type=int,
        default=5,
        help="--runtime llamacpp: timed repeats after one warm-up; median and its standard error (default 5)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_main(_main, build_parser(), argv)


def _main(args: argparse.Namespace) -> int:
    from bo_search.trial import ModelContext

    if args.output:
        cli.check_output_path(args.output)
    for path in args.config:  # read before the model loads: a bad file is one line at once
        cli.load_plan_file(path)
    if args.runtime == "llamacpp":
        return _main_llamacpp(args)
    if args.gguf:
        raise UserError("--gguf FILE is measured by llama.cpp: add --runtime llamacpp")
    ctx = ModelContext.from_args(args, heldout=args.heldout_tokens > 0)
    configs = cli.collect_plans(args, ctx)
    rows = []
    print(
        f"model {ctx.ref.name}: {len(ctx.layers.linears)} quantizable linears in {ctx.layers.n_blocks} blocks; "
        f"search split {ctx.search_windows.n_tokens} tokens, held-out {ctx.heldout_windows.n_tokens if ctx.heldout_windows else 0} tokens",
        flush=True,
    )
    for label, plan in cli.progress(configs, desc="configs"):
        t0 = time.perf_counter()
        row = ctx.measure(plan, heldout=ctx.heldout_windows is not None)
        if args.tasks:
            ctx.applier.apply(plan)
            row["lm_eval"] = lm_eval_tasks(ctx.model, ctx.tok, args.tasks, ctx.search_windows)
            ctx.applier.restore()
        row = {"config": label, **row, "seconds": round(time.perf_counter() - t0, 2)}
        rows.append(row)
    print(cli.table(rows, ["config", "model_size_gb", "avg_bits", "ppl", "ppl_heldout", "seconds"]))
    for row in rows:
        for task, metrics in row.get("lm_eval", {}).items():
            print(f"  {row['config']}  lm_eval {task}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if args.output:
        out = {"checkpoint": ctx.ref.name, "eval": ctx.eval_description(), "results": rows}
        cli.write_json(args.output, out)
        print(f"wrote {args.output}")
    return 0


def _main_llamacpp(args: argparse.Namespace) -> int:
    """Every plan and file checked, then each measured in llama.cpp; nothing is written on a bad input."""
    from bo_search.trial import ModelContext

    if args.tasks:
        raise UserError("--tasks runs lm_eval on the torch model: drop --runtime llamacpp for it")
    decode = DecodeSpec(args.prompt_tokens, args.decode_tokens, args.decode_repeats, 1, args.threads)
    for f in args.gguf:
        if not Path(f).is_file():
            raise UserError(f"--gguf file not found: {f}")
        tensor_bytes(f)  # readable by the gguf package
    if not args.config and not args.uniform and not args.sample and not args.gguf:
        raise UserError(
            "--runtime llamacpp: name what to measure: --uniform Q4_K Q8_0 ..., --config PLAN.json (a ggml plan) or --gguf FILE"
        )
    version = llamacpp.check_available()
    ctx = ModelContext.from_args(args, heldout=args.heldout_tokens > 0)
    plans = cli.collect_plans(args, ctx) if (args.config or args.uniform or args.sample) else []
    print(
        f"{version}; {args.threads} thread(s); model {ctx.ref.name}: search split {ctx.search_windows.n_tokens} tokens, "
        f"held-out {ctx.heldout_windows.n_tokens if ctx.heldout_windows else 0} tokens; decode {args.decode_tokens} tokens after "
        f"{args.prompt_tokens}, 1 warm-up + {args.decode_repeats} timed",
        flush=True,
    )
    rows = measure_plans(ctx, plans, args.gguf, decode, progress=lambda xs: cli.progress(xs, desc="llama.cpp"))
    print(cli.table(rows, ["config", "file_mb", "model_size_gb", "ppl", "ppl_heldout", "tok_s", "tok_s_sem", "seconds"]))
    if args.output:
        out = {"checkpoint": ctx.ref.name, "runtime": version, "threads": args.threads, "eval": ctx.eval_description(), "results": rows}
        cli.write_json(args.output, out)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
