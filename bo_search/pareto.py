"""``python -m bo_search.pareto``: the whole perplexity / size trade-off.

A multi-objective Ax search (mean NLL on the search split and model size, both minimised) on the
same workers, history and resume as ``acc_modelsize``. Objective thresholds bound the region of
interest: size at most the largest plan of the space, perplexity at most ``--max_ppl``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bo_search import cli
from bo_search.budget import SIZE_METRIC, SizeLimit
from bo_search.search import flags, runner, seeding
from bo_search.search.experiment import Goal
from bo_search.search.metric_registry import nll_of_ppl
from bo_search.types import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bo_search.pareto",
        description="Multi-objective Bayesian optimisation of perplexity and model size (both minimised); prints and writes the Pareto front.",
    )
    p.add_argument(
        "--max_ppl", type=float, default=200.0, help="perplexity threshold: plans above it are outside the region of interest (default 200)"
    )
    p.add_argument(
        "--max_size_gb", type=float, default=None, help="size threshold in GB (1e9 bytes; default: the largest plan of the space)"
    )
    flags.add_search_args(p, default_history="runs/pareto_history.csv")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_main(_main, build_parser(), argv)


def _main(args: argparse.Namespace) -> int:
    if args.max_ppl <= 1:
        raise UserError(f"--max_ppl must be above 1, got {args.max_ppl}")
    setup = runner.prepare(args, "pareto")
    try:
        return _search(setup, args)
    finally:
        setup.release()


def _search(setup: runner.Setup, args: argparse.Namespace) -> int:
    size_thr = args.max_size_gb if args.max_size_gb is not None else setup.max_gb
    if size_thr <= setup.min_gb:
        raise UserError(f"--max_size_gb {size_thr:.6g} is not above the smallest plan of the space ({setup.min_gb:.6g} GB)")
    goal = Goal(
        objective=f"nll, {SIZE_METRIC}",
        minimize=True,
        constraint_metric="",
        limit=size_thr,
        search="pareto",
        thresholds=(("nll", nll_of_ppl(args.max_ppl)), (SIZE_METRIC, size_thr)),
    )
    print(
        f"Pareto search: size {setup.min_gb:.6g}-{setup.max_gb:.6g} GB in this space, thresholds size <= {size_thr:.6g} GB, perplexity <= {args.max_ppl:g}"
    )
    seeds = (
        seeding.seeds_for(setup, args.initial_samples, SizeLimit(size_thr))
        if args.initial_samples != "uniform"
        else seeding.ladder_seeds(setup)
    )
    return runner.run_search(setup, goal, seeds)


if __name__ == "__main__":
    sys.exit(main())
