"""Allocation on the per-slot table (``budget.SlotTable`` with a prior attached): a multiple-choice
knapsack over the space's slots, solved greedily (bang for buck) or exactly (the one integer program,
``search.mckp.solve_mckp``), under a size or bit-operations budget."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from bo_search.budget import SlotTable, gb_of_bits
from bo_search.search.mckp import solve_mckp_status
from bo_search.types import UserError, did_you_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Allocation:
    """A solver's answer: one choice index per slot."""

    solver: str
    pick: tuple[int, ...]
    bits: int  # the slots' bits
    cost: float  # predicted loss increase
    budget_bits: int
    optimal: bool  # proven optimal (exact solver) or not


def check_budget(problem: SlotTable, budget_bits: int) -> tuple[int, ...]:
    start = problem.cheapest()
    if problem.size(start) > budget_bits:
        if problem.metric == "bitops":
            lo, have, what = (
                (problem.size(start) + problem.base_bits) / 1e9,
                (budget_bits + problem.base_bits) / 1e9,
                "bit-operations budget",
            )
            unit = "GBOPs per token"
        else:
            lo, have, what = gb_of_bits(problem.size(start) + problem.base_bits), gb_of_bits(budget_bits + problem.base_bits), "size budget"
            unit = "GB"
        raise UserError(
            f"{what} {have:.6g} {unit} is below the smallest plan of the space ({lo:.6g} {unit}): no allocation fits; raise the budget"
        )
    return start


def greedy(problem: SlotTable, budget_bits: int) -> Allocation:
    """Bang for the buck: start every slot at its smallest choice, then repeatedly take the upgrade
    (to any larger choice of the same slot) with the largest predicted-loss reduction per extra bit
    that still fits; a choice that is both smaller and better is taken first. Never exceeds the budget."""
    assert problem.prior is not None, "greedy allocation needs a prior"
    pick = list(check_budget(problem, budget_bits))
    used = problem.size(pick)
    while True:
        best: tuple[float, float, int, int] | None = None  # (ratio, gain, slot, choice)
        for s, (sz, co) in enumerate(zip(problem.sizes, problem.prior)):
            cur = pick[s]
            for c in range(len(sz)):
                gain = co[cur] - co[c]
                extra = sz[c] - sz[cur]
                if gain <= 0 or used + extra > budget_bits:
                    continue
                ratio = math.inf if extra <= 0 else gain / extra
                if best is None or (ratio, gain) > (best[0], best[1]):
                    best = (ratio, gain, s, c)
        if best is None:
            break
        _, _, s, c = best
        used += problem.sizes[s][c] - problem.sizes[s][pick[s]]
        pick[s] = c
    assert used <= budget_bits
    return Allocation("greedy", tuple(pick), used, problem.cost(pick), budget_bits, optimal=False)


def exact(problem: SlotTable, budget_bits: int, time_limit: float = 120.0) -> Allocation:
    """The multiple-choice knapsack solved exactly: the one integer program (``solve_mckp``) on the
    prior's costs and the table's sizes, at zero relative gap (proven optimal unless the time limit
    stops it)."""
    assert problem.prior is not None, "exact allocation needs a prior"
    check_budget(problem, budget_bits)
    pick, optimal = solve_mckp_status(problem.prior, problem.sizes, budget_bits, time_limit=time_limit, gap=0.0)
    if pick is None:
        raise RuntimeError("the knapsack solver found no allocation within the budget")
    if not optimal:
        log.warning("knapsack solver stopped before proving optimality (time limit %.0f s)", time_limit)
    return Allocation("exact", pick, problem.size(pick), problem.cost(pick), budget_bits, optimal=optimal)


SOLVERS = {"exact": exact, "greedy": greedy}


def get_solver(name: str) -> Any:
    if name not in SOLVERS:
        raise did_you_mean(name, SOLVERS, "solver")
    return SOLVERS[name]
