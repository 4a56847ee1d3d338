"""The Ax experiment of record: what a search optimises (:class:`Goal`), the wrapper over the Ax
``Client`` (:class:`AxDriver`: parameters, seeds, completion, failure), and attaching a resumed
search's history to it.

Imports neither torch nor ray."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bo_search.budget import SIZE_METRIC, SizeLimit
from bo_search.search.history import HistoryRow
from bo_search.search.metric_registry import METRICS, RESUMED_METRICS
from bo_search.search.strategies import DriverConfig, make_generation_strategy
from bo_search.space import SearchSpace, ax_parameters, from_ax, to_ax
from bo_search.types import UserError

if TYPE_CHECKING:
    from bo_search.search.setup import Setup


@dataclass(frozen=True)
class Goal:
    """What the search optimises and under which constraint."""

    objective: str  # Ax metric name(s): "kl" or "nll" (minimised), "throughput" (maximised), or "kl, model_size_gb" (Pareto)
    minimize: bool
    constraint_metric: str  # "model_size_gb", "ppl", or "" (Pareto: none)
    limit: float  # constraint: metric <= limit
    search: str  # modelsize | throughput | pareto (recorded in the CSV)
    #: multi-objective only: objective thresholds (metric <= value), the corner of the region of interest
    thresholds: tuple[tuple[str, float], ...] = ()

    @property
    def multi(self) -> bool:
        return "," in self.objective

    @property
    def size_limit(self) -> SizeLimit | None:
        """The size limit of a size-limited search (None for the other goals)."""
        return SizeLimit(self.limit) if self.constraint_metric == SIZE_METRIC else None

    def feasible(self, row: HistoryRow) -> bool:
        """Whether a completed row meets the goal's limit (a Pareto search has none)."""
        if self.multi:
            return True
        limit = self.size_limit
        if limit is not None:
            return limit.holds(row.model_size)
        return row.cal_PPL is not None and row.cal_PPL <= self.limit


class AxDriver:
    """A thin wrapper over the Ax ``Client`` speaking in tunable-parameter dicts."""

    def __init__(self, space: SearchSpace, goal: Goal, cfg: DriverConfig, node: Any = None):
        import warnings

        from ax.api.client import Client
        from ax.api.configs import ChoiceParameterConfig, RangeParameterConfig
        from ax.utils.common.logger import set_ax_logger_levels

        set_ax_logger_levels(logging.ERROR)  # e.g. the expected 'missing metrics' of over-limit proposals
        warnings.filterwarnings("ignore", module="ax")
        warnings.filterwarnings("ignore", module="botorch")
        warnings.filterwarnings("ignore", module="linear_operator")
        warnings.filterwarnings("ignore", module="gpytorch")
        self.space, self.goal, self.cfg = space, goal, cfg
        if not space.tunable:
            raise UserError(f"parameter space {space.source} has no tunable parameter: every entry is fixed")
        params: list[Any] = []
        for ap in ax_parameters(space, cfg.encoding):
            if ap.kind == "float":
                params.append(RangeParameterConfig(name=ap.name, bounds=(0.0, 1.0), parameter_type="float"))
            else:
                params.append(ChoiceParameterConfig(name=ap.name, values=list(ap.values), parameter_type="int", is_ordered=True))
        self.client = Client(random_seed=cfg.seed)
        self.client.configure_experiment(parameters=params, name=f"bo_search-{goal.search}")
        if goal.multi:
            objective = ", ".join("-" + name.strip() for name in goal.objective.split(","))
            # In Ax's multi-objective form a bound on an objective metric is that objective's threshold.
            constraints = [f"{name} <= {value!r}" for name, value in goal.thresholds]
        else:
            objective = ("-" if goal.minimize else "") + goal.objective
            constraints = [f"{goal.constraint_metric} <= {goal.limit!r}"]
        self.client.configure_optimization(objective=objective, outcome_constraints=constraints)
        self.node = node
        self.client.set_generation_strategy(make_generation_strategy(cfg, node))

    def attach(self, values: Mapping[str, int]) -> int:
        return self.client.attach_trial(parameters=to_ax(self.space, values, self.cfg.encoding))

    def propose(self) -> tuple[int, dict[str, int], str] | None:
        """One new trial: (index, tunable values, generation node name), or None if Ax gave none."""
        trials = self.client.get_next_trials(max_trials=1)
        if not trials:
            return None
        idx, params = next(iter(trials.items()))
        node = self.client._experiment.trials[idx].generator_runs[0]._generation_node_name or "?"
        return idx, from_ax(self.space, params, self.cfg.encoding), node.lower()

    def complete(self, index: int, data: Mapping[str, float | tuple[float, float | None]]) -> None:
        raw = {k: (v if isinstance(v, tuple) else float(v)) for k, v in data.items()}
        self.client.complete_trial(trial_index=index, raw_data=raw)  # type: ignore[arg-type]

    def fail(self, index: int, reason: str) -> None:
        self.client.mark_trial_failed(trial_index=index, failed_reason=reason)

    def abandon(self, index: int) -> None:
        self.client.mark_trial_abandoned(trial_index=index)


