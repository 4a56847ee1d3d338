"""What the driver process of a search knows: its options (:class:`SearchOptions`, frozen and
validated, made once from the flags) and :class:`Setup` (the model structure, space and sizes plus
the history). Below the runner: the search's modules read these, never the runner or the flags.

Imports neither torch nor ray."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bo_search.search.history import HistoryLock, HistoryRow
from bo_search.search.strategies import DEFAULT_STRATEGY
from bo_search.sensitivity.table import Sensitivity
from bo_search.structure import Structure
from bo_search.types import UserError


@dataclass(frozen=True)
class SearchOptions:
    """The search's own flags (``search.flags``), with the flags' defaults for a command that lacks
    one. Model, space and evaluation flags are the structure's (``Structure.eval_cfg``)."""

    num_trials: int = 20
    history_output: str = ""
    resume: bool = False
    change_limit: bool = False
    change_compute_dtype: bool = False
    #: --initial_samples as given (each command has its own default; "" when a command has none)
    initial_samples: str = ""
    seed: int = 0
    max_failure_rate: float = 0.5
    best_plan_output: str | None = None
    #: finalists re-scored on the validation split (0: none; only size-limited searches have the flag)
    finalists: int = 0
    strategy: str = DEFAULT_STRATEGY
    prior: str = "auto"
    ts_temper: float = 0.25
    ts_shared_sd: float = 0.1
    ts_prior_sd: float = 0.2
    encoding: str = "relaxed"
    num_restarts: int = 4
    raw_samples: int = 256
    n_sobol: int = 4
    gpus: str | None = None
    gpu_list: str | None = None
    num_workers: int = 1
    ray_address: str | None = None
    placement_timeout: float = 600.0
    trial_timeout: float | None = None
    threads_per_worker: int | None = None

    def __post_init__(self) -> None:
        if self.num_trials < 1:
            raise UserError(f"--num_trials must be at least 1, got {self.num_trials}")
        if not 0 < self.max_failure_rate <= 1:
            raise UserError(f"--max_failure_rate must be in (0, 1], got {self.max_failure_rate}")
        if self.placement_timeout <= 0:
            raise UserError(f"--placement_timeout must be positive (seconds), got {self.placement_timeout:g}")

    @classmethod
    def from_args(cls, args: argparse.Namespace | SearchOptions) -> SearchOptions:
        """The options among parsed flags (the others keep their defaults)."""
        if isinstance(args, SearchOptions):
            return args
        given = vars(args)
        return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})

    @property
    def on_gpu(self) -> bool:
        """Whether GPUs were asked for (``--gpus`` or ``--gpu_list``)."""
        return bool(self.gpu_list) or self.gpus is not None


@dataclass
class Setup(Structure):
    """What the driver process knows: the structure, space and sizes, the options, plus the history."""

    options: SearchOptions = field(default_factory=SearchOptions)
    history_path: Path = Path()
    history_rows: list[HistoryRow] = field(default_factory=list)
    #: sensitivity tables computed in this process, by method (auto seeds and the prior share one)
    tables: dict[str, Sensitivity] = field(default_factory=dict)
    lock: HistoryLock | None = None
    #: the weights' content and evaluation settings, recorded on every row (search/identity.py)
    identity: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_structure(cls, st: Structure, args: argparse.Namespace | SearchOptions, **history: Any) -> Setup:
        return cls(**{f.name: getattr(st, f.name) for f in dataclasses.fields(Structure)}, options=SearchOptions.from_args(args), **history)

    def release(self) -> None:
        """Release the history's lock (a refusal after ``prepare``: the next command, in this process
        too, may take it). Idempotent; ``run_search`` releases it as well."""
        if self.lock is not None:
            self.lock.release()
