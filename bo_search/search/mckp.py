"""The one exact solver: the multiple-choice knapsack over a space's slots (one choice per slot,
summed objective minimised, summed constraint within a cap) as a 0/1 integer program
(``scipy.optimize.milp``), with no-good cuts for evaluated and pending plans. The Thompson strategy
solves each sampled problem with it; seeding and ``seed`` solve the prior's allocation with it
(``sensitivity.allocate.exact``). The tables come from ``budget.SlotTable``.

Imports neither torch nor ray."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DRAW_TIME_LIMIT = 0.6  # seconds of milp per Thompson draw (measured: 0.1-1.7 s untimed at 420 parameters)


def solve_mckp(
    objective: Sequence[Sequence[float]],
    constraint: Sequence[Sequence[float]],
    cap: float,
    exclude: Sequence[Sequence[int]] = (),
    time_limit: float = 30.0,
    gap: float | None = None,
) -> tuple[int, ...] | None:
    """One choice per slot minimising the summed ``objective`` with the summed ``constraint`` <= ``cap``,
    and differing from every pick in ``exclude`` (one no-good cut each). None if nothing qualifies.

    A choice is dropped when another choice of its slot dominates it (no worse in both tables, better
    in one, or equal and listed first) and no excluded plan uses that other choice there: then every
    plan with the dropped choice is matched or beaten by a plan that is not excluded, so no optimum
    changes. The constraint is scaled so the solver's tolerance sits
    far below one unit, and the answer is checked in exact arithmetic (re-solved tighter if over).
    ``gap``: the solver's relative optimality gap (None: HiGHS's default; 0: proven optimal, as the
    seeds' allocation asks). :func:`solve_mckp_status` also says whether the optimum was proven."""
    return solve_mckp_status(objective, constraint, cap, exclude, time_limit, gap)[0]


def solve_mckp_status(
    objective: Sequence[Sequence[float]],
    constraint: Sequence[Sequence[float]],
    cap: float,
    exclude: Sequence[Sequence[int]] = (),
    time_limit: float = 30.0,
    gap: float | None = None,
) -> tuple[tuple[int, ...] | None, bool]:
    """:func:`solve_mckp`, and whether the solver proved its answer optimal (not stopped by its time limit)."""
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
    floor = sum(min(constraint[s][c] for c in kept[s]) for s in range(n_slots))
    if floor > cap:
        return None, False
    # a choice whose extra constraint over its slot's smallest exceeds the room left can never fit:
    # dropped, so a cap at the floor (room 0) leaves the solver no ill-scaled column
    kept = [[c for c in ks if constraint[s][c] - min(constraint[s][cc] for cc in ks) <= cap - floor] for s, ks in enumerate(kept)]
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
        options: dict[str, float] = {"time_limit": time_limit}
        if gap is not None:
            options["mip_rel_gap"] = gap
        res = milp(cvec, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1), options=options)
        if res.x is None:
            return None, False
        pick = [0] * n_slots
        for s in range(n_slots):
            pick[s] = max(kept[s], key=lambda c: res.x[col[(s, c)]])
        if sum(constraint[s][c] for s, c in enumerate(pick)) <= cap and tuple(pick) not in {tuple(e) for e in exclude}:
            return tuple(pick), res.status == 0
        room -= 1e-6  # over the cap by the solver's tolerance: tighten and solve again
    return None, False
