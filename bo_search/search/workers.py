"""Ray workers that hold the model, and the pool that dispatches trials to them asynchronously.

The only module importing ray. One actor per GPU (``num_gpus=1``: per GPU of the Ray cluster with
``--gpus``, wherever Ray places it, or per listed local GPU with ``--gpu_list``), or ``num_workers``
CPU actors. Each actor takes its device from Ray's assignment (Ray sets ``CUDA_VISIBLE_DEVICES`` to
the one GPU it gives the actor, so it computes on ``cuda:0``), builds a
:class:`~bo_search.trial.ModelContext` once (model, tokenised windows, saved original weights) and
then runs trial after trial on it. A finished actor gets its next trial at once.

A dead actor's trial is reported failed: "node lost" when its node left the cluster, else "worker
died". A replacement is requested at once; Ray places it when the cluster has room (a node joins),
and until then the search goes on with the workers that remain. :meth:`WorkerPool.unplaced_s` tells
the search how long it has had no worker at all, so it can stop with a clear message.

Over the ~400-line guide on purpose: this is the one module that imports ray (after
:func:`~bo_search.ray_env.apply_loopback_env`, which the loopback test relies on). The actor and the
pool that places, watches and replaces it share the placement and death rules; split, both halves
would touch ray.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from bo_search.cli import setup_logging
from bo_search.ray_env import apply_loopback_env, local_init_kwargs
from bo_search.trial import EvalConfig
from bo_search.types import QuantPlan, TrialResult, UserError

log = logging.getLogger(__name__)

#: Test-only: GPU-scheduled actors (``num_gpus=1``) compute on CPU, so that a cluster of nodes that
#: declare logical GPUs (``ray start --num-gpus 2``) can be tested on a machine without one. Read
#: by the driver; deliberately not a command-line flag and not in README.
TEST_GPU_AS_CPU_ENV = "BO_SEARCH_TEST_GPU_AS_CPU"
#: Test-only: seconds each trial sleeps before it runs (keeps trials in flight while a test kills a node
#: or interrupts the search), ``S`` for every trial or ``S@I,J`` for trials I and J only (a hang).
TEST_TRIAL_DELAY_ENV = "BO_SEARCH_TEST_TRIAL_DELAY_S"
#: a dead actor whose node is still alive after this many seconds crashed on its own ("worker died").
#: Ray's defaults mark a silent node dead after 5 missed health checks 3 s apart (plus a 10 s timeout).
NODE_LOSS_GRACE_S = 30.0
#: --trial_timeout auto: this multiple of the slowest of the first trials, never below the floor; until
#: those trials have finished, and for loading a model, the unmeasured timeout
TIMEOUT_FIRST_TRIALS = 3
TIMEOUT_FACTOR = 10.0
TIMEOUT_FLOOR_S = 300.0
TIMEOUT_UNMEASURED_S = 3600.0
#: worker starts (model loads) that fail in a row before the search stops
MAX_START_FAILURES = 3


def trial_timeout(explicit: float | None, first_durations: Sequence[float]) -> float:
    """Seconds a trial may run: ``--trial_timeout`` when given, else ``TIMEOUT_FACTOR`` times the slowest
    of the first ``TIMEOUT_FIRST_TRIALS`` finished trials (at least ``TIMEOUT_FLOOR_S``), and
    ``TIMEOUT_UNMEASURED_S`` until they have finished."""
    if explicit:
        return explicit
    if len(first_durations) < TIMEOUT_FIRST_TRIALS:
        return TIMEOUT_UNMEASURED_S
    return max(TIMEOUT_FLOOR_S, TIMEOUT_FACTOR * max(first_durations[:TIMEOUT_FIRST_TRIALS]))


def parse_trial_delay(spec: str) -> tuple[float, tuple[int, ...]]:
    """``TEST_TRIAL_DELAY_ENV``: 'S' (every trial) or 'S@I,J' (those trial indices) -> (S, indices)."""
    seconds, _, which = (spec or "0").partition("@")
    return float(seconds or 0), tuple(int(i) for i in which.split(",") if i.strip())


def default_threads(num_workers: int, on_gpu: bool = False) -> int:
    """Torch threads per worker: the cores shared out, CPU workers leaving one core to the driver's Ax
    proposals (oversubscribed OpenMP threads spin and slow everything down; measured: plan
    application 0.3 s -> 5-11 s)."""
    return max(1, ((os.cpu_count() or 1) - (0 if on_gpu else 1)) // num_workers)


class TrialWorker:
    """Body of a Ray actor (wrapped with ``ray.remote`` by the pool). Subclass it to inject faults in tests."""

    #: how long the pool waits for the cluster to mark a dead actor's node dead before it calls the
    #: death a crash of the worker itself (a fault-injecting subclass that crashes on purpose lowers it)
    node_loss_grace_s: float = NODE_LOSS_GRACE_S

    def __init__(
        self, cfg: EvalConfig, worker_id: str, threads: int | None = None, trial_delay_s: float = 0.0, delay_trials: tuple[int, ...] = ()
    ):
        import torch

        setup_logging(False)
        if threads:
            torch.set_num_threads(threads)
        self.placement = _placement()
        self.worker_id = placement_label(worker_id, self.placement)
        self.cfg = cfg
        self.load_s = 0.0
        self._delay = trial_delay_s  # test-only (TEST_TRIAL_DELAY_ENV, read by the driver)
        self._delay_trials = delay_trials  # only these trial indices (empty: every trial)

    def placed(self) -> dict[str, Any]:
        """Answers as soon as Ray has placed the actor (the constructor does no heavy work), so a
        placement timeout never counts the model's load time."""
        return self.placement

    def load(self) -> dict[str, Any]:
        """Load the model (once) and return :meth:`info`."""
        from bo_search.trial import ModelContext

        t0 = time.perf_counter()
        self.ctx = ModelContext(self.cfg, heldout=True)
        if not self.cfg.throughput_model:
            self.ctx.search_reference()  # what every trial's KL and NLL increase are measured against
        self.load_s = time.perf_counter() - t0
        return self.info()

    def info(self) -> dict[str, Any]:
        import torch

        return {
            **self.placement,
            "worker_id": self.worker_id,
            "pid": os.getpid(),
            "load_s": self.load_s,
            "threads": torch.get_num_threads(),
            "device": self.ctx.cfg.device,
            "dtype": str(next(self.ctx.model.parameters()).dtype).removeprefix("torch."),
        }

    def run(self, trial_index: int, plan_json: str) -> TrialResult:
        if self._delay and (not self._delay_trials or trial_index in self._delay_trials):
            log.warning("trial %d: test delay of %g s (%s)", trial_index, self._delay, TEST_TRIAL_DELAY_ENV)
            time.sleep(self._delay)
        return self.ctx.run_trial(trial_index, QuantPlan.loads(plan_json), self.worker_id)

    def measure(self, plan_json: str) -> dict[str, Any]:
        """Size and search-split perplexity of a plan (baselines)."""
        return self.ctx.measure(QuantPlan.loads(plan_json), heldout=False)

    def rescore(self, plan_json: str, split: str, threads: int | None = None, with_search: bool = False) -> dict[str, Any]:
        """A finalist on the validation or test split (see ModelContext.rescore); ``threads``: torch
        threads for this call (the search is over, so the driver's core is free)."""
        import torch

        before = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            return self.ctx.rescore(QuantPlan.loads(plan_json), split, with_search)
        finally:
            torch.set_num_threads(before)

    def heldout(self, plan_json: str) -> float | None:
        """Held-out perplexity of a plan (for final reports); None with --heldout_tokens 0."""
        row = self.ctx.measure(QuantPlan.loads(plan_json), heldout=True)
        return None if row["ppl_heldout"] is None else float(row["ppl_heldout"])


