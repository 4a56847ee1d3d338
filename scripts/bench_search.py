"""Search quality and cost on the embedded model, every arm under the same evaluation budget.

Arms: ``uniform`` (the best uniform plan that fits), ``random`` feasible plans, ``greedy`` and
``exact`` (knapsack) allocations from FIT sensitivity, and searches: ``ts_seeded`` (the Thompson
strategy from the ``auto`` seeds), ``ts`` (Thompson, no seeds, FIT prior), ``ts_flat`` (no seeds,
flat prior), ``gp_seeded`` and ``gp`` (Ax's GP). Seeded arms start from the same evaluated seeds
(evaluated once, copied). For each arm: the best plan's held-out perplexity, the gap closure from
the uniform plan just below the budget to full precision, trials to within 1% of the arm's final
best ("n/a" for one-plan arms), proposal time, worker idle, how many of the search's own proposals
beat every seed, and for Thompson the model's calibration on trials it had not yet seen. Also a
per-trial cost breakdown and (``--scaling``) trials per hour with 1 and 2 workers.

    python scripts/bench_search.py --quick                                   # CI-sized: minutes
    python scripts/bench_search.py --trials 40 --seeds 3 --out runs/b375     # one budget (hours on 2 CPU cores)
    python scripts/bench_search.py --merge runs/b375/results.json runs/b425/results.json --out runs/bench

Writes a Markdown summary (``--out``, default runs/bench/BENCH.md), results.json and a best-so-far plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bo_search.budget import SizeLimit, SlotTable, random_feasible
from bo_search.metrics import perplexity
from bo_search.search.history import read_history
from bo_search.search.runner import EMBEDDED_SPACE
from bo_search.search.workers import default_threads
from bo_search.space import load_space
from bo_search.trial import EvalConfig, ModelContext
from bo_search.types import QuantPlan


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run: 6 trials, 1 seed, 512/1024 tokens")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--seeds", type=int, default=3, help="runs per stochastic arm (different random streams)")
    p.add_argument("--first_seed", type=int, default=0, help="first random stream (to add streams to an earlier run)")
    p.add_argument("--arm_seeds", default=None, metavar="ARM=N,...", help="runs per arm where it differs from --seeds, e.g. random=1,ts=2")
    p.add_argument("--arm_trials", default=None, metavar="ARM=N,...", help="trials per arm where it differs from --trials, e.g. ts=20")
    p.add_argument(
        "--avg_bits",
        type=float,
        default=3.75,
        help="budget in average bits per quantized weight (between uniform 3-bit g64 = 3.5 and 4-bit g64 = 4.5)",
    )
    p.add_argument("--eval_tokens", type=int, default=2048)
    p.add_argument("--heldout_tokens", type=int, default=16384, help="test-split tokens of every held-out number (default 16384)")
    p.add_argument("--curves", action="store_true", help="also the best-so-far held-out curve (one held-out evaluation per mark)")
    p.add_argument(
        "--reuse", action="store_true", help="keep a search run's history and log when they exist (the search resumes: nothing runs again)"
    )
    p.add_argument("--search_args", default="", help="extra flags for every search run, e.g. '--objective nll' or '--finalists 0'")
    p.add_argument("--arms", default="uniform,random,greedy,exact,gp_seeded,ts_seeded,ts")
    p.add_argument("--space", default=str(EMBEDDED_SPACE), help="parameter space JSON (default: the per-block space)")
    p.add_argument("--merge", nargs="+", default=None, metavar="RESULTS.json", help="merge runs' results.json into one table (--out)")
    p.add_argument("--scaling", action="store_true", help="also measure trials/hour with 1 and 2 workers")
    p.add_argument("--scaling_trials", type=int, default=16, help="trials per scaling run (uniform seeds, then BO)")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args()
    if args.quick:
        args.trials, args.seeds, args.eval_tokens, args.heldout_tokens, args.scaling_trials = 8, 1, 512, 1024, 4
    return args


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        # the searches' quantizer (--search_args '--quantizer gptq') measures every plan here too
        quantizer = search_flag(args.search_args, "--quantizer", "rtn")
        self.ctx = ModelContext(EvalConfig(eval_tokens=args.eval_tokens, heldout_tokens=args.heldout_tokens, quantizer=quantizer))
        self.space_path = Path(args.space).resolve()
        self.space = load_space(self.space_path, self.ctx.layers)
        n = sum(li.numel for li in self.ctx.layers.linears)
        self.size_limit = SizeLimit.from_avg_bits(args.avg_bits, self.ctx.size_model.other_bits, n)
        self.limit = self.size_limit.gb
        self.sizes = SlotTable.build(self.space, self.ctx.size_model)
        self._heldout: dict[QuantPlan, tuple[float, float]] = {}

    def search_ppl(self, plan: QuantPlan) -> float:
        self.ctx.applier.apply(plan)
        return perplexity(self.ctx.model, self.ctx.search_windows).ppl

    def heldout(self, plan: QuantPlan) -> float:
        return self.heldout_sem(plan)[0]

    def heldout_sem(self, plan: QuantPlan) -> tuple[float, float]:
        """Held-out perplexity and its standard error across the test windows (delta method)."""
        if plan not in self._heldout:
            self.ctx.applier.apply(plan)
            p = perplexity(self.ctx.model, self.ctx.heldout_windows)
            self._heldout[plan] = (p.ppl, p.ppl_sem)
        return self._heldout[plan]

    def curve(self, plans_ppl: list[tuple[QuantPlan, float]]) -> list[float]:
        """Best-so-far held-out perplexity (of the best-by-search plan) after each trial; measured at
        the report's marks only (held-out evaluations are dear), carried forward in between."""
        if not self.args.curves:
            return []
        marks = set(curve_marks(self.args.trials)) | {len(plans_ppl)}
        best: tuple[QuantPlan, float] | None = None
        out: list[float] = []
        for k, (plan, ppl) in enumerate(plans_ppl, 1):
            if best is None or ppl < best[1]:
                best = (plan, ppl)
            out.append(self.heldout(best[0]) if k in marks else math.nan)
        for i in range(len(out) - 2, -1, -1):  # fill back from the next mark (a flat stretch until then is not claimed)
            if math.isnan(out[i]):
                out[i] = out[i + 1]
        return out


