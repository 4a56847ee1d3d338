"""Quality of sensitivity-based allocations on the embedded model, held-out split.

At a size budget equal to uniform 3-bit g64 (``--uniform``), evaluates on the held-out windows:
full precision, the uniform plan, the exact and greedy allocations of every sensitivity table given,
and ``--n_random`` random feasible plans at the same budget (``budget.random_feasible``). Prints:

- held-out perplexity of each plan (exact vs uniform vs random),
- per method, the Spearman and Pearson correlations between the predicted loss increase and the
  measured held-out NLL over the random plans,
- the correlations between the methods' cost tables (``sensitivity.correlations``).

Compute the tables first (each under ten minutes on 2 CPU cores), then run this (about 4 minutes)::

    python -m bo_search.sensitivity --method fit --nsamples 8 --output fit.json
    python -m bo_search.sensitivity --method fit --nsamples 8 --fisher_labels data --output fit_data.json
    python -m bo_search.sensitivity --method hessian --nsamples 8 --max_seqlen 256 --max_iter 64 --output hessian.json
    python -m bo_search.sensitivity --method measured --nsamples 1 --output measured.json
    python scripts/bench_sensitivity.py --sens fit.json fit_data.json hessian.json measured.json --output bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sens", nargs="+", required=True, metavar="SENS.json", help="sensitivity tables (python -m bo_search.sensitivity)")
    p.add_argument("--checkpoint", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--parameters_list", default=None, help="space (default: the search's default space)")
    p.add_argument("--uniform", default="3:64", help="the budget: size of this uniform BITS:GROUP plan (default 3:64)")
    p.add_argument("--heldout_tokens", type=int, default=2048)
    p.add_argument("--max_seqlen", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--n_random", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, metavar="BENCH.json")
    args = p.parse_args()

    import torch
    from scipy.stats import pearsonr, spearmanr

    from bo_search import cli
    from bo_search.budget import SizeLimit, SlotTable, random_feasible
    from bo_search.metrics import window_nll
    from bo_search.sensitivity.cli import correlations
    from bo_search.sensitivity.seeds import allocate
    from bo_search.sensitivity.table import Sensitivity
    from bo_search.structure import structure_setup
    from bo_search.trial import EvalConfig, ModelContext
    from bo_search.types import QuantPlan

    cli.setup_logging()
    torch.manual_seed(args.seed)
    ns = argparse.Namespace(checkpoint=args.checkpoint, parameters_list=args.parameters_list, max_seqlen=args.max_seqlen, device="cpu")
    setup = structure_setup(ns)
    space, sm = setup.space, setup.size_model
    tables: dict[str, Any] = {}
    for path in args.sens:
        sens = Sensitivity.load(path)
        sens.check_model(setup.ref.fingerprint, setup.ref.name, setup.layers.fqns)
        name = sens.label
        tables[name] = sens
        other = {"nll": "kl", "kl": "nll"}.get(str(sens.details.get("metric")))
        if sens.method == "measured" and other and f"{other}_costs" in sens.details:
            # the same forward passes also measured the other metric: price allocations with it too
            tables[f"measured[{other}]"] = dataclasses.replace(sens, costs=sens.details[f"{other}_costs"])
    slot_tables = {name: t.slot_costs(space) for name, t in tables.items()}

    ub, ug = (int(x) for x in args.uniform.split(":"))
    uniform = {prm.name: (ub if prm.kind == "bits" else ug) for prm in space.tunable}
    limit = sm.gb(space.decode(uniform))
    print(f"budget: size of uniform {args.uniform} = {limit:.6g} GB ({sm.report(space.decode(uniform)).avg_bits:.4f} avg bits)")

    plans: list[tuple[str, dict[str, int] | None]] = [("full precision", None), (f"uniform {args.uniform}", uniform)]
    for name, sens in tables.items():
        for seed in allocate(SlotTable.build(space, sm), sm, sens, SizeLimit(limit), solvers=("exact", "greedy"), fractions=(1.0,)):
            plans.append((f"{seed.solver} ({name})", seed.values))
    rng = random.Random(args.seed)
    sizes = SlotTable.build(space, sm)
    randoms = [random_feasible(sizes, SizeLimit(limit), rng) for _ in range(args.n_random)]
    plans += [(f"random {i}", v) for i, v in enumerate(randoms)]

    t0 = time.perf_counter()
    ctx = ModelContext(
        EvalConfig(
            checkpoint=args.checkpoint,
            eval_tokens=args.max_seqlen,
            heldout_tokens=args.heldout_tokens,
            max_seqlen=args.max_seqlen,
            batch_size=args.batch_size,
        )
    )
    print(
        f"model loaded in {time.perf_counter() - t0:.1f} s; {ctx.heldout_windows.n_tokens} held-out tokens; {len(plans)} plans", flush=True
    )
    rows: list[dict[str, Any]] = []
    uniform_windows = None
    for label, vals in cli.progress(plans, desc="plans"):
        plan = QuantPlan() if vals is None else space.decode(vals)
        t1 = time.perf_counter()
        ctx.applier.apply(plan)
        per_window = window_nll(ctx.model, ctx.heldout_windows, args.batch_size) / ctx.heldout_windows.seq_len
        nll = float(per_window.mean())
        if label.startswith("uniform"):
            uniform_windows = per_window
        # paired difference to the uniform plan over the same windows: mean and standard error
        diff = per_window - uniform_windows if uniform_windows is not None else None
        row: dict[str, Any] = {
            "plan": label,
            "size_gb": sm.gb(plan),
            "avg_bits": sm.report(plan).avg_bits,
            "ppl_heldout": math.exp(nll),
            "nll_heldout": nll,
            "dnll_vs_uniform": None if diff is None else float(diff.mean()),
            "dnll_se": None if diff is None else float(diff.std(unbiased=True) / math.sqrt(diff.numel())),
            "seconds": time.perf_counter() - t1,
        }
        for name, sens in tables.items():
            row[f"pred_{name}"] = None if vals is None else sens.predicted(space, vals, slot_tables[name])
        rows.append(row)
        print(f"  {label}: ppl {row['ppl_heldout']:.3f} ({row['seconds']:.1f} s)", flush=True)
    ctx.applier.restore()

    print()
    print(
        cli.table(
            rows[: len(plans) - len(randoms)],
            ["plan", "size_gb", "avg_bits", "ppl_heldout", "dnll_vs_uniform", "dnll_se"] + [f"pred_{n}" for n in tables],
        )
    )
    rnd = rows[len(plans) - len(randoms) :]
    rppl = sorted(r["ppl_heldout"] for r in rnd)
    print(
        f"\n{len(rnd)} random feasible plans at the same budget: held-out ppl best {rppl[0]:.3f}, median {rppl[len(rppl) // 2]:.3f}, worst {rppl[-1]:.3f}"
    )
    corr = []
    for name in tables:
        pred = [r[f"pred_{name}"] for r in rnd]
        nll = [r["nll_heldout"] for r in rnd]
        corr.append(
            {
                "method": name,
                "spearman_random_plans": float(spearmanr(pred, nll).statistic),
                "pearson_random_plans": float(pearsonr(pred, nll).statistic),
            }
        )
    print("\npredicted loss increase vs measured held-out NLL (equivalently perplexity for Spearman), over the random plans:")
    print(cli.table(corr, ["method", "spearman_random_plans", "pearson_random_plans"]))
    between = correlations(tables, space) if len(tables) > 1 else []
    if between:
        print("\nbetween methods (costs aggregated to the space's slots):")
        print(cli.table(between, ["pair", "spearman_all", "pearson_all", "spearman_across_slots", "pearson_across_slots"]))
    if args.output:
        cli.write_json(
            args.output,
            {
                "budget_gb": limit,
                "uniform": args.uniform,
                "heldout_tokens": ctx.heldout_windows.n_tokens,
                "sensitivity": {n: {"windows": dict(t.windows), "timings": dict(t.timings)} for n, t in tables.items()},
                "rows": rows,
                "correlations_random_plans": corr,
                "correlations_between_methods": between,
            },
        )
        print(f"wrote {args.output}")
    assert all(math.isfinite(r["ppl_heldout"]) for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
