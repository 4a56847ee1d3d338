"""The search loop (``bo_search.search.driver.Search``) in this process: a real Ax driver on a tiny
synthetic space (Sobol proposals only, so Ax stays fast), a fake worker pool in plain Python (no Ray,
no model). Asynchronous dispatch, a failed trial, the paths that abandon in-flight trials, and the
bookkeeping of a resumed search."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from layers import llama_like

from bo_search.search.driver import Search, SearchStopped
from bo_search.search.experiment import AxDriver, Goal, attach_history, goal_text
from bo_search.search.history import HistoryWriter, read_history
from bo_search.search.strategies import DriverConfig
from bo_search.space import build_space
from bo_search.types import QuantPlan, TrialResult

SPEC = {
    "parameters": [
        {"name": "bitwidth", "name_format": "bitwidth.{i}.", "layers": [{"range": [0, 3], "type": "choice", "values": [2, 4, 8]}]},
        {"name": "groupsize", "name_format": "groupsize.{i}.", "layers": [{"range": [0, 3], "type": "choice", "values": [32, 64]}]},
    ]
}
LAYERS = llama_like(3, 64, 32, 128)
SPACE = build_space(SPEC, LAYERS, "<test>")
NUMEL = {li.fqn: li.numel for li in LAYERS.linears}
GOAL = Goal(objective="nll", minimize=True, constraint_metric="model_size_gb", limit=1.0, search="modelsize")
ROW_DEFAULTS = {"search": GOAL.search, "goal": goal_text(GOAL), "limit_metric": GOAL.constraint_metric, "limit": GOAL.limit}
#: how long a fake worker may hold a trial before the pool gives up on the loop (the test then fails)
PATIENCE_S = 10.0


def size_gb(plan: QuantPlan) -> float:
    """Exact enough for the loop: weight bits only (every plan of SPACE is far under GOAL.limit)."""
    return sum(NUMEL[fqn] * lq.bits for fqn, lq in plan.items()) / 8e9


def fake_nll(plan: QuantPlan) -> float:
    return 2.0 + sum(1.0 / lq.bits for lq in plan.values()) / len(plan)


def make_driver() -> AxDriver:
    # gp with a Sobol start longer than any test here: no GP is ever fitted, each proposal is ~10 ms
    return AxDriver(SPACE, GOAL, DriverConfig(strategy="gp", n_sobol=1000, seed=0))


@dataclass
class Running:
    index: int
    plan: QuantPlan
    started: float


@dataclass
class FakePool:
    """The ``Pool`` protocol of driver.py in plain Python. Slots are worker names; a running trial
    ends (in ``wait``) once ``finishes(pool, slot, index)`` says so, with ``outcome(slot, index, plan)``.
    ``events`` logs every submit, result and cancel in order."""

    slots: list[str]
    finishes: Callable[[FakePool, str, int], bool] = lambda pool, slot, index: True
    outcome: Callable[[str, int, QuantPlan], TrialResult] | None = None
    #: called at the start of every ``wait`` (a test's hook: raise Ctrl-C, break the pool, ...)
    on_wait: Callable[[FakePool], list[TrialResult] | None] | None = None
    running: dict[str, Running] = field(default_factory=dict)
    events: list[tuple[str, str, int]] = field(default_factory=list)
    cancel_calls: int = 0
    broken: str = ""

    @property
    def size(self) -> int:
        return len(self.slots)

    def idle(self) -> list[str]:
        return [s for s in self.slots if s not in self.running]

    def busy(self) -> list[str]:
        return [s for s in self.slots if s in self.running]

    def submit(self, slot: str, trial_index: int, plan: QuantPlan) -> float:
        assert slot in self.slots and slot not in self.running, f"submit to {slot}, which is busy"
        self.running[slot] = Running(trial_index, plan, time.perf_counter())
        self.events.append(("submit", slot, trial_index))
        return 0.0

    def wait(self, timeout: float) -> list[TrialResult]:
        if self.on_wait is not None and (early := self.on_wait(self)) is not None:
            return early
        out = []
        for slot in list(self.running):
            run = self.running[slot]
            if self.finishes(self, slot, run.index):
                del self.running[slot]
                self.events.append(("result", slot, run.index))
                out.append((self.outcome or completed)(slot, run.index, run.plan))
        if not out:
            time.sleep(min(timeout, 0.005))  # as a real pool blocks: leave the proposal thread the GIL
        return out

    def cancel_all(self) -> list[int]:
        self.cancel_calls += 1
        cancelled = [r.index for r in self.running.values()]
        for slot, run in self.running.items():
            self.events.append(("cancel", slot, run.index))
        self.running.clear()
        return cancelled

    def submitted(self, slot: str | None = None) -> list[int]:
        return [i for kind, s, i in self.events if kind == "submit" and slot in (None, s)]

    def results(self, slot: str | None = None) -> list[int]:
        return [i for kind, s, i in self.events if kind == "result" and slot in (None, s)]

    def slot_of(self, index: int) -> str:
        return next(s for kind, s, i in self.events if kind == "submit" and i == index)


def completed(slot: str, index: int, plan: QuantPlan) -> TrialResult:
    nll = fake_nll(plan)
    return TrialResult(
        index, "completed", metrics={"nll": nll, "ppl": math.exp(nll)}, sems={"nll": 0.01}, quantize_s=0.1, evaluate_s=0.2, worker_id=slot
    )


def make_search(driver: AxDriver, pool: FakePool, path: Path, num_trials: int, **kw) -> tuple[Search, HistoryWriter]:
    history = HistoryWriter(path)
    return Search(driver, pool, history, size_gb, ROW_DEFAULTS, num_trials, **kw), history


def run_to_end(search: Search, history: HistoryWriter):
    try:
        return search.run()
    finally:
        history.close()


def ax_status(driver: AxDriver, index: int) -> str:
    return driver.client._experiment.trials[index].status.name


def test_a_fast_worker_is_fed_while_a_slow_one_still_runs(tmp_path):
    """Two workers; the slow one's first trial ends only after the fast one has returned three
    results. Lockstep rounds would starve the fast worker (it would wait for the slow one)."""
    hold_for = 3

    def finishes(pool: FakePool, slot: str, index: int) -> bool:
        if slot == "fast" or pool.results("slow"):
            return True
        # the slow worker's first trial: held until the fast worker has returned hold_for results
        return len(pool.results("fast")) >= hold_for or time.perf_counter() - pool.running[slot].started > PATIENCE_S

    pool = FakePool(["slow", "fast"], finishes)
    driver = make_driver()
    search, history = make_search(driver, pool, tmp_path / "h.csv", num_trials=7)
    stats = run_to_end(search, history)

    first_slow = pool.submitted("slow")[0]
    slow_done = pool.events.index(("result", "slow", first_slow))
    before = pool.events[:slow_done]
    fast_results_before = [i for kind, s, i in before if kind == "result" and s == "fast"]
    fast_submits_before = [i for kind, s, i in before if kind == "submit" and s == "fast"]
    assert len(fast_results_before) >= hold_for, f"the slow trial was released by the patience timer: {pool.events}"
    # the fast worker got a new trial after each of its results, the slow one still running (in
    # lockstep rounds it would have had one trial before the slow one returned)
    assert fast_submits_before == fast_results_before and len(fast_submits_before) >= hold_for, pool.events
    assert pool.events[0][:2] == ("submit", "slow") and pool.events[1][:2] == ("submit", "fast")  # both busy at once
    # each trial was dispatched once, to one worker, and every one is in the history
    assert sorted(pool.submitted()) == list(range(7)) and len(pool.submitted("slow")) + len(pool.submitted("fast")) == 7
    rows = read_history(tmp_path / "h.csv").rows
    assert sorted(r.trial_index for r in rows) == list(range(7))
    assert {r.status for r in rows} == {"completed"}
    assert {r.worker_id for r in rows if r.trial_index == first_slow} == {"slow"}
    assert stats.evaluated == stats.completed == 7 and stats.failed == stats.abandoned == 0
    for r in rows:  # each row holds the plan its trial was given, with that plan's numbers
        assert r.nll == pytest.approx(fake_nll(r.plan)) and r.model_size == pytest.approx(size_gb(r.plan))
        assert r.source == "sobol" and ax_status(driver, r.trial_index) == "COMPLETED"
    assert stats.best is not None and stats.best.nll == min(r.nll for r in rows)


def test_a_failed_trial_is_a_failed_row_with_its_reason_and_the_search_goes_on(tmp_path):
    reason = "worker w1 raised: CUDA out of memory"
    doomed = 2

    def outcome(slot: str, index: int, plan: QuantPlan) -> TrialResult:
        if index == doomed:
            return TrialResult(index, "failed", reason=reason, worker_id=slot)
        return completed(slot, index, plan)

    seeds = [SPACE.uniform(8, 64), SPACE.uniform(4, 32)]
    pool = FakePool(["w0", "w1"], outcome=outcome)
    driver = make_driver()
    search, history = make_search(driver, pool, tmp_path / "h.csv", num_trials=6, seeds=seeds)
    stats = run_to_end(search, history)

    rows = read_history(tmp_path / "h.csv").rows
    assert sorted(r.trial_index for r in rows) == list(range(6))  # the failure did not end the search
    failed = [r for r in rows if r.status == "failed"]
    assert len(failed) == 1
    row = failed[0]
    assert (row.trial_index, row.reason, row.worker_id) == (doomed, reason, pool.slot_of(doomed))
    assert row.nll is None and row.cal_PPL is None  # no numbers for a failed trial
    assert row.model_size == pytest.approx(size_gb(row.plan))  # its exact size is still known
    assert all(r.status == "completed" and r.reason == "" for r in rows if r.trial_index != doomed)
    assert (stats.evaluated, stats.completed, stats.failed) == (6, 5, 1)
    assert ax_status(driver, doomed) == "FAILED"
    assert driver.client._experiment.trials[doomed].status_reason == reason
    # the seeds went first, as they are
    by_index = {r.trial_index: r for r in rows}
    assert [by_index[i].source for i in (0, 1)] == ["seed", "seed"]
    assert [SPACE.encode(by_index[i].plan) for i in (0, 1)] == seeds


def _sigint(swallow: bool) -> list[TrialResult] | None:
    """Ctrl-C while the main loop waits on the pool. ``swallow``: the pool's own code eats the
    KeyboardInterrupt (as Ray's wait/get can); the loop must still stop at its next turn."""
    try:
        signal.raise_signal(signal.SIGINT)
        time.sleep(PATIENCE_S)  # the handler raises in here
    except KeyboardInterrupt:
        if not swallow:
            raise
        return []
    pytest.fail("SIGINT did not interrupt the wait")


def _hold_after(n: int) -> Callable[[FakePool, str, int], bool]:
    """Trials end at once until ``n`` results were returned; later trials never end."""
    return lambda pool, slot, index: len(pool.results()) < n


@pytest.mark.parametrize("swallow", [False, True], ids=["raised", "swallowed"])
def test_ctrl_c_marks_in_flight_trials_abandoned(tmp_path, swallow):
    """The one path that abandons trials in Ax too: ``Search.run`` catches the KeyboardInterrupt of
    its SIGINT handler, cancels the pool and records every in-flight trial as abandoned."""
    outer = signal.getsignal(signal.SIGINT)

    presses = []

    def on_wait(pool: FakePool) -> list[TrialResult] | None:
        # once both workers hold a trial that never ends, the user presses Ctrl-C
        if len(pool.results()) >= 3 and len(pool.running) == 2:
            if presses:
                pytest.fail("the search went on waiting for its workers after Ctrl-C")
            presses.append(1)
            return _sigint(swallow)
        return None

    pool = FakePool(["w0", "w1"], _hold_after(3), on_wait=on_wait)
    driver = make_driver()
    search, history = make_search(driver, pool, tmp_path / "h.csv", num_trials=10)
    with pytest.raises(KeyboardInterrupt):
        run_to_end(search, history)
    assert signal.getsignal(signal.SIGINT) is outer  # the search's handler is gone again

    held = sorted(i for kind, _, i in pool.events if kind == "cancel")
    assert pool.cancel_calls == 1 and len(held) == 2
    rows = read_history(tmp_path / "h.csv").rows
    done = sorted(r.trial_index for r in rows if r.status == "completed")
    abandoned = [r for r in rows if r.status == "abandoned"]
    assert done == sorted(pool.results()) and len(done) == 3
    _check_abandoned(driver, rows, held, "interrupted (Ctrl-C)")
    assert all(r.nll is None for r in abandoned)
    assert (search.stats.completed, search.stats.abandoned, search.stats.evaluated) == (3, len(abandoned), 3)


def _check_abandoned(driver: AxDriver, rows, held: list[int], reason: str) -> None:
    """A search that ended early: the trials on a worker (``held``) are abandoned with ``reason``,
    the ones proposed but not yet started with ``reason (proposed, not started)``; each is
    ABANDONED in Ax with the plan Ax gave it, and every trial Ax holds has exactly one row."""
    abandoned = [r for r in rows if r.status == "abandoned"]
    in_flight = sorted(r.trial_index for r in abandoned if r.reason == reason)
    queued = [r for r in abandoned if r.reason == f"{reason} (proposed, not started)"]
    assert in_flight == held and len(in_flight) + len(queued) == len(abandoned)
    for r in abandoned:  # each abandoned row holds the plan Ax gave the trial
        assert r.plan == driver.space.decode(_ax_values(driver, r.trial_index))
        assert ax_status(driver, r.trial_index) == "ABANDONED"
    assert sorted(r.trial_index for r in rows) == sorted(driver.client._experiment.trials)  # none silently dropped
    assert "RUNNING" not in {ax_status(driver, i) for i in driver.client._experiment.trials}


def _ax_values(driver: AxDriver, index: int) -> dict[str, int]:
    from bo_search.space import from_ax

    return from_ax(driver.space, driver.client._experiment.trials[index].arm.parameters, driver.cfg.encoding)


@pytest.mark.parametrize("why", ["broken pool", "too many failures"])
def test_a_stopped_search_records_its_in_flight_trials_as_abandoned(tmp_path, why):
    """The other two abandon paths of ``Search._main_loop``: the pool reports itself ``broken``
    (worker starts keep failing), or more than ``max_failure_rate`` of the trials failed. Both
    raise SearchStopped and record the trials still running as abandoned with the reason."""
    if why == "broken pool":
        message = "3 worker starts failed in a row (last: worker w1: boom)"

        def on_wait(pool: FakePool) -> None:
            if len(pool.results()) >= 2 and len(pool.running) == 2:
                pool.broken = message

        pool = FakePool(["w0", "w1"], _hold_after(2), on_wait=on_wait)
        want_reason, want_stop = "search stopped: workers cannot start", message
    else:
        # w0 (the first idle slot: it gets the first trial) never ends its trial; w1 fails each
        # trial at once: 4 failures of 4 evaluated > 0.5
        def outcome(slot: str, index: int, plan: QuantPlan) -> TrialResult:
            return TrialResult(index, "failed", reason=f"worker {slot} raised: boom", worker_id=slot)

        pool = FakePool(["w0", "w1"], lambda pool, slot, index: slot == "w1", outcome=outcome)
        want_reason, want_stop = "search stopped: too many failures", "4 of 4 trials failed"
    driver = make_driver()
    search, history = make_search(driver, pool, tmp_path / "h.csv", num_trials=10)
    with pytest.raises(SearchStopped) as info:
        run_to_end(search, history)
    assert str(info.value).startswith(want_stop) and search.stats.stop_reason.startswith(want_stop)

    held = sorted(i for kind, _, i in pool.events if kind == "cancel")
    assert pool.cancel_calls == 1 and len(held) == (2 if why == "broken pool" else 1)
    rows = read_history(tmp_path / "h.csv").rows
    _check_abandoned(driver, rows, held, want_reason)
    assert search.stats.abandoned == sum(r.status == "abandoned" for r in rows)
    assert len(rows) < 10


def test_a_failed_proposal_step_leaves_no_trial_running(tmp_path):
    """The proposal thread fails (a strategy's model fit raises, say) while two trials run: the user
    gets one line, and the running trials are cancelled, abandoned in Ax and recorded, not dropped."""
    from bo_search.types import UserError

    driver = make_driver()
    calls = []
    propose = driver.propose

    def flaky() -> object:
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("the model fit diverged")
        return propose()

    driver.propose = flaky  # type: ignore[method-assign]
    pool = FakePool(["w0", "w1"], _hold_after(2))
    search, history = make_search(driver, pool, tmp_path / "h.csv", num_trials=10)
    with pytest.raises(UserError, match=r"the proposal step failed \(RuntimeError: the model fit diverged\)"):
        run_to_end(search, history)
    held = sorted(i for kind, _, i in pool.events if kind == "cancel")
    assert pool.cancel_calls == 1 and 1 <= len(held) <= 2  # the 4th proposal may still be queued
    rows = read_history(tmp_path / "h.csv").rows
    assert sorted(r.status for r in rows) == ["abandoned"] * 2 + ["completed"] * 2
    _check_abandoned(driver, rows, held, "search stopped: the proposal step failed")


def test_resume_runs_only_the_remaining_trials_under_new_indices(tmp_path):
    """A first search is interrupted; a user then deletes one line of the history (as a corrupt-row
    error tells them to), leaving a gap in the trial indices. The resumed search attaches the rows,
    runs only num_trials minus the evaluated rows, and numbers its rows after the highest index in
    the file (``index_offset`` from ``attach_history``), never reusing one."""
    path = tmp_path / "h.csv"

    def outcome(slot: str, index: int, plan: QuantPlan) -> TrialResult:
        return TrialResult(index, "failed", reason="boom", worker_id=slot) if index == 1 else completed(slot, index, plan)

    def on_wait(pool: FakePool) -> list[TrialResult] | None:
        return _sigint(False) if len(pool.results()) >= 5 and len(pool.running) == 2 else None

    first = FakePool(["w0", "w1"], _hold_after(5), outcome=outcome, on_wait=on_wait)
    search, history = make_search(make_driver(), first, path, num_trials=12)
    with pytest.raises(KeyboardInterrupt):
        run_to_end(search, history)
    rows = read_history(path).rows
    assert sorted((r.trial_index, r.status) for r in rows)[:5] == [(0, "completed"), (1, "failed")] + [(i, "completed") for i in (2, 3, 4)]
    # the 2 on the workers and those proposed but not started (0-2, as the proposal thread was placed)
    assert {r.status for r in rows[5:]} == {"abandoned"} and 2 <= len(rows[5:]) <= 4
    high = max(r.trial_index for r in rows)
    assert sorted(r.trial_index for r in rows) == list(range(high + 1))

    # the user deletes the row of trial 3
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    drop = 1 + [r.trial_index for r in rows].index(3)  # +1: the header
    path.write_text("".join(lines[:drop] + lines[drop + 1 :]), encoding="utf-8")
    old = read_history(path).rows
    assert sorted(r.trial_index for r in old) == [i for i in range(high + 1) if i != 3]
    evaluated = sum(r.status in ("completed", "failed") for r in old)  # as runner.run_search counts them
    assert evaluated == 4

    driver = make_driver()
    offset = attach_history(driver, old)
    n_old = len(old)
    assert offset == high + 1 - n_old == 1  # n_old rows attached as Ax trials 0..n_old-1: new Ax trial n_old is row high+1
    assert [ax_status(driver, i) for i in range(n_old)] == [
        {"completed": "COMPLETED", "failed": "FAILED", "abandoned": "ABANDONED"}[r.status] for r in old
    ]
    second = FakePool(["w0", "w1"])
    search, history = make_search(driver, second, path, num_trials=9, already_evaluated=evaluated)
    search.index_offset = offset
    stats = run_to_end(search, history)

    assert sorted(second.submitted()) == list(range(n_old, n_old + 5))  # Ax indices after the attached ones: 9 - 4 trials run
    assert stats.evaluated == 5
    rows = read_history(path).rows
    assert len(rows) == len(old) + 5
    new = rows[len(old) :]
    assert sorted(r.trial_index for r in new) == list(range(high + 1, high + 6))  # after the highest old index, none reused
    assert len({r.trial_index for r in rows}) == len(rows)
    assert {r.status for r in new} == {"completed"}
    for r in new:  # the row's index is the Ax trial's index plus the offset: same plan
        assert r.plan == driver.space.decode(_ax_values(driver, r.trial_index - offset))
    assert sum(r.status in ("completed", "failed") for r in rows) == 9