def ax_data(
    metrics: Mapping[str, float], sems: Mapping[str, float], size_gb: float, strategy: str
) -> dict[str, float | tuple[float, float | None]]:
    """A trial's data for Ax. The NLL and KL standard errors are those of the damage across the
    search windows (how far the score may sit from the plan's damage on other text): the Thompson
    model takes them as each measurement's noise. GP keeps inferring one noise level for them, as
    before (Ax's GP would treat given standard errors as the whole noise). Measured throughput
    always carries its spread over repeats."""
    data: dict[str, float | tuple[float, float | None]] = {}
    for name, value in metrics.items():
        sem = sems.get(name)
        m = METRICS.get(name)
        use_sem = sem is not None and math.isfinite(sem) and m is not None and m.sem_for_ax(strategy)
        data[name] = (value, sem) if use_sem else value
    data[SIZE_METRIC] = (size_gb, 0.0)  # exact: zero noise is the truth here
    return data


def attach_history(driver: AxDriver, rows: Sequence[HistoryRow]) -> int:
    """Attach every trial row of a history to a fresh experiment (completed with their metrics,
    infeasible with their exact size, failed and abandoned as such; rescored finalists are not
    trials). Returns the index offset for new rows."""
    trials = [r for r in rows if r.status != "rescored"]
    for row in trials:
        values = driver.space.encode(row.plan)
        idx = driver.attach(values)
        if row.status == "completed":
            metrics: dict[str, float] = {}
            sems: dict[str, float] = {}
            for name in RESUMED_METRICS:
                value, sem = METRICS[name].value(row), METRICS[name].sem(row)
                if value is not None:
                    metrics[name] = value
                    if sem is not None:
                        sems[name] = sem
            data = ax_data(metrics, sems, float(row.model_size or 0.0), driver.cfg.strategy)
            if row.cal_throughput is not None:  # a measured spread: always given to Ax, even when missing
                data["throughput"] = (row.cal_throughput, row.cal_throughput_sem)
            driver.complete(idx, data)
        elif row.status == "infeasible":
            driver.complete(idx, {SIZE_METRIC: (float(row.model_size or 0.0), 0.0)})
        elif row.status == "failed":
            driver.fail(idx, row.reason or "failed")
        else:
            driver.abandon(idx)
    next_index = max((r.trial_index for r in trials), default=-1) + 1
    return next_index - len(trials)


def goal_text(goal: Goal) -> str:
    if goal.multi:
        return f"pareto {goal.objective}"
    return f"{'min' if goal.minimize else 'max'} {goal.objective} s.t. {goal.constraint_metric} <= limit"


def row_defaults(setup: Setup, goal: Goal, row_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The columns every row of this search shares."""
    return {
        "search": goal.search,
        "model_id": setup.ref.fingerprint,
        "space_id": setup.space.fingerprint,
        "goal": goal_text(goal),
        "limit_metric": "" if goal.multi else goal.constraint_metric,
        "limit": None if goal.multi else goal.limit,
        **setup.identity,
        **(row_extra or {}),
    }
