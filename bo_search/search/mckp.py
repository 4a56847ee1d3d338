"""The exact solver of the Thompson strategy: a space's slots with their choices and exact per-choice
costs (:class:`SlotProblem`), and the multiple-choice knapsack of one sampled problem solved as a
0/1 integer program (``scipy.optimize.milp``), with no-good cuts for evaluated and pending plans.

Imports neither torch nor ray."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bo_search.budget import SlotSizes
    from bo_search.space import SearchSpace

DRAW_TIME_LIMIT = 0.6  # seconds of milp per Thompson draw (measured: 0.1-1.7 s untimed at 420 parameters)


@dataclass(frozen=True)
class SlotProblem:
    """Per slot: its choices (bits, group size), what each costs against the budget (exact, e.g. bits
    of storage), the prior table's predicted loss increase (or None), and the slot's weight share."""

    choices: tuple[tuple[tuple[int, int], ...], ...]
    budget: tuple[tuple[float, ...], ...]
    prior: tuple[tuple[float, ...], ...] | None
    weight: tuple[float, ...]
    #: the space's (bits, group) parameter names per slot, None where fixed (not in the plan's values)
    names: tuple[tuple[str | None, str | None], ...] = ()
    #: secondary exact per-choice cost (bytes read per token) for the perplexity-limited goal
    speed: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.choices)
        if not n or len(self.budget) != n or len(self.weight) != n:
            raise ValueError("slot problem: choices, budget and weight need one entry per slot")
        for s, ch in enumerate(self.choices):
            if len(self.budget[s]) != len(ch) or (self.prior is not None and len(self.prior[s]) != len(ch)):
                raise ValueError(f"slot problem: slot {s} has tables of different lengths")
        keys = sorted({c for ch in self.choices for c in ch})
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_offsets", np.cumsum([0] + [len(ch) for ch in self.choices]))

    @property
    def keys(self) -> list[tuple[int, int]]:
        return self._keys  # type: ignore[attr-defined,no-any-return]

    @property
    def n_onehot(self) -> int:
        return int(self._offsets[-1])  # type: ignore[attr-defined]

    def offset(self, s: int) -> int:
        return int(self._offsets[s])  # type: ignore[attr-defined]

    def pick_of(self, values: Mapping[str, int]) -> tuple[int, ...]:
        """A plan's tunable values -> one choice index per slot."""
        out = []
        for s, ch in enumerate(self.choices):
            bn, gn = self.names[s]
            b = values[bn] if bn is not None else ch[0][0]
            g = values[gn] if gn is not None else ch[0][1]
            out.append(ch.index((b, g)))
        return tuple(out)

    def values_of(self, pick: Sequence[int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for s, c in enumerate(pick):
            b, g = self.choices[s][c]
            bn, gn = self.names[s]
            if bn is not None:
                out[bn] = b
            if gn is not None:
                out[gn] = g
        return out

    def total(self, table: Sequence[Sequence[float]], pick: Sequence[int]) -> float:
        return float(sum(table[s][c] for s, c in enumerate(pick)))


def build_problem(
    space: SearchSpace, slot_sizes: SlotSizes, tables: list[dict[tuple[int, int], float]] | None, speed: Any = None
) -> SlotProblem:
    """From a SearchSpace, its ``budget.SlotSizes`` (exact bits per slot setting) and a sensitivity
    table per slot (``Sensitivity.slot_costs``) or None. ``speed`` optionally gives per slot setting
    bits read per token (same shape as ``slot_sizes.tables``)."""
    tunable = {p.name for p in space.tunable}
    choices, budget, prior, weight, names = [], [], [], [], []
    for i, slot in enumerate(space.slots):
        ch = tuple((b, g) for b in slot.bits.values for g in slot.group_size.values)
        choices.append(ch)
        budget.append(tuple(float(slot_sizes.tables[i][c]) for c in ch))
        if tables is not None:
            prior.append(tuple(float(tables[i][c]) for c in ch))
        weight.append(float(sum(slot_sizes.numel[f] for f in slot.fqns)))
        names.append(
            (slot.bits.name if slot.bits.name in tunable else None, slot.group_size.name if slot.group_size.name in tunable else None)
        )
    total_w = sum(weight) or 1.0
    return SlotProblem(
        tuple(choices),
        tuple(budget),
        tuple(prior) if tables is not None else None,
        tuple(w / total_w for w in weight),
        tuple(names),
        tuple(tuple(float(t[c]) for c in ch) for t, ch in zip(speed, choices)) if speed is not None else None,
    )


def solve_mckp(
    objective: Sequence[Sequence[float]],
    constraint: Sequence[Sequence[float]],
    cap: float,
    exclude: Sequence[Sequence[int]] = (),
    time_limit: float = 30.0,
) -> tuple[int, ...] | None:
    """One choice per slot minimising the summed ``objective`` with the summed ``constraint`` <= ``cap``,
    and differing from every pick in ``exclude`` (one no-good cut each). None if nothing qualifies.

    A choice is dropped when another choice of its slot dominates it (no worse in both tables, better
    in one, or equal and listed first) and no excluded plan uses that other choice there: then every
    plan with the dropped choice is matched or beaten by a plan that is not excluded, so no optimum
    changes. The constraint is scaled so the solver's tolerance sits
    far below one unit, and the answer is checked in exact arithmetic (re-solved tighter if over)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    n_slots = len(objective)
    used = [{int(e[s]) for e in exclude} for s in range(n_slots)]
    kept: list[list[int]] = []
    for s in range(n_slots):
        o, k = objective[s], constraint[s]
        free = [d for d in range(len(o)) if d not in used[s]]

        def dominated(c: int, o: Sequence[float] = o, k: Sequence[float] = k, free: list[int] = free) -> bool:
            return any(d != c and o[d] <= o[c] and k[d] <= k[c] and (o[d] < o[c] or k[d] < k[c] or d < c) for d in free)

        kept.append([c for c in range(len(o)) if not dominated(c)])
    if sum(min(constraint[s][c] for c in kept[s]) for s in range(n_slots)) > cap:
        return None
    col = {(s, c): j for j, (s, c) in enumerate((s, c) for s in range(n_slots) for c in kept[s])}
    n = len(col)
    lows = [min(objective[s][c] for c in kept[s]) for s in range(n_slots)]
    spread = sum(max(objective[s][c] for c in kept[s]) - lows[s] for s in range(n_slots))
    oscale = 1e3 / spread if spread > 0 else 1.0
    cvec = np.zeros(n)
    kvec = np.zeros(n)
    member = np.zeros((n_slots, n))
    base = sum(min(constraint[s][c] for c in kept[s]) for s in range(n_slots))
    kspread = max(cap - base, 1e-12)
    for (s, c), j in col.items():
        cvec[j] = (objective[s][c] - lows[s]) * oscale
        kvec[j] = (constraint[s][c] - min(constraint[s][cc] for cc in kept[s])) / kspread
        member[s, j] = 1.0
    cuts = []
    for e in exclude:
        if all((s, c) in col for s, c in enumerate(e)):
            row = np.zeros(n)
            for s, c in enumerate(e):
                row[col[(s, c)]] = 1.0
            cuts.append(row)
    room = 1.0
    for _attempt in range(4):
        cons = [LinearConstraint(member, 1, 1), LinearConstraint(kvec[None, :], -np.inf, room)]
        if cuts:
            cons.append(LinearConstraint(np.array(cuts), -np.inf, n_slots - 1))
        res = milp(cvec, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1), options={"time_limit": time_limit})
        if res.x is None:
            return None
        pick = [0] * n_slots
        for s in range(n_slots):
            pick[s] = max(kept[s], key=lambda c: res.x[col[(s, c)]])
        if sum(constraint[s][c] for s, c in enumerate(pick)) <= cap and tuple(pick) not in {tuple(e) for e in exclude}:
            return tuple(pick)
        room -= 1e-6  # over the cap by the solver's tolerance: tighten and solve again
    return None