def _placement() -> dict[str, Any]:
    """Where this actor runs: node id and IP, and the GPU ids Ray assigned it (empty on CPU)."""
    try:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }
    except Exception:  # built outside Ray (a unit test constructing the class directly)
        return {"node_id": "", "node_ip": "", "gpu_ids": []}


def placement_label(worker_id: str, placement: dict[str, Any]) -> str:
    """``w0@10.0.0.7/3f2a9c:gpu1``: worker, node IP / node id prefix, and Ray's GPU id (or ``cpu``).
    The CSV ``worker_id`` column holds it, so every trial says where it ran."""
    if not placement.get("node_id"):
        return worker_id
    gpus = placement.get("gpu_ids") or []
    where = "gpu" + "+".join(gpus) if gpus else "cpu"
    return f"{worker_id}@{placement['node_ip']}/{placement['node_id'][:6]}:{where}"


@dataclass
class _Slot:
    index: int
    worker_id: str
    actor: Any
    busy_with: int | None = None  # trial index
    ref: Any = None
    started: float = 0.0
    idle_since: float = 0.0
    #: the actor's ``placed`` call (resolves once Ray places it) and ``load`` call (the model is loaded:
    #: the slot takes trials from then on)
    placed_ref: Any = None
    placed: bool = False
    ready_ref: Any = None
    ready: bool = False
    info: dict[str, Any] | None = None
    node_id: str = ""
    #: the actor died mid-trial; the reason (node lost or worker died) is not settled yet
    dead_err: BaseException | None = None
    dead_since: float = 0.0
    #: when Ray placed a replacement (its model load is timed from then); 0 = not seen placed yet
    placed_at: float = 0.0


