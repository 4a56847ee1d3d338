"""Allocation on the per-slot table: a multiple-choice knapsack over the space's slots, solved
greedily (bang for buck) or exactly (an integer program, ``scipy.optimize.milp``), under a size or
bit-operations budget."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bo_search.sizes import SizeModel
from bo_search.space import SearchSpace
from bo_search.types import FULL_PRECISION, FULL_PRECISION_BITS, UserError, did_you_mean

if TYPE_CHECKING:
    from bo_search.sensitivity.table import Sensitivity

log = logging.getLogger(__name__)

#: activation bits assumed by the bit-operations budget (weight-only quantization: fp16/bf16 activations)
ACT_BITS = 16


BUDGET_METRICS = ("size", "bitops")


@dataclass(frozen=True)
class Knapsack:
    """One choice per slot; ``sizes`` in bits (exact, from SizeModel), ``costs`` predicted loss increases.

    ``base_bits`` is what the plan does not choose: tensors outside the space (embeddings, norms,
    layers no slot covers) at their storage dtype.
    """

    labels: tuple[str, ...]
    choices: tuple[tuple[tuple[int, int], ...], ...]
    sizes: tuple[tuple[int, ...], ...]
    costs: tuple[tuple[float, ...], ...]
    base_bits: int = 0

    def __post_init__(self) -> None:
        n = len(self.labels)
        if not n or len(self.choices) != n or len(self.sizes) != n or len(self.costs) != n:
            raise ValueError("knapsack: labels, choices, sizes and costs must have one non-empty entry per slot")
        for label, ch, sz, co in zip(self.labels, self.choices, self.sizes, self.costs):
            if not ch or len(sz) != len(ch) or len(co) != len(ch):
                raise ValueError(f"knapsack slot {label}: choices, sizes and costs differ in length")
            if any(not math.isfinite(c) for c in co):
                raise ValueError(f"knapsack slot {label}: a cost is not finite")

    def size(self, pick: Sequence[int]) -> int:
        return sum(self.sizes[s][c] for s, c in enumerate(pick))

    def cost(self, pick: Sequence[int]) -> float:
        return sum(self.costs[s][c] for s, c in enumerate(pick))

    def cheapest(self) -> tuple[int, ...]:
        """Per slot the smallest choice (the lower cost among equal sizes)."""
        return tuple(min(range(len(sz)), key=list(zip(sz, co)).__getitem__) for sz, co in zip(self.sizes, self.costs))


@dataclass(frozen=True)
class Allocation:
    """A solver's answer: one choice index per slot."""

    solver: str
    pick: tuple[int, ...]
    bits: int  # the slots' bits
    cost: float  # predicted loss increase
    budget_bits: int
    optimal: bool  # proven optimal (exact solver) or not


def build_knapsack(space: SearchSpace, size_model: SizeModel, sens: Sensitivity, metric: str = "size") -> Knapsack:
    """The instance for ``space``: slot costs = the sensitivity table aggregated to the slot
    (UserError if the table cannot price the space); slot "sizes" = what the budget counts:

    - ``size``: the exact bits of the slot's linears (``SizeModel.layer_bits``: codes, scales, zeros);
    - ``bitops``: bit operations per token, numel x weight bits x ``ACT_BITS`` summed over the slot's
      linears (one multiply-accumulate per weight per token; group size does not change it). The
      linears outside the space count at full precision in ``base_bits``; embeddings do no MACs."""

    if metric not in BUDGET_METRICS:
        raise UserError(f"unknown budget metric {metric!r}; use one of {', '.join(BUDGET_METRICS)}")
    infos = size_model.layers.by_fqn()
    tables = sens.slot_costs(space)
    in_space = {f for slot in space.slots for f in slot.fqns}

    def cost_bits(f: str, q: Any) -> int:
        if metric == "bitops":
            return int(infos[f].numel * (q.bits if q.bits < FULL_PRECISION_BITS else size_model.fp_bits) * ACT_BITS)
        return int(size_model.layer_bits(infos[f], q))

    outside = sum(cost_bits(li.fqn, FULL_PRECISION) for li in size_model.layers.linears if li.fqn not in in_space)
    base = outside + (size_model.other_bits if metric == "size" else 0)
    labels, choices, sizes, costs = [], [], [], []
    for slot, table in zip(space.slots, tables):
        ch = tuple((b, g) for b in slot.bits.values for g in slot.group_size.values)
        labels.append(f"block {slot.block}" + (f" {slot.group}" if slot.group else ""))
        choices.append(ch)
        sizes.append(tuple(sum(cost_bits(f, space.choice_setting(b, g)) for f in slot.fqns) for b, g in ch))
        costs.append(tuple(table[c] for c in ch))
    return Knapsack(tuple(labels), tuple(choices), tuple(sizes), tuple(costs), int(base))


def total_bits_limit(limit_gb: float) -> int:
    """The largest whole number of bits whose size, computed as SizeModel does (bits / 8 / 1e9), fits ``limit_gb``."""
    t = math.floor(limit_gb * 8e9)
    while (t + 1) / 8 / 1e9 <= limit_gb:
        t += 1
    while t / 8 / 1e9 > limit_gb:
        t -= 1
    return t


