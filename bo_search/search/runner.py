"""Wiring shared by the search entry points (acc_modelsize, acc_throughput, pareto): flags, space,
history and resume, seeds, workers, the Ax driver, the final summary."""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bo_search import cli, structure
from bo_search.budget import random_feasible, repair_to_budget
from bo_search.search import identity, preflight
from bo_search.search.driver import Search, SearchStopped
from bo_search.search.experiment import AxDriver, attach_history, row_defaults
from bo_search.search.history import HistoryLock, HistoryRow, HistoryWriter, check_writable, read_history
from bo_search.search.setup import SearchOptions, Setup
from bo_search.search.strategies import DriverConfig, check_strategy
from bo_search.sensitivity.table import Sensitivity
from bo_search.space import resolve_encoding
from bo_search.structure import Structure, load_structure
from bo_search.types import UserError

if TYPE_CHECKING:
    from bo_search.search.driver import SearchStats
    from bo_search.search.experiment import Goal
    from bo_search.search.workers import TrialWorker, WorkerPool
    from bo_search.sizes import SizeModel
from bo_search.search.seeding import resolve_prior, thompson_node
from bo_search.search.summary import final_choice_pending, print_row, summarize, workers_ready

REPO_ROOT = structure.REPO_ROOT  # kept for the entry points and scripts that name shipped files


EMBEDDED_SPACE = structure.EMBEDDED_SPACE


def prepare(args: argparse.Namespace, search: str, take_lock: bool = True) -> Setup:
    """Flags -> model structure, space, sizes and the history (read, checked; a torn last row set
    aside). ``take_lock``: this process is the history's writer (a search); False for commands that
    only need the structure."""

    options = SearchOptions.from_args(args)  # validated: a bad value fails before anything loads
    preflight.check_search_flags(args)
    parse_gpus(options.gpu_list)
    st = load_structure(args)
    history_path = Path(options.history_output).expanduser()
    lock = None
    if take_lock:
        cli.check_output_path(history_path)
        lock = HistoryLock(history_path).acquire()  # one writer per history; released at exit
    try:
        rows, ids = _checked_history(options, st, history_path, search, take_lock)
    except BaseException:
        if lock is not None:
            lock.release()  # refused: the next command (in this process too) may take it
        raise
    return Setup.from_structure(st, options, history_path=history_path, history_rows=rows, lock=lock, identity=ids)


def _checked_history(
    options: SearchOptions, st: Structure, history_path: Path, search: str, take_lock: bool
) -> tuple[list[HistoryRow], dict[str, str]]:
    """The history's rows (a torn last row set aside when ``take_lock``), each checked against this
    model, space, search, size accounting, weights and evaluation settings; and this run's
    ``weights_id``/``eval_settings`` columns."""
    space, ref = st.space, st.ref
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
    elif options.resume:
        raise UserError(f"--resume: history {history_path} does not exist or is empty")
    settings = identity.eval_settings(st.eval_cfg, options.on_gpu)
    identity.check_history(history_path, rows, ref, settings, options)
    if take_lock:
        check_writable(history_path)
    return rows, identity.row_fields(ref, settings)


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


def check_history_limit(setup: Setup, goal: Goal) -> None:
    """A history continues under the goal and limit it was written with, unless --change_limit."""
    for r in reversed(setup.history_rows):
        if r.limit is None or not r.limit_metric:
            continue
        same = r.limit_metric == goal.constraint_metric and math.isclose(r.limit, goal.limit, rel_tol=1e-9)
        if not same and not setup.options.change_limit:
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


def _start_pool(setup: Setup, gpus: list[int], cluster_gpus: int | str | None, worker_cls: type[TrialWorker] | None) -> WorkerPool:
    """The workers, started without waiting: they load their model while Ax is set up."""
    from bo_search.search.workers import TrialWorker, WorkerPool

    opts = setup.options
    return WorkerPool(
        setup.eval_cfg,
        num_workers=opts.num_workers,
        gpus=gpus,
        ray_address=opts.ray_address,
        threads_per_worker=opts.threads_per_worker,
        worker_cls=worker_cls or TrialWorker,
        cluster_gpus=cluster_gpus,
        placement_timeout=opts.placement_timeout,
        wait=False,
        trial_timeout=opts.trial_timeout,
    )