def ray_is_initialized() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


HEAD_HINT = "start a head there first (ray start --head --port 6379), then pass --ray_address HOST:6379 (or auto on the head)"


def _check_address_reachable(address: str) -> None:
    """A HOST:PORT address that nothing listens on fails in a second with one line, instead of Ray's
    long connection retries. Connects only to the address the user gave."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # 'auto', 'ray://...': Ray resolves and reports these itself
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3):
            pass
    except OSError as err:
        raise UserError(f"--ray_address {address}: no Ray head answers there ({err.strerror or err}); {HEAD_HINT}") from None


def start_ray(num_cpus: int, num_gpus: int | None, address: str | None, object_store_mb: int = 256) -> None:
    """Start a local loopback-only Ray (default) or join ``address`` (e.g. ``auto``). ``num_gpus``
    None lets a local Ray count the machine's GPUs itself."""
    if address:
        _check_address_reachable(address)
        import ray

        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"cannot join the Ray cluster at --ray_address {address}: {str(err).splitlines()[0]}; {HEAD_HINT}") from None
        return
    apply_loopback_env()
    import ray

    kwargs: dict[str, Any] = local_init_kwargs(num_cpus, object_store_mb * 1024 * 1024, num_gpus=num_gpus)
    ray.init(**kwargs, logging_level=logging.WARNING, configure_logging=True)


def parse_cluster_gpus(spec: str | None, gpu_list: str | None = None) -> int | str | None:
    """``--gpus``: 'all' or a positive count (never together with ``--gpu_list``)."""
    if spec is None:
        return None
    if gpu_list:
        raise UserError(
            "--gpus and --gpu_list cannot be combined: --gpus N|all counts the Ray cluster's GPUs, "
            "--gpu_list names this machine's; give one"
        )
    if spec.strip().lower() == "all":
        return "all"
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"--gpus {spec!r}: expected 'all' or a positive number of GPUs, such as --gpus 8")
    return n


def _cluster_text(resources: dict[str, float]) -> str:
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 0))
    return f"{gpus} GPU(s) and {cpus} CPU(s)"


