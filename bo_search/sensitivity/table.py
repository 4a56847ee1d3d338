"""The per-slot sensitivity table: what each method writes, the knapsack solves on, the search's
Bayesian model starts from, and the report explains a plan with."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bo_search.cli import write_json
from bo_search.types import PER_CHANNEL, LayerQuant, UserError, did_you_mean, read_text_utf8

if TYPE_CHECKING:
    from bo_search.space import SearchSpace, Slot

FORMAT = "bo_search.sensitivity/1"
#: the methods of the registry (``compute.METHODS``)
METHOD_NAMES = ("fit", "hessian", "measured")


#: bumped whenever a method's computation changes, so cached tables of the old code are not reused
#: (2: FIT costs in nats per token, the window-mean Fisher times the window's scored tokens;
#: 3: ggml settings keyed by their type, not their nominal bits, which merged Q4_0/Q4_K/Q4_1)
COMPUTE_VERSION = 3


STOP_RULES = ("rank", "layers", "total")


MEASURED_METRICS = ("nll", "kl")


FISHER_LABELS = ("data", "model")


#: calibration windows per method when --nsamples is not given (measured costs one forward per slot and choice)
DEFAULT_NSAMPLES = {"fit": 8, "hessian": 8, "measured": 1}


def choice_key(lq: LayerQuant) -> str:
    """The cost-table key of a setting: ``"bits:group"`` (``":sym"`` appended for symmetric codes);
    a llama.cpp type's name for a ggml setting (Q4_0, Q4_K and Q4_1 share their nominal 4 bits)."""
    if lq.ggml_type:
        return lq.ggml_type
    return f"{lq.bits}:{lq.group_size}" + (":sym" if lq.symmetric else "")


# ---------------------------------------------------------------------------------------------
# Configuration and result types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SensitivityConfig:
    """How to compute sensitivity. ``nsamples`` = calibration windows of ``seq_len`` tokens."""

    method: str = "fit"
    nsamples: int | None = None
    seq_len: int = 512
    batch_size: int = 4
    max_iter: int = 100
    tol: float = 0.1
    stop_on: str = "rank"
    metric: str = "kl"
    fisher_labels: str = "model"
    seed: int = 0
    time_eval: bool = True  # also time one evaluation pass over the windows (for the cost ratio)

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise did_you_mean(self.method, list(METHOD_NAMES), "sensitivity method")
        if self.nsamples is not None and self.nsamples < 1:
            raise UserError(f"--nsamples must be at least 1, got {self.nsamples}")
        if self.seq_len < 2:
            raise UserError(f"--max_seqlen must be at least 2, got {self.seq_len}")
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be positive, got {self.batch_size}")
        if self.max_iter < 2:
            raise UserError(f"--max_iter must be at least 2 (a standard error needs two samples), got {self.max_iter}")
        if not 0 < self.tol < 1:
            raise UserError(f"--tol must be in (0, 1), got {self.tol}")
        if self.stop_on not in STOP_RULES:
            raise did_you_mean(self.stop_on, STOP_RULES, "stopping rule")
        if self.metric not in MEASURED_METRICS:
            raise did_you_mean(self.metric, MEASURED_METRICS, "measured metric")
        if self.fisher_labels not in FISHER_LABELS:
            raise did_you_mean(self.fisher_labels, FISHER_LABELS, "Fisher labels")

    @property
    def windows(self) -> int:
        return self.nsamples if self.nsamples is not None else DEFAULT_NSAMPLES[self.method]