def _print_banner(
    setup: Setup,
    strategy: str,
    prior: Sensitivity | None,
    encoding: str,
    n_seeds: int,
    pool: WorkerPool | None,
    gpus: list[int],
    cluster_gpus: int | str | None,
) -> None:
    detail = f"prior: {prior.label if prior is not None else 'flat'}" if strategy == "thompson" else f"{encoding} encoding"
    n_workers = pool.size if pool is not None else len(gpus) or setup.options.num_workers
    kind = "GPU" if gpus or cluster_gpus is not None else "CPU"
    print(
        f"space {setup.space.source}: {len(setup.space.tunable)} tunable parameters; strategy {strategy} ({detail}); "
        f"{n_seeds} seeds; {n_workers} {kind} worker(s); history {setup.history_path}",
        flush=True,
    )


def run_search(
    setup: Setup,
    goal: Goal | Callable[[WorkerPool], Goal],
    seeds: list[dict[str, int]],
    worker_cls: type[TrialWorker] | None = None,
    row_extra: dict[str, Any] | None = None,
) -> int:
    """Start workers and Ax, attach history, run, summarise. Returns the exit status.

    ``goal`` is a Goal, or a callable ``goal(pool)`` for goals that need a measurement first (a
    perplexity limit relative to full precision)."""
    import torch

    from bo_search.search.workers import parse_cluster_gpus

    opts = setup.options
    torch.set_num_threads(1)  # the driver's Ax work must not fight the workers for cores
    done = sum(1 for r in setup.history_rows if r.status in ("completed", "failed"))
    if setup.history_rows:
        print(f"resuming {setup.history_path}: {len(setup.history_rows)} rows, {done} evaluated trials", flush=True)
    if done >= opts.num_trials:
        print(f"the history already holds {done} evaluated trials (--num_trials {opts.num_trials}); nothing to run")
    # every flag is checked before anything starts
    cluster_gpus = parse_cluster_gpus(opts.gpus, opts.gpu_list)
    gpus = parse_gpus(opts.gpu_list)
    strategy, prior = _strategy_and_prior(setup)
    if not callable(goal) and not goal.multi:
        check_history_limit(setup, goal)
    t_start = time.perf_counter()
    pool: WorkerPool | None = None
    history = None
    stats = None
    driver = None
    status = 0
    try:
        if done < opts.num_trials or callable(goal) or final_choice_pending(setup, goal):
            from bo_search.trial import ensure_calibrated  # torch

            ensure_calibrated(setup.eval_cfg, setup.ref, setup.layers)  # --quantizer gptq: once, here, not in every worker
            pool = _start_pool(setup, gpus, cluster_gpus, worker_cls)
        if callable(goal):
            assert pool is not None
            workers_ready(pool)
            goal = goal(pool)
            check_history_limit(setup, goal)
        driver, encoding = _make_driver(setup, goal, strategy, prior)
        offset = attach_history(driver, setup.history_rows)
        seen = {r.plan for r in setup.history_rows}
        seeds = [s for s in seeds if setup.space.decode(s) not in seen]
        _print_banner(setup, strategy, prior, encoding, len(seeds), pool, gpus, cluster_gpus)
        history = HistoryWriter(setup.history_path)
        if done < opts.num_trials:
            assert pool is not None
            search = _make_search(setup, goal, driver, pool, history, seeds, done, row_extra, offset)
            stats, status = _run(search, done)
        elif pool is not None:  # only the final choice is left to measure
            workers_ready(pool)
        summarize(setup, goal, stats, pool, time.perf_counter() - t_start, history)
    except KeyboardInterrupt:
        _print_interrupted(setup, driver)
        return 130
    finally:
        _close(history, pool, setup.lock)
    return status


