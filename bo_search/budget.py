"""The per-slot table and the size limit: the spine every planner shares.

:class:`SlotTable` holds, per slot of a parameter space and per choice (bits, group size), what the
choice costs against the budget (exact bits of storage, or bit operations per token) and, once a
sensitivity table is attached, its predicted loss increase (the prior); plus the base (what no slot
chooses). It is built once per search from the space and the size model; seeding, the knapsack
solvers, the Thompson strategy, repair and random feasible plans all read it.

:class:`SizeLimit` is a size limit in GB (1e9 bytes), made once from the flags; every conversion
between GB, bits and average bits per weight is here.

Size is additive over slots, so a plan's size is a sum of per-slot look-ups: cheap enough to repair
proposals and draw random feasible plans in spaces of hundreds of parameters. Imports no torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from bo_search.types import FULL_PRECISION, FULL_PRECISION_BITS, UserError

if TYPE_CHECKING:
    from bo_search.sensitivity.table import Sensitivity
    from bo_search.sizes import SizeModel
    from bo_search.space import SearchSpace

#: activation bits assumed by the bit-operations budget (weight-only quantization: fp16/bf16 activations)
ACT_BITS = 16

#: what a table's sizes count: storage bits, or bit operations per token
BUDGET_METRICS = ("size", "bitops")

#: the history column / Ax metric of a size limit
SIZE_METRIC = "model_size_gb"


def gb_of_bits(bits: float) -> float:
    """Decimal gigabytes (1e9 bytes) of a number of bits."""
    return bits / 8 / 1e9


@dataclass(frozen=True)
class SizeLimit:
    """A model size limit in GB (1e9 bytes): codes, scales, zero points and every other tensor."""

    gb: float

    def __post_init__(self) -> None:
        if not self.gb > 0:
            raise UserError(f"--model_size_constraint must be positive, got {self.gb}")

    @classmethod
    def from_avg_bits(cls, avg_bits: float, other_bits: int, n_weights: int) -> SizeLimit:
        """The size at ``avg_bits`` per quantized weight, plus ``other_bits`` outside the plan."""
        if not avg_bits > 0:
            raise UserError(f"--avg_bits must be positive, got {avg_bits}")
        return cls(gb_of_bits(other_bits + n_weights * avg_bits))

    @property
    def bits(self) -> int:
        """The largest whole number of bits whose size (bits / 8 / 1e9, as SizeModel computes it) fits."""
        t = math.floor(self.gb * 8e9)
        while gb_of_bits(t + 1) <= self.gb:
            t += 1
        while gb_of_bits(t) > self.gb:
            t -= 1
        return t

    def avg_bits(self, other_bits: int, n_weights: int) -> float:
        """Average bits per quantized weight the limit leaves once ``other_bits`` are stored."""
        return (self.gb * 8e9 - other_bits) / n_weights

    def admits(self, gb: float) -> bool:
        """Whether a plan of ``gb`` fits (exact: what seeds, repair and dispatch use)."""
        return gb <= self.gb

    def holds(self, recorded_gb: float | None) -> bool:
        """Whether a size recorded in a history is within the limit: the one rule the search's best
        row, the finalists and the report share (relative tolerance 1e-9, for a limit recomputed
        from ``--avg_bits`` in another process)."""
        return recorded_gb is not None and recorded_gb <= self.gb * (1 + 1e-9)


@dataclass(frozen=True)
class SlotTable:
    """Per slot of ``space``: its choices (bits, group size), each choice's exact budget cost
    (``sizes``: storage bits, or bit operations per token), the slot's weights, its tunable parameter
    names (None where fixed), and, with a prior attached, each choice's predicted loss increase.
    ``base_bits``: what no slot chooses (other tensors, linears outside the space at full precision)."""

    labels: tuple[str, ...]
    choices: tuple[tuple[tuple[int, int], ...], ...]
    sizes: tuple[tuple[int, ...], ...]
    numel: tuple[int, ...]
    names: tuple[tuple[str | None, str | None], ...]
    base_bits: int
    metric: str = "size"
    prior: tuple[tuple[float, ...], ...] | None = None
    #: the space the table was built from (None for a table built by hand, which cannot take a prior)
    space: SearchSpace | None = None

    def __post_init__(self) -> None:
        n = len(self.choices)
        if not n or not (len(self.labels) == len(self.sizes) == len(self.numel) == len(self.names) == n):
            raise ValueError("slot table: labels, choices, sizes, weights and names need one entry per slot")
        for s, ch in enumerate(self.choices):
            if not ch or len(self.sizes[s]) != len(ch) or (self.prior is not None and len(self.prior[s]) != len(ch)):
                raise ValueError(f"slot table: slot {self.labels[s]} has tables of different lengths")
            if self.prior is not None and any(not math.isfinite(c) for c in self.prior[s]):
                raise ValueError(f"slot table: slot {self.labels[s]}: a prior cost is not finite")
        index = {}
        for s, (bn, gn) in enumerate(self.names):
            for name in (bn, gn):
                if name is not None:
                    index[name] = s
        object.__setattr__(self, "_slot_of", index)
        object.__setattr__(self, "_keys", sorted({c for ch in self.choices for c in ch}))
        offsets = [0]
        for ch in self.choices:
            offsets.append(offsets[-1] + len(ch))
        object.__setattr__(self, "_offsets", tuple(offsets))
        total_w = float(sum(self.numel)) or 1.0
        object.__setattr__(self, "_weight", tuple(float(w) / total_w for w in self.numel))
        object.__setattr__(self, "_budget", tuple(tuple(float(v) for v in sz) for sz in self.sizes))

    @classmethod
    def build(cls, space: SearchSpace, size_model: SizeModel, metric: str = "size") -> SlotTable:
        """The table of ``space``: ``size`` counts the exact bits of each slot's linears
        (``SizeModel.layer_bits``: codes, scales, zeros) and the base holds every other tensor;
        ``bitops`` counts bit operations per token, numel x weight bits x ``ACT_BITS`` over the slot's
        linears (one multiply-accumulate per weight per token; group size does not change it), the
        base the linears outside the space at full precision (embeddings do no MACs)."""
        if metric not in BUDGET_METRICS:
            raise UserError(f"unknown budget metric {metric!r}; use one of {', '.join(BUDGET_METRICS)}")
        infos = size_model.layers.by_fqn()

        def cost_bits(f: str, q: Any) -> int:
            if metric == "bitops":
                return int(infos[f].numel * (q.bits if q.bits < FULL_PRECISION_BITS else size_model.fp_bits) * ACT_BITS)
            return int(size_model.layer_bits(infos[f], q))

        in_space = {f for slot in space.slots for f in slot.fqns}
        outside = sum(cost_bits(li.fqn, FULL_PRECISION) for li in size_model.layers.linears if li.fqn not in in_space)
        base = outside + (size_model.other_bits if metric == "size" else 0)
        tunable = {p.name for p in space.tunable}
        choices = tuple(slot.choices for slot in space.slots)
        return cls(
            space=space,
            labels=tuple(f"block {slot.block}" + (f" {slot.group}" if slot.group else "") for slot in space.slots),
            choices=choices,
            sizes=tuple(
                tuple(sum(cost_bits(f, space.choice_setting(b, g)) for f in slot.fqns) for b, g in ch)
                for slot, ch in zip(space.slots, choices)
            ),
            numel=tuple(sum(infos[f].numel for f in slot.fqns) for slot in space.slots),
            names=tuple(
                (slot.bits.name if slot.bits.name in tunable else None, slot.group_size.name if slot.group_size.name in tunable else None)
                for slot in space.slots
            ),
            base_bits=int(base),
            metric=metric,
        )

    def with_prior(self, sens: Sensitivity | None) -> SlotTable:
        """This table with ``sens``'s predicted loss increases per slot and choice (UserError if the
        sensitivity table cannot price the space); ``None`` removes the prior."""
        if sens is None:
            return replace(self, prior=None)
        assert self.space is not None, "a table built by hand has no space to price"
        tables = sens.slot_costs(self.space)
        return replace(self, prior=tuple(tuple(float(t[c]) for c in ch) for t, ch in zip(tables, self.choices)))

    # -- plans as one choice index per slot ---------------------------------------------------------
    def pick_of(self, values: Mapping[str, int]) -> tuple[int, ...]:
        """A plan's tunable values -> one choice index per slot (a fixed parameter takes its only value)."""
        return tuple(ch.index(self.setting(s, values)) for s, ch in enumerate(self.choices))

    def values_of(self, pick: Sequence[int]) -> dict[str, int]:
        """One choice index per slot -> the space's tunable parameters."""
        out: dict[str, int] = {}
        for s, c in enumerate(pick):
            b, g = self.choices[s][c]
            bn, gn = self.names[s]
            if bn is not None:
                out[bn] = b
            if gn is not None:
                out[gn] = g
        return out

    def setting(self, s: int, values: Mapping[str, int]) -> tuple[int, int]:
        """Slot ``s``'s (bits, group) in a plan's values (a fixed parameter: its only value)."""
        (b0, g0), (bn, gn) = self.choices[s][0], self.names[s]
        return (values.get(bn, b0) if bn is not None else b0, values.get(gn, g0) if gn is not None else g0)

    def slot_of(self, name: str) -> int:
        """The slot a tunable parameter belongs to."""
        return self._slot_of[name]  # type: ignore[attr-defined,no-any-return]

    # -- sums over slots ----------------------------------------------------------------------------
    def size(self, pick: Sequence[int]) -> int:
        """The slots' budget cost of a pick (without the base)."""
        return sum(self.sizes[s][c] for s, c in enumerate(pick))

    def cost(self, pick: Sequence[int]) -> float:
        """The prior's predicted loss increase of a pick."""
        assert self.prior is not None, "no prior attached"
        return sum(self.prior[s][c] for s, c in enumerate(pick))

    def total(self, table: Sequence[Sequence[float]], pick: Sequence[int]) -> float:
        return float(sum(table[s][c] for s, c in enumerate(pick)))

    def bits(self, values: Mapping[str, int]) -> int:
        """Exact bits of a plan's values, base included."""
        return self.base_bits + sum(self.sizes[s][self.choices[s].index(self.setting(s, values))] for s in range(len(self.choices)))

    def gb(self, values: Mapping[str, int]) -> float:
        return gb_of_bits(self.bits(values))

    def delta_bits(self, values: Mapping[str, int], name: str, new: int) -> int:
        """What changing one parameter to ``new`` adds to the plan's bits."""
        s = self.slot_of(name)
        ch, sz = self.choices[s], self.sizes[s]
        return sz[ch.index(self.setting(s, {**values, name: new}))] - sz[ch.index(self.setting(s, values))]

    def cheapest(self) -> tuple[int, ...]:
        """Per slot the smallest choice (the lower prior cost among equal sizes)."""
        if self.prior is None:
            return tuple(min(range(len(sz)), key=sz.__getitem__) for sz in self.sizes)
        return tuple(min(range(len(sz)), key=list(zip(sz, co)).__getitem__) for sz, co in zip(self.sizes, self.prior))

    def bounds_gb(self) -> tuple[float, float]:
        """Exact smallest and largest size (GB) over all plans of the space."""
        assert self.metric == "size"
        lo = self.base_bits + sum(min(sz) for sz in self.sizes)
        hi = self.base_bits + sum(max(sz) for sz in self.sizes)
        return gb_of_bits(lo), gb_of_bits(hi)

    # -- the Thompson strategy's one-hot layout -------------------------------------------------------
    @property
    def budget(self) -> tuple[tuple[float, ...], ...]:
        """The sizes as floats (the exact solver's constraint)."""
        return self._budget  # type: ignore[attr-defined,no-any-return]

    @property
    def weight(self) -> tuple[float, ...]:
        """Each slot's share of the planned weights."""
        return self._weight  # type: ignore[attr-defined,no-any-return]

    @property
    def keys(self) -> list[tuple[int, int]]:
        """Every (bits, group) choice of any slot, sorted."""
        return self._keys  # type: ignore[attr-defined,no-any-return]

    @property
    def n_onehot(self) -> int:
        return int(self._offsets[-1])  # type: ignore[attr-defined]

    def offset(self, s: int) -> int:
        return int(self._offsets[s])  # type: ignore[attr-defined]


