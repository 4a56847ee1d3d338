"""Named types shared across module boundaries. Standard library only."""

from __future__ import annotations

import difflib
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


def read_text_utf8(path: Any, what: str) -> str:
    """A user's text file (JSON spaces, samples, sensitivity tables, plans), a UserError naming it
    when it is not UTF-8."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None


def did_you_mean(name: str, known: Any, what: str) -> UserError:
    """The error for an unknown registry name: the closest known one, else the whole list."""
    known = list(known)
    hint = difflib.get_close_matches(str(name), known, n=1)
    return UserError(f"unknown {what} {name!r}" + (f"; did you mean {hint[0]!r}?" if hint else f"; use one of {', '.join(known)}"))


@dataclass(frozen=True)
class GgmlType:
    """A llama.cpp tensor type: block layout and bytes as in ggml-common.h (``gguf.GGML_QUANT_SIZES``)."""

    name: str  # llama.cpp's name, e.g. "Q4_K"
    block: int  # weights per block
    type_size: int  # bytes per block
    bits: int  # nominal code bits (labels and ordering only; sizes use type_size)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block


#: the ggml types a ggml-scheme space may use, ordered by bits per weight (the order Ax sees)
GGML_TYPES: dict[str, GgmlType] = {
    t.name: t
    for t in (
        GgmlType("Q2_K", 256, 84, 2),
        GgmlType("Q3_K", 256, 110, 3),
        GgmlType("Q4_0", 32, 18, 4),
        GgmlType("Q4_K", 256, 144, 4),
        GgmlType("Q4_1", 32, 20, 4),
        GgmlType("Q5_0", 32, 22, 5),
        GgmlType("Q5_K", 256, 176, 5),
        GgmlType("Q5_1", 32, 24, 5),
        GgmlType("Q6_K", 256, 210, 6),
        GgmlType("Q8_0", 32, 34, 8),
        GgmlType("F16", 1, 2, 16),
    )
}
GGML_TYPE_NAMES = tuple(GGML_TYPES)
#: what a k-quant becomes on rows whose length is not a multiple of 256 (see ``bo_search.ggml``)
GGML_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def ggml_check_type(name: Any) -> str:
    """The canonical name of a ggml type (case-insensitive), or a UserError with a did-you-mean."""
    canon = str(name).upper()
    if canon in GGML_TYPES:
        return canon
    near = difflib.get_close_matches(canon, GGML_TYPE_NAMES, n=1)
    hint = f"; did you mean {near[0]}?" if near else ""
    raise UserError(f"{name!r} is not a ggml tensor type this tool writes (one of {', '.join(GGML_TYPE_NAMES)}){hint}")


def ggml_effective_type(name: str, in_features: int) -> str:
    """The type written for rows of ``in_features`` weights (k-quant fallback applied); a row that
    fits no block of the type is a UserError."""
    name = ggml_check_type(name)
    if in_features % GGML_TYPES[name].block:
        fb = GGML_FALLBACK.get(name)
        if fb is None or in_features % GGML_TYPES[fb].block:
            raise UserError(
                f"rows of {in_features} weights do not fit {name}'s blocks of {GGML_TYPES[name].block}; choose another type for this layer"
            )
        return fb
    return name


def ggml_row_bytes(name: str, in_features: int) -> int:
    t = GGML_TYPES[ggml_effective_type(name, in_features)]
    return in_features // t.block * t.type_size


@dataclass(frozen=True, order=True)
class LayerQuant:
    """Quantization setting of one linear layer's weight."""

    bits: int
    group_size: int = PER_CHANNEL
    symmetric: bool = False
    #: a llama.cpp tensor type (ggml scheme); then ``bits`` is its nominal width, ``group_size`` -1
    ggml_type: str = ""

    def __post_init__(self) -> None:
        if self.ggml_type:
            canon = ggml_check_type(self.ggml_type)
            if canon != self.ggml_type or self.bits != GGML_TYPES[canon].bits or self.group_size != PER_CHANNEL or self.symmetric:
                raise UserError(f"a ggml setting is LayerQuant.of_ggml({canon!r}), got {self!r}")
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

    @classmethod
    def of_ggml(cls, name: str) -> LayerQuant:
        canon = ggml_check_type(name)
        return cls(GGML_TYPES[canon].bits, PER_CHANNEL, False, canon)

    @property
    def is_quantized(self) -> bool:
        """False only for "leave as is"; a ggml F16 setting is a real conversion (rounds to float16)."""
        return self.bits != FULL_PRECISION_BITS or bool(self.ggml_type)

    def label(self) -> str:
        if self.ggml_type:
            return self.ggml_type
        if not self.is_quantized:
            return "fp"
        g = "ch" if self.group_size == PER_CHANNEL else str(self.group_size)
        return f"{self.bits}b/g{g}{'/sym' if self.symmetric else ''}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if not self.ggml_type:
            del out["ggml_type"]  # affine plans keep the JSON they always had
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> LayerQuant:
        try:
            if obj.get("ggml_type"):
                return cls.of_ggml(obj["ggml_type"])
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