def search_flag(search_args: str, flag: str, default: str) -> str:
    """The value of ``flag`` in ``--search_args`` (``--flag VALUE`` or ``--flag=VALUE``), else ``default``."""
    parts = search_args.split()
    for i, p in enumerate(parts):
        if p == flag and i + 1 < len(parts):
            return parts[i + 1]
        if p.startswith(flag + "="):
            return p.split("=", 1)[1]
    return default


def curve_marks(trials: int) -> list[int]:
    return sorted({k for k in (1, 5, 10, 20, 30, 40, 50, trials) if k <= trials})


def _per_arm(spec: str | None, arm: str, default: int) -> int:
    for item in (spec or "").split(","):
        if "=" in item and item.split("=")[0] == arm:
            return int(item.split("=")[1])
    return default


def seeds_for_arm(args: argparse.Namespace, arm: str) -> int:
    return _per_arm(args.arm_seeds, arm, args.seeds)


def trials_for_arm(args: argparse.Namespace, arm: str) -> int:
    return _per_arm(args.arm_trials, arm, args.trials)


def bare_forward(b: Bench) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, b.ctx.search_windows.ids.shape[0], 4):
            b.ctx.model(input_ids=b.ctx.search_windows.ids[s : s + 4, :-1], use_cache=False)
    return time.perf_counter() - t0


def trials_to_1pct(search_ppls: list[float]) -> int:
    final = min(search_ppls)
    running = float("inf")
    for i, p in enumerate(search_ppls, 1):
        running = min(running, p)
        if running <= final * 1.01:
            return i
    return len(search_ppls)


SEARCH_ARMS = {
    # arm: (strategy, --initial_samples, --prior)
    "gp": ("gp", "none", "none"),
    "gp_seeded": ("gp", "auto", "none"),
    "ts": ("thompson", "none", "auto"),
    "ts_flat": ("thompson", "none", "none"),
    "ts_seeded": ("thompson", "auto", "auto"),
}
ONE_PLAN_ARMS = ("uniform", "greedy", "exact")
OWN_SOURCES = ("thompson", "bo", "sobol", "repaired", "random")


def seed_history(b: Bench) -> tuple[Path, int]:
    """The auto seeds evaluated once (deterministic), copied as the start of every seeded run."""
    from bo_search import acc_modelsize, structure
    from bo_search.search import runner, seeding

    args = acc_modelsize.build_parser().parse_args(
        ["--avg_bits", str(b.args.avg_bits), "--parameters_list", str(b.space_path), "--history_output", os.devnull,
         *b.args.search_args.split()]
    )  # fmt: skip
    setup = runner.prepare(args, "modelsize", take_lock=False)
    seeds = seeding.seeds_for(setup, "auto", structure.size_limit(setup, None, b.args.avg_bits))
    hist = b.out / "seeds.csv"
    if hist.exists() and sum(1 for r in read_history(hist).rows if r.status == "completed") == len(seeds):
        return hist, len(seeds)
    hist.unlink(missing_ok=True)
    run_cli(b, hist, ["--strategy", "thompson", "--initial_samples", "auto", "--num_trials", str(len(seeds))])
    return hist, len(seeds)


