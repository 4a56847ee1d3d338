"""Ray workers and the pool (no Ax), and failure handling of the whole search with injected faults."""

import os
import sys
import tempfile
import time

import pytest

from bo_search.quant import uniform_plan
from bo_search.search.workers import TrialWorker, WorkerPool
from bo_search.trial import EvalConfig
from bo_search.types import LayerQuant

pytestmark = pytest.mark.slow


class FlakyWorker(TrialWorker):
    """A real worker with real faults: its 2nd trial raises; its 3rd kills the worker process
    (once per test: the replacement worker then keeps going)."""

    MARKER = os.path.join(tempfile.gettempdir(), f"bo_search_flaky_{os.getpid()}")
    calls = 0
    node_loss_grace_s = 2.0  # its node never dies: settle "worker died" quickly

    def run(self, trial_index, plan_json):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("injected failure")
        if self.calls == 3 and not os.path.exists(self.MARKER):
            open(self.MARKER, "w").close()
            os._exit(1)
        return super().run(trial_index, plan_json)


@pytest.fixture(autouse=True)
def _reset_marker():
    for marker in (FlakyWorker.MARKER, CannotRestart.MARKER):
        if os.path.exists(marker):
            os.remove(marker)


class CannotRestart(TrialWorker):
    """Starts once; its first trial kills the worker; every replacement then fails to load."""

    MARKER = os.path.join(tempfile.gettempdir(), f"bo_search_norestart_{os.getpid()}")
    node_loss_grace_s = 2.0

    def load(self):
        if os.path.exists(self.MARKER):
            raise RuntimeError("injected start failure")
        return super().load()

    def run(self, trial_index, plan_json):
        open(self.MARKER, "w").close()
        os._exit(1)


class AlwaysFails(TrialWorker):
    def run(self, trial_index, plan_json):
        raise MemoryError("out of memory (injected)")


@pytest.fixture(scope="module")
def ray_cluster():
    from bo_search.search.workers import start_ray

    start_ray(num_cpus=2, num_gpus=0, address=None, object_store_mb=128)
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.shutdown()


def _cfg(ckpt):
    return EvalConfig(checkpoint=str(ckpt), eval_text="pydoc", eval_tokens=128, heldout_tokens=128, max_seqlen=64)


def _drain(pool, n):
    out = []
    while len(out) < n:
        out += pool.wait(timeout=1.0)
    return out


def test_pool_failures_and_dead_worker_replaced(ray_cluster, tiny_llama):
    from bo_search.model import discover_layers, load_structure

    model, _ = load_structure(str(tiny_llama))
    plan = uniform_plan(discover_layers(model), LayerQuant(4, 32))
    pool = WorkerPool(_cfg(tiny_llama), num_workers=1, worker_cls=FlakyWorker)
    try:
        results = {}
        for idx in (0, 1, 2, 3):
            deadline = time.time() + 120
            while not pool.idle() and time.time() < deadline:  # a replacement loads its model first
                pool.wait(timeout=0.2)
            [slot] = pool.idle()
            pool.submit(slot, idx, plan)
            [res] = _drain(pool, 1)
            results[idx] = res
        assert results[0].ok and results[3].ok
        assert results[0].metrics["ppl"] == pytest.approx(results[3].metrics["ppl"])
        assert not results[1].ok and "injected failure" in results[1].reason
        assert not results[2].ok and "died" in results[2].reason and not results[2].reason.startswith("node lost")
        assert pool.restarts == 1
    finally:
        pool.shutdown()


