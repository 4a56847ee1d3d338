"""The metric registry: every metric a trial reports, Ax optimises or a limit constrains, in one
table: its name (the trial result's key and the Ax metric), direction, history columns (value and
standard error), how its standard error reaches Ax, and how it turns into a search-split score.

Adding a metric touches this table and the code that measures it. Imports neither torch nor ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bo_search.budget import SIZE_METRIC
from bo_search.types import did_you_mean

#: when a metric's recorded standard error goes to Ax as the measurement's noise
SEM_POLICIES = ("never", "thompson", "always", "exact")


@dataclass(frozen=True)
class Metric:
    """One metric. ``column``/``sem_column``: the history row's fields; ``sem_to_ax``: ``never``
    (Ax infers the noise), ``thompson`` (the standard error of the damage across the search windows,
    given to the Thompson model, not to Ax's GP, which would take it as the whole noise), ``always``
    (a measured spread, e.g. throughput over repeats), ``exact`` (known without evaluating: zero
    noise). ``score``: how a row's value becomes a search-split score (lower is better), or None
    when the metric is not an objective."""

    name: str
    minimize: bool
    column: str
    sem_column: str | None = None
    sem_to_ax: str = "never"
    objective: bool = False
    #: the history column of its validation-split value (finalists), and whether it holds a perplexity
    val_column: str | None = None
    val_is_ppl: bool = False

    def __post_init__(self) -> None:
        if self.sem_to_ax not in SEM_POLICIES:
            raise ValueError(f"metric {self.name}: sem_to_ax must be one of {SEM_POLICIES}, not {self.sem_to_ax!r}")

    def value(self, row: Any) -> float | None:
        """The metric's value in a history row (None where the row lacks it)."""
        v = getattr(row, self.column, None)
        return None if v is None else float(v)

    def sem(self, row: Any) -> float | None:
        v = getattr(row, self.sem_column, None) if self.sem_column else None
        return None if v is None else float(v)

    def val_value(self, row: Any) -> float | None:
        """The metric's validation-split value in a rescored row (None where it lacks it)."""
        v = getattr(row, self.val_column, None) if self.val_column else None
        if v is None or (self.val_is_ppl and not v):
            return None
        return nll_of_ppl(float(v)) if self.val_is_ppl else float(v)

    def sem_for_ax(self, strategy: str) -> bool:
        """Whether a recorded standard error goes to Ax with the value under ``strategy``."""
        return self.sem_to_ax == "always" or (self.sem_to_ax == "thompson" and strategy == "thompson")


#: every metric, by name (the trial result's key, the Ax metric name)
METRICS: Mapping[str, Metric] = {
    m.name: m
    for m in (
        Metric("nll", True, "nll", "nll_delta_sem", "thompson", objective=True, val_column="val_PPL", val_is_ppl=True),
        Metric("kl", True, "kl", "kl_sem", "thompson", objective=True, val_column="val_kl"),
        Metric("ppl", True, "cal_PPL", "cal_PPL_sem"),
        Metric("throughput", False, "cal_throughput", "cal_throughput_sem", "always"),
        Metric(SIZE_METRIC, True, "model_size", None, "exact"),
        Metric("avg_bits", True, "avg_bits"),
    )
}

#: what a size-limited search can minimise on the search split
OBJECTIVES = tuple(name for name, m in METRICS.items() if m.objective)

#: the metrics a completed history row gives back to Ax on resume, in this order (throughput apart)
RESUMED_METRICS = ("nll", "ppl", "kl")


def check_objective(name: str) -> str:
    if name not in OBJECTIVES:
        raise did_you_mean(name, OBJECTIVES, "--objective")
    return name


def score_metric(objective: str) -> Metric:
    """The metric a goal's objective scores rows by: kl for a kl objective (a Pareto search's
    ``"kl, model_size_gb"`` too), nll otherwise."""
    return METRICS["kl"] if objective.startswith("kl") else METRICS["nll"]


def nll_of_ppl(ppl: float) -> float:
    return math.log(ppl)


def search_score(row: Any, objective: str) -> float:
    """A completed row's search-split score under ``objective`` (lower is better): its KL, or its
    NLL (from the perplexity where an old row lacks it); inf when the row lacks it."""
    metric = score_metric(objective)
    value = metric.value(row)
    if value is not None:
        return value
    if metric.name == "nll":
        ppl = METRICS["ppl"].value(row)
        return nll_of_ppl(ppl) if ppl else math.inf
    return math.inf


def val_score(row: Any, objective: str) -> float:
    """A rescored row's validation score under the search's objective (lower is better; inf when missing)."""
    value = score_metric(objective).val_value(row)
    return value if value is not None else math.inf


def metrics_to_row(metrics: Mapping[str, float], sems: Mapping[str, float]) -> dict[str, Any]:
    """A trial's reported metrics as history columns (value and standard error of each registered metric)."""
    out: dict[str, Any] = {}
    for name, value in metrics.items():
        m = METRICS.get(name)
        if m is None or m.sem_to_ax == "exact":
            continue  # exact metrics (size) are recorded by the search, not the worker
        out[m.column] = value
        if m.sem_column is not None:
            out[m.sem_column] = sems.get(name)
    return out
