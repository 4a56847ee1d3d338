"""Ray workers that hold the model, and the pool that dispatches trials to them asynchronously.

The only module importing ray. One actor per listed GPU (``num_gpus=1``, pinned to its device), or
``num_workers`` CPU actors. Each actor builds a :class:`~bo_search.trial.ModelContext` once (model,
tokenised windows, saved original weights) and then runs trial after trial on it. A finished actor
gets its next trial at once; a dead actor is replaced and its trial reported failed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bo_search.ray_env import apply_loopback_env, local_init_kwargs
from bo_search.trial import EvalConfig
from bo_search.types import QuantPlan, TrialResult, UserError

log = logging.getLogger(__name__)


def default_threads(num_workers: int, on_gpu: bool = False) -> int:
    """Torch threads per worker: the cores shared out, CPU workers leaving one core to the driver's Ax
    proposals (oversubscribed OpenMP threads spin and slow everything down; measured: plan
    application 0.3 s -> 5-11 s)."""
    return max(1, ((os.cpu_count() or 1) - (0 if on_gpu else 1)) // num_workers)


class TrialWorker:
    """Body of a Ray actor (wrapped with ``ray.remote`` by the pool). Subclass it to inject faults in tests."""

    def __init__(self, cfg: EvalConfig, worker_id: str, threads: int | None = None):
        import torch

        from bo_search.cli import setup_logging

        setup_logging(False)
        if threads:
            torch.set_num_threads(threads)
        from bo_search.trial import ModelContext

        self.worker_id = worker_id
        t0 = time.perf_counter()
        self.ctx = ModelContext(cfg, heldout=True)
        self.load_s = time.perf_counter() - t0

    def info(self) -> dict[str, Any]:
        import ray
        import torch

        return {
            "worker_id": self.worker_id,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "load_s": self.load_s,
            "threads": torch.get_num_threads(),
            "device": self.ctx.cfg.device,
        }

    def run(self, trial_index: int, plan_json: str) -> TrialResult:
        return self.ctx.run_trial(trial_index, QuantPlan.loads(plan_json), self.worker_id)

    def measure(self, plan_json: str) -> dict[str, Any]:
        """Size and search-split perplexity of a plan (baselines)."""
        return self.ctx.measure(QuantPlan.loads(plan_json), heldout=False)

    def heldout(self, plan_json: str) -> float | None:
        """Held-out perplexity of a plan (for final reports); None with --heldout_tokens 0."""
        row = self.ctx.measure(QuantPlan.loads(plan_json), heldout=True)
        return None if row["ppl_heldout"] is None else float(row["ppl_heldout"])


@dataclass
class _Slot:
    worker_id: str
    actor: Any
    busy_with: int | None = None  # trial index
    ref: Any = None
    started: float = 0.0
    idle_since: float = 0.0


def ray_is_initialized() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def start_ray(num_cpus: int, num_gpus: int, address: str | None, object_store_mb: int = 256) -> None:
    """Start a local loopback-only Ray (default) or join ``address`` (e.g. ``auto``)."""
    if address:
        import ray

        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"cannot join the Ray cluster at --ray_address {address}: {str(err).splitlines()[0]}") from None
        return
    apply_loopback_env()
    import ray

    kwargs: dict[str, Any] = local_init_kwargs(num_cpus, object_store_mb * 1024 * 1024, num_gpus=num_gpus)
    ray.init(**kwargs, logging_level=logging.WARNING, configure_logging=True)


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
    ):
        self.cfg = cfg
        self.gpus = list(gpus or [])
        n = len(self.gpus) if self.gpus else num_workers
        if n < 1:
            raise UserError(f"--num_workers must be at least 1, got {num_workers}")
        self._own_ray = False
        if not ray_is_initialized():  # checked without importing ray: the loopback env must come first
            cpus = os.cpu_count() or 1
            start_ray(num_cpus=max(cpus, n), num_gpus=len(self.gpus), address=ray_address, object_store_mb=object_store_mb)
            self._own_ray = not ray_address
        import ray

        if self.gpus:
            visible = int(ray.cluster_resources().get("GPU", 0))
            if visible < len(self.gpus):
                raise UserError(f"--gpu_list names {len(self.gpus)} GPU(s) but the Ray cluster has {visible}")
        self.threads = threads_per_worker or default_threads(n, bool(self.gpus))
        self._remote = ray.remote(worker_cls)
        self._worker_cls = worker_cls
        self.slots: list[_Slot] = []
        self.restarts = 0
        for i in range(n):
            self.slots.append(_Slot(f"w{i}", self._spawn(i)))
        self.load_times: list[float] = []
        infos = ray.get([s.actor.info.remote() for s in self.slots])
        now = time.perf_counter()
        for s, info in zip(self.slots, infos):
            s.idle_since = now
            self.load_times.append(info["load_s"])
        self.infos = infos

    def _spawn(self, i: int) -> Any:
        cfg = self.cfg
        if self.gpus:
            # Ray sets CUDA_VISIBLE_DEVICES to the one GPU it assigns; inside the actor it is cuda:0.
            cfg = EvalConfig(**{**cfg.to_dict(), "device": "cuda:0"})
            opts: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
        else:
            cfg = EvalConfig(**{**cfg.to_dict(), "device": "cpu"})
            opts = {"num_cpus": 1}
        opts["max_concurrency"] = 1
        return self._remote.options(**opts).remote(cfg, f"w{i}", self.threads)

    @property
    def size(self) -> int:
        return len(self.slots)

    def idle(self) -> list[_Slot]:
        return [s for s in self.slots if s.busy_with is None]

    def busy(self) -> list[_Slot]:
        return [s for s in self.slots if s.busy_with is not None]

    def submit(self, slot: _Slot, trial_index: int, plan: QuantPlan) -> float:
        """Start a trial on an idle worker; returns how long the worker had been idle."""
        assert slot.busy_with is None
        slot.busy_with = trial_index
        slot.started = time.perf_counter()
        slot.ref = slot.actor.run.remote(trial_index, plan.dumps())
        return slot.started - slot.idle_since

    def wait(self, timeout: float) -> list[TrialResult]:
        """Results of trials that finished within ``timeout`` seconds (possibly none)."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        busy = self.busy()
        if not busy:
            time.sleep(min(timeout, 0.05))
            return []
        ready, _ = ray.wait([s.ref for s in busy], num_returns=len(busy), timeout=timeout)
        results = []
        for s in busy:
            if s.ref not in ready:
                continue
            idx = s.busy_with
            assert idx is not None
            try:
                res = ray.get(s.ref, timeout=5)
            except RayActorError as err:
                res = TrialResult(idx, "failed", reason=f"worker {s.worker_id} died: {_first_line(err)}", worker_id=s.worker_id)
                self._replace(s)
            except (RayTaskError, GetTimeoutError) as err:
                res = TrialResult(idx, "failed", reason=f"worker {s.worker_id} raised: {_first_line(err)}", worker_id=s.worker_id)
            s.busy_with, s.ref = None, None
            s.idle_since = time.perf_counter()
            results.append(res)
        return results

    def _replace(self, slot: _Slot) -> None:
        import ray

        self.restarts += 1
        log.warning("worker %s died; starting a replacement", slot.worker_id)
        try:
            ray.kill(slot.actor)
        except Exception:  # already gone
            pass
        slot.actor = self._spawn(int(slot.worker_id[1:]))

    def heldout(self, plans: Sequence[QuantPlan]) -> list[float | None]:
        """Held-out perplexity of several plans, spread over the workers (None with --heldout_tokens 0)."""
        import ray

        refs = [self.slots[i % len(self.slots)].actor.heldout.remote(p.dumps()) for i, p in enumerate(plans)]
        return [None if x is None else float(x) for x in ray.get(refs)]

    def measure(self, plans: Sequence[QuantPlan]) -> list[dict[str, Any]]:
        import ray

        refs = [self.slots[i % len(self.slots)].actor.measure.remote(p.dumps()) for i, p in enumerate(plans)]
        return list(ray.get(refs))

    def cancel_all(self) -> list[int]:
        import ray

        cancelled = []
        for s in self.busy():
            assert s.busy_with is not None
            cancelled.append(s.busy_with)
            try:
                ray.cancel(s.ref, force=True)
            except Exception:  # the task may have just finished
                pass
            s.busy_with, s.ref = None, None
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
