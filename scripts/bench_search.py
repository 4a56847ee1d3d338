"""Search quality and cost on the embedded model, every arm under the same evaluation budget.

Arms: uniform baselines; random feasible search; greedy and exact (knapsack) allocations from FIT
sensitivity; Bayesian optimisation unseeded (``--initial_samples none``) and seeded from
sensitivity (``--initial_samples auto``). For each arm: the best feasible plan's held-out
perplexity, the gap closure relative to the uniform plan just below the budget, trials needed to
get within 1% of the arm's final best (search split), and wall time. Stochastic arms are repeated
over ``--seeds`` seeds. Also: a per-trial cost breakdown from the BO histories, the ratio of trial
time to a bare forward pass, and (``--scaling``) trials per hour with 1 and 2 workers.

    python scripts/bench_search.py --quick                 # CI-sized: minutes
    python scripts/bench_search.py --trials 40 --seeds 3   # the full benchmark (hours on 2 CPU cores)

Writes a Markdown summary (``--out``, default runs/bench/BENCH.md) and a best-so-far plot.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bo_search.budget import SlotSizes, random_feasible
from bo_search.evaluate import perplexity
from bo_search.history import read_history
from bo_search.quant import uniform_plan
from bo_search.runner import EMBEDDED_SPACE
from bo_search.space import load_space
from bo_search.trial import EvalConfig, ModelContext
from bo_search.types import LayerQuant, QuantPlan
from bo_search.workers import default_threads


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run: 6 trials, 1 seed, 512/1024 tokens")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument(
        "--avg_bits",
        type=float,
        default=3.75,
        help="budget in average bits per quantized weight (between uniform 3-bit g64 = 3.5 and 4-bit g64 = 4.5)",
    )
    p.add_argument("--eval_tokens", type=int, default=2048)
    p.add_argument("--heldout_tokens", type=int, default=4096)
    p.add_argument("--arms", default="uniform,random,greedy,exact,bo,bo_seeded")
    p.add_argument("--scaling", action="store_true", help="also measure trials/hour with 1 and 2 workers")
    p.add_argument("--scaling_trials", type=int, default=16, help="trials per scaling run (uniform seeds, then BO)")
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args()
    if args.quick:
        args.trials, args.seeds, args.eval_tokens, args.heldout_tokens, args.scaling_trials = 6, 1, 512, 1024, 4
    return args


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ctx = ModelContext(EvalConfig(eval_tokens=args.eval_tokens, heldout_tokens=args.heldout_tokens))
        self.space = load_space(EMBEDDED_SPACE, self.ctx.layers)
        n = sum(li.numel for li in self.ctx.layers.linears)
        self.limit = (self.ctx.size_model.other_bits + n * args.avg_bits) / 8 / 1e9
        self.sizes = SlotSizes(self.space, self.ctx.size_model)
        self._heldout: dict[QuantPlan, float] = {}

    def search_ppl(self, plan: QuantPlan) -> float:
        self.ctx.applier.apply(plan)
        return perplexity(self.ctx.model, self.ctx.search_windows).ppl

    def heldout(self, plan: QuantPlan) -> float:
        if plan not in self._heldout:
            self.ctx.applier.apply(plan)
            self._heldout[plan] = perplexity(self.ctx.model, self.ctx.heldout_windows).ppl
        return self._heldout[plan]

    def curve(self, plans_ppl: list[tuple[QuantPlan, float]]) -> list[float]:
        """Best-so-far held-out perplexity after each trial (held-out of the best-by-search plan)."""
        best: tuple[QuantPlan, float] | None = None
        out = []
        for plan, ppl in plans_ppl:
            if best is None or ppl < best[1]:
                best = (plan, ppl)
            out.append(self.heldout(best[0]))
        return out


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


def run_bo(b: Bench, seeds_spec: str, seed: int, trials: int, workers: int = 1) -> dict[str, Any]:
    hist = b.out / f"bo_{seeds_spec}_s{seed}_w{workers}.csv"
    for p in (hist, Path(str(hist) + ".best_plan.json")):
        p.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bo_search.acc_modelsize", "--avg_bits", str(b.args.avg_bits), "--num_trials", str(trials), "--initial_samples", seeds_spec,
           "--seed", str(seed), "--history_output", str(hist), "--eval_tokens", str(b.args.eval_tokens), "--heldout_tokens", str(b.args.heldout_tokens),
           "--num_workers", str(workers)]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"BO run failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    rows = read_history(hist).rows
    done = [x for x in rows if x.status == "completed"]
    done.sort(key=lambda x: x.timestamp)
    return {"rows": rows, "completed": done, "wall_s": wall, "stdout": r.stdout, "history": str(hist)}


def main() -> None:
    args = parse()
    torch.manual_seed(0)
    b = Bench(args)
    arms = args.arms.split(",")
    fp_held = b.heldout(QuantPlan())
    results: dict[str, list[dict[str, Any]]] = {}
    curves: dict[str, list[list[float]]] = {}
    print(
        f"budget {args.avg_bits} avg bits = {b.limit:.6g} GB; {args.trials} trials per arm; seeds {args.seeds}; full precision held-out ppl {fp_held:.3f}",
        flush=True,
    )

    # the uniform plan just below the budget (reference for gap closure)
    uniform = []
    for bits in (2, 3, 4, 5, 6, 8):
        for g in (32, 64, 192):
            plan = uniform_plan(b.ctx.layers, LayerQuant(bits, g))
            if b.ctx.size_model.gb(plan) <= b.limit:
                uniform.append((b.ctx.size_model.gb(plan), bits, g, plan))
    ref_size, ref_bits, ref_g, ref_plan = max(uniform, key=lambda u: (u[0], -u[2]))
    ref_held = b.heldout(ref_plan)
    print(f"uniform reference: {ref_bits}-bit g{ref_g}, {ref_size:.6g} GB, held-out ppl {ref_held:.3f}", flush=True)

    def gap(h: float) -> float:
        return (ref_held - h) / (ref_held - fp_held)

    if "uniform" in arms:
        t0 = time.perf_counter()
        best = min(uniform, key=lambda u: b.search_ppl(u[3]))
        results["uniform"] = [
            {"heldout": b.heldout(best[3]), "trials_1pct": len(uniform), "wall_s": time.perf_counter() - t0, "trials": len(uniform)}
        ]
    if "random" in arms:
        results["random"], curves["random"] = [], []
        for s in range(args.seeds):
            rng = random.Random(s)
            t0 = time.perf_counter()
            plans = [b.space.decode(random_feasible(b.sizes, b.limit, rng)) for _ in range(args.trials)]
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
        from bo_search.seeding import allocate
        from bo_search.sensitivity import cached_sensitivity

        t0 = time.perf_counter()
        sens, _, _ = cached_sensitivity(b.ctx.cfg, b.ctx.ref, b.ctx.layers, b.space, "fit")
        sens_s = time.perf_counter() - t0
        for name in ("greedy", "exact"):
            if name not in arms:
                continue
            t0 = time.perf_counter()
            [seed] = allocate(b.space, b.ctx.size_model, sens, b.limit, solvers=(name,), fractions=(1.0,))
            plan = b.space.decode(seed.values)
            results[name] = [{"heldout": b.heldout(plan), "trials_1pct": 1, "wall_s": time.perf_counter() - t0 + sens_s, "trials": 1}]
            print(f"{name}: held-out {results[name][0]['heldout']:.3f}", flush=True)
    breakdown = []
    for arm, spec in (("bo", "none"), ("bo_seeded", "auto")):
        if arm not in arms:
            continue
        results[arm], curves[arm] = [], []
        for s in range(args.seeds):
            run = run_bo(b, spec, s, args.trials)
            comp = run["completed"]
            scored = [(x.plan, x.cal_PPL) for x in comp]
            curves[arm].append(b.curve(scored))
            best = min(comp, key=lambda x: x.cal_PPL)
            results[arm].append(
                {
                    "heldout": b.heldout(best.plan),
                    "trials_1pct": trials_to_1pct([x.cal_PPL for x in comp]),
                    "wall_s": run["wall_s"],
                    "trials": len(comp),
                }
            )
            breakdown.append(run)
            print(f"{arm} seed {s}: held-out {results[arm][-1]['heldout']:.3f} in {run['wall_s']:.0f} s", flush=True)
    scaling = {}
    if args.scaling:
        for w in (1, 2):
            run = run_bo(b, "uniform", 100, args.scaling_trials, workers=w)
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
    write_report(b, args, results, curves, breakdown, scaling, fp_held, (ref_bits, ref_g, ref_size, ref_held), gap)


def write_report(
    b: Bench, args: argparse.Namespace, results: dict, curves: dict, breakdown: list, scaling: dict, fp_held: float, ref: tuple, gap: Any
) -> None:
    lines = [f"Budget {args.avg_bits} average bits ({b.limit:.6g} GB); {args.trials} evaluations per arm; held-out {args.heldout_tokens} tokens, search {args.eval_tokens} tokens.",
             f"Full precision held-out ppl {fp_held:.3f}; reference uniform {ref[0]}-bit g{ref[1]} ({ref[2]:.6g} GB) held-out ppl {ref[3]:.3f}.", "",
             "| arm | runs | held-out ppl (mean ± sd) | gap closure | trials to within 1% | wall s |", "|---|---|---|---|---|---|"]  # fmt: skip
    for arm, rs in results.items():
        h = [r["heldout"] for r in rs]
        sd = statistics.stdev(h) if len(h) > 1 else 0.0
        g = [gap(x) for x in h]
        lines.append(
            f"| {arm} | {len(rs)} | {statistics.mean(h):.3f} ± {sd:.3f} | {100 * statistics.mean(g):.1f}% | {statistics.mean(r['trials_1pct'] for r in rs):.1f} | {statistics.mean(r['wall_s'] for r in rs):.0f} |"
        )
    if curves:
        marks = sorted({k for k in (1, 5, 10, 20, 30, 40, 50, args.trials) if k <= args.trials})
        lines += ["", "Best-so-far held-out perplexity after k trials (mean over runs):", "",
                  "| arm | " + " | ".join(f"k={k}" for k in marks) + " |", "|---|" + "---|" * len(marks)]  # fmt: skip
        for arm, cs in curves.items():
            cells = [statistics.mean(c[min(k, len(c)) - 1] for c in cs) for k in marks]
            lines.append(f"| {arm} | " + " | ".join(f"{v:.2f}" for v in cells) + " |")
    if breakdown:
        comp = [x for run in breakdown for x in run["completed"]]
        q = statistics.mean(x.quantize_s or 0 for x in comp)
        e = statistics.mean(x.evaluate_s or 0 for x in comp)
        props = [x.proposal_s for run in breakdown for x in run["rows"] if x.source in ("bo", "sobol") and x.proposal_s]
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
            b.ctx.applier.apply(b.space.decode(random_feasible(b.sizes, b.limit, rng)))
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
    (b.out / "results.json").write_text(json.dumps({"results": results, "curves": curves, "scaling": scaling}, indent=1))
    print(text)
    if curves:
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
                    color={"random": "tab:gray", "bo": "tab:blue", "bo_seeded": "tab:red"}.get(arm),
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