def _down(p, v: int) -> int | None:  # type: ignore[no-untyped-def]
    i = p.values.index(v)
    if p.kind == "bits":
        return p.values[i - 1] if i > 0 else None
    return p.values[i + 1] if i + 1 < len(p.values) else None


def _up(p, v: int) -> int | None:  # type: ignore[no-untyped-def]
    i = p.values.index(v)
    if p.kind == "bits":
        return p.values[i + 1] if i + 1 < len(p.values) else None
    return p.values[i - 1] if i > 0 else None


def repair_to_budget(
    sizes: SlotTable, limit: SizeLimit, values: Mapping[str, int], cost: Callable[[Mapping[str, int]], float] | None = None
) -> dict[str, int] | None:
    """The nearest plan within the budget, by one-notch downgrades (fewer bits, or a larger group).

    Without a cost model the downgrade taken is at the slot holding the most bits (quantization
    error falls steeply with bits, so the widest slots give up the least), the largest saving first.
    With ``cost(values) -> predicted loss`` it is the cheapest downgrade per bit saved. Returns None
    when no downgrade is left and the plan still does not fit.
    """
    space = sizes.space
    assert space is not None, "repair needs a table built from a space"
    vals = dict(values)
    limit_bits = limit.bits
    total = sizes.bits(vals)
    while total > limit_bits:
        best: tuple[float, str, int, int] | None = None
        for p in space.tunable:
            step = _down(p, vals[p.name])
            if step is None:
                continue
            saved = -sizes.delta_bits(vals, p.name, step)
            if saved <= 0:
                continue
            if cost is not None:
                score = (cost({**vals, p.name: step}) - cost(vals)) / saved
            else:
                slot_bits = sizes.setting(sizes.slot_of(p.name), vals)[0]
                score = -slot_bits * 1e12 - saved
            if best is None or score < best[0]:
                best = (score, p.name, step, saved)
        if best is None:
            return None
        _, name, step, saved = best
        vals[name] = step
        total -= saved
    return vals


def random_feasible(sizes: SlotTable, limit: SizeLimit, rng: random.Random) -> dict[str, int]:
    """A random plan that fits: random choices, random downgrades until it fits, then random
    upgrades while it still fits (so the budget is used)."""
    space = sizes.space
    assert space is not None, "random plans need a table built from a space"
    params = space.tunable
    vals = {p.name: rng.choice(p.values) for p in params}
    limit_bits = limit.bits
    total = sizes.bits(vals)
    while total > limit_bits:
        options = [(p.name, d) for p in params if (d := _down(p, vals[p.name])) is not None]
        if not options:
            break
        name, d = rng.choice(options)
        total += sizes.delta_bits(vals, name, d)
        vals[name] = d
    for p in rng.sample(params, len(params)):
        u = _up(p, vals[p.name])
        if u is not None:
            delta = sizes.delta_bits(vals, p.name, u)
            if total + delta <= limit_bits:
                vals[p.name] = u
                total += delta
    return vals
