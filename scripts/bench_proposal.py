"""Thompson proposal time on the embedded model's spaces (no evaluation: the objective values are
the prior table's sum plus noise, which is all the proposal's cost depends on).

    python scripts/bench_proposal.py --sensitivity FIT.json [--trials 10,40] [--proposals 10]

``--sensitivity``: a FIT table of the embedded model (``python -m bo_search.sensitivity --method fit``);
being per linear layer it prices every shipped space. Prints mean and max seconds per proposal
(posterior fit + draw + exact solve) for the per-block (60 parameters), fused-group (240) and
per-linear (420) spaces, with one torch/numpy thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from bo_search.budget import SizeLimit, SlotTable, random_feasible  # noqa: E402
from bo_search.model import discover_layers, load_structure, resolve_checkpoint  # noqa: E402
from bo_search.search.runner import REPO_ROOT  # noqa: E402
from bo_search.search.thompson import Acquisition, Posterior, ThompsonConfig, propose
from bo_search.sensitivity.table import Sensitivity  # noqa: E402
from bo_search.sizes import SizeModel  # noqa: E402
from bo_search.space import load_space  # noqa: E402

SPACES = ("smollm2_135m_per_block.json", "smollm2_135m_fused_groups.json", "smollm2_135m_per_linear.json")


def main() -> None:
    import random

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sensitivity", required=True)
    p.add_argument("--avg_bits", type=float, default=3.75)
    p.add_argument("--trials", default="10,40", help="completed trials the posterior is fitted on")
    p.add_argument("--proposals", type=int, default=10)
    args = p.parse_args()
    model, _ = load_structure(None)
    layers = discover_layers(model)
    sm = SizeModel(model, layers, fp_dtype=resolve_checkpoint(None).storage_dtype)
    sens = Sensitivity.load(args.sensitivity)
    n = sum(li.numel for li in layers.linears)
    limit = SizeLimit.from_avg_bits(args.avg_bits, sm.other_bits, n)
    rng = np.random.default_rng(0)
    for name in SPACES:
        space = load_space(REPO_ROOT / "parameter_spaces" / name, layers)
        sizes = problem = SlotTable.build(space, sm).with_prior(sens)
        acq = Acquisition("budget", float(limit.bits - sizes.base_bits))
        for n_trials in (int(x) for x in args.trials.split(",")):
            r = random.Random(n_trials)
            picks = [problem.pick_of(random_feasible(sizes, limit, r)) for _ in range(n_trials)]
            ys = [3.2 + problem.total(problem.prior, pk) + float(rng.normal(0, 0.02)) for pk in picks]  # type: ignore[arg-type]
            times = []
            for _ in range(args.proposals):
                t0 = time.perf_counter()
                post = Posterior(problem, ThompsonConfig()).fit(picks, ys)
                got = propose(post, acq, rng, exclude=picks)
                times.append(time.perf_counter() - t0)
                assert got is not None and problem.total(problem.budget, got[0]) <= acq.cap
            print(
                f"{name}: {len(space.tunable)} parameters, {len(space.slots)} slots, {n_trials} trials: "
                f"proposal mean {statistics.mean(times):.3f} s, max {max(times):.3f} s ({args.proposals} proposals, 1 thread)",
                flush=True,
            )


if __name__ == "__main__":
    main()
