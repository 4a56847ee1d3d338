"""Initial configurations for the search: budget-filling uniform plans (no model needed), and
allocations from sensitivity (greedy bang-for-buck and exact multiple-choice knapsack)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bo_search.quant import SizeModel
from bo_search.space import SearchSpace
from bo_search.types import UserError, did_you_mean

log = logging.getLogger(__name__)


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
            vals = space.uniform(b, g, check_fixed=False)
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


# ---------------------------------------------------------------------------------------------
# Allocations from sensitivity: a multiple-choice knapsack over the space's slots
# ---------------------------------------------------------------------------------------------

#: budgets of the seeds, as fractions of the bits the size limit leaves for the space's layers
BUDGET_FRACTIONS = (1.0, 0.98, 0.96)
AUTO_METHOD = "fit"
#: uniform seeds (the best predicted) added to the sensitivity allocations by auto_seeds
AUTO_UNIFORM = 2
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


def build_knapsack(space: SearchSpace, size_model: SizeModel, sens: Any, metric: str = "size") -> Knapsack:
    """The instance for ``space``: slot costs = the sensitivity table aggregated to the slot
    (UserError if the table cannot price the space); slot "sizes" = what the budget counts:

    - ``size``: the exact bits of the slot's linears (``SizeModel.layer_bits``: codes, scales, zeros);
    - ``bitops``: bit operations per token, numel x weight bits x ``ACT_BITS`` summed over the slot's
      linears (one multiply-accumulate per weight per token; group size does not change it). The
      linears outside the space count at full precision in ``base_bits``; embeddings do no MACs."""
    from bo_search.types import FULL_PRECISION, FULL_PRECISION_BITS

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


def _check_budget(problem: Knapsack, budget_bits: int, metric: str = "size") -> tuple[int, ...]:
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
    pick = list(_check_budget(problem, budget_bits))
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

    _check_budget(problem, budget_bits)
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


@dataclass(frozen=True)
class Seed:
    """One allocation as a seed: the parameters plus what it costs and is predicted to lose."""

    solver: str
    fraction: float
    values: dict[str, int]
    size_gb: float
    avg_bits: float
    predicted: float
    optimal: bool
    histogram: dict[str, int]
    gbops: float | None = None  # bit operations per token (the bitops metric), in 1e9

    def to_json(self) -> dict[str, Any]:
        return {
            "solver": self.solver,
            "budget_fraction": self.fraction,
            "model_size_gb": round(self.size_gb, 9),
            "avg_bits": round(self.avg_bits, 4),
            "predicted_loss_increase": self.predicted,
            "optimal": self.optimal,
            "bit_widths": self.histogram,
            **({"gbops_per_token": round(self.gbops, 6)} if self.gbops is not None else {}),
        }


def allocate(
    space: SearchSpace,
    size_model: SizeModel,
    sens: Any,
    limit_gb: float,
    solvers: Sequence[str] = ("exact",),
    fractions: Sequence[float] = BUDGET_FRACTIONS,
    bitops_limit: float | None = None,
) -> list[Seed]:
    """Allocations by each solver at each budget: ``fraction`` of the bits the limit leaves for the
    space's layers. The full budget must admit a plan (UserError otherwise); smaller fractions that
    admit none are skipped. Every seed fits ``limit_gb``.

    With ``bitops_limit`` (giga bit-operations per token, see ``build_knapsack``) the knapsack
    budget is bit operations instead of size, and ``limit_gb`` is not enforced (pass ``math.inf``)."""
    for f in fractions:
        if not 0 < f <= 1:
            raise UserError(f"budget fractions must be in (0, 1], got {f}")
    fns = [(name, get_solver(name)) for name in solvers]
    metric = "size" if bitops_limit is None else "bitops"
    problem = build_knapsack(space, size_model, sens, metric)
    room = (total_bits_limit(limit_gb) if bitops_limit is None else math.floor(bitops_limit * 1e9)) - problem.base_bits
    _check_budget(problem, room, metric)
    seeds: list[Seed] = []
    for f in fractions:
        budget = math.floor(f * room) if f < 1 else room
        if problem.size(problem.cheapest()) > budget:
            log.info("budget fraction %.3g admits no plan; skipped", f)
            continue
        for name, fn in fns:
            alloc = fn(problem, budget)
            values = pick_values(space, problem, alloc.pick)
            plan = space.decode(values)
            report = size_model.report(plan)
            assert report.gb <= limit_gb, (report.gb, limit_gb)
            gbops = (alloc.bits + problem.base_bits) / 1e9 if metric == "bitops" else None
            seeds.append(Seed(name, f, values, report.gb, report.avg_bits, alloc.cost, alloc.optimal, plan.histogram(), gbops))
    return seeds


def auto_seeds(setup: Any, limit_gb: float, sens: Any = None) -> list[dict[str, int]]:
    """``--initial_samples auto``: FIT sensitivity on the calibration split (computed in this process
    once, then read from the cache), exact allocations at 100/98/96% of the budget, the greedy one at
    100%, and the two budget-filling uniform seeds with the lowest predicted loss; all fit ``limit_gb``."""
    if sens is None:
        from bo_search import cli
        from bo_search.sensitivity import cached_sensitivity

        t0 = time.perf_counter()
        print(
            f"--initial_samples auto: {AUTO_METHOD} sensitivity on the calibration split (computed once per model and space, then cached)",
            flush=True,
        )
        sens, path, hit = cached_sensitivity(setup.eval_cfg, setup.ref, setup.layers, setup.space, AUTO_METHOD, progress=cli.progress)
        print(
            f"{AUTO_METHOD} sensitivity {'read from' if hit else 'computed and cached in'} {path} ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    seeds = allocate(setup.space, setup.size_model, sens, limit_gb, solvers=("exact",)) + allocate(
        setup.space, setup.size_model, sens, limit_gb, solvers=("greedy",), fractions=(1.0,)
    )
    # The additive model is only a model (at ~3.5 bits the benchmark's FIT allocation is within noise of
    # uniform 3-bit): also seed the uniform plans it predicts best, so auto never starts behind 'uniform'.
    tables = sens.slot_costs(setup.space)
    uniform = sorted(uniform_seeds(setup.space, setup.size_model, limit_gb), key=lambda v: sens.predicted(setup.space, v, tables))
    return dedupe([s.values for s in seeds] + uniform[:AUTO_UNIFORM])


def dedupe(samples: Sequence[dict[str, int]]) -> list[dict[str, int]]:
    out: list[dict[str, int]] = []
    for s in samples:
        if s not in out:
            out.append(s)
    return out
