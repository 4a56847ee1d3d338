"""The search driver: owns the Ax ``Client``, attaches seeds and history, keeps the workers fed.

Imports neither torch nor ray: the pool is passed in.

How a search runs
-----------------
- One *proposal thread* makes every Ax call. It keeps one ready proposal per worker queued, so a
  worker that finishes gets its next trial at once while the next proposal is being computed
  (asynchronous BO: queued and running trials are pending points for the acquisition function).
- The *main thread* dispatches proposals to idle workers, collects results, writes the CSV row of
  each trial as it ends, and hands the result to the proposal thread to complete in Ax.
- The size limit is checked before dispatch. Size is exact and known without evaluating, so a
  proposal over the limit is never evaluated: it is completed in Ax with only its exact size (so
  the size model learns the boundary) and recorded as ``infeasible``. It is then *repaired*: the
  nearest plan under the limit (one-notch downgrades, see ``budget.repair_to_budget``) is attached
  to Ax as a new trial (source ``repaired``) and evaluated instead, so every proposal yields an
  evaluation and workers never starve behind a run of over-limit proposals. The limit is also an
  Ax outcome constraint, so proposals concentrate on feasible plans.
- Seeds (initial samples) go first, attached to Ax as they are.
"""

from __future__ import annotations

import logging
import math
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bo_search.budget import SIZE_METRIC
from bo_search.search.experiment import AxDriver, Goal, ax_data
from bo_search.search.history import HistoryRow, HistoryWriter
from bo_search.search.metric_registry import metrics_to_row, search_score
from bo_search.types import QuantPlan, TrialResult, UserError

log = logging.getLogger(__name__)


class Pool(Protocol):
    @property
    def size(self) -> int: ...

    def idle(self) -> list[Any]: ...
    def busy(self) -> list[Any]: ...
    def submit(self, slot: Any, trial_index: int, plan: QuantPlan) -> float: ...
    def wait(self, timeout: float) -> list[TrialResult]: ...
    def cancel_all(self) -> list[int]: ...


@dataclass
class Proposal:
    index: int
    values: dict[str, int]
    plan: QuantPlan
    source: str
    proposal_s: float
    size_gb: float


@dataclass
class SearchStats:
    evaluated: int = 0
    completed: int = 0
    failed: int = 0
    infeasible: int = 0
    abandoned: int = 0
    #: failed because the worker's node left the cluster (not counted against --max_failure_rate)
    node_lost: int = 0
    proposal_s: list[float] = field(default_factory=list)
    worker_idle_s: float = 0.0
    worker_busy_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    best: HistoryRow | None = None
    stop_reason: str = ""

    @property
    def idle_fraction(self) -> float:
        total = self.worker_idle_s + self.worker_busy_s
        return self.worker_idle_s / total if total > 0 else 0.0


class SearchStopped(Exception):
    """The search stopped early for a reason the user must see (too many failures, ...).
    ``abandon_reason``: what the trials it leaves unfinished are recorded with."""

    def __init__(self, message: str, abandon_reason: str = ""):
        super().__init__(message)
        self.abandon_reason = abandon_reason


