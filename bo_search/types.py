"""Named types shared across module boundaries. Standard library only."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

#: Bit width meaning "leave this layer unquantized".
FULL_PRECISION_BITS = 16
#: Group size meaning "one group per output channel" (the whole input row).
PER_CHANNEL = -1
VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8, FULL_PRECISION_BITS)


class UserError(Exception):
    """A mistake in user input. The CLI prints it as one line and exits with status 2."""


@dataclass(frozen=True, order=True)
class LayerQuant:
    """Quantization setting of one linear layer's weight."""

    bits: int
    group_size: int = PER_CHANNEL
    symmetric: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise UserError(f"bitwidth must be an integer, got {self.bits!r}")
        if self.bits not in VALID_BITS:
            raise UserError(f"bitwidth {self.bits} is not allowed: use 1..8, or {FULL_PRECISION_BITS} to leave a layer unquantized")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int):
            raise UserError(f"groupsize must be an integer, got {self.group_size!r}")
        if self.group_size != PER_CHANNEL and self.group_size < 1:
            raise UserError(
                f"groupsize {self.group_size} is not allowed: use a positive divisor of the layer's "
                f"in_features, or {PER_CHANNEL} for one group per output channel"
            )

    @property
    def is_quantized(self) -> bool:
        return self.bits != FULL_PRECISION_BITS

    def label(self) -> str:
        if not self.is_quantized:
            return "fp"
        g = "ch" if self.group_size == PER_CHANNEL else str(self.group_size)
        return f"{self.bits}b/g{g}{'/sym' if self.symmetric else ''}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> LayerQuant:
        try:
            return cls(
                bits=obj["bits"],
                group_size=obj.get("group_size", PER_CHANNEL),
                symmetric=bool(obj.get("symmetric", False)),
            )
        except (KeyError, TypeError, AttributeError) as err:
            raise UserError(f'a layer setting must look like {{"bits": 4, "group_size": 64}}, got {obj!r}') from err


FULL_PRECISION = LayerQuant(FULL_PRECISION_BITS, PER_CHANNEL)


@dataclass(frozen=True)
class QuantPlan(Mapping[str, LayerQuant]):
    """An explicit mapping from a linear layer's fully qualified name to its setting.

    Layers absent from the plan stay at full precision.
    """

    layers: Mapping[str, LayerQuant] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", dict(sorted(self.layers.items())))
        for fqn, lq in self.layers.items():
            if not isinstance(lq, LayerQuant):
                raise TypeError(f"plan entry {fqn!r} is {type(lq).__name__}, expected LayerQuant")

    def __getitem__(self, fqn: str) -> LayerQuant:
        return self.layers[fqn]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __hash__(self) -> int:
        return hash(tuple(self.layers.items()))

    def setting(self, fqn: str) -> LayerQuant:
        return self.layers.get(fqn, FULL_PRECISION)

    @classmethod
    def uniform(cls, fqns: list[str] | tuple[str, ...], lq: LayerQuant) -> QuantPlan:
        return cls({f: lq for f in fqns})

    def to_json(self) -> dict[str, Any]:
        return {"format": "bo_search.plan/1", "layers": {f: lq.to_json() for f, lq in self.layers.items()}}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, obj: Any) -> QuantPlan:
        if not isinstance(obj, Mapping) or not isinstance(obj.get("layers"), Mapping):
            raise UserError('a plan must be a JSON object {"layers": {"<layer name>": {"bits": 4, "group_size": 64}}}')
        return cls({str(k): LayerQuant.from_json(v) for k, v in obj["layers"].items()})

    @classmethod
    def loads(cls, text: str) -> QuantPlan:
        try:
            return cls.from_json(json.loads(text))
        except json.JSONDecodeError as err:
            raise UserError(f"plan is not valid JSON ({err})") from err

    def histogram(self) -> dict[str, int]:
        """Number of layers per setting label, e.g. {"4b/g64": 120, "8b/g64": 90}."""
        out: dict[str, int] = {}
        for lq in self.layers.values():
            out[lq.label()] = out.get(lq.label(), 0) + 1
        return dict(sorted(out.items()))


@dataclass(frozen=True)
class Perplexity:
    """Token-level perplexity with its standard error (delta method over windows)."""

    ppl: float
    nll: float  # mean negative log-likelihood per token, nats
    nll_sem: float  # standard error of the mean NLL across windows
    n_tokens: int
    n_windows: int

    @property
    def ppl_sem(self) -> float:
        return self.ppl * self.nll_sem

    @classmethod
    def from_nll(cls, nll: float, nll_sem: float, n_tokens: int, n_windows: int) -> Perplexity:
        return cls(ppl=math.exp(nll), nll=nll, nll_sem=nll_sem, n_tokens=n_tokens, n_windows=n_windows)


@dataclass(frozen=True)
class TrialResult:
    """What a worker reports for one trial. `status` is 'completed' or 'failed'."""

    trial_index: int
    status: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    sems: Mapping[str, float] = field(default_factory=dict)
    reason: str = ""
    quantize_s: float = 0.0
    evaluate_s: float = 0.0
    restore_s: float = 0.0
    worker_id: str = ""

    def __post_init__(self) -> None:
        if self.status not in ("completed", "failed"):
            raise ValueError(f"status must be 'completed' or 'failed', got {self.status!r}")

    @property
    def ok(self) -> bool:
        return self.status == "completed"
