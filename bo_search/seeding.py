"""Initial configurations for the search: budget-filling uniform plans (no model needed), and
allocations from sensitivity (greedy bang-for-buck and exact multiple-choice knapsack)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bo_search.quant import SizeModel
from bo_search.space import SearchSpace


def _set_all(space: SearchSpace, bits: int, group: int) -> dict[str, int] | None:
    vals: dict[str, int] = {}
    for p in space.tunable:
        v = bits if p.kind == "bits" else group
        if v not in p.values:
            return None
        vals[p.name] = v
    return vals


def _interleaved(n: int) -> list[int]:
    """0, n-1, 1, n-2, ...: first and last blocks first (they are usually the most sensitive)."""
    out: list[int] = []
    lo, hi = 0, n - 1
    while lo <= hi:
        out.append(lo)
        if hi != lo:
            out.append(hi)
        lo, hi = lo + 1, hi - 1
    return out


def uniform_seeds(space: SearchSpace, size_model: SizeModel, limit_gb: float) -> list[dict[str, int]]:
    """For each group size: the widest uniform plan that fits, and that plan with slots upgraded to
    the next bit width (first and last blocks first) until the budget is used."""
    bits_choices = sorted({v for p in space.tunable if p.kind == "bits" for v in p.values})
    group_choices: list[int | None] = [*sorted({v for p in space.tunable if p.kind == "group_size" for v in p.values})] or [None]
    seeds: list[dict[str, int]] = []
    for g in group_choices:
        best: dict[str, int] | None = None
        for b in bits_choices:
            vals = _set_all(space, b, g) if g is not None else _set_all_bits(space, b)
            if vals is not None and size_model.gb(space.decode(vals)) <= limit_gb:
                best = vals
        if best is None:
            continue
        seeds.append(best)
        filled = dict(best)
        bit_params = [p for p in space.tunable if p.kind == "bits"]
        order = _interleaved(len(bit_params))
        for i in order:
            p = bit_params[i]
            higher = [v for v in p.values if v > filled[p.name]]
            if not higher:
                continue
            trial = {**filled, p.name: higher[0]}
            if size_model.gb(space.decode(trial)) <= limit_gb:
                filled = trial
        if filled != best:
            seeds.append(filled)
    unique: list[dict[str, int]] = []
    for s in seeds:
        if s not in unique:
            unique.append(s)
    return unique


def _set_all_bits(space: SearchSpace, bits: int) -> dict[str, int] | None:
    vals: dict[str, int] = {}
    for p in space.tunable:
        if p.kind == "bits":
            if bits not in p.values:
                return None
            vals[p.name] = bits
    return vals


def random_feasible(space: SearchSpace, size_gb: Any, limit_gb: float, rng: Any) -> dict[str, int]:
    """A random plan that fits: random choices, then random downgrades (fewer bits, else larger
    groups) until it fits, then random upgrades while it still fits. ``rng`` is a ``random.Random``."""
    vals = {p.name: rng.choice(p.values) for p in space.tunable}
    params = space.tunable

    def cheaper(p: Any, v: int) -> int | None:
        i = p.values.index(v)
        return (
            p.values[i - 1]
            if p.kind == "bits" and i > 0
            else (p.values[i + 1] if p.kind == "group_size" and i + 1 < len(p.values) else None)
        )

    def dearer(p: Any, v: int) -> int | None:
        i = p.values.index(v)
        return (
            p.values[i + 1]
            if p.kind == "bits" and i + 1 < len(p.values)
            else (p.values[i - 1] if p.kind == "group_size" and i > 0 else None)
        )

    while size_gb(space.decode(vals)) > limit_gb:
        options = [(p, c) for p in params if (c := cheaper(p, vals[p.name])) is not None]
        if not options:
            break
        p, c = rng.choice(options)
        vals[p.name] = c
    for p in rng.sample(params, len(params)):
        up = dearer(p, vals[p.name])
        if up is not None and size_gb(space.decode({**vals, p.name: up})) <= limit_gb:
            vals[p.name] = up
    return vals


def auto_seeds(setup: Any, limit_gb: float) -> list[dict[str, int]]:
    raise NotImplementedError("sensitivity seeding arrives with bo_search.seed")


def dedupe(samples: Sequence[dict[str, int]]) -> list[dict[str, int]]:
    out: list[dict[str, int]] = []
    for s in samples:
        if s not in out:
            out.append(s)
    return out
