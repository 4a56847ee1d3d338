"""Size-budget arithmetic over a parameter space, at the granularity of its slots.

Size is additive over slots, so a plan's size is a sum of per-slot table look-ups: cheap enough to
repair proposals and draw random feasible plans in spaces of hundreds of parameters.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from bo_search.sizes import SizeModel
from bo_search.space import SearchSpace
from bo_search.types import FULL_PRECISION


class SlotSizes:
    """Exact size (bits) of each slot for each of its (bits, group_size) settings."""

    def __init__(self, space: SearchSpace, size_model: SizeModel):
        self.space = space
        infos = size_model.layers.by_fqn()
        planned = {f for s in space.slots for f in s.fqns}
        self.base_bits = size_model.other_bits + sum(
            size_model.layer_bits(li, FULL_PRECISION) for li in size_model.layers.linears if li.fqn not in planned
        )
        self.tables: list[dict[tuple[int, int], int]] = []
        for slot in space.slots:
            table = {}
            for b in slot.bits.values:
                for g in slot.group_size.values:
                    table[(b, g)] = sum(size_model.layer_bits(infos[f], space.choice_setting(b, g)) for f in slot.fqns)
            self.tables.append(table)
        #: weights per planned layer (the strategy weighs slots by their share of the planned weights)
        self.numel = {f: infos[f].numel for s in space.slots for f in s.fqns}
        #: parameter name -> slot index
        self.slot_of = {p.name: i for i, s in enumerate(space.slots) for p in (s.bits, s.group_size)}

    def slot_setting(self, i: int, values: Mapping[str, int]) -> tuple[int, int]:
        s = self.space.slots[i]
        return (values.get(s.bits.name, s.bits.values[0]), values.get(s.group_size.name, s.group_size.values[0]))

    def bits(self, values: Mapping[str, int]) -> int:
        return self.base_bits + sum(t[self.slot_setting(i, values)] for i, t in enumerate(self.tables))

    def gb(self, values: Mapping[str, int]) -> float:
        return self.bits(values) / 8 / 1e9

    def delta_bits(self, values: Mapping[str, int], name: str, new: int) -> int:
        i = self.slot_of[name]
        return self.tables[i][self.slot_setting(i, {**values, name: new})] - self.tables[i][self.slot_setting(i, values)]


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
    sizes: SlotSizes, limit_gb: float, values: Mapping[str, int], cost: Callable[[Mapping[str, int]], float] | None = None
) -> dict[str, int] | None:
    """The nearest plan within the budget, by one-notch downgrades (fewer bits, or a larger group).

    Without a cost model the downgrade taken is at the slot holding the most bits (quantization
    error falls steeply with bits, so the widest slots give up the least), the largest saving first.
    With ``cost(values) -> predicted loss`` it is the cheapest downgrade per bit saved. Returns None
    when no downgrade is left and the plan still does not fit.
    """
    space = sizes.space
    vals = dict(values)
    limit_bits = limit_gb * 8e9
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
                slot_bits = sizes.slot_setting(sizes.slot_of[p.name], vals)[0]
                score = -slot_bits * 1e12 - saved
            if best is None or score < best[0]:
                best = (score, p.name, step, saved)
        if best is None:
            return None
        _, name, step, saved = best
        vals[name] = step
        total -= saved
    return vals


def random_feasible(sizes: SlotSizes, limit_gb: float, rng: random.Random) -> dict[str, int]:
    """A random plan that fits: random choices, random downgrades until it fits, then random
    upgrades while it still fits (so the budget is used)."""
    space = sizes.space
    params = space.tunable
    vals = {p.name: rng.choice(p.values) for p in params}
    limit_bits = limit_gb * 8e9
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