def _close(history: HistoryWriter | None, pool: WorkerPool | None, lock: HistoryLock | None) -> None:
    """Close the history, stop the workers, release the lock: each of them even when one before it
    fails (a full disk makes closing the history fail), that failure raised after."""
    error: BaseException | None = None
    for step in (history.close if history else None, pool.shutdown if pool else None, lock.release if lock else None):
        try:
            if step is not None:
                step()
        except Exception as err:
            error = error or err
    if error is not None:
        raise error


def _strategy_and_prior(setup: Setup) -> tuple[str, Sensitivity | None]:
    """``--strategy`` and, for ``thompson``, its prior table (bad values fail before anything starts)."""
    from bo_search.search.thompson import ThompsonConfig

    opts = setup.options
    strategy = check_strategy(opts.strategy)
    if strategy != "thompson":
        return strategy, None
    ThompsonConfig(rel_sd=opts.ts_prior_sd, temper=opts.ts_temper, shared_sd=opts.ts_shared_sd)
    return strategy, resolve_prior(setup)


def _make_driver(setup: Setup, goal: Goal, strategy: str, prior: Sensitivity | None) -> tuple[AxDriver, str]:
    opts = setup.options
    driver_cfg = DriverConfig(
        encoding=resolve_encoding(setup.space, opts.encoding),
        num_restarts=opts.num_restarts,
        raw_samples=opts.raw_samples,
        n_sobol=opts.n_sobol,
        seed=opts.seed,
        strategy=strategy,
    )
    node = thompson_node(setup, goal, prior, driver_cfg.encoding) if strategy == "thompson" else None
    return AxDriver(setup.space, goal, driver_cfg, node), driver_cfg.encoding


def _make_search(
    setup: Setup,
    goal: Goal,
    driver: AxDriver,
    pool: WorkerPool,
    history: HistoryWriter,
    seeds: list[dict[str, int]],
    done: int,
    row_extra: dict[str, Any] | None,
    index_offset: int,
) -> Search:
    opts = setup.options
    if not pool.infos:
        workers_ready(pool)
    bar = cli.progress(range(opts.num_trials), desc="trials", total=opts.num_trials)
    bar.update(done)
    fallback: Callable[[], dict[str, int]] | None = None
    repair: Callable[[dict[str, int]], dict[str, int] | None] | None = None
    limit = goal.size_limit
    if limit is not None:  # over-limit proposals are repaired; a random feasible plan when Ax has no data yet
        rng = random.Random(opts.seed)
        sizes = setup.slots
        fallback = lambda: random_feasible(sizes, limit, rng)  # noqa: E731
        repair = lambda values: repair_to_budget(sizes, limit, values)  # noqa: E731
    return Search(
        driver,
        pool,
        history,
        setup.size_model.gb,
        row_defaults(setup, goal, row_extra),
        opts.num_trials,
        already_evaluated=done,
        seeds=seeds,
        max_failure_rate=opts.max_failure_rate,
        placement_timeout=opts.placement_timeout,
        progress=bar,
        on_result=None if not bar.disable else print_row,
        fallback=fallback,
        repair=repair,
        index_offset=index_offset,
    )


def _run(search: Search, done: int) -> tuple[SearchStats, int]:
    """Run to the end; exit status 3 when the search had to stop (no worker placed, too many failures)."""
    status = 0
    try:
        stats = search.run()
    except SearchStopped as err:
        stats = search.stats
        print(f"\nsearch stopped: {err}", file=sys.stderr)
        status = 3
    finally:
        search.progress.close()
    if stats.stop_reason and status == 0:
        print(f"search stopped early: {stats.stop_reason}", file=sys.stderr)
    return stats, status


def _print_interrupted(setup: Setup, driver: AxDriver | None) -> None:
    marked = ""
    if driver is not None:
        from ax.core.trial_status import TrialStatus

        n = sum(t.status == TrialStatus.ABANDONED for t in driver.client._experiment.trials.values())
        n -= sum(r.status == "abandoned" for r in setup.history_rows)  # those came back from the history
        marked = f" ({n} unfinished trial(s), running or proposed, marked abandoned in Ax and in the history)"
    print(
        f"\ninterrupted: in-flight trials were marked abandoned{marked}; every finished trial is in {setup.history_path}.\n"
        "resume with the same command (or add --resume).",
        file=sys.stderr,
    )
