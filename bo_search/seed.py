"""``python -m bo_search.seed``: initial samples from sensitivity.

Reads a sensitivity JSON (``python -m bo_search.sensitivity``; or ``--sensitivity auto``: FIT on the
calibration split, cached), builds the multiple-choice knapsack over the parameter space's slots
(exact sizes, predicted loss increases) and writes seed-format ``initial_samples`` with the greedy
bang-for-buck and/or the exact allocations at several budgets around the requested one::

    python -m bo_search.seed --sensitivity fit.json --avg_bits 3.5 --output seeds.json
    python -m bo_search.acc_modelsize --avg_bits 3.5 --initial_samples seeds.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bo_search import cli
from bo_search.budget import ACT_BITS
from bo_search.sensitivity.table import Sensitivity
from bo_search.space import write_initial_samples
from bo_search.structure import Structure, size_limit, structure_setup
from bo_search.types import UserError, did_you_mean

if TYPE_CHECKING:
    from bo_search.budget import SizeLimit
    from bo_search.sensitivity.seeds import Seed


def build_parser() -> argparse.ArgumentParser:
    from bo_search.sensitivity.allocate import SOLVERS
    from bo_search.sensitivity.seeds import BUDGET_FRACTIONS

    p = argparse.ArgumentParser(
        prog="python -m bo_search.seed",
        description="Seed-format initial samples from per-layer sensitivity: greedy bang-for-buck and exact knapsack allocations "
        "under a size budget.",
    )
    p.add_argument(
        "--sensitivity",
        default="auto",
        metavar="SENS.json|auto",
        help="sensitivity table from python -m bo_search.sensitivity; 'auto' (default): --method on the calibration split, cached",
    )
    p.add_argument("--method", default="fit", help="method for --sensitivity auto (default fit)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows for --sensitivity auto (default: the method's)")
    g = p.add_argument_group("budget")
    g.add_argument("--model_size_constraint", type=float, default=None, metavar="GB", help="size limit in GB (1e9 bytes)")
    g.add_argument(
        "--avg_bits", type=float, default=None, help="size limit as average bits per quantized weight (default 4.25 when no GB is given)"
    )
    g.add_argument(
        "--bitops",
        type=float,
        default=None,
        metavar="GBOPS",
        help="budget in bit operations per token instead of size: giga (weight bits x 16 activation bits) multiply-accumulates "
        "over the linear layers; the size flags are then ignored",
    )
    g.add_argument(
        "--budgets",
        default=",".join(f"{f:g}" for f in BUDGET_FRACTIONS),
        metavar="F,F,...",
        help="fractions of the budget (bits left for the space's layers) to allocate at (default %(default)s)",
    )
    g.add_argument("--solver", default="both", help=f"{', '.join(SOLVERS)} or both (default both)")
    cli.add_model_args(p)
    e = p.add_argument_group("calibration (only for --sensitivity auto)")
    e.add_argument("--eval_text", default=None, metavar="PATH", help="text whose calibration split is used (default: embedded Wikipedia)")
    e.add_argument("--max_seqlen", type=int, default=512, help="window length in tokens (default 512)")
    e.add_argument("--batch_size", type=int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--parameters_list", default=None, metavar="SPACE.json", help="parameter space (default: the search's default space)")
    p.add_argument("--output", default=None, metavar="SEEDS.json", help="write the seed-format initial samples here")
    return p


def _fractions(spec: str) -> list[float]:
    try:
        out = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--budgets {spec!r}: expected comma-separated fractions such as 1,0.98,0.96") from None
    if not out or any(not 0 < f <= 1 for f in out):
        raise UserError(f"--budgets {spec!r}: fractions must be in (0, 1]")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_main(_main, build_parser(), argv)


def _load_sensitivity(args: argparse.Namespace, setup: Structure) -> tuple[Sensitivity, Path]:
    """The table of --sensitivity: computed (or read from the cache) for ``auto``, else loaded and checked."""
    from bo_search.sensitivity.cache import cached_sensitivity
    from bo_search.sensitivity.compute import METHODS
    from bo_search.trial import EvalConfig

    if args.sensitivity != "auto":
        sens = Sensitivity.load(args.sensitivity)
        sens.check_model(setup.ref.fingerprint, setup.ref.name, setup.layers.fqns)
        return sens, Path(args.sensitivity)
    if args.method not in METHODS:
        raise did_you_mean(args.method, list(METHODS), "sensitivity method")
    eval_cfg = EvalConfig.from_args(args)
    sens, path, hit = cached_sensitivity(eval_cfg, setup.ref, setup.layers, setup.space, args.method, args.nsamples, progress=cli.progress)
    print(f"{args.method} sensitivity {'read from the cache' if hit else 'computed and cached'}: {path}")
    return sens, Path(path)


def _print_seeds(args: argparse.Namespace, limit: SizeLimit | None, seeds: list[Seed]) -> None:
    rows = [
        {
            "solver": s.solver,
            "budget": f"{100 * s.fraction:.0f}%",
            "size_gb": s.size_gb,
            "use": f"{100 * (s.size_gb / limit.gb if limit is not None else s.gbops / args.bitops):.2f}%",
            "gbops": s.gbops if s.gbops is not None else "-",
            "avg_bits": s.avg_bits,
            "predicted": s.predicted,
            "optimal": "yes" if s.optimal else "-",
        }
        for s in seeds
    ]
    print(cli.table(rows, ["solver", "budget", "size_gb", "gbops", "use", "avg_bits", "predicted", "optimal"]))
    for s in seeds:
        print(f"  {s.solver} {100 * s.fraction:.0f}%: bit widths {s.histogram}")


def _seeding_record(
    args: argparse.Namespace, setup: Structure, sens: Sensitivity, sens_path: Path, limit: SizeLimit | None, seeds: list[Seed]
) -> dict[str, object]:
    """The ``seeding`` block written next to the samples: where they came from."""
    return {
        "sensitivity": {
            "path": str(sens_path.expanduser().resolve()),
            "method": sens.method,
            "model": sens.model,
            "model_id": sens.model_id,
            "windows": dict(sens.windows),
        },
        "space": setup.space.source,
        "space_id": setup.space.fingerprint,
        "limit_gb": limit.gb if limit is not None else None,
        "bitops_limit_gbops_per_token": args.bitops,
        "allocations": [s.to_json() for s in seeds],
    }


def _main(args: argparse.Namespace) -> int:
    from bo_search.sensitivity.allocate import SOLVERS, get_solver
    from bo_search.sensitivity.seeds import allocate, dedupe

    solvers = list(SOLVERS) if args.solver == "both" else [args.solver]
    for s in solvers:
        get_solver(s)
    fractions = _fractions(args.budgets)
    if args.output:
        cli.check_output_path(args.output)
    if args.bitops is not None and args.bitops <= 0:
        raise UserError(f"--bitops must be positive, got {args.bitops}")
    setup = structure_setup(args)
    limit = size_limit(setup, args.model_size_constraint, args.avg_bits) if args.bitops is None else None
    sens, sens_path = _load_sensitivity(args, setup)
    n = setup.n_weights
    if limit is not None:
        budget = f"budget {limit.gb:.6g} GB ({limit.avg_bits(setup.size_model.other_bits, n):.3f} avg bits)"
    else:
        budget = f"budget {args.bitops:.6g} GBOPs per token ({args.bitops * 1e9 / n / ACT_BITS:.3f} avg weight bits at {ACT_BITS}-bit activations)"
    print(
        f"model {setup.ref.name}; space {setup.space.source} ({len(setup.space.slots)} slots); {sens.method} sensitivity on "
        f"{sens.windows.get('n_tokens', '?')} calibration tokens; {budget}"
    )
    seeds = allocate(setup.slots, setup.size_model, sens, limit, solvers, fractions, bitops_limit=args.bitops)
    _print_seeds(args, limit, seeds)
    samples = dedupe([s.values for s in seeds])
    if args.output:
        extra = {"seeding": _seeding_record(args, setup, sens, sens_path, limit, seeds)}
        write_initial_samples(args.output, samples, setup.space, extra)
        print(f"wrote {len(samples)} initial samples to {args.output}")
    else:
        print(f"{len(samples)} distinct allocations (use --output SEEDS.json to write them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