def run_cli(b: Bench, hist: Path, extra: list[str], workers: int = 1) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "bo_search.acc_modelsize", "--avg_bits", str(b.args.avg_bits), "--parameters_list", str(b.space_path),
           "--history_output", str(hist), "--eval_tokens", str(b.args.eval_tokens), "--heldout_tokens", "0",
           "--num_workers", str(workers), *b.args.search_args.split(), *extra]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"search run failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return r.stdout, wall


def run_search(b: Bench, arm: str, seed: int, trials: int, workers: int = 1) -> dict[str, Any]:
    strategy, init, prior = SEARCH_ARMS[arm]
    hist = b.out / f"{arm}_s{seed}_w{workers}.csv"
    log_path = Path(str(hist) + ".log")
    reuse = b.args.reuse and hist.exists()
    if not reuse:
        for p in (hist, Path(str(hist) + ".best_plan.json"), log_path):
            p.unlink(missing_ok=True)
        if init == "auto":
            src, _ = seed_history(b)
            shutil.copyfile(src, hist)  # the same evaluated seeds for every seeded arm and stream
    stdout, wall = run_cli(b, hist, ["--strategy", strategy, "--initial_samples", init, "--prior", prior, "--seed", str(seed),
                                     "--num_trials", str(trials)], workers)  # fmt: skip
    rows = read_history(hist).rows
    if reuse and log_path.exists():  # the first run's output holds its timings
        wall_text, stdout = log_path.read_text().split("\n", 1)
        wall = float(wall_text)
    elif reuse:  # a run from before logs were kept: its span from the history (its own trials: seeds were copied in)
        own = [x for x in rows if x.source != "seed" and x.status != "rescored"]
        first = min(x.timestamp - (x.quantize_s or 0) - (x.evaluate_s or 0) - (x.proposal_s or 0) for x in own)
        wall = max(x.timestamp for x in rows) - first
    else:
        log_path.write_text(f"{wall}\n{stdout}")
    done = sorted((x for x in rows if x.status == "completed"), key=lambda x: x.timestamp)
    idle = re.search(r"worker idle waiting for proposals: ([0-9.]+)%", stdout)
    return {
        "rows": rows,
        "completed": done,
        "wall_s": wall,
        "stdout": stdout,
        "history": str(hist),
        "idle": float(idle.group(1)) if idle else idle_from_history(rows),
    }


def idle_from_history(rows: list[Any]) -> float | None:
    """A one-worker search's idle share from its rows: the gaps between one trial's end and the next
    one's start (end = the row's timestamp, start = end - apply - evaluate), over gaps plus busy time.
    Used where the search's own figure (its summary line) was not kept."""
    trials = sorted((x for x in rows if x.status in ("completed", "failed") and x.source != "seed"), key=lambda x: x.timestamp)
    if len(trials) < 2:
        return None
    busy = sum((x.quantize_s or 0) + (x.evaluate_s or 0) for x in trials)
    gaps = sum(max(0.0, (b.timestamp - (b.quantize_s or 0) - (b.evaluate_s or 0)) - a.timestamp) for a, b in zip(trials, trials[1:]))
    return 100 * gaps / (gaps + busy)