class WorkerPool:
    """Actors, dispatch, results. ``submit`` to an idle worker; ``wait`` for finished trials."""

    def __init__(
        self,
        cfg: EvalConfig,
        num_workers: int = 1,
        gpus: Sequence[int] | None = None,
        ray_address: str | None = None,
        threads_per_worker: int | None = None,
        worker_cls: type[TrialWorker] = TrialWorker,
        object_store_mb: int = 256,
        cluster_gpus: int | str | None = None,
        placement_timeout: float = 600.0,
        node_loss_grace_s: float | None = None,
        wait: bool = True,
        trial_timeout: float | None = None,
    ):
        self.cfg = cfg
        #: --trial_timeout (None: derived from the first trials, see ``trial_timeout``)
        self.trial_timeout = trial_timeout
        self._first_durations: list[float] = []
        #: worker starts that failed in a row; at MAX_START_FAILURES the pool is ``broken``
        self.start_failures = 0
        #: why the pool cannot go on ("" while it can): the search stops with this line
        self.broken = ""
        self.node_loss_grace_s = worker_cls.node_loss_grace_s if node_loss_grace_s is None else node_loss_grace_s
        self.gpus = list(gpus or [])
        self.on_gpu = bool(self.gpus) or cluster_gpus is not None
        self.placement_timeout = placement_timeout
        n = len(self.gpus) if self.gpus else num_workers
        if n < 1 and cluster_gpus is None:
            raise UserError(f"--num_workers must be at least 1, got {num_workers}")
        self._joined = bool(ray_address)
        self._start_ray(n, ray_address, cluster_gpus, object_store_mb)
        import ray

        n = self._worker_count(n, cluster_gpus)
        self.threads = threads_per_worker or default_threads(n, self.on_gpu)
        self._remote = ray.remote(worker_cls)
        self._worker_cls = worker_cls
        self._gpu_as_cpu = bool(os.environ.get(TEST_GPU_AS_CPU_ENV))
        self._trial_delay_s, self._delay_trials = parse_trial_delay(os.environ.get(TEST_TRIAL_DELAY_ENV, ""))
        self.slots: list[_Slot] = [self._new_slot(i) for i in range(n)]
        self.restarts = 0
        self._none_ready_since: float | None = None
        self._nodes_checked = 0.0
        self._alive: dict[str, bool] = {}
        refs = [s.placed_ref for s in self.slots]
        placed, pending = ray.wait(refs, num_returns=len(refs), timeout=placement_timeout)
        if pending:
            raise UserError(
                f"{len(pending)} of {n} worker(s) could not be placed within {placement_timeout:g} s "
                f"(the Ray cluster has {_cluster_text(ray.cluster_resources())}); free resources or ask for fewer workers"
            )
        try:
            self.driver_node = ray.get_runtime_context().get_node_id()
        except Exception:  # pragma: no cover - old Ray
            self.driver_node = ""
        if wait:
            self.wait_ready()

    def _start_ray(self, n: int, ray_address: str | None, cluster_gpus: int | str | None, object_store_mb: int) -> None:
        """Start (or join) Ray unless this process is already connected."""
        if not ray_is_initialized():  # checked without importing ray: the loopback env must come first
            cpus = os.cpu_count() or 1
            if self.gpus and not ray_address:
                # Ray hands out the ids it finds in CUDA_VISIBLE_DEVICES: so --gpu_list 2,3 gives GPUs 2 and 3.
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.gpus)
            start_ray(
                num_cpus=max(cpus, n),
                num_gpus=None if cluster_gpus is not None else len(self.gpus),
                address=ray_address,
                object_store_mb=object_store_mb,
            )

    def _worker_count(self, n: int, cluster_gpus: int | str | None) -> int:
        """How many workers the cluster can hold: one per GPU asked for, checked against what Ray has."""
        import ray

        resources = ray.cluster_resources()
        have = int(resources.get("GPU", 0))
        if cluster_gpus is not None:
            if have == 0:
                raise UserError(
                    f"--gpus {cluster_gpus}: the Ray cluster has no GPU ({_cluster_text(resources)}); join a cluster with GPU nodes (--ray_address) or use --num_workers"
                )
            if cluster_gpus != "all" and int(cluster_gpus) > have:
                raise UserError(
                    f"--gpus {cluster_gpus}: the Ray cluster has {_cluster_text(resources)}; ask for at most --gpus {have}, or --gpus all"
                )
            n = have if cluster_gpus == "all" else int(cluster_gpus)
        elif self.gpus and have < len(self.gpus):
            raise UserError(f"--gpu_list names {len(self.gpus)} GPU(s) but the Ray cluster has {have}")
        return n

    def wait_ready(self) -> None:
        """Block until every worker has loaded its model (``wait=False`` lets the caller set up Ax
        meanwhile, so the workers do not sit idle waiting for the first proposal); a UserError after
        ``TIMEOUT_UNMEASURED_S``."""
        self._poll_pending(block=True)

    def timeout_s(self) -> float:
        """Seconds a trial may run now (see ``trial_timeout``)."""
        return trial_timeout(self.trial_timeout, self._first_durations)

    def _load_timeout_s(self) -> float:
        """Seconds a replacement may take to load its model once placed: a multiple of the slowest
        first load (at least the floor), ``TIMEOUT_UNMEASURED_S`` before any load was measured."""
        loads = self.load_times
        return max(TIMEOUT_FLOOR_S, TIMEOUT_FACTOR * max(loads)) if loads else TIMEOUT_UNMEASURED_S

    @property
    def infos(self) -> list[dict[str, Any]]:
        """``info`` of every loaded worker."""
        return [s.info for s in self.slots if s.info]

    @property
    def load_times(self) -> list[float]:
        return [i["load_s"] for i in self.infos]

    def _new_slot(self, i: int) -> _Slot:
        cfg = self.cfg
        if self.on_gpu:
            # Ray sets CUDA_VISIBLE_DEVICES to the one GPU it assigns; inside the actor it is cuda:0.
            device = "cpu" if self._gpu_as_cpu else "cuda:0"
            cfg = EvalConfig(**{**cfg.to_dict(), "device": device})
            opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
        else:
            cfg = EvalConfig(**{**cfg.to_dict(), "device": "cpu"})
            opts = {"num_cpus": 1}
        opts["max_concurrency"] = 1
        actor: Any = self._remote.options(**opts).remote(cfg, f"w{i}", self.threads, self._trial_delay_s, self._delay_trials)
        placed_ref = actor.placed.remote()  # actor calls run in order: placed, then load
        return _Slot(i, f"w{i}", actor, placed_ref=placed_ref, ready_ref=actor.load.remote())

    def _poll_pending(self, block: bool = False) -> None:
        """Mark placed (loaded) actors ready. A replacement that cannot be placed yet stays pending."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        pending = [s for s in self.slots if not s.ready and s.ready_ref is not None]
        if not pending:
            return
        wait_s = TIMEOUT_UNMEASURED_S if block else 0
        ready, _ = ray.wait([s.ready_ref for s in pending], num_returns=len(pending), timeout=wait_s)
        if block and len(ready) < len(pending):
            late = ", ".join(s.worker_id for s in pending if s.ready_ref not in ready)
            raise UserError(f"worker(s) {late} did not load the model within {wait_s:.0f} s; check the checkpoint and the workers' logs")
        for s in pending:
            if s.ready_ref not in ready:
                self._check_load_time(s)
                continue
            try:
                info = ray.get(s.ready_ref)
            except (RayActorError, RayTaskError) as err:
                if block:
                    raise UserError(f"worker {s.worker_id} failed to start: {_first_line(err)}") from None
                self._start_failed(s, _first_line(err))
                continue
            self.start_failures = 0
            s.info, s.ready, s.ready_ref = info, True, None
            s.worker_id, s.node_id = info["worker_id"], info.get("node_id", "")
            s.idle_since = time.perf_counter()
            if not block:
                log.warning("worker %s ready (load %.1f s)", s.worker_id, info["load_s"])

    def _check_load_time(self, s: _Slot) -> None:
        """A placed replacement that takes too long to load its model counts as a failed start."""
        import ray

        if not s.placed_at:
            if s.placed_ref is None or not ray.wait([s.placed_ref], timeout=0)[0]:
                return
            s.placed_at = time.perf_counter()
        limit = self._load_timeout_s()
        if time.perf_counter() - s.placed_at > limit:
            self._start_failed(s, f"did not load the model within {limit:.0f} s")

    def _start_failed(self, s: _Slot, why: str) -> None:
        """Try again, unless MAX_START_FAILURES starts failed in a row: then the pool is broken."""
        self.start_failures += 1
        if self.start_failures < MAX_START_FAILURES:
            log.warning("replacement worker %s failed to start (%s); trying again", s.worker_id, why)
            self._respawn(s)
            return
        self.broken = (
            f"{self.start_failures} worker starts failed in a row (last: worker {s.worker_id}: {why}); "
            "every finished trial is in the history: fix the cause and run the same command to resume"
        )
        self._retire(s)

    def _retire(self, s: _Slot) -> None:
        """Kill a slot's actor and leave the slot empty (no replacement)."""
        import ray

        try:
            ray.kill(s.actor, no_restart=True)
        except Exception:  # already gone
            pass
        s.busy_with = s.ref = s.ready_ref = s.placed_ref = None
        s.ready = s.placed = False

    @property
    def size(self) -> int:
        return len(self.slots)

    def idle(self) -> list[_Slot]:
        return [s for s in self.slots if s.ready and s.busy_with is None]

    def busy(self) -> list[_Slot]:
        return [s for s in self.slots if s.busy_with is not None]

    def unplaced_s(self) -> float:
        """Seconds for which no worker has been placed on the cluster (0 while any is)."""
        import ray

        for s in self.slots:
            if not s.placed and s.placed_ref is not None:
                done, _ = ray.wait([s.placed_ref], timeout=0)
                s.placed = bool(done)
        if any(s.placed or s.ready for s in self.slots):
            self._none_ready_since = None
            return 0.0
        now = time.perf_counter()
        if self._none_ready_since is None:
            self._none_ready_since = now
        return now - self._none_ready_since

    def submit(self, slot: _Slot, trial_index: int, plan: QuantPlan) -> float:
        """Start a trial on an idle worker; returns how long the worker had been idle."""
        assert slot.busy_with is None and slot.ready
        slot.busy_with = trial_index
        slot.started = time.perf_counter()
        slot.ref = slot.actor.run.remote(trial_index, plan.dumps())
        return slot.started - slot.idle_since

    def wait(self, timeout: float) -> list[TrialResult]:
        """Results of trials that finished within ``timeout`` seconds (possibly none)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        self._poll_pending()
        results = self._classify_dead() + self._timed_out()
        running = [s for s in self.busy() if s.ref is not None]
        if not running:
            time.sleep(min(timeout, 0.05))
            return results
        ready, _ = ray.wait([s.ref for s in running], num_returns=len(running), timeout=timeout)
        for s in running:
            if s.ref not in ready:
                continue
            idx = s.busy_with
            assert idx is not None
            try:
                res = ray.get(s.ref, timeout=5)
            except RayActorError as err:
                # Why did it die? Ray may report the actor dead a moment before the cluster marks its
                # node dead, so the reason is settled by _classify_dead, without blocking the others.
                s.ref, s.dead_err, s.dead_since = None, err, time.perf_counter()
                continue
            except (RayTaskError, GetTimeoutError) as err:
                res = TrialResult(idx, "failed", reason=f"worker {s.worker_id} raised: {_first_line(err)}", worker_id=s.worker_id)
            s.busy_with, s.ref = None, None
            s.idle_since = time.perf_counter()
            if len(self._first_durations) < TIMEOUT_FIRST_TRIALS:
                self._first_durations.append(s.idle_since - s.started)
            results.append(res)
        return results + self._classify_dead()

    def _timed_out(self) -> list[TrialResult]:
        """Failed results (reason "timeout: ...") for trials running longer than ``timeout_s``; their
        workers are killed and replaced (a running actor task cannot be interrupted otherwise)."""
        limit, now = self.timeout_s(), time.perf_counter()
        out = []
        for s in self.busy():
            if s.ref is None or now - s.started <= limit:
                continue
            idx = s.busy_with
            assert idx is not None
            how = "--trial_timeout" if self.trial_timeout else f"--trial_timeout auto: {TIMEOUT_FACTOR:g}x the slowest first trial"
            reason = f"timeout: trial ran over {limit:.0f} s ({how}); worker {s.worker_id} was replaced"
            out.append(TrialResult(idx, "failed", reason=reason, worker_id=s.worker_id))
            s.busy_with, s.ref = None, None
            self._replace(s, "timed out")
        return out

    def _classify_dead(self) -> list[TrialResult]:
        """Failed results for trials whose actor died: "node lost" once Ray marks the actor's node dead
        (or says so), "worker died" when the node is still alive after ``node_loss_grace_s``."""
        import ray

        dead = [s for s in self.slots if s.dead_err is not None]
        if not dead:
            return []
        now = time.perf_counter()
        if now - self._nodes_checked >= 0.5:
            self._nodes_checked = now
            self._alive = {n["NodeID"]: bool(n["Alive"]) for n in ray.nodes()}
        out = []
        for s in dead:
            err, idx = s.dead_err, s.busy_with
            assert idx is not None and err is not None
            text = str(err).lower()
            lost = "node has died" in text or (s.node_id and not self._alive.get(s.node_id, False))
            if not lost and now - s.dead_since < self.node_loss_grace_s:
                continue
            if lost:
                reason = f"node lost: worker {s.worker_id}'s node left the Ray cluster"
            else:
                reason = f"worker {s.worker_id} died: {_first_line(err)}"
            out.append(TrialResult(idx, "failed", reason=reason, worker_id=s.worker_id))
            s.dead_err, s.busy_with = None, None
            self._replace(s)
        return out

    def _respawn(self, slot: _Slot) -> None:
        import ray

        try:
            ray.kill(slot.actor)
        except Exception:  # already gone
            pass
        fresh = self._new_slot(slot.index)
        slot.actor, slot.ready_ref, slot.ready, slot.info, slot.node_id = fresh.actor, fresh.ready_ref, False, None, ""
        slot.placed_ref, slot.placed, slot.placed_at = fresh.placed_ref, False, 0.0
        slot.busy_with, slot.ref = None, None

    def _replace(self, slot: _Slot, what: str = "died") -> None:
        self.restarts += 1
        log.warning("worker %s %s; requesting a replacement (it starts when the cluster has room)", slot.worker_id, what)
        self._respawn(slot)
        slot.worker_id = f"w{slot.index}"  # until the replacement reports where it runs

    def has_ready(self) -> bool:
        return any(s.ready for s in self.slots)

    def _ready_slots(self) -> list[_Slot]:
        ready = [s for s in self.slots if s.ready]
        if not ready:
            raise UserError("no worker is placed on the Ray cluster; add a node (ray start --address HEAD:PORT) and resume")
        return ready

    def heldout(self, plans: Sequence[QuantPlan]) -> list[float | None]:
        """Held-out perplexity of several plans, spread over the workers (None with --heldout_tokens 0,
        and None with a warning when the evaluation timed out)."""
        ready = self._ready_slots()
        refs = [ready[i % len(ready)].actor.heldout.remote(p.dumps()) for i, p in enumerate(plans)]
        scale = max(1.0, self.cfg.heldout_tokens / self.cfg.eval_tokens)
        try:
            return [None if x is None else float(x) for x in self._get(refs, scale)]
        except UserError as err:
            log.warning("held-out perplexity not measured: %s", err)
            return [None] * len(plans)

    def rescore(self, plans: Sequence[QuantPlan], split: str, with_search: Sequence[bool] = ()) -> Iterator[tuple[int, dict[str, Any]]]:
        """Re-score plans on ``split`` over the ready workers, one at a time each; yields (index into
        ``plans``, result) as they finish; a result with ``error`` when its worker raised or died.
        Once the search is over the driver needs no core, so a local CPU worker may use the cores
        left to it. ``with_search[i]``: also score plan i on the search split."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        ready = self._ready_slots()
        threads = None
        if not self.on_gpu and not self._joined:
            threads = max(1, (os.cpu_count() or 1) // len(ready))
        todo = list(enumerate(plans))
        running: dict[Any, tuple[int, _Slot]] = {}
        free = list(ready)
        while todo or running:
            while todo and free:
                i, plan = todo.pop(0)
                slot = free.pop(0)
                also = bool(with_search[i]) if i < len(with_search) else False
                running[slot.actor.rescore.remote(plan.dumps(), split, threads, also)] = (i, slot)
            if not running:  # every worker died
                for i, _plan in todo:
                    yield i, {"error": "no worker left"}
                return
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                i, slot = running.pop(ref)
                try:
                    result = ray.get(ref)
                    free.append(slot)
                except (RayActorError, RayTaskError) as err:
                    result = {"error": f"worker {slot.worker_id}: {_first_line(err)}"}
                    if isinstance(err, RayTaskError):
                        free.append(slot)
                yield i, result

    def measure(self, plans: Sequence[QuantPlan]) -> list[dict[str, Any]]:
        ready = self._ready_slots()
        refs = [ready[i % len(ready)].actor.measure.remote(p.dumps()) for i, p in enumerate(plans)]
        return list(self._get(refs, 1.0))

    def _get(self, refs: list[Any], scale: float) -> list[Any]:
        """``ray.get`` bounded by the trial timeout (times ``scale``, for longer evaluations)."""
        import ray
        from ray.exceptions import GetTimeoutError

        per_worker = -(-len(refs) // max(1, len(self._ready_slots())))  # plans are dealt round-robin
        limit = scale * self.timeout_s() * per_worker
        try:
            return list(ray.get(refs, timeout=limit))
        except GetTimeoutError:
            raise UserError(f"an evaluation on the workers did not finish within {limit:.0f} s (--trial_timeout)") from None

    def placement_lines(self) -> list[str]:
        """One line per worker: where it runs, its device and dtype (the run summary prints them)."""
        out = []
        for s in self.slots:
            if not s.ready or not s.info:
                out.append(f"  {s.worker_id}: waiting for room on the cluster")
                continue
            i = s.info
            gpu = f"GPU {'+'.join(i['gpu_ids'])}" if i.get("gpu_ids") else "no GPU"
            out.append(
                f"  {s.worker_id}: node {i.get('node_ip', '?')} ({i.get('node_id', '')[:6]}), {gpu}, {i['device']}, {i['dtype']}, load {i['load_s']:.1f} s"
            )
        return out

    def cancel_all(self) -> list[int]:
        """Stop every running trial now (the search is ending) and return their indices. Ray cannot
        stop a running actor task: ``ray.cancel`` refuses ``force=True`` for one (ValueError), and
        without it only sets a flag the task would have to poll. So each busy worker is killed, and
        its slot left empty."""
        cancelled = []
        for s in self.busy():
            assert s.busy_with is not None
            cancelled.append(s.busy_with)
            self._retire(s)
        return cancelled

    def shutdown(self) -> None:
        import ray

        for s in self.slots:
            try:
                ray.kill(s.actor)
            except Exception:  # already gone
                pass
        if ray.is_initialized():
            ray.shutdown()  # stops a cluster we started; only disconnects from a joined one


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray's task errors put the user exception last.
    return (lines[-1] if lines else type(err).__name__)[:300]
