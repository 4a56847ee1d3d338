"""``python -m bo_search.acc_modelsize``: lowest perplexity under a model size limit.

Each trial quantizes the model held by a Ray worker with a per-layer plan proposed by Ax, and
scores its perplexity on the search split. Sizes are exact (GB = 1e9 bytes) and known before any
evaluation: a proposal over the limit is never evaluated (see bo_search.search.driver).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bo_search import cli
from bo_search.budget import SIZE_METRIC
from bo_search.data import check_splits
from bo_search.search import flags, runner, seeding
from bo_search.search.experiment import Goal
from bo_search.search.finalists import check_finalists
from bo_search.search.metric_registry import check_objective
from bo_search.structure import DEFAULT_AVG_BITS, size_limit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bo_search.acc_modelsize",
        description="Bayesian-optimisation search for the per-layer (bitwidth, groupsize) plan with the lowest perplexity "
        "whose size fits a limit. Resumes from its CSV history.",
    )
    g = p.add_argument_group("budget")
    g.add_argument(
        "--model_size_constraint",
        type=float,
        default=None,
        metavar="GB",
        help="size limit in GB (1e9 bytes; the original tool divided by 1024^3): quantized codes + per-group scales/zeros + every "
        f"unquantized tensor. Default: the size at --avg_bits {DEFAULT_AVG_BITS}",
    )
    g.add_argument(
        "--avg_bits",
        type=float,
        default=None,
        help=f"size limit as average bits per quantized weight, scales and zero points included (default {DEFAULT_AVG_BITS} when no --model_size_constraint)",
    )
    flags.add_search_args(p, default_history="runs/acc_modelsize_history.csv", default_seeds="auto")
    flags.add_selection_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_main(_main, build_parser(), argv)


def _main(args: argparse.Namespace) -> int:
    check_objective(args.objective)
    check_finalists(args.finalists, args.val_tokens)
    setup = runner.prepare(args, "modelsize")
    try:
        return _search(setup, args)
    finally:
        setup.release()


def _search(setup: runner.Setup, args: argparse.Namespace) -> int:
    limit = size_limit(setup, args.model_size_constraint, args.avg_bits)
    avg = limit.avg_bits(setup.size_model.other_bits, setup.n_weights)
    print(
        f"size limit {limit.gb:.6g} GB ({avg:.3f} avg bits per quantized weight); space spans {setup.min_gb:.6g}-{setup.max_gb:.6g} GB; full precision {setup.fp_gb:.6g} GB"
    )
    if limit.gb >= setup.max_gb:
        print("note: every plan of the space fits this limit, so it does not bind")
    if args.finalists > 0:
        splits = ("search", "validation") + (("test",) if args.heldout_tokens > 0 else ())
        check_splits(args.checkpoint, args.eval_text, splits, args.max_seqlen)
    goal = Goal(objective=args.objective, minimize=True, constraint_metric=SIZE_METRIC, limit=limit.gb, search="modelsize")
    runner.check_history_limit(setup, goal)  # before the seeds: 'auto' seeds cost a sensitivity pass
    seeds = seeding.seeds_for(setup, args.initial_samples, limit)
    return runner.run_search(setup, goal, seeds)


if __name__ == "__main__":
    sys.exit(main())