def test_pool_async_dispatch_two_workers(ray_cluster, tiny_llama):
    from bo_search.model import discover_layers, load_structure

    model, _ = load_structure(str(tiny_llama))
    plans = [uniform_plan(discover_layers(model), LayerQuant(b, 32)) for b in (2, 3, 4, 8, 2)]
    pool = WorkerPool(_cfg(tiny_llama), num_workers=2)
    try:
        pending = list(enumerate(plans))
        done = []
        while pending or pool.busy():
            for slot in pool.idle():
                if pending:
                    idx, p = pending.pop(0)
                    pool.submit(slot, idx, p)
            done += pool.wait(timeout=0.5)
        assert sorted(r.trial_index for r in done) == [0, 1, 2, 3, 4]
        assert {r.worker_id.split("@")[0] for r in done} == {"w0", "w1"}
        ppl = {r.trial_index: r.metrics["ppl"] for r in done}
        assert ppl[0] == pytest.approx(ppl[4])  # same plan, same number, whichever worker ran it
    finally:
        pool.shutdown()


def _search_args(tiny_llama, tmp_path, n):
    from clitools import base_args, tiny_space

    from bo_search.acc_modelsize import build_parser

    space = tiny_space(tmp_path / "space.json")
    args = build_parser().parse_args(base_args(tiny_llama, space, tmp_path / "h.csv", "--num_trials", str(n), "--initial_samples", "none"))
    args.device = "cpu"
    args.verbose = False
    return args


def test_search_goes_on_after_failures(ray_cluster, tiny_llama, tmp_path):
    from bo_search.search import runner
    from bo_search.search.experiment import Goal
    from bo_search.search.history import read_history
    from bo_search.structure import size_limit

    args = _search_args(tiny_llama, tmp_path, 6)
    args.max_failure_rate = 0.9
    setup = runner.prepare(args, "modelsize")
    limit = size_limit(setup, None, 5.0).gb
    goal = Goal("nll", True, "model_size_gb", limit, "modelsize")
    assert runner.run_search(setup, goal, [], worker_cls=FlakyWorker) == 0
    rows = read_history(tmp_path / "h.csv").rows
    evaluated = [r for r in rows if r.status in ("completed", "failed")]
    assert len(evaluated) == 6
    failed = {r.trial_index: r.reason for r in rows if r.status == "failed"}
    assert any("injected failure" in v for v in failed.values())
    assert any("died" in v for v in failed.values())
    assert sum(r.status == "completed" for r in rows) >= 3


def test_max_failure_rate_stops_search(ray_cluster, tiny_llama, tmp_path, capsys):
    from bo_search.search import runner
    from bo_search.search.experiment import Goal
    from bo_search.search.history import read_history
    from bo_search.structure import size_limit

    args = _search_args(tiny_llama, tmp_path, 20)
    setup = runner.prepare(args, "modelsize")
    goal = Goal("nll", True, "model_size_gb", size_limit(setup, None, 5.0).gb, "modelsize")
    assert runner.run_search(setup, goal, [], worker_cls=AlwaysFails) == 3
    err = capsys.readouterr().err
    assert "--max_failure_rate" in err
    rows = read_history(tmp_path / "h.csv").rows
    assert all(r.status in ("failed", "abandoned", "infeasible") for r in rows)
    assert any("out of memory (injected)" in r.reason for r in rows)
    # one worker: the search stops at the first check that can fire, 4 evaluated trials, all failed
    assert sum(r.status == "failed" for r in rows) == 4
    # nothing was running when it stopped; a proposal already queued is recorded, not dropped
    assert all(r.reason.endswith("(proposed, not started)") for r in rows if r.status == "abandoned")


def _modelsize_goal(setup):
    from bo_search.search.experiment import Goal
    from bo_search.structure import size_limit

    return Goal("nll", True, "model_size_gb", size_limit(setup, None, 5.0).gb, "modelsize")


