"""Seed sets for a search: uniform plans that fill the budget, allocations at a few budget fractions,
and ``--initial_samples auto`` (FIT, exact and greedy allocations, the best uniform plans)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bo_search import cli
from bo_search.budget import SizeLimit, SlotTable
from bo_search.sensitivity.allocate import check_budget, get_solver
from bo_search.types import UserError

if TYPE_CHECKING:
    from bo_search.sensitivity.table import Sensitivity
    from bo_search.sizes import SizeModel
    from bo_search.space import SearchSpace
    from bo_search.structure import Structure

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


def widest_uniform(space: SearchSpace, size_model: SizeModel, limit: SizeLimit) -> list[tuple[int, int | None, dict[str, int]]]:
    """For each group size of the space: (bits, group size, values) of the widest uniform plan that fits."""
    bits_choices = sorted({v for p in space.tunable if p.kind == "bits" for v in p.values})
    group_choices: list[int | None] = [*sorted({v for p in space.tunable if p.kind == "group_size" for v in p.values})] or [None]
    out: list[tuple[int, int | None, dict[str, int]]] = []
    for g in group_choices:
        best: tuple[int, int | None, dict[str, int]] | None = None
        for b in bits_choices:
            vals = space.uniform(b, g, check_fixed=False)
            if vals is not None and limit.admits(size_model.gb(space.decode(vals))):
                best = (b, g, vals)
        if best is not None:
            out.append(best)
    return out


def best_uniform_candidates(space: SearchSpace, size_model: SizeModel, limit: SizeLimit) -> list[dict[str, int]]:
    """The uniform plans that fit and that no other fitting uniform plan beats on both counts (at
    least as many bits and a group at most as large): the candidates for "the best uniform plan"."""

    def group_key(g: int | None) -> float:
        return math.inf if g is None or g <= 0 else float(g)

    wide = widest_uniform(space, size_model, limit)
    return [vals for b, g, vals in wide if not any((b2, g2) != (b, g) and b2 >= b and group_key(g2) <= group_key(g) for b2, g2, _ in wide)]


def uniform_seeds(space: SearchSpace, size_model: SizeModel, limit: SizeLimit) -> list[dict[str, int]]:
    """For each group size: the widest uniform plan that fits, and that plan with slots upgraded to
    the next bit width (first and last blocks first) until the budget is used."""
    seeds: list[dict[str, int]] = []
    for _b, _g, best in widest_uniform(space, size_model, limit):
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
            if limit.admits(size_model.gb(space.decode(trial))):
                filled = trial
        if filled != best:
            seeds.append(filled)
    unique: list[dict[str, int]] = []
    for s in seeds:
        if s not in unique:
            unique.append(s)
    return unique


#: budgets of the seeds, as fractions of the bits the size limit leaves for the space's layers
BUDGET_FRACTIONS = (1.0, 0.98, 0.96)


AUTO_METHOD = "fit"


#: uniform seeds (the best predicted) added to the sensitivity allocations by auto_seeds
AUTO_UNIFORM = 2


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
    table: SlotTable,
    size_model: SizeModel,
    sens: Sensitivity,
    limit: SizeLimit | None,
    solvers: Sequence[str] = ("exact",),
    fractions: Sequence[float] = BUDGET_FRACTIONS,
    bitops_limit: float | None = None,
) -> list[Seed]:
    """Allocations by each solver at each budget: ``fraction`` of the bits the limit leaves for the
    space's layers. The full budget must admit a plan (UserError otherwise); smaller fractions that
    admit none are skipped. Every seed fits ``limit``. ``table``: the space's size table
    (``Structure.slots``), its prior is ``sens``.

    With ``bitops_limit`` (giga bit-operations per token, see ``SlotTable.build``) the knapsack
    budget is bit operations instead of size, and ``limit`` is not enforced (pass None)."""
    for f in fractions:
        if not 0 < f <= 1:
            raise UserError(f"budget fractions must be in (0, 1], got {f}")
    fns = [(name, get_solver(name)) for name in solvers]
    space = table.space
    assert space is not None, "allocate needs a table built from a space"
    if bitops_limit is not None:
        problem = SlotTable.build(space, size_model, "bitops").with_prior(sens)
        room = math.floor(bitops_limit * 1e9) - problem.base_bits
    elif limit is not None:
        problem = table.with_prior(sens)
        room = limit.bits - problem.base_bits
    else:
        raise ValueError("allocate: give a size limit or a bit-operations limit")
    check_budget(problem, room)
    seeds: list[Seed] = []
    for f in fractions:
        budget = math.floor(f * room) if f < 1 else room
        if problem.size(problem.cheapest()) > budget:
            log.info("budget fraction %.3g admits no plan; skipped", f)
            continue
        for name, fn in fns:
            alloc = fn(problem, budget)
            values = problem.values_of(alloc.pick)
            plan = space.decode(values)
            report = size_model.report(plan)
            assert limit is None or limit.admits(report.gb), (report.gb, limit)
            gbops = (alloc.bits + problem.base_bits) / 1e9 if problem.metric == "bitops" else None
            seeds.append(Seed(name, f, values, report.gb, report.avg_bits, alloc.cost, alloc.optimal, plan.histogram(), gbops))
    return seeds


def auto_seeds(setup: Structure, limit: SizeLimit, sens: Sensitivity | None = None) -> list[dict[str, int]]:
    """``--initial_samples auto``: FIT sensitivity on the calibration split (computed in this process
    once, then read from the cache), exact allocations at 100/98/96% of the budget, the greedy one at
    100%, and the two budget-filling uniform seeds with the lowest predicted loss; all fit ``limit``."""
    if sens is None:
        from bo_search.sensitivity.cache import cached_sensitivity

        t0 = time.perf_counter()
        log.info(
            "--initial_samples auto: %s sensitivity on the calibration split (computed once per model and space, then cached)", AUTO_METHOD
        )
        sens, path, hit = cached_sensitivity(setup.eval_cfg, setup.ref, setup.layers, setup.space, AUTO_METHOD, progress=cli.progress)
        log.info(
            "%s sensitivity %s %s (%.1f s)", AUTO_METHOD, "read from" if hit else "computed and cached in", path, time.perf_counter() - t0
        )
    seeds = allocate(setup.slots, setup.size_model, sens, limit, solvers=("exact",)) + allocate(
        setup.slots, setup.size_model, sens, limit, solvers=("greedy",), fractions=(1.0,)
    )
    # The additive model is only a model (at ~3.5 bits the benchmark's FIT allocation is within noise of
    # uniform 3-bit): also seed the uniform plans it predicts best, so auto never starts behind 'uniform'.
    tables = sens.slot_costs(setup.space)
    uniform = sorted(uniform_seeds(setup.space, setup.size_model, limit), key=lambda v: sens.predicted(setup.space, v, tables))
    return dedupe([s.values for s in seeds] + uniform[:AUTO_UNIFORM])


def dedupe(samples: Sequence[dict[str, int]]) -> list[dict[str, int]]:
    out: list[dict[str, int]] = []
    for s in samples:
        if s not in out:
            out.append(s)
    return out