class Search:
    """Runs trials until ``num_trials`` evaluations (completed + failed) exist, history included."""

    def __init__(
        self,
        driver: AxDriver,
        pool: Pool,
        history: HistoryWriter,
        size_gb: Callable[[QuantPlan], float],
        row_defaults: Mapping[str, Any],
        num_trials: int,
        already_evaluated: int = 0,
        seeds: Sequence[Mapping[str, int]] = (),
        max_failure_rate: float = 0.5,
        max_infeasible_streak: int = 200,
        progress: Any = None,
        on_result: Callable[[HistoryRow], None] | None = None,
        fallback: Callable[[], dict[str, int]] | None = None,
        repair: Callable[[dict[str, int]], dict[str, int] | None] | None = None,
        placement_timeout: float = 600.0,
        index_offset: int = 0,
    ):
        self.driver, self.pool, self.history = driver, pool, history
        self.size_gb = size_gb
        self.row_defaults = dict(row_defaults)
        self.num_trials = num_trials
        self.to_run = max(0, num_trials - already_evaluated)
        self.seeds = list(seeds)
        self.max_failure_rate = max_failure_rate
        self.max_infeasible_streak = max_infeasible_streak
        self.stats = SearchStats()
        self.progress = progress
        self.on_result = on_result
        self.fallback = fallback
        #: maps an over-limit proposal to the nearest plan that fits (evaluated as a new trial)
        self.repair = repair
        #: stop when no worker has been placed on the cluster for this long (all nodes lost)
        self.placement_timeout = placement_timeout
        self._ready: queue.Queue[Proposal] = queue.Queue()
        self._results: queue.Queue[tuple[TrialResult, Proposal]] = queue.Queue()
        self._stop = threading.Event()
        self._assigned = 0  # proposals queued for evaluation (proposal thread only)
        self._error: BaseException | None = None
        self._inflight: dict[int, Proposal] = {}
        #: CSV trial index = Ax index + offset, so resumed searches never reuse an index of the history
        self.index_offset = index_offset
        self._lock = threading.Lock()
        self._interrupted = False  # set by the SIGINT handler while run() is active

    # ---- proposal thread -------------------------------------------------------------------
    def _proposal_loop(self) -> None:
        try:
            streak = 0
            while not self._stop.is_set():
                self._drain_results()
                if self._assigned >= self.to_run or self._ready.qsize() >= self.pool.size:
                    try:
                        res, prop = self._results.get(timeout=0.05)
                        self._complete_in_ax(res, prop)
                    except queue.Empty:
                        pass
                    continue
                nxt = self._next_proposal()
                if nxt is None:
                    self._stop_with("Ax produced no new configuration (the space may be exhausted)")
                    return
                prop = nxt
                limit = self.driver.goal.size_limit
                if limit is not None and not limit.admits(prop.size_gb):
                    self.driver.complete(prop.index, {SIZE_METRIC: (prop.size_gb, 0.0)})
                    self._record(prop, "infeasible", reason=f"size {prop.size_gb:.6g} GB over the limit; not evaluated")
                    self.stats.infeasible += 1
                    fixed = self.repair(prop.values) if self.repair is not None else None
                    if fixed is not None and not limit.admits(self.size_gb(self.driver.space.decode(fixed))):
                        log.warning("trial %d: its repaired plan is still over the limit (exact size); not evaluated", prop.index)
                        fixed = None
                    if fixed is None:
                        streak += 1
                        if streak >= self.max_infeasible_streak:
                            self._stop_with(
                                f"{streak} proposals in a row were over the size limit; seed the search (--initial_samples) or raise the limit"
                            )
                            return
                        continue
                    t0 = time.perf_counter()
                    plan = self.driver.space.decode(fixed)
                    prop = Proposal(self.driver.attach(fixed), fixed, plan, "repaired", time.perf_counter() - t0, self.size_gb(plan))
                streak = 0
                self._assigned += 1
                self._ready.put(prop)
        except BaseException as err:  # surfaced by the main thread
            self._error = err

    def _next_proposal(self) -> Proposal | None:
        t0 = time.perf_counter()
        if self.seeds:
            values = dict(self.seeds.pop(0))
            index, source = self.driver.attach(values), "seed"
        else:
            try:
                got = self.driver.propose()
            except Exception as err:
                # BO cannot fit before any trial has an objective value (e.g. every quasi-random
                # proposal so far was over the size limit): propose a random feasible plan instead.
                if self.fallback is None or type(err).__name__ != "DataRequiredError":
                    raise
                values = self.fallback()
                index, source = self.driver.attach(values), "random"
                got = (index, values, source)
            if got is None:
                return None
            index, values, source = got
        plan = self.driver.space.decode(values)
        dt = time.perf_counter() - t0
        if source != "seed":
            self.stats.proposal_s.append(dt)
        return Proposal(index, values, plan, source, dt, self.size_gb(plan))

    def _drain_results(self) -> None:
        while True:
            try:
                res, prop = self._results.get_nowait()
            except queue.Empty:
                return
            self._complete_in_ax(res, prop)

    def _complete_in_ax(self, res: TrialResult, prop: Proposal) -> None:
        if res.ok:
            self.driver.complete(prop.index, ax_data(res.metrics, res.sems, prop.size_gb, self.driver.cfg.strategy))
        else:
            self.driver.fail(prop.index, res.reason)

    def _stop_with(self, reason: str) -> None:
        self.stats.stop_reason = reason
        self._stop.set()

    # ---- main thread -------------------------------------------------------------------------
    def _on_sigint(self, signum: int, frame: Any) -> None:
        # Remembered as well as raised: a KeyboardInterrupt raised while Ray's own code runs (its
        # wait/get) can be swallowed there, and the main loop then raises it at its next turn.
        self._interrupted = True
        raise KeyboardInterrupt

    def run(self) -> SearchStats:
        thread = threading.Thread(target=self._proposal_loop, name="ax-proposals", daemon=True)
        thread.start()
        self._interrupted = False
        old_handler = None
        if threading.current_thread() is threading.main_thread():
            # installed after the workers started, so it is ours even if Ray set its own at init
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            self._main_loop()
            if self._error is not None:  # the proposal thread failed: nothing in flight is left behind
                self._abandon_all(thread, "search stopped: the proposal step failed")
        except KeyboardInterrupt:
            self._abandon_all(thread, "interrupted (Ctrl-C)")
            raise
        except SearchStopped as err:
            self._abandon_all(thread, err.abandon_reason or f"search stopped: {err}")
            raise
        finally:
            self._stop.set()  # whatever ended the loop, the proposal thread ends too
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        thread.join(timeout=600)
        self._drain_results()
        if self._error is not None:
            raise _one_line(self._error)
        return self.stats

    def _abandon_all(self, thread: threading.Thread, reason: str) -> None:
        """The search ends early: the proposal thread is stopped first (Ax is then the main thread's
        alone), results already recorded reach Ax, and every trial Ax holds as running (on a worker,
        or proposed and queued) is cancelled, marked abandoned in Ax and recorded with ``reason``."""
        self._stop.set()
        thread.join(timeout=600)
        self._drain_results()
        for idx in self.pool.cancel_all():
            prop = self._inflight.pop(idx)
            self.driver.abandon(idx)
            self._record(prop, "abandoned", reason=reason)
            self.stats.abandoned += 1
        while True:
            try:
                prop = self._ready.get_nowait()
            except queue.Empty:
                break
            self.driver.abandon(prop.index)
            self._record(prop, "abandoned", reason=f"{reason} (proposed, not started)")
            self.stats.abandoned += 1

    def _main_loop(self) -> None:
        while True:
            if self._interrupted:
                raise KeyboardInterrupt
            if self._error is not None:
                return
            # dispatch
            for slot in self.pool.idle():
                try:
                    prop = self._ready.get_nowait()
                except queue.Empty:
                    break
                self._inflight[prop.index] = prop
                self.stats.worker_idle_s += self.pool.submit(slot, prop.index, prop.plan)
            results = self.pool.wait(timeout=0.1)
            for res in results:
                prop = self._inflight.pop(res.trial_index)
                self.stats.worker_busy_s += res.quantize_s + res.evaluate_s + res.restore_s
                self._on_result(res, prop)
                self._results.put((res, prop))
            done = self.stats.evaluated >= self.to_run
            if done and not self.pool.busy():
                return
            if self._stop.is_set() and not self.pool.busy() and self._ready.empty():
                return
            broken = getattr(self.pool, "broken", "")
            if broken:
                self._stop_with(broken)
                raise SearchStopped(broken, "search stopped: workers cannot start")
            unplaced = getattr(self.pool, "unplaced_s", None)
            if unplaced is not None and not self.pool.busy() and (waited := unplaced()) > self.placement_timeout:
                self._stop_with(
                    f"no worker could be placed on the Ray cluster for {waited:.0f} s (--placement_timeout {self.placement_timeout:g}); "
                    "add a node (ray start --address HEAD:PORT) and run the same command again: it resumes from the history"
                )
                raise SearchStopped(self.stats.stop_reason, "search stopped: no worker could be placed")
            plan_failures = self.stats.failed - self.stats.node_lost
            plan_evaluated = self.stats.evaluated - self.stats.node_lost
            if plan_evaluated >= 4 and plan_failures / plan_evaluated > self.max_failure_rate:
                self._stop_with(
                    f"{plan_failures} of {plan_evaluated} trials failed (more than --max_failure_rate {self.max_failure_rate:g}); "
                    "last reason is in the history's 'reason' column"
                )
                raise SearchStopped(self.stats.stop_reason, "search stopped: too many failures")

    def _on_result(self, res: TrialResult, prop: Proposal) -> None:
        self.stats.evaluated += 1
        if res.ok:
            self.stats.completed += 1
            row = self._record(prop, "completed", result=res)
            if (
                row.model_size is not None
                and self._feasible(row)
                and (self.stats.best is None or _better(row, self.stats.best, self.driver.goal))
            ):
                self.stats.best = row
        else:
            self.stats.failed += 1
            if res.reason.startswith("node lost"):
                self.stats.node_lost += 1
            row = self._record(prop, "failed", result=res, reason=res.reason)
        if self.progress is not None:
            self.progress.update(1)
            best = self.stats.best
            if best is not None:
                post = {"best_ppl": f"{best.cal_PPL:.3f}"} if self.driver.goal.minimize else {"best_tok/s": f"{best.cal_throughput:.1f}"}
                self.progress.set_postfix(post | {"failed": self.stats.failed, "skipped": self.stats.infeasible}, refresh=False)
        if self.on_result is not None:
            self.on_result(row)

    def _feasible(self, row: HistoryRow) -> bool:
        return self.driver.goal.feasible(row)

    def _record(self, prop: Proposal, status: str, result: TrialResult | None = None, reason: str = "") -> HistoryRow:
        fields_: dict[str, Any] = dict(self.row_defaults)
        fields_.update(
            trial_index=prop.index + self.index_offset,
            status=status,
            source=prop.source,
            quant_config=prop.plan.dumps(),
            reason=reason,
            model_size=prop.size_gb,
            proposal_s=prop.proposal_s,
        )
        if result is not None:
            fields_.update(metrics_to_row(result.metrics, result.sems))
            fields_.update(quantize_s=result.quantize_s, evaluate_s=result.evaluate_s, worker_id=result.worker_id)
        row = HistoryRow(**fields_)
        with self._lock:
            self.history.append(row)
        return row


def _one_line(err: BaseException) -> BaseException:
    """An error of the proposal thread (Ax, BoTorch, a strategy) as the one line the CLI prints, the
    traceback logged (shown with -v); a UserError or an interrupt passes as it is."""
    if isinstance(err, UserError | KeyboardInterrupt | SearchStopped) or not isinstance(err, Exception):
        return err
    log.info("the proposal thread failed", exc_info=err)
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return UserError(
        f"the proposal step failed ({type(err).__name__}: {first}); every finished trial is in the history: "
        "run the same command to resume (-v shows the traceback)"
    )


def _better(a: HistoryRow, b: HistoryRow, goal: Goal) -> bool:
    if goal.minimize:
        return search_score(a, goal.objective) < search_score(b, goal.objective)
    return (a.cal_throughput or -math.inf) > (b.cal_throughput or -math.inf)