def test_workers_that_cannot_start_stop_the_search(ray_cluster, tiny_llama, tmp_path, capsys):
    """Issue 31, item 4: a replacement that keeps failing to start is not respawned forever."""
    from bo_search.search import runner
    from bo_search.search.history import read_history
    from bo_search.search.workers import MAX_START_FAILURES

    setup = runner.prepare(_search_args(tiny_llama, tmp_path, 5), "modelsize")
    assert runner.run_search(setup, _modelsize_goal(setup), [], worker_cls=CannotRestart) == 3
    err = capsys.readouterr().err
    assert f"search stopped: {MAX_START_FAILURES} worker starts failed in a row" in err and "injected start failure" in err
    rows = read_history(tmp_path / "h.csv").rows
    assert rows[0].status == "failed" and "died" in rows[0].reason
    # the proposal queued for the dead worker is recorded, not dropped (and abandoned in Ax)
    assert [(r.status, r.reason) for r in rows[1:]] in (
        [],
        [("abandoned", "search stopped: workers cannot start (proposed, not started)")],
    )


def test_a_failing_proposal_step_is_one_line(ray_cluster, tiny_llama, tmp_path, monkeypatch):
    """Issue 31, item 8: an exception of Ax (or of a strategy) in the proposal thread is a UserError
    (one line, exit 2 from the CLI), the history intact and the workers stopped."""
    from bo_search.search import runner
    from bo_search.search.experiment import AxDriver
    from bo_search.search.history import read_history
    from bo_search.search.workers import ray_is_initialized
    from bo_search.types import UserError

    def propose(self):
        raise ValueError("injected Ax failure\nsecond line")

    monkeypatch.setattr(AxDriver, "propose", propose)
    setup = runner.prepare(_search_args(tiny_llama, tmp_path, 3), "modelsize")
    with pytest.raises(UserError, match=r"the proposal step failed \(ValueError: injected Ax failure\)") as err:
        runner.run_search(setup, _modelsize_goal(setup), [])
    assert "\n" not in str(err.value)
    assert read_history(tmp_path / "h.csv").rows == [] and not ray_is_initialized()


def test_trial_timeout_follows_the_flag_or_the_first_trials():
    from bo_search.search.workers import TIMEOUT_FLOOR_S, TIMEOUT_UNMEASURED_S, parse_trial_delay, trial_timeout

    assert trial_timeout(None, []) == trial_timeout(None, [1.0, 2.0]) == TIMEOUT_UNMEASURED_S  # not measured yet
    assert trial_timeout(None, [1.0, 50.0, 2.0, 100.0]) == 500.0  # 10x the slowest of the first 3, later ones ignored
    assert trial_timeout(None, [1.0, 2.0, 3.0]) == TIMEOUT_FLOOR_S  # never below the floor
    assert trial_timeout(8.0, [1.0, 2.0, 3.0]) == 8.0  # --trial_timeout wins
    assert parse_trial_delay("") == (0.0, ()) and parse_trial_delay("1.5") == (1.5, ()) and parse_trial_delay("600@0,2") == (600.0, (0, 2))


def test_cancel_all_really_stops_the_running_trial(ray_cluster, tiny_llama, monkeypatch):
    """Issue 31, item 5: ``ray.cancel(force=True)`` raises for an actor task (and was swallowed), so the
    'cancelled' trial kept running. Now the worker running it is gone."""
    from bo_search.model import discover_layers, load_structure
    from bo_search.search.workers import TEST_TRIAL_DELAY_ENV

    monkeypatch.setenv(TEST_TRIAL_DELAY_ENV, "600")  # the trial sleeps: it is running when cancelled
    model, _ = load_structure(str(tiny_llama))
    plan = uniform_plan(discover_layers(model), LayerQuant(4, 32))
    pool = WorkerPool(_cfg(tiny_llama), num_workers=1)
    try:
        [slot] = pool.idle()
        pid = slot.info["pid"]
        pool.submit(slot, 7, plan)
        time.sleep(1.0)
        assert pool.cancel_all() == [7] and not pool.busy()
        deadline = time.time() + 30
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            assert time.time() < deadline, "the worker still runs the cancelled trial"
            time.sleep(0.2)
    finally:
        pool.shutdown()