@dataclass(frozen=True)
class Sensitivity:
    """Per-unit scores and per-unit per-choice predicted loss increases (nats per token).

    A unit is one linear layer (fit, hessian) or one slot of the space (measured); ``units`` maps
    each unit's name to the layer FQNs it covers, so nothing parses names.
    """

    method: str
    model: str
    model_id: str
    windows: Mapping[str, Any]
    scheme: Mapping[str, Any]
    units: Mapping[str, tuple[str, ...]]
    scores: Mapping[str, float]
    costs: Mapping[str, Mapping[str, float]]
    timings: Mapping[str, float] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)
    space: str = ""
    space_id: str = ""

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise did_you_mean(self.method, list(METHOD_NAMES), "sensitivity method")
        if set(self.costs) != set(self.units) or set(self.scores) != set(self.units):
            raise UserError("sensitivity: the units, scores and costs tables name different units")
        for unit, row in self.costs.items():
            for key, val in row.items():
                if not isinstance(val, (int, float)) or not math.isfinite(val):
                    raise UserError(f"sensitivity: cost of {unit} at {key} is {val!r}, not a finite number")

    @property
    def label(self) -> str:
        """The method with its variant, e.g. ``fit[model]``, ``measured[kl]``."""
        variant = {"fit": self.details.get("fisher_labels"), "measured": self.details.get("metric")}.get(self.method)
        return f"{self.method}[{variant}]" if variant else self.method

    # -- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "method": self.method,
            "model": self.model,
            "model_id": self.model_id,
            "space": self.space,
            "space_id": self.space_id,
            "windows": dict(self.windows),
            "scheme": dict(self.scheme),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "details": dict(self.details),
            "units": {u: list(f) for u, f in self.units.items()},
            "scores": dict(self.scores),
            "costs": {u: dict(row) for u, row in self.costs.items()},
        }

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    @classmethod
    def from_json(cls, obj: Any, source: str = "<sensitivity>") -> Sensitivity:
        if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
            raise UserError(
                f'{source} is not a bo_search sensitivity JSON (expected "format": {FORMAT!r}); write one with python -m bo_search.sensitivity'
            )
        try:
            return cls(
                method=str(obj["method"]),
                model=str(obj["model"]),
                model_id=str(obj["model_id"]),
                windows=dict(obj["windows"]),
                scheme=dict(obj.get("scheme", {})),
                units={str(u): tuple(str(f) for f in fs) for u, fs in obj["units"].items()},
                scores={str(u): float(v) for u, v in obj["scores"].items()},
                costs={str(u): {str(k): float(v) for k, v in row.items()} for u, row in obj["costs"].items()},
                timings={str(k): float(v) for k, v in obj.get("timings", {}).items()},
                details=dict(obj.get("details", {})),
                space=str(obj.get("space", "")),
                space_id=str(obj.get("space_id", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{source} is a malformed sensitivity JSON ({type(err).__name__}: {err})") from err

    @classmethod
    def load(cls, path: str | Path) -> Sensitivity:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"sensitivity file not found: {p}")
        try:
            obj = json.loads(read_text_utf8(p, "sensitivity file"))
        except json.JSONDecodeError as err:
            raise UserError(f"sensitivity file {p} is not valid JSON: {err.msg} at line {err.lineno}") from err
        return cls.from_json(obj, str(p))

    # -- use ----------------------------------------------------------------------------------
    def check_model(self, model_id: str, model_name: str, layer_fqns: Sequence[str]) -> None:
        """Raise UserError unless this table was computed for the given model."""
        if self.model_id != model_id:
            raise UserError(
                f"the sensitivity JSON was computed for model {self.model} ({self.model_id}), not {model_name} ({model_id}); "
                f"recompute it with python -m bo_search.sensitivity --checkpoint ..."
            )
        known = set(layer_fqns)
        for unit, fqns in self.units.items():
            bad = [f for f in fqns if f not in known]
            if bad:
                raise UserError(f"the sensitivity JSON names layer {bad[0]!r} (unit {unit}), which the model does not have")

    def slot_costs(self, space: SearchSpace) -> list[dict[tuple[int, int], float]]:
        """Per slot of ``space``, the predicted cost of each allowed (bits, group_size): the sum of the
        costs of the units that tile the slot. UserError when the table cannot price the space.
        Computed once per space (the seeds, the prior check and the Thompson node share it); do not
        modify the returned tables."""
        cache: dict[str, list[dict[tuple[int, int], float]]] = self.__dict__.setdefault("_slot_costs_cache", {})
        key = f"{space.fingerprint}:{space.source}"
        if key not in cache:
            cache[key] = self._slot_costs(space)
        return cache[key]

    def _slot_costs(self, space: SearchSpace) -> list[dict[tuple[int, int], float]]:
        unit_of: dict[str, str] = {f: u for u, fqns in self.units.items() for f in fqns}
        out: list[dict[tuple[int, int], float]] = []
        for slot in space.slots:
            where = f"block {slot.block}" + (f" group {slot.group!r}" if slot.group else "")
            missing = [f for f in slot.fqns if f not in unit_of]
            if missing:
                raise UserError(
                    f"the sensitivity JSON ({self.method}) has no entry for layer {missing[0]} ({where}): it was computed for another "
                    "model or for a subset of layers; recompute it for this model and space"
                )
            members = sorted({unit_of[f] for f in slot.fqns})
            for u in members:
                if not set(self.units[u]) <= set(slot.fqns):
                    raise UserError(
                        f"the sensitivity JSON ({self.method}) measured {u} as one unit, which spans several slots of the space "
                        f"{space.source}; recompute it with --parameters_list {space.source}"
                    )
            costs: dict[tuple[int, int], float] = {}
            for b, g in slot.choices:
                lq = space.choice_setting(b, g)
                if not lq.is_quantized:
                    costs[(b, g)] = 0.0
                    continue
                total = 0.0
                for u in members:
                    val = self.costs[u].get(choice_key(lq))
                    if val is None:
                        raise UserError(
                            f"the sensitivity JSON ({self.method}) has no cost for {choice_key(lq)} at {u}: it was computed for another "
                            f"parameter space ({self.space or 'unknown'}); recompute it with --parameters_list {space.source}"
                        )
                    total += val
                costs[(b, g)] = total
            out.append(costs)
        return out

    def predicted(self, space: SearchSpace, values: Mapping[str, int], tables: list[dict[tuple[int, int], float]] | None = None) -> float:
        """Predicted loss increase of one parameter dict of ``space``."""
        tables = tables if tables is not None else self.slot_costs(space)
        full = space.complete(values)
        total = 0.0
        for slot, table in zip(space.slots, tables):
            # the table is keyed by the slot's raw choice values (in a ggml space the bits value is a
            # type index, not the type's nominal bits), as slot_costs builds it
            b = int(full[slot.bits.name]) if slot.bits.name in full else slot.bits.values[0]
            g = int(full[slot.group_size.name]) if slot.group_size.name in full else slot.group_size.values[0]
            total += table[(b, g)]
        return total


# ---------------------------------------------------------------------------------------------
# Running a method on a loaded model
# ---------------------------------------------------------------------------------------------


def layer_choices(space: SearchSpace) -> dict[str, tuple[LayerQuant, ...]]:
    """Every setting the space allows for each layer FQN."""
    out: dict[str, tuple[LayerQuant, ...]] = {}
    for slot in space.slots:
        lqs = tuple(space.choice_setting(b, g) for b, g in slot.choices)
        for f in slot.fqns:
            out[f] = tuple(dict.fromkeys(out.get(f, ()) + lqs))
    return out


def slot_unit(blocks_fqn: str, slot: Slot) -> str:
    """Unit name of a slot: its block's FQN, plus the group name for finer granularities."""
    return f"{blocks_fqn}.{slot.block}" + (f".{slot.group}" if slot.group else "")


def _group_order(g: int) -> float:
    return math.inf if g == PER_CHANNEL else float(g)