def run_result(b: Bench, run: dict[str, Any], exact_held: float | None) -> dict[str, Any]:
    """A search run's outcome as a user gets it: its final pick (best_plan.json: the validation
    winner among the finalists, or the search split's best with --finalists 0), held-out on the
    bench's test tokens, against the best seed (chosen the same way: by validation among the
    re-scored seeds), the search split's own winner (the old rule) and the exact FIT allocation."""
    from bo_search.search.metric_registry import search_score, val_score

    comp = run["completed"]
    rows = run["rows"]
    pick_json = json.loads(Path(run["history"] + ".best_plan.json").read_text())
    pick = QuantPlan.from_json(pick_json)
    objective = "kl" if any(x.goal.startswith("min kl") for x in comp) else "nll"
    resc = [x for x in rows if x.status == "rescored"]
    own = [x for x in comp if x.source in OWN_SOURCES]
    seeds_ = [x for x in comp if x.source == "seed"]
    resc_seeds = [x for x in resc if x.source == "seed"]
    if resc_seeds:
        best_seed_plan = min(resc_seeds, key=lambda x: val_score(x, objective)).plan
    else:
        best_seed_plan = min(seeds_, key=lambda x: search_score(x, objective)).plan if seeds_ else None
    search_best = min(comp, key=lambda x: search_score(x, objective))
    best_own = min(own, key=lambda x: search_score(x, objective)) if own else None
    best_seed_search = min(seeds_, key=lambda x: search_score(x, objective)) if seeds_ else None
    held, held_sem = b.heldout_sem(pick)
    seed_held = b.heldout(best_seed_plan) if best_seed_plan is not None else None
    props = [x.proposal_s for x in rows if x.source in OWN_SOURCES and x.proposal_s is not None]
    val_s = re.search(r"validation (\d+) s, held-out", run["stdout"])
    return {
        "heldout": held,
        "heldout_sem": held_sem,
        "best_source": pick_json.get("source"),
        "picked_by": pick_json.get("picked_by"),
        "pick_trial": pick_json.get("trial_index"),
        "objective": objective,
        "search_best_heldout": b.heldout(search_best.plan),
        "search_best_source": search_best.source,
        "trials_1pct": trials_to_1pct([x.cal_PPL for x in comp]),
        "wall_s": run["wall_s"],
        "trials": len(comp),
        "proposal_s_mean": statistics.mean(props) if props else None,
        "proposal_s_max": max(props) if props else None,
        "idle_pct": run["idle"],
        "over_limit": sum(x.status == "infeasible" for x in rows),
        "own_beat_seeds": sum(
            best_seed_search is not None and search_score(x, objective) < search_score(best_seed_search, objective) for x in own
        ),
        "own": len(own),
        "best_own_heldout": b.heldout(best_own.plan) if best_own else None,
        "best_seed_heldout": seed_held,
        "beats_seed": seed_held is not None and held < seed_held,
        "beats_exact": exact_held is not None and held < exact_held,
        "finalists": len(resc),
        "rescore_s": float(val_s.group(1)) if val_s and float(val_s.group(1)) > 0 else sum(x.evaluate_s or 0 for x in resc),
        "trial_s_mean": statistics.mean((x.quantize_s or 0) + (x.evaluate_s or 0) for x in comp),
    }


def calibration(b: Bench, completed: list[Any], n_seeds: int, flat: bool = False) -> list[tuple[float, float, float]]:
    """(predicted mean, predicted sd, measured) objective of each trial after the seeds, from the
    Thompson model fitted on the trials before it (so on trials it had not yet seen), with the
    search's own objective, measurement noise and default model settings; with ``flat``, the model
    of a flat-prior search (no sensitivity table), as the ``ts_flat`` arm runs it."""
    from bo_search.search.thompson import Posterior, ThompsonConfig
    from bo_search.sensitivity.cache import cached_sensitivity

    sens, _, _ = cached_sensitivity(b.ctx.cfg, b.ctx.ref, b.ctx.layers, b.space, "fit")
    problem = b.sizes.with_prior(None if flat else sens)
    kl = all(x.kl is not None for x in completed) and any(x.goal.startswith("min kl") for x in completed)
    picks = [problem.pick_of(b.space.encode(x.plan)) for x in completed]
    ys = [x.kl if kl else x.nll for x in completed]
    sems = [x.kl_sem if kl else x.nll_delta_sem for x in completed]
    out = []
    for t in range(max(1, n_seeds), len(completed)):
        post = Posterior(problem, ThompsonConfig()).fit(picks[:t], ys[:t], sems[:t])
        m, sd = post.predict([picks[t]])
        out.append((float(m[0]), float(sd[0]), float(ys[t])))
    return out


