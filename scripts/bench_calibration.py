"""How well does the Thompson model predict trials it has not seen? Replays recorded histories.

For each history (completed trials in the order they ended), the model is fitted on the trials
before trial t and predicts trial t, from the first trial after the seeds on. Several model variants
are compared on the same trials: the shared per-choice term's prior scale (``--shared_sd``, 0 drops
it) and the per-measurement noise (``--noise``: ``none``; ``window``: each row's recorded spread of
its perplexity across the search windows, ``cal_PPL_sem``, as an NLL standard error; ``damage``: the
recorded standard error of its damage, ``nll_delta_sem`` or ``kl_sem``, which histories written
since the KL objective hold; rows without one count as the median known one). Prints Spearman(predicted, measured), mean absolute error and how many measured
values fall within 2 predicted sd (noise included), per space.

    .venv/bin/python scripts/bench_calibration.py --space parameter_spaces/smollm2_135m_per_linear.json \\
        docs/bench/b375_linear/ts_seeded_s0_w1.csv docs/bench/b375_linear/ts_seeded_s1_w1.csv --shared_sd 1,0.1,0 --noise none,window
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from bench_search import spearman  # scripts/ is on sys.path when a script runs


def replay(
    problem: Any, space: Any, rows: list[Any], n_seeds: int, cfg: Any, noise: str, objective: str
) -> list[tuple[float, float, float]]:
    from bo_search.search.thompson import Posterior

    picks = [problem.pick_of(space.encode(r.plan)) for r in rows]
    ys = [_objective(r, objective) for r in rows]
    sems = [_sem(r, noise, objective) for r in rows] if noise != "none" else None
    out = []
    for t in range(max(1, n_seeds), len(rows)):
        post = Posterior(problem, cfg).fit(picks[:t], ys[:t], sems[:t] if sems is not None else None)
        m, sd = post.predict([picks[t]])
        total_sd = math.sqrt(float(sd[0]) ** 2 + post.noise**2)
        out.append((float(m[0]), total_sd, float(ys[t])))
    return out


def _sem(row: Any, noise: str, objective: str) -> float | None:
    if noise == "window":
        return row.cal_PPL_sem / row.cal_PPL if row.cal_PPL_sem and row.cal_PPL else None
    return row.kl_sem if objective == "kl" else row.nll_delta_sem


def _objective(row: Any, objective: str) -> float:
    if objective == "kl":
        return float(row.kl)
    return float(row.nll)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("histories", nargs="+")
    p.add_argument("--space", required=True)
    p.add_argument("--shared_sd", default="1,0.1,0", help="comma-separated scales of the shared per-choice term's prior sd")
    p.add_argument("--noise", default="none,window", help="comma-separated: none, window, damage")
    p.add_argument("--objective", default="nll", choices=["nll", "kl"])
    p.add_argument("--json", default=None)
    a = p.parse_args()

    from bo_search.budget import SlotTable
    from bo_search.search.history import read_history
    from bo_search.search.thompson import ThompsonConfig
    from bo_search.sensitivity.cache import cached_sensitivity
    from bo_search.space import load_space
    from bo_search.trial import EvalConfig, ModelContext

    ctx = ModelContext(EvalConfig(eval_tokens=512, heldout_tokens=0), heldout=False)
    space = load_space(Path(a.space), ctx.layers)
    sens, _, _ = cached_sensitivity(ctx.cfg, ctx.ref, ctx.layers, space, "fit")
    problem = SlotTable.build(space, ctx.size_model).with_prior(sens)
    results: dict[str, Any] = {}
    for shared in (float(x) for x in a.shared_sd.split(",")):
        for noise in a.noise.split(","):
            cal: list[tuple[float, float, float]] = []
            per_history: list[float] = []
            for h in a.histories:
                rows = sorted((r for r in read_history(h).rows if r.status == "completed"), key=lambda r: r.timestamp)
                if a.objective == "kl":
                    rows = [r for r in rows if r.kl is not None]
                n_seeds = sum(r.source == "seed" for r in rows)
                one = replay(problem, space, rows, n_seeds, ThompsonConfig(shared_sd=shared), noise, a.objective)
                per_history.append(spearman([m for m, _, _ in one], [y for _, _, y in one]))
                cal += one
            pred, sd, meas = (list(x) for x in zip(*cal))
            err = np.abs(np.array(pred) - np.array(meas))
            within = int(np.sum(err <= 2 * np.array(sd)))
            key = f"shared_sd={shared:g} noise={noise}"
            results[key] = {
                "n": len(cal),
                "spearman": spearman(pred, meas),
                "spearman_per_history": statistics.fmean(per_history),
                "mae": float(err.mean()),
                "within_2sd": within,
            }
            print(
                f"{key}: {len(cal)} unseen trials, Spearman {results[key]['spearman']:.3f} pooled, "
                f"{results[key]['spearman_per_history']:.3f} mean per history, MAE {results[key]['mae']:.4f} nats, {within} within 2 sd",
                flush=True,
            )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