def check_budget(problem: Knapsack, budget_bits: int, metric: str = "size") -> tuple[int, ...]:
    start = problem.cheapest()
    if problem.size(start) > budget_bits:
        if metric == "bitops":
            lo, have, what = (
                (problem.size(start) + problem.base_bits) / 1e9,
                (budget_bits + problem.base_bits) / 1e9,
                "bit-operations budget",
            )
            unit = "GBOPs per token"
        else:
            lo, have, what = (problem.size(start) + problem.base_bits) / 8 / 1e9, (budget_bits + problem.base_bits) / 8 / 1e9, "size budget"
            unit = "GB"
        raise UserError(
            f"{what} {have:.6g} {unit} is below the smallest plan of the space ({lo:.6g} {unit}): no allocation fits; raise the budget"
        )
    return start


def greedy(problem: Knapsack, budget_bits: int) -> Allocation:
    """Bang for the buck: start every slot at its smallest choice, then repeatedly take the upgrade
    (to any larger choice of the same slot) with the largest predicted-loss reduction per extra bit
    that still fits; a choice that is both smaller and better is taken first. Never exceeds the budget."""
    pick = list(check_budget(problem, budget_bits))
    used = problem.size(pick)
    while True:
        best: tuple[float, float, int, int] | None = None  # (ratio, gain, slot, choice)
        for s, (sz, co) in enumerate(zip(problem.sizes, problem.costs)):
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


def _pareto(sizes: Sequence[int], costs: Sequence[float]) -> list[int]:
    """Choices not dominated by a choice that is no larger and cheaper (or equal and listed first)."""
    keep: list[int] = []
    best = math.inf
    for c in sorted(range(len(sizes)), key=lambda i: (sizes[i], costs[i], i)):
        if costs[c] < best:
            keep.append(c)
            best = costs[c]
    return keep


def exact(problem: Knapsack, budget_bits: int, time_limit: float = 120.0) -> Allocation:
    """The multiple-choice knapsack solved exactly as a 0/1 integer program (``scipy.optimize.milp``,
    HiGHS, zero relative gap): minimise the summed predicted cost, one choice per slot, summed size
    within the budget. Dominated choices are dropped first; sizes are divided by their gcd and costs
    are shifted and scaled per slot (neither changes the optimum) so the solver's tolerances bite
    far below the costs' resolution."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    check_budget(problem, budget_bits)
    kept = [_pareto(sz, co) for sz, co in zip(problem.sizes, problem.costs)]
    g = 0
    for s, ks in enumerate(kept):
        for c in ks:
            g = math.gcd(g, problem.sizes[s][c])
    g = max(g, 1)
    lows = [min(problem.costs[s][c] for c in ks) for s, ks in enumerate(kept)]
    spread = sum(max(problem.costs[s][c] for c in ks) - lows[s] for s, ks in enumerate(kept))
    scale = 1e6 / spread if spread > 0 else 1.0
    index = [(s, c) for s, ks in enumerate(kept) for c in ks]
    n = len(index)
    cost_vec = np.array([(problem.costs[s][c] - lows[s]) * scale for s, c in index])
    size_vec = np.array([problem.sizes[s][c] // g for s, c in index], dtype=float)
    member = np.zeros((len(kept), n))
    for j, (s, _) in enumerate(index):
        member[s, j] = 1.0
    cap = budget_bits // g
    for _attempt in range(4):
        res = milp(
            cost_vec,
            constraints=[LinearConstraint(member, 1, 1), LinearConstraint(size_vec[None, :], -np.inf, cap)],
            integrality=np.ones(n),
            bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0, "time_limit": time_limit},
        )
        if res.x is None:
            raise RuntimeError(f"the knapsack solver found no solution ({res.message})")
        pick = [0] * len(kept)
        for s in range(len(kept)):
            cols = [j for j, (ss, _) in enumerate(index) if ss == s]
            pick[s] = index[max(cols, key=lambda j: res.x[j])][1]
        used = problem.size(pick)
        if used <= budget_bits:
            if res.status != 0:
                log.warning("knapsack solver stopped before proving optimality: %s", res.message)
            return Allocation("exact", tuple(pick), used, problem.cost(pick), budget_bits, optimal=res.status == 0)
        cap -= 1  # a solution over the budget by the solver's feasibility tolerance: tighten and solve again
    raise RuntimeError("the knapsack solver kept returning allocations over the budget")


SOLVERS = {"exact": exact, "greedy": greedy}


def get_solver(name: str) -> Any:
    if name not in SOLVERS:
        raise did_you_mean(name, SOLVERS, "solver")
    return SOLVERS[name]


def pick_values(space: SearchSpace, problem: Knapsack, pick: Sequence[int]) -> dict[str, int]:
    """A knapsack answer as the space's tunable parameters."""
    params = {p.name for p in space.tunable}
    vals: dict[str, int] = {}
    for slot, ch, c in zip(space.slots, problem.choices, pick):
        bits, group = ch[c]
        for p, v in ((slot.bits, bits), (slot.group_size, group)):
            if p.name in params:
                vals[p.name] = v
    return vals