def main() -> None:
    args = parse()
    if args.merge:
        merge(args)
        return
    torch.manual_seed(0)
    b = Bench(args)
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ("uniform", "random", "greedy", "exact", *SEARCH_ARMS)]
    if unknown:
        raise SystemExit(f"unknown arm {unknown[0]!r}: use uniform, random, greedy, exact, {', '.join(SEARCH_ARMS)}")
    fp_held = b.heldout(QuantPlan())
    results: dict[str, list[dict[str, Any]]] = {}
    curves: dict[str, list[list[float]]] = {}
    print(
        f"budget {args.avg_bits} avg bits = {b.limit:.6g} GB; space {b.space_path.name}; {args.trials} trials per arm; "
        f"seeds {args.seeds}; full precision held-out ppl {fp_held:.3f}",
        flush=True,
    )

    # the uniform plan just below the budget (reference for gap closure)
    uniform = []
    for bits, g in sorted({(v["b"], v["g"]) for v in _uniform_choices(b.space)}):
        vals = b.space.uniform(bits, g, check_fixed=False)
        if vals is None:
            continue
        plan = b.space.decode(vals)
        if b.ctx.size_model.gb(plan) <= b.limit:
            uniform.append((b.ctx.size_model.gb(plan), bits, g, plan))
    ref_size, ref_bits, ref_g, ref_plan = max(uniform, key=lambda u: (u[0], -u[2]))
    ref_held = b.heldout(ref_plan)
    print(f"uniform reference: {ref_bits}-bit g{ref_g}, {ref_size:.6g} GB, held-out ppl {ref_held:.3f}", flush=True)

    if "uniform" in arms:
        t0 = time.perf_counter()
        best = min(uniform, key=lambda u: b.search_ppl(u[3]))
        results["uniform"] = [
            {"heldout": b.heldout(best[3]), "trials_1pct": None, "wall_s": time.perf_counter() - t0, "trials": len(uniform)}
        ]
    if "random" in arms:
        results["random"], curves["random"] = [], []
        for s in range(args.first_seed, args.first_seed + seeds_for_arm(args, "random")):
            rng = random.Random(s)
            t0 = time.perf_counter()
            plans = [b.space.decode(random_feasible(b.sizes, b.size_limit, rng)) for _ in range(args.trials)]
            scored = [(p, b.search_ppl(p)) for p in plans]
            wall = time.perf_counter() - t0
            best = min(scored, key=lambda x: x[1])
            curves["random"].append(b.curve(scored))
            results["random"].append(
                {
                    "heldout": b.heldout(best[0]),
                    "trials_1pct": trials_to_1pct([x[1] for x in scored]),
                    "wall_s": wall,
                    "trials": args.trials,
                }
            )
            print(f"random seed {s}: held-out {results['random'][-1]['heldout']:.3f}", flush=True)
    if "greedy" in arms or "exact" in arms:
        from bo_search.sensitivity.cache import cached_sensitivity
        from bo_search.sensitivity.seeds import allocate

        t0 = time.perf_counter()
        sens, _, hit = cached_sensitivity(b.ctx.cfg, b.ctx.ref, b.ctx.layers, b.space, "fit")
        sens_s = time.perf_counter() - t0
        for name in ("greedy", "exact"):
            if name not in arms:
                continue
            t0 = time.perf_counter()
            [seed] = allocate(b.sizes, b.ctx.size_model, sens, b.size_limit, solvers=(name,), fractions=(1.0,))
            plan = b.space.decode(seed.values)
            solve_s = time.perf_counter() - t0
            results[name] = [
                {
                    "heldout": b.heldout(plan),
                    "trials_1pct": None,
                    "wall_s": solve_s + (0.0 if hit else sens_s),
                    "wall_note": "FIT cached" if hit else f"incl. FIT {sens_s:.0f} s",
                    "trials": 1,
                }
            ]
            print(f"{name}: held-out {results[name][0]['heldout']:.3f}", flush=True)
    breakdown = []
    n_seeds = seed_history(b)[1] if any(SEARCH_ARMS[a][1] == "auto" for a in arms if a in SEARCH_ARMS) else 0
    for arm in [a for a in arms if a in SEARCH_ARMS]:
        results[arm], curves[arm] = [], []
        seeded = SEARCH_ARMS[arm][1] == "auto"
        for s in range(args.first_seed, args.first_seed + seeds_for_arm(args, arm)):
            run = run_search(b, arm, s, trials_for_arm(args, arm))
            comp = run["completed"]
            scored = [(x.plan, x.cal_PPL) for x in comp]
            if args.curves:
                curves[arm].append(b.curve(scored))
            res = run_result(b, run, results.get("exact", [{}])[0].get("heldout"))
            if SEARCH_ARMS[arm][0] == "thompson":
                cal = calibration(b, comp, n_seeds if seeded else 1, flat=SEARCH_ARMS[arm][2] == "none")
                res["calibration"] = cal
            results[arm].append(res)
            breakdown.append(run)
            print(
                f"{arm} seed {s}: pick held-out {res['heldout']:.3f} ± {res['heldout_sem']:.3f} ({res['best_source']}, by {res['picked_by']}) "
                f"in {run['wall_s']:.0f} s; best seed {_fmt(res['best_seed_heldout'], '.3f')}, exact {_fmt(results.get('exact', [{}])[0].get('heldout'), '.3f')}, "
                f"search-split winner {res['search_best_heldout']:.3f} ({res['search_best_source']})",
                flush=True,
            )
    scaling = {}
    if args.scaling:
        for w in (1, 2):
            run = run_search(b, "ts_seeded", 100, args.scaling_trials, workers=w)
            # trials/hour of the search itself: from the first trial's start (its result time minus its
            # apply + evaluate time) to the last result; and end to end (incl. Ray start and model load)
            comp = run["completed"]
            start = min(x.timestamp - (x.quantize_s or 0) - (x.evaluate_s or 0) for x in comp)
            span = max(x.timestamp for x in comp) - start
            scaling[w] = {"steady": 3600 * len(comp) / span, "end_to_end": 3600 * len(comp) / run["wall_s"], "wall_s": run["wall_s"]}
            print(
                f"{w} worker(s): {scaling[w]['steady']:.0f} trials/hour in the search, {scaling[w]['end_to_end']:.0f} end to end",
                flush=True,
            )
    write_report(b, args, results, curves, breakdown, scaling, fp_held, (ref_bits, ref_g, ref_size, ref_held))


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (nan under 3 points); also used by bench_calibration and bench_objective."""

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r

    if len(a) < 3:
        return float("nan")
    return statistics.correlation(ranks(a), ranks(b))


def _uniform_choices(space: Any) -> list[dict[str, int]]:
    bits = sorted({v for p in space.tunable if p.kind == "bits" for v in p.values})
    groups = sorted({v for p in space.tunable if p.kind == "group_size" for v in p.values})
    return [{"b": b_, "g": g} for b_ in bits for g in groups]


def merge(args: argparse.Namespace) -> None:
    """One table over several runs' results.json (each run: one budget and space, one machine state).

    Runs of the same budget, space and search tokens are one group: a one-plan arm (uniform, greedy,
    exact: deterministic) is listed once per group, a stochastic arm's runs from every file are pooled
    into one row, and the best plan of any arm is given per group."""
    lines = ["| budget | space | search tokens | arm | runs | held-out ppl (mean ± sd) | gap closure | trials to within 1% | proposal s (mean / max) | worker idle % | own proposals beating every seed | best own vs best seed (held-out) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    pooled: dict[tuple[Any, ...], tuple[dict[str, Any], list[dict[str, Any]]]] = {}  # (*group, arm) -> (meta, runs)
    for path in args.merge:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            meta, results = data["meta"], dict(data["results"])
            group = (meta["avg_bits"], meta["space"], meta["eval_tokens"])
            _ = meta["ref_held"], meta["fp_held"]
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise SystemExit(
                f"--merge {path}: not a bench_search results.json ({type(e).__name__}: {e}); pass the results.json files bench_search runs wrote"
            ) from None
        for arm, rs in results.items():
            runs = pooled.setdefault((*group, arm), (meta, []))[1]
            if arm not in ONE_PLAN_ARMS or not runs:
                runs.extend(rs)  # a stochastic arm's runs pool across files
    best: dict[tuple[Any, ...], tuple[float, str, dict[str, Any]]] = {}
    for key, (meta, rs) in pooled.items():
        group, arm = key[:-1], key[-1]
        lines.append(_arm_row(arm, rs, meta, prefix=True))
        for r in rs:
            if group not in best or r["heldout"] < best[group][0]:
                best[group] = (r["heldout"], arm, meta)
    best_any = [
        f"- {g[0]} avg bits, {g[1]}, {g[2]:,} search tokens: best held-out ppl of any arm {h:.3f} ({arm}; uniform reference "
        f"{meta['ref_held']:.3f}, full precision {meta['fp_held']:.3f})"
        for g, (h, arm, meta) in best.items()
    ]
    text = "\n".join(lines + [""] + best_any) + "\n"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "MERGED.md").write_text(text)
    print(text)


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _arm_row(arm: str, rs: list[dict[str, Any]], meta: dict[str, Any], prefix: bool = False) -> str:
    h = [r["heldout"] for r in rs]
    gap = [(meta["ref_held"] - x) / (meta["ref_held"] - meta["fp_held"]) for x in h]  # closure from uniform to full precision
    sd = statistics.stdev(h) if len(h) > 1 else 0.0
    t1 = [r["trials_1pct"] for r in rs if r.get("trials_1pct") is not None]
    props = [r["proposal_s_mean"] for r in rs if r.get("proposal_s_mean") is not None]
    pmax = [r["proposal_s_max"] for r in rs if r.get("proposal_s_max") is not None]
    idle = [r["idle_pct"] for r in rs if r.get("idle_pct") is not None]
    own = [f"{r['own_beat_seeds']}/{r['own']}" for r in rs if "own_beat_seeds" in r and r.get("best_seed_heldout") is not None]
    vs = [f"{_fmt(r.get('best_own_heldout'))} vs {_fmt(r.get('best_seed_heldout'))}" for r in rs if r.get("best_seed_heldout") is not None]
    cells = [
        arm,
        str(len(rs)),
        f"{statistics.mean(h):.3f} ± {sd:.3f}",
        f"{100 * statistics.mean(gap):.1f}%",
        f"{statistics.mean(t1):.1f}" if t1 else "n/a",
        f"{statistics.mean(props):.2f} / {max(pmax):.2f}" if props else "n/a",
        f"{statistics.mean(idle):.1f} (max {max(idle):.1f})" if idle else "n/a",
        ", ".join(own) if own else "n/a",
        "; ".join(vs) if vs else "n/a",
    ]
    if prefix:
        cells = [f"{meta['avg_bits']}", meta["space"], f"{meta['eval_tokens']:,}", *cells]
    return "| " + " | ".join(cells) + " |"


def write_report(
    b: Bench, args: argparse.Namespace, results: dict, curves: dict, breakdown: list, scaling: dict, fp_held: float, ref: tuple
) -> None:
    meta = {"avg_bits": args.avg_bits, "space": b.space_path.name, "limit_gb": b.limit, "trials": args.trials, "eval_tokens": args.eval_tokens,
            "heldout_tokens": args.heldout_tokens, "fp_held": fp_held, "ref": f"uniform {ref[0]}-bit g{ref[1]}", "ref_held": ref[3]}  # fmt: skip
    lines = [f"Budget {args.avg_bits} average bits ({b.limit:.6g} GB), space {b.space_path.name}; {args.trials} evaluations per search arm; "
             f"held-out {args.heldout_tokens} tokens, search {args.eval_tokens} tokens.",
             f"Full precision held-out ppl {fp_held:.3f}; reference uniform {ref[0]}-bit g{ref[1]} ({ref[2]:.6g} GB) held-out ppl {ref[3]:.3f}.", "",
             "| arm | runs | held-out ppl (mean ± sd) | gap closure | trials to within 1% | proposal s (mean / max) | worker idle % | own proposals beating every seed | best own vs best seed (held-out) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm, rs in results.items():
        lines.append(_arm_row(arm, rs, meta))
    runs = [(arm, i, r) for arm, rs in results.items() for i, r in enumerate(rs) if "picked_by" in r]
    if runs:
        lines += ["", "| arm | run | pick (source, chosen by) | pick held-out ± sem | best seed held-out | exact FIT held-out | search-split winner held-out | beats seed | beats exact | finalists | re-scoring s | mean trial s | over limit | idle % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for arm, i, r in runs:
            lines.append(
                f"| {arm} | {i} | {r['best_source']}, {r['picked_by']} | {r['heldout']:.3f} ± {r['heldout_sem']:.3f} | {_fmt(r['best_seed_heldout'], '.3f')} | "
                f"{_fmt(results.get('exact', [{}])[0].get('heldout'), '.3f')} | {r['search_best_heldout']:.3f} ({r['search_best_source']}) | "
                f"{'yes' if r['beats_seed'] else 'no'} | {'yes' if r['beats_exact'] else 'no'} | {r['finalists']} | {_fmt(r['rescore_s'], '.0f')} | "
                f"{r['trial_s_mean']:.2f} | {r['over_limit']} | {_fmt(r['idle_pct'], '.1f')} |"
            )
    walls = [
        f"{arm}: " + ", ".join(f"{r['wall_s']:.0f} s" + (f" ({r['wall_note']})" if r.get("wall_note") else "") for r in rs)
        for arm, rs in results.items()
    ]
    lines += ["", "Wall time per run: " + "; ".join(walls) + "."]
    cal = [c for rs in results.values() for r in rs for c in r.get("calibration", [])]
    if cal:
        err = [m - y for m, _, y in cal]
        z = [(m - y) / sd for m, sd, y in cal if sd > 0]
        within = sum(abs(v) <= 2 for v in z)
        rho = spearman([m for m, _, _ in cal], [y for _, _, y in cal])
        lines += ["", f"Calibration of the Thompson model on trials it had not yet seen ({len(cal)} trials): mean error "
                  f"{statistics.mean(err):+.4f} nats, mean absolute error {statistics.mean(abs(e) for e in err):.4f} nats, "
                  f"{within} of {len(z)} within 2 predicted sd, Spearman(predicted, measured) {rho:.3f}."]  # fmt: skip
    if any(curves.values()):
        marks = curve_marks(args.trials)
        lines += ["", "Best-so-far held-out perplexity after k trials (mean over runs):", "",
                  "| arm | " + " | ".join(f"k={k}" for k in marks) + " |", "|---|" + "---|" * len(marks)]  # fmt: skip
        for arm, cs in curves.items():
            if not cs:
                continue
            cells = [statistics.mean(c[min(k, len(c)) - 1] for c in cs) for k in marks]
            lines.append(f"| {arm} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    if breakdown:
        comp = [x for run in breakdown for x in run["completed"]]
        q = statistics.mean(x.quantize_s or 0 for x in comp)
        e = statistics.mean(x.evaluate_s or 0 for x in comp)
        props = [x.proposal_s for run in breakdown for x in run["rows"] if x.source in OWN_SOURCES and x.proposal_s]
        idle = [line for run in breakdown for line in run["stdout"].splitlines() if "idle waiting" in line]
        # the worker of a 1-worker search on this machine runs (cores - 1) threads: time the bare forward the same way
        worker_threads = default_threads(1)
        own_threads = torch.get_num_threads()
        torch.set_num_threads(worker_threads)
        b.ctx.applier.restore()
        bare = min(bare_forward(b) for _ in range(2))
        rng = random.Random(1)
        restores = []
        for _ in range(3):
            b.ctx.applier.apply(b.space.decode(random_feasible(b.sizes, b.size_limit, rng)))
            t0 = time.perf_counter()
            b.ctx.applier.restore()
            restores.append(time.perf_counter() - t0)
        torch.set_num_threads(own_threads)
        restore = statistics.mean(restores)
        loads = [float(m.group(1)) for run in breakdown for m in re.finditer(r"model load ([0-9.]+) s", run["stdout"])]
        lines += ["", f"| per-trial cost (BO runs, worker with {worker_threads} thread(s)) | seconds |", "|---|---|",
                  f"| model load, once per worker (mean of {len(loads)} runs) | {statistics.mean(loads) if loads else float('nan'):.1f} |",
                  f"| apply plan (restores the layers that change, then quantizes; mean of {len(comp)}) | {q:.3f} |",
                  f"| evaluate ({b.args.eval_tokens} tokens) | {e:.3f} |",
                  f"| restore all quantized layers (separately timed, mean of 3) | {restore:.3f} |",
                  f"| proposal (mean of {len(props)}, overlapped with evaluation) | {statistics.mean(props) if props else 0:.2f} |",
                  f"| bare forward over the same tokens ({worker_threads} thread(s), best of 2) | {bare:.3f} |",
                  f"| trial time (apply + evaluate) / bare forward | {(q + e) / bare:.3f} |", "", *[f"- {x.strip()}" for x in idle]]  # fmt: skip
    if scaling:
        lines += [
            "",
            f"| workers ({args.scaling_trials} trials) | trials/hour from first start to last result | trials/hour end to end | wall s |",
            "|---|---|---|---|",
        ]
        lines += [f"| {w} | {v['steady']:.0f} | {v['end_to_end']:.0f} | {v['wall_s']:.0f} |" for w, v in scaling.items()]
        if 1 in scaling and 2 in scaling:
            lines.append(
                f"\nParallel efficiency with 2 workers: {100 * scaling[2]['steady'] / (2 * scaling[1]['steady']):.0f}% (from first start to last result)"
            )
    text = "\n".join(lines) + "\n"
    (b.out / "BENCH.md").write_text(text)
    (b.out / "results.json").write_text(json.dumps({"meta": meta, "results": results, "curves": curves, "scaling": scaling}, indent=1))
    print(text)
    if any(curves.values()):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for arm, cs in curves.items():
            for i, c in enumerate(cs):
                ax.plot(
                    range(1, len(c) + 1),
                    c,
                    label=arm if i == 0 else None,
                    color={
                        "random": "tab:gray",
                        "gp": "tab:cyan",
                        "gp_seeded": "tab:blue",
                        "ts": "tab:orange",
                        "ts_flat": "tab:brown",
                        "ts_seeded": "tab:red",
                    }.get(arm),
                )
        for arm in ("uniform", "greedy", "exact"):
            if arm in results:
                ax.axhline(
                    results[arm][0]["heldout"],
                    linestyle="--",
                    label=f"{arm} (one plan)",
                    color={"uniform": "black", "greedy": "tab:green", "exact": "tab:purple"}[arm],
                )
        ax.axhline(fp_held, linestyle=":", color="black", label="full precision")
        ax.set_xlabel("trial (evaluations)")
        ax.set_ylabel("held-out perplexity of the best plan so far")
        ax.set_title(f"SmolLM2-135M at {args.avg_bits} avg bits ({b.limit:.4g} GB)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(b.out / "best_so_far.png", dpi=120)
        print(f"wrote {b.out / 'BENCH.md'} and {b.out / 'best_so_far.png'}")


if __name__ == "__main__":
    main()
