"""Wiring shared by the search entry points (acc_modelsize, acc_throughput, pareto): flags, space,
history and resume, seeds, workers, the Ax driver, the final summary."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bo_search import cli, structure
from bo_search.search.driver import AxDriver, Search, SearchStopped, attach_history
from bo_search.search.history import COLUMNS, HistoryLock, HistoryRow, HistoryWriter, pareto_front, read_history
from bo_search.search.strategies import DriverConfig, check_strategy
from bo_search.sensitivity.table import Sensitivity
from bo_search.space import load_initial_samples, resolve_encoding
from bo_search.structure import Structure, load_structure
from bo_search.types import UserError

if TYPE_CHECKING:
    from bo_search.quant import SizeModel
    from bo_search.search.driver import Goal, SearchStats
    from bo_search.search.history import HistoryLock
    from bo_search.search.workers import WorkerPool
    from bo_search.sensitivity.table import Sensitivity

log = logging.getLogger(__name__)

REPO_ROOT = structure.REPO_ROOT  # kept for the entry points and scripts that name shipped files
EMBEDDED_SPACE = structure.EMBEDDED_SPACE


def add_search_args(p: argparse.ArgumentParser, default_history: str, default_seeds: str = "uniform") -> None:
    cli.add_model_args(p)
    cli.add_eval_args(p)
    g = p.add_argument_group("search")
    g.add_argument("--num_trials", type=int, default=20, help="evaluated trials in total, history included (default 20)")
    g.add_argument(
        "--parameters_list",
        default=None,
        metavar="SPACE.json",
        help="parameter space JSON (default: parameter_spaces/smollm2_135m_per_block.json for the embedded model, "
        "else one (bitwidth, groupsize) per block with bits {2,3,4,5,6,8})",
    )
    g.add_argument(
        "--initial_samples",
        default=default_seeds,
        metavar="SAMPLES.json|uniform|auto|none",
        help="seeds evaluated first: a seed-format JSON file; 'uniform': per group size, the widest uniform plan that "
        "fits and that plan with blocks upgraded (first and last first) to fill the budget; 'auto': FIT sensitivity on the "
        "calibration split (about a minute for the embedded model on 2 CPU cores, then cached), exact knapsack allocations at "
        "100/98/96%% of the budget, the greedy one, and the 2 budget-filling uniform seeds FIT predicts best; 'none': no seeds "
        f"(default {default_seeds})",
    )
    g.add_argument(
        "--history_output",
        "--output_file",
        dest="history_output",
        default=default_history,
        metavar="HISTORY.csv",
        help=f"CSV history, appended as trials end (default {default_history})",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="require an existing --history_output and continue it (an existing history is always continued)",
    )
    g.add_argument(
        "--change_limit",
        action="store_true",
        help="continue a history that was searched under another limit (each row records the limit it was written under)",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed for Ax and the proposal strategy (default 0)")
    g.add_argument(
        "--max_failure_rate", type=float, default=0.5, help="stop when more than this fraction of evaluated trials failed (default 0.5)"
    )
    g.add_argument(
        "--best_plan_output", default=None, metavar="PLAN.json", help="where to write the best plan (default: HISTORY.best_plan.json)"
    )
    w = p.add_argument_group("workers")
    w.add_argument(
        "--gpus",
        default=None,
        metavar="all|N",
        help="one worker per GPU of the Ray cluster ('all') or N of them, wherever Ray places them; the driver needs no GPU. "
        "A worker lost with its node is replaced when the cluster has room again",
    )
    w.add_argument(
        "--gpu_list",
        "--gpu_lists",
        dest="gpu_list",
        default=None,
        metavar="0,1,...",
        help="single machine: one worker per listed local GPU index (use --gpus for a cluster)",
    )
    w.add_argument("--num_workers", type=int, default=1, help="CPU workers when no GPU is asked for (default 1)")
    w.add_argument(
        "--ray_address",
        default=None,
        metavar="HOST:PORT|auto",
        help="join an existing Ray cluster (its head's address, or 'auto' on a node of it) instead of starting a local loopback-only one",
    )
    w.add_argument(
        "--compute_dtype",
        default="auto",
        metavar="auto|float32|bfloat16|float16",
        help="dtype the workers hold and run the model in: auto (default) = bfloat16 on a GPU, float32 on CPU. "
        "Sizes never depend on it (they follow the checkpoint's storage dtype)",
    )
    w.add_argument(
        "--placement_timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="stop when no worker can be placed on the cluster for this many seconds (default 600)",
    )
    w.add_argument(
        "--threads_per_worker",
        type=int,
        default=None,
        help="torch threads per worker (default: (cores - 1) / workers on CPU, leaving a core for Ax)",
    )
    st = p.add_argument_group("proposal strategy")
    st.add_argument(
        "--strategy",
        default="thompson",
        help="thompson (default): a Bayesian per-slot loss model centred on the --prior table, corrected by every trial, "
        "sampled and solved exactly under the limit (every proposal fits; BENCHMARKS.md); gp: Ax's BoTorch GP "
        "(Sobol start, relaxed choices, over-limit proposals repaired)",
    )
    st.add_argument(
        "--prior",
        default="auto",
        metavar="auto|SENSITIVITY.json|none",
        help="the thompson prior: 'auto' (default): the table the seeds were allocated from (a seed file written by "
        "python -m bo_search.seed names it), else FIT on the calibration split (computed once, cached); a sensitivity JSON "
        "of this model and space (python -m bo_search.sensitivity); 'none': flat (learnt from trials alone)",
    )
    st.add_argument(
        "--ts_temper",
        type=float,
        default=0.25,
        help="thompson: posterior covariance multiplier of each draw, in (0, 1] (default 0.25; 1 = untempered)",
    )
    st.add_argument(
        "--ts_prior_sd",
        type=float,
        default=0.2,
        help="thompson: prior sd of a per-slot correction as a fraction of its table cost (default 0.2)",
    )
    a = p.add_argument_group("Ax / BoTorch (--strategy gp)")
    a.add_argument(
        "--encoding",
        default="relaxed",
        choices=["relaxed", "choice", "float"],
        help="relaxed (default): ordered choices optimised as a continuous relaxation, 1-3 s per proposal; choice: exact discrete "
        "local search (minutes per proposal above ~100 parameters); float: floats in [0,1] binned to choices",
    )
    a.add_argument(
        "--num_restarts", type=int, default=4, help="acquisition optimiser restarts (default 4; Ax's 20 costs minutes per proposal)"
    )
    a.add_argument("--raw_samples", type=int, default=256, help="acquisition optimiser raw samples (default 256)")
    a.add_argument("--n_sobol", type=int, default=4, help="quasi-random proposals after the seeds, before BO (default 4)")


@dataclass
class Setup(Structure):
    """What the driver process knows: the structure, space and sizes, plus the history."""

    args: argparse.Namespace = field(default_factory=argparse.Namespace)
    history_path: Path = Path()
    history_rows: list[HistoryRow] = field(default_factory=list)
    #: sensitivity tables computed in this process, by method (auto seeds and the prior share one)
    tables: dict[str, Sensitivity] = field(default_factory=dict)
    lock: HistoryLock | None = None


def prepare(args: argparse.Namespace, search: str, take_lock: bool = True) -> Setup:
    """Flags -> model structure, space, sizes and the history (read, checked; a torn last row set
    aside). ``take_lock``: this process is the history's writer (a search); False for commands that
    only need the structure."""

    if args.num_trials < 1:
        raise UserError(f"--num_trials must be at least 1, got {args.num_trials}")
    if not 0 < args.max_failure_rate <= 1:
        raise UserError(f"--max_failure_rate must be in (0, 1], got {args.max_failure_rate}")
    if getattr(args, "placement_timeout", 1.0) <= 0:
        raise UserError(f"--placement_timeout must be positive (seconds), got {args.placement_timeout:g}")
    st = load_structure(args)
    space, ref = st.space, st.ref
    history_path = Path(args.history_output).expanduser()
    lock = None
    if take_lock:
        cli.check_output_path(history_path)
        lock = HistoryLock(history_path).acquire()  # one writer per history; released at exit
    rows: list[HistoryRow] = []
    if history_path.exists() and history_path.stat().st_size > 0:
        rows = read_history(history_path, strict=True, repair_tail=take_lock).rows
        for r in rows:
            if r.model_id and r.model_id != ref.fingerprint:
                raise UserError(
                    f"history {history_path} line of trial {r.trial_index} belongs to another model ({r.model_id}); use a new --history_output"
                )
            if r.space_id and r.space_id != space.fingerprint:
                raise UserError(
                    f"history {history_path} trial {r.trial_index} belongs to a different parameter space ({r.space_id} != {space.fingerprint}); use a new --history_output"
                )
            if r.search and r.search != search:
                raise UserError(f"history {history_path} holds a {r.search} search, not {search}; use a new --history_output")
            space.encode(r.plan)  # raises if the plan is not expressible in this space
        check_history_sizes(history_path, rows, st.size_model)
    elif args.resume:
        raise UserError(f"--resume: history {history_path} does not exist or is empty")
    fields = {f.name: getattr(st, f.name) for f in dataclasses.fields(Structure)}
    return Setup(**fields, args=args, history_path=history_path, history_rows=rows, lock=lock)


def check_history_sizes(path: Path, rows: list[Any], size_model: SizeModel) -> None:
    """Every recorded size must be what the current accounting gives its plan: a history written
    under another storage dtype (before sizes followed the checkpoint's dtype) or other
    --fp_dtype/--zero_bits/--scale_dtype is refused, never rewritten."""
    for r in rows:
        if r.model_size is None:
            continue
        now = size_model.gb(r.plan)
        if abs(now - r.model_size) > 1e-6 * max(1.0, abs(now)):
            raise UserError(
                f"history {path} trial {r.trial_index} records size {r.model_size:.6g} GB, but its plan is {now:.6g} GB under the "
                f"current size accounting (unquantized tensors at {size_model.fp_dtype}): it was written with another storage dtype "
                "or scheme; pass the --fp_dtype/--zero_bits/--scale_dtype it was written with, or use a new --history_output"
            )


def goal_text(goal: Goal) -> str:
    if goal.multi:
        return f"pareto {goal.objective}"
    return f"{'min' if goal.minimize else 'max'} {goal.objective} s.t. {goal.constraint_metric} <= limit"


def check_history_limit(setup: Setup, goal: Goal) -> None:
    """A history continues under the goal and limit it was written with, unless --change_limit."""
    for r in reversed(setup.history_rows):
        if r.limit is None or not r.limit_metric:
            continue
        same = r.limit_metric == goal.constraint_metric and math.isclose(r.limit, goal.limit, rel_tol=1e-9)
        if not same and not getattr(setup.args, "change_limit", False):
            raise UserError(
                f"history {setup.history_path} was searched under {r.limit_metric} <= {r.limit:.6g} (trial {r.trial_index}), "
                f"not {goal.constraint_metric} <= {goal.limit:.6g}; pass the same limit, add --change_limit to continue it "
                "under the new one (recorded per row), or use a new --history_output"
            )
        return


def parse_gpus(spec: str | None) -> list[int]:
    if not spec:
        return []
    try:
        gpus = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--gpu_list {spec!r}: expected comma-separated GPU indices such as 0,1,2,3") from None
    import torch

    n = torch.cuda.device_count()
    bad = [g for g in gpus if g < 0 or g >= n]
    if bad:
        raise UserError(f"--gpu_list names GPU {bad[0]}, but {n} GPU(s) are visible" + ("" if n else " (no CUDA device)"))
    return gpus


def fit_table(setup: Setup) -> Any:
    """FIT on the calibration split for this model and space: computed in this process once (then
    cached on disk, see sensitivity.cached_sensitivity)."""
    from bo_search.sensitivity.cache import cached_sensitivity
    from bo_search.sensitivity.seeds import AUTO_METHOD

    if AUTO_METHOD not in setup.tables:
        t0 = time.perf_counter()
        print(f"{AUTO_METHOD} sensitivity on the calibration split (computed once per model and space, then cached)", flush=True)
        sens, path, hit = cached_sensitivity(setup.eval_cfg, setup.ref, setup.layers, setup.space, AUTO_METHOD, progress=cli.progress)
        print(
            f"{AUTO_METHOD} sensitivity {'read from' if hit else 'computed and cached in'} {path} ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        setup.tables[AUTO_METHOD] = sens
    return setup.tables[AUTO_METHOD]


def resolve_prior(setup: Setup) -> Any:
    """The Sensitivity table the thompson strategy's prior is centred on, or None (flat)."""

    args = setup.args
    spec = getattr(args, "prior", "auto")
    if spec == "none":
        return None
    if spec == "auto":
        init = getattr(args, "initial_samples", "")
        if init not in ("auto", "uniform", "none", "") and Path(init).is_file():
            try:
                rec = json.loads(Path(init).read_text(encoding="utf-8")).get("seeding", {}).get("sensitivity", {})
            except (json.JSONDecodeError, AttributeError):
                rec = {}
            if isinstance(rec, dict) and rec.get("path") and Path(rec["path"]).is_file():
                spec = rec["path"]
                print(f"prior: the sensitivity table the seeds were allocated from, {spec}", flush=True)
        if spec == "auto":
            return fit_table(setup)
    sens = Sensitivity.load(spec)
    sens.check_model(setup.ref.fingerprint, setup.ref.name, setup.layers.fqns)
    sens.slot_costs(setup.space)  # UserError if it cannot price every choice of this space
    return sens


def thompson_node(setup: Setup, goal: Goal, prior: Any, encoding: str) -> Any:
    """The Thompson generation node for ``goal``: budget = the size limit (bits left for the space's
    slots), the perplexity limit (NLL), or a sweep of budgets (Pareto)."""
    from bo_search.budget import SlotSizes
    from bo_search.search.thompson import Acquisition, ThompsonConfig, build_problem, make_thompson_node
    from bo_search.sensitivity.allocate import total_bits_limit

    args = setup.args
    cfg = ThompsonConfig(rel_sd=args.ts_prior_sd, temper=args.ts_temper, seed=args.seed)
    sizes = SlotSizes(setup.space, setup.size_model)
    problem = build_problem(setup.space, sizes, prior.slot_costs(setup.space) if prior is not None else None)
    if goal.multi:
        acq = Acquisition("sweep", 0.0)
    elif goal.constraint_metric == "model_size_gb":
        acq = Acquisition("budget", float(total_bits_limit(goal.limit) - sizes.base_bits))
    else:
        acq = Acquisition("loss", math.log(goal.limit))
    return make_thompson_node(setup.space, encoding, problem, acq, "nll", cfg)


def seeds_for(setup: Setup, spec: str, limit_gb: float) -> list[dict[str, int]]:

    if spec in ("none", ""):
        return []
    if spec == "uniform":
        from bo_search.sensitivity.seeds import uniform_seeds

        return uniform_seeds(setup.space, setup.size_model, limit_gb)
    if spec == "auto":
        from bo_search.sensitivity.seeds import auto_seeds

        return auto_seeds(setup, limit_gb, fit_table(setup))
    return load_initial_samples(spec, setup.space)


def ladder_seeds(setup: Setup) -> list[dict[str, int]]:
    """Uniform plans at every bit width of the space (middle group size): seeds spanning a trade-off."""
    space = setup.space
    groups = sorted({v for p in space.tunable if p.kind == "group_size" for v in p.values})
    g = groups[len(groups) // 2] if groups else None
    bits = sorted({v for p in space.tunable if p.kind == "bits" for v in p.values})
    return [vals for b in bits if (vals := space.uniform(b, g, check_fixed=False)) is not None]


def run_search(
    setup: Setup,
    goal: Goal | Callable[[WorkerPool], Goal],
    seeds: list[dict[str, int]],
    metrics_to_row: Any = None,
    worker_cls: Any = None,
    row_extra: dict[str, Any] | None = None,
) -> int:
    """Start workers and Ax, attach history, run, summarise. Returns the exit status.

    ``goal`` is a Goal, or a callable ``goal(pool)`` for goals that need a measurement first (a
    perplexity limit relative to full precision)."""
    import torch

    from bo_search.search.workers import TrialWorker, WorkerPool

    args = setup.args
    torch.set_num_threads(1)  # the driver's Ax work must not fight the workers for cores
    done = sum(1 for r in setup.history_rows if r.status in ("completed", "failed"))
    if setup.history_rows:
        print(f"resuming {setup.history_path}: {len(setup.history_rows)} rows, {done} evaluated trials", flush=True)
    if done >= args.num_trials:
        print(f"the history already holds {done} evaluated trials (--num_trials {args.num_trials}); nothing to run")
    from bo_search.search.workers import parse_cluster_gpus

    cluster_gpus = parse_cluster_gpus(getattr(args, "gpus", None), args.gpu_list)
    gpus = parse_gpus(args.gpu_list)
    from bo_search.search.thompson import ThompsonConfig

    strategy = check_strategy(getattr(args, "strategy", "gp"))
    prior = None
    if strategy == "thompson":
        ThompsonConfig(rel_sd=args.ts_prior_sd, temper=args.ts_temper)  # bad values fail before anything starts
        prior = resolve_prior(setup)
    if not callable(goal) and not goal.multi:
        check_history_limit(setup, goal)  # before any worker starts
    t_start = time.perf_counter()
    pool = None
    history = None
    stats = None
    driver = None
    status = 0
    try:
        if done < args.num_trials or callable(goal):
            pool = WorkerPool(
                setup.eval_cfg,
                num_workers=args.num_workers,
                gpus=gpus,
                ray_address=args.ray_address,
                threads_per_worker=args.threads_per_worker,
                worker_cls=worker_cls or TrialWorker,
                cluster_gpus=cluster_gpus,
                placement_timeout=args.placement_timeout,
                wait=False,  # the workers load their model while Ax is set up below
            )
        if callable(goal):
            assert pool is not None
            _workers_ready(pool)
            goal = goal(pool)
            check_history_limit(setup, goal)
        driver_cfg = DriverConfig(
            encoding=resolve_encoding(setup.space, args.encoding),
            num_restarts=args.num_restarts,
            raw_samples=args.raw_samples,
            n_sobol=args.n_sobol,
            seed=args.seed,
            strategy=strategy,
        )
        node = thompson_node(setup, goal, prior, driver_cfg.encoding) if strategy == "thompson" else None
        driver = AxDriver(setup.space, goal, driver_cfg, node)
        offset = attach_history(driver, setup.history_rows)
        seen = {r.plan for r in setup.history_rows}
        seeds = [s for s in seeds if setup.space.decode(s) not in seen]
        print(
            f"space {setup.space.source}: {len(setup.space.tunable)} tunable parameters; strategy {strategy}"
            + (
                f" (prior: {prior.label if prior is not None else 'flat'})"
                if strategy == "thompson"
                else f" ({driver_cfg.encoding} encoding)"
            )
            + "; "
            f"{len(seeds)} seeds; {pool.size if pool is not None else len(gpus) or args.num_workers} "
            f"{'GPU' if gpus or cluster_gpus is not None else 'CPU'} worker(s); history {setup.history_path}",
            flush=True,
        )
        history = HistoryWriter(setup.history_path)
        if done < args.num_trials:
            assert pool is not None
            if not pool.infos:
                _workers_ready(pool)
            row_defaults = {
                "search": goal.search,
                "model_id": setup.ref.fingerprint,
                "space_id": setup.space.fingerprint,
                "goal": goal_text(goal),
                "limit_metric": "" if goal.multi else goal.constraint_metric,
                "limit": None if goal.multi else goal.limit,
                **(row_extra or {}),
            }
            bar = cli.progress(range(args.num_trials), desc="trials", total=args.num_trials)
            bar.update(done)
            search = Search(
                driver,
                pool,
                history,
                setup.size_model.gb,
                row_defaults,
                args.num_trials,
                already_evaluated=done,
                seeds=seeds,
                max_failure_rate=args.max_failure_rate,
                placement_timeout=args.placement_timeout,
                metrics_to_row=metrics_to_row,
                progress=bar,
                on_result=None if not bar.disable else _print_row,
            )
            search.index_offset = offset
            if goal.constraint_metric == "model_size_gb":
                import random

                from bo_search.budget import SlotSizes, random_feasible, repair_to_budget

                rng = random.Random(args.seed)
                sizes = SlotSizes(setup.space, setup.size_model)
                search.fallback = lambda: random_feasible(sizes, goal.limit, rng)
                search.repair = lambda values: repair_to_budget(sizes, goal.limit, values)
            try:
                stats = search.run()
            except SearchStopped as err:
                stats = search.stats
                print(f"\nsearch stopped: {err}", file=sys.stderr)
                status = 3
            finally:
                bar.close()
            if stats.stop_reason and status == 0:
                print(f"search stopped early: {stats.stop_reason}", file=sys.stderr)
        summarize(setup, goal, stats, pool, time.perf_counter() - t_start)
    except KeyboardInterrupt:
        marked = ""
        if driver is not None:
            from ax.core.trial_status import TrialStatus

            n = sum(t.status == TrialStatus.ABANDONED for t in driver.client._experiment.trials.values())
            n -= sum(r.status == "abandoned" for r in setup.history_rows)  # those came back from the history
            marked = f" ({n} in-flight trial(s) marked abandoned in Ax and in the history)"
        print(
            f"\ninterrupted: in-flight trials were marked abandoned{marked}; every finished trial is in {setup.history_path}.\n"
            "resume with the same command (or add --resume).",
            file=sys.stderr,
        )
        return 130
    finally:
        if history is not None:
            history.close()
        if pool is not None:
            pool.shutdown()
        if setup.lock is not None:
            setup.lock.release()
    return status


def _workers_ready(pool: WorkerPool) -> None:
    pool.wait_ready()
    nodes = len({i["node_id"] for i in pool.infos})
    on_driver = sum(i["node_id"] == pool.driver_node for i in pool.infos)
    print(
        f"workers ready (model load {max(pool.load_times):.1f} s; {pool.size} worker(s) on {nodes} Ray node(s), {on_driver} on the driver's node)",
        flush=True,
    )
    print("\n".join(pool.placement_lines()), flush=True)


def _print_row(row: Any) -> None:
    """One line per finished trial when stderr is not a terminal (no progress bar)."""
    what = f"ppl {row.cal_PPL:.4g}" if row.cal_PPL is not None else ""
    if row.cal_throughput is not None:
        what += f" {row.cal_throughput:.1f} tok/s"
    took = (row.quantize_s or 0) + (row.evaluate_s or 0)
    print(
        f"trial {row.trial_index} {row.status} ({row.source}) {what} size {row.model_size:.6g} GB {took:.1f} s {row.reason}".rstrip(),
        flush=True,
    )


def print_placement(rows: Any, pool: WorkerPool | None) -> None:
    """Where the trials ran (the CSV's worker_id: worker@node-ip/node-id:gpuN), and nodes lost."""
    from collections import Counter

    per = Counter(r.worker_id for r in rows if r.status in ("completed", "failed") and r.worker_id)
    if per:
        print("trials per worker (whole history): " + ", ".join(f"{w} {n}" for w, n in sorted(per.items())))
    lost = sum(r.status == "failed" and r.reason.startswith("node lost") for r in rows)
    if lost or (pool is not None and getattr(pool, "restarts", 0)):
        print(f"{lost} trial(s) failed with their node lost; {getattr(pool, 'restarts', 0)} replacement worker(s) requested this run")


def summarize(setup: Setup, goal: Goal, stats: SearchStats | None, pool: WorkerPool | None, wall_s: float) -> None:
    """Best feasible plan (with held-out perplexity), run statistics, best-plan JSON."""

    rows = read_history(setup.history_path, strict=True).rows
    comp = [r for r in rows if r.status == "completed"]
    if goal.multi:
        pareto_summary(setup, comp, pool)
        return
    if goal.constraint_metric == "model_size_gb":
        feas = [r for r in comp if r.model_size is not None and r.model_size <= goal.limit]
    else:
        feas = [r for r in comp if r.cal_PPL is not None and r.cal_PPL <= goal.limit]
    n_failed = sum(r.status == "failed" for r in rows)
    n_inf = sum(r.status == "infeasible" for r in rows)
    print(f"\n{len(comp)} completed, {n_failed} failed, {n_inf} proposals over the limit (not evaluated), in {wall_s:.0f} s")
    print_placement(rows, pool)
    if stats is not None and stats.evaluated:
        props = stats.proposal_s
        mean_prop = sum(props) / len(props) if props else 0.0
        print(
            f"proposal time: mean {mean_prop:.2f} s over {len(props)} proposals; worker idle waiting for proposals: {100 * stats.idle_fraction:.1f}%"
        )
    if not feas:
        smallest = min((r.model_size for r in comp if r.model_size is not None), default=None)
        what = f"size limit {goal.limit:.6g} GB" if goal.constraint_metric == "model_size_gb" else f"perplexity limit {goal.limit:.6g}"
        print(
            f"no completed trial fits the {what}" + (f"; the smallest evaluated size was {smallest:.6g} GB" if smallest is not None else "")
        )
        if goal.constraint_metric != "model_size_gb" and comp:
            print(f"the lowest perplexity seen was {min(r.cal_PPL for r in comp if r.cal_PPL is not None):.4g}")
        return
    best = min(feas, key=lambda r: r.cal_PPL or math.inf) if goal.minimize else max(feas, key=lambda r: r.cal_throughput or -math.inf)
    heldout = best.ppl_heldout
    if heldout is None and pool is not None and _can_measure(pool, setup):
        heldout = pool.heldout([best.plan])[0]
        if heldout is not None:
            _fill_heldout(setup.history_path, best.trial_index, heldout)
    out = Path(setup.args.best_plan_output or str(setup.history_path) + ".best_plan.json")
    cli.write_json(
        out,
        {
            **best.plan.to_json(),
            "trial_index": best.trial_index,
            "cal_PPL": best.cal_PPL,
            "ppl_heldout": heldout,
            "model_size_gb": best.model_size,
            "avg_bits": best.avg_bits,
            "cal_throughput": best.cal_throughput,
        },
    )
    print(
        f"best feasible trial {best.trial_index} ({best.source}): size {best.model_size:.6g} GB, {best.avg_bits:.3f} avg bits, perplexity {best.cal_PPL:.4f} (search split)"
        + (f", {heldout:.4f} (held-out)" if heldout is not None else "")
    )
    if best.cal_throughput is not None:
        print(f"  throughput {best.cal_throughput:.2f} tok/s {best.throughput_kind}")
    kind = "ggml types" if any(lq.ggml_type for lq in best.plan.values()) else "bit widths"
    print(f"  {kind}: {json.dumps(best.plan.histogram())}")
    print(f"  plan written to {out} (python -m bo_search.evaluate --config {out})")


def pareto_summary(setup: Setup, comp: list[Any], pool: WorkerPool | None) -> None:
    """Print the perplexity/size Pareto front (held-out perplexity of each point computed once and
    recorded in the history) and write it as JSON."""

    pts = [r for r in comp if r.cal_PPL is not None and r.model_size is not None]
    if not pts:
        print("no completed trial: no Pareto front")
        return
    front = [pts[i] for i in pareto_front([(r.model_size, r.cal_PPL) for r in pts])]
    missing = [r for r in front if r.ppl_heldout is None]
    if missing and pool is not None and _can_measure(pool, setup):
        for r, value in zip(missing, pool.heldout([r.plan for r in missing])):
            if value is not None:
                r.ppl_heldout = value
                _fill_heldout(setup.history_path, r.trial_index, value)
    rows = [
        {
            "trial": r.trial_index,
            "source": r.source,
            "model_size_gb": r.model_size,
            "avg_bits": r.avg_bits,
            "ppl": r.cal_PPL,
            "ppl_heldout": r.ppl_heldout,
        }
        for r in front
    ]
    print(f"Pareto front ({len(front)} of {len(pts)} completed trials; perplexity and size both minimised):")
    print(cli.table(rows, ["trial", "source", "model_size_gb", "avg_bits", "ppl", "ppl_heldout"]))
    out = Path(setup.args.best_plan_output or str(setup.history_path) + ".pareto.json")
    cli.write_json(out, {"front": [{**row, **r.plan.to_json()} for row, r in zip(rows, front)]})
    print(f"front written to {out}")


def _can_measure(pool: WorkerPool, setup: Setup) -> bool:
    """Whether held-out perplexity can be measured now (a worker is up; --heldout_tokens > 0)."""
    if pool is None or setup.eval_cfg.heldout_tokens <= 0:
        return False
    if not pool.has_ready():
        print("held-out perplexity not measured: no worker is placed (python -m bo_search.report HISTORY.csv measures it later)")
        return False
    return True


def _fill_heldout(path: Path, trial_index: int, value: float) -> None:
    """Record a held-out perplexity in the history: rewritten to a temp file, fsynced, renamed."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        if r.get("trial_index") == str(trial_index) and r.get("status") == "completed":
            r["ppl_heldout"] = repr(value)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
