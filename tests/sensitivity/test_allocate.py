"""Allocations from sensitivity: the exact knapsack against exhaustive search, greedy within budget,
seeds that fit and round-trip through the space. No model needed (synthetic SmolLM2 layers)."""

import itertools
import json
import math
import random

import pytest
from layers import smollm2

from bo_search.budget import SizeLimit, SlotTable, random_feasible
from bo_search.quant import QuantScheme
from bo_search.sensitivity.allocate import exact, get_solver, greedy
from bo_search.sensitivity.seeds import allocate
from bo_search.sensitivity.table import Sensitivity, choice_key
from bo_search.sizes import SizeModel
from bo_search.space import load_initial_samples, load_space, write_initial_samples
from bo_search.types import LayerQuant, QuantPlan, UserError

SPACE = "parameter_spaces/smollm2_135m_per_block.json"


def _size_model(layers, other_bits=49152 * 576 * 16):
    sm = SizeModel.__new__(SizeModel)
    sm.layers, sm.scheme, sm.fp_bits, sm.other_bits, sm.fp_dtype = layers, QuantScheme(), 16, other_bits, "bfloat16"
    sm._infos = layers.by_fqn()
    return sm


def Knapsack(labels, choices, sizes, costs):  # noqa: N802 - a hand-built table with a prior, as the old tests built it
    n = len(labels)
    return SlotTable(tuple(labels), tuple(choices), tuple(sizes), (1,) * n, ((None, None),) * n, 0, prior=tuple(costs))


def _table(space, sm, sens=None):
    return SlotTable.build(space, sm).with_prior(sens)


def _random_instance(rng, n_slots, n_choices, monotone=True):
    sizes, costs = [], []
    for _ in range(n_slots):
        sz = sorted(rng.sample(range(10, 200), n_choices))
        if monotone:
            co = sorted((rng.random() * 10 for _ in range(n_choices)), reverse=True)
        else:
            co = [rng.random() * 10 - 1 for _ in range(n_choices)]
        sizes.append(tuple(sz))
        costs.append(tuple(co))
    choices = tuple(tuple((b, 64) for b in range(n_choices)) for _ in range(n_slots))
    return Knapsack(tuple(f"s{i}" for i in range(n_slots)), choices, tuple(sizes), tuple(costs))


def _brute_force(problem, budget):
    best = (math.inf, None)
    for pick in itertools.product(*(range(len(c)) for c in problem.choices)):
        if problem.size(pick) <= budget:
            best = min(best, (problem.cost(pick), pick))
    return best


@pytest.mark.parametrize("monotone", [True, False])
def test_exact_matches_exhaustive_search(monotone):
    rng = random.Random(1 if monotone else 2)
    for _ in range(40):
        problem = _random_instance(rng, rng.randint(2, 5), rng.randint(2, 5), monotone)
        lo = problem.size(problem.cheapest())
        hi = sum(max(s) for s in problem.sizes)
        budget = rng.randint(lo, hi)
        want, _ = _brute_force(problem, budget)
        got = exact(problem, budget)
        assert got.bits == problem.size(got.pick) <= budget
        assert got.optimal
        assert got.cost == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_exact_with_costs_spanning_many_orders_of_magnitude():
    """HiGHS has an absolute gap of 1e-6: tiny costs must still be optimised exactly."""
    rng = random.Random(3)
    for _ in range(20):
        problem = _random_instance(rng, 5, 4)
        problem = Knapsack(problem.labels, problem.choices, problem.sizes, tuple(tuple(c * 1e-9 for c in co) for co in problem.prior))
        budget = (problem.size(problem.cheapest()) + sum(max(s) for s in problem.sizes)) // 2
        want, _ = _brute_force(problem, budget)
        assert exact(problem, budget).cost == pytest.approx(want, rel=1e-9)


def test_greedy_never_exceeds_budget_and_never_beats_exact():
    rng = random.Random(4)
    for i in range(300):
        problem = _random_instance(rng, rng.randint(1, 6), rng.randint(1, 6), monotone=i % 2 == 0)
        lo = problem.size(problem.cheapest())
        budget = rng.randint(lo, sum(max(s) for s in problem.sizes) + 5)
        g = greedy(problem, budget)
        assert g.bits == problem.size(g.pick) <= budget
        assert g.cost <= problem.cost(problem.cheapest()) + 1e-12  # only ever improves
        if i % 10 == 0:
            assert exact(problem, budget).cost <= g.cost + 1e-9


def test_greedy_takes_bang_for_buck_order():
    # slot 0: +10 bits buys 5.0 (0.5/bit); slot 1: +10 bits buys 1.0 (0.1/bit); room for one upgrade only
    problem = Knapsack(("a", "b"), (((2, 64), (4, 64)),) * 2, ((10, 20), (10, 20)), ((6.0, 1.0), (2.0, 1.0)))
    g = greedy(problem, 30)
    assert g.pick == (1, 0) and g.bits == 30 and g.cost == pytest.approx(3.0)


def test_budget_below_cheapest_plan_is_a_user_error():
    problem = Knapsack(("a",), (((2, 64), (4, 64)),), ((10, 20),), ((2.0, 1.0),))
    for solver in (greedy, exact):
        with pytest.raises(UserError, match=r"below the smallest plan of the space"):
            solver(problem, 9)
    with pytest.raises(UserError, match="did you mean 'greedy'"):
        get_solver("gredy")


def test_size_limit_bits_is_the_largest_size_that_fits_and_avg_bits_round_trips():
    for gb in (0.1, 0.0512345678, 0.06797472, 1 / 3):
        t = SizeLimit(gb).bits
        assert t / 8 / 1e9 <= gb < (t + 1) / 8 / 1e9
    limit = SizeLimit.from_avg_bits(3.5, other_bits=10**6, n_weights=10**7)
    assert limit.gb == pytest.approx((10**6 + 3.5 * 10**7) / 8e9) and limit.avg_bits(10**6, 10**7) == pytest.approx(3.5)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(UserError, match="--model_size_constraint must be positive"):
            SizeLimit(bad)
    with pytest.raises(UserError, match="--avg_bits must be positive"):
        SizeLimit.from_avg_bits(0, 0, 1)


def _synthetic_sensitivity(space, layers, seed=0):
    """Per-layer costs ~ s_layer * 4^-bits * (group/64)^0.5: the shape real FIT tables have."""
    rng = random.Random(seed)
    costs, scores = {}, {}
    for li in layers.linears:
        s = rng.lognormvariate(0, 1.5) * (3.0 if li.block in (0, 29) else 1.0)
        scores[li.fqn] = s
        costs[li.fqn] = {choice_key(LayerQuant(b, g)): s * 4.0**-b * (g / 64) ** 0.5 for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 192)}
    return Sensitivity(
        method="fit",
        model="synthetic",
        model_id="abc",
        windows={"n_tokens": 0},
        scheme={},
        units={f: (f,) for f in costs},
        scores=scores,
        costs=costs,
        space=space.source,
        space_id=space.fingerprint,
    )


def test_allocations_on_smollm2_space_fit_and_beat_uniform(tmp_path):
    layers = smollm2()
    space = load_space(SPACE, layers)
    sm = _size_model(layers)
    sens = _synthetic_sensitivity(space, layers)
    uniform = {p.name: (3 if p.kind == "bits" else 64) for p in space.tunable}
    limit = sm.gb(space.decode(uniform))
    seeds = allocate(_table(space, sm), sm, sens, SizeLimit(limit), solvers=("exact", "greedy"))
    assert [(s.solver, s.fraction) for s in seeds] == [(n, f) for f in (1.0, 0.98, 0.96) for n in ("exact", "greedy")]
    tables = sens.slot_costs(space)
    uniform_cost = sens.predicted(space, uniform, tables)
    for s in seeds:
        assert s.size_gb <= limit
        assert sm.gb(space.decode(s.values)) == pytest.approx(s.size_gb)
        assert sens.predicted(space, s.values, tables) == pytest.approx(s.predicted)
    full = {s.solver: s for s in seeds if s.fraction == 1.0}
    assert full["exact"].optimal
    assert full["exact"].predicted <= full["greedy"].predicted + 1e-12
    # on this synthetic table the optimum is 15% better than uniform 3-bit at the same size (8.25 vs 9.65), greedy close to it
    assert full["exact"].predicted < 0.9 * uniform_cost
    assert full["greedy"].predicted < 1.05 * full["exact"].predicted
    assert full["exact"].size_gb > 0.995 * limit  # the budget is used
    # seed JSON round-trips through the space
    path = tmp_path / "seeds.json"
    write_initial_samples(path, [s.values for s in seeds], space, {"seeding": [s.to_json() for s in seeds]})
    back = load_initial_samples(path, space)
    assert back == [s.values for s in seeds]
    assert json.loads(path.read_text())["seeding"][0]["solver"] == "exact"


def test_random_feasible_plans_never_beat_the_exact_allocation():
    layers = smollm2()
    space = load_space(SPACE, layers)
    sm = _size_model(layers)
    sens = _synthetic_sensitivity(space, layers, seed=5)
    limit = sm.gb(space.decode({p.name: (4 if p.kind == "bits" else 64) for p in space.tunable}))
    best = allocate(_table(space, sm), sm, sens, SizeLimit(limit), fractions=(1.0,))[0]
    tables = sens.slot_costs(space)
    rng = random.Random(0)
    sizes = SlotTable.build(space, sm)
    for _ in range(10):
        vals = random_feasible(sizes, SizeLimit(limit), rng)
        assert sens.predicted(space, vals, tables) >= best.predicted - 1e-12


def test_budget_below_cheapest_plan_in_allocate():
    layers = smollm2()
    space = load_space(SPACE, layers)
    sm = _size_model(layers)
    cheapest = sm.gb(space.decode({p.name: (2 if p.kind == "bits" else 192) for p in space.tunable}))
    with pytest.raises(UserError, match="below the smallest plan"):
        allocate(_table(space, sm), sm, _synthetic_sensitivity(space, layers), SizeLimit(cheapest * 0.999))
    seeds = allocate(_table(space, sm), sm, _synthetic_sensitivity(space, layers), SizeLimit(cheapest))  # exactly the cheapest plan fits
    assert len(seeds) == 1 and seeds[0].size_gb <= cheapest


def test_sensitivity_of_another_space_or_granularity_is_refused():
    layers = smollm2()
    space = load_space(SPACE, layers)
    sens = _synthetic_sensitivity(space, layers)
    narrow = Sensitivity(
        **{**sens.__dict__, "costs": {u: {k: v for k, v in row.items() if not k.startswith("3:")} for u, row in sens.costs.items()}}
    )
    with pytest.raises(UserError, match=r"no cost for 3:32 .*another parameter space"):
        narrow.slot_costs(space)
    per_linear = load_space("parameter_spaces/smollm2_135m_per_linear.json", layers)
    blocks = {f"model.layers.{b}": tuple(li.fqn for li in layers.in_block(b)) for b in range(30)}
    measured = Sensitivity(
        method="measured",
        model="synthetic",
        model_id="abc",
        windows={},
        scheme={},
        units=blocks,
        scores={u: 1.0 for u in blocks},
        costs={u: {"3:64": 1.0} for u in blocks},
    )
    with pytest.raises(UserError, match="spans several slots"):
        measured.slot_costs(per_linear)
    with pytest.raises(UserError, match=r"computed for model synthetic \(abc\), not other"):
        sens.check_model("zzz", "other", layers.fqns)


def test_table_values_skip_fixed_parameters():
    layers = smollm2()
    spec = json.loads(open(SPACE).read())
    spec["parameters"][0]["layers"] = [
        {"range": [0, 2], "type": "fixed", "value": 8},
        {"range": [2, 30], "type": "choice", "values": [2, 3, 4, 5, 6, 8]},
    ]
    from bo_search.space import build_space

    space = build_space(spec, layers, "<fixed>")
    sm = _size_model(layers)
    problem = _table(space, sm, _synthetic_sensitivity(space, layers))
    assert problem.choices[0] == ((8, 32), (8, 64), (8, 192))
    alloc = exact(problem, problem.size(problem.cheapest()) + 10**6)
    vals = problem.values_of(alloc.pick)
    assert problem.pick_of(vals) == alloc.pick
    assert "bitwidth.0." not in vals and "groupsize.0." in vals
    plan: QuantPlan = space.decode(vals)
    assert plan.setting("model.layers.0.mlp.up_proj").bits == 8


def test_bitops_budget_counts_bits_times_macs_and_ignores_group_size():
    """Under a bit-operations budget (numel x weight bits x 16 per token) group size is free, so with
    costs that fall with smaller groups every slot takes g32; the allocation spends no more bit
    operations than allowed, and a budget below the cheapest plan is one clear error."""
    layers = smollm2()
    space = load_space(SPACE, layers)
    sm = _size_model(layers)
    sens = _synthetic_sensitivity(space, layers, seed=3)
    n = sum(li.numel for li in layers.linears)
    gbops = n * 3.5 * 16 / 1e9  # the bit operations of 3.5 average weight bits
    for solver in ("exact", "greedy"):
        [seed] = allocate(_table(space, sm), sm, sens, None, solvers=(solver,), fractions=(1.0,), bitops_limit=gbops)
        plan = space.decode(seed.values)
        used = sum(li.numel * plan.layers[li.fqn].bits * 16 for li in layers.linears) / 1e9
        assert used <= gbops and abs(used - seed.gbops) < 1e-9
        assert {seed.values[s.group_size.name] for s in space.slots} == {32}, solver
        assert seed.to_json()["gbops_per_token"] == round(seed.gbops, 6)
    # the size budget of the same plan costs more bits for g32: the size knapsack prefers larger groups
    [by_size] = allocate(_table(space, sm), sm, sens, SizeLimit(sm.gb(plan)), solvers=("exact",), fractions=(1.0,))
    assert {by_size.values[s.group_size.name] for s in space.slots} != {32}
    with pytest.raises(UserError, match="bit-operations budget .* GBOPs per token is below the smallest plan"):
        allocate(_table(space, sm), sm, sens, None, bitops_limit=n * 1.9 * 16 / 1e9)


def test_predicted_cost_of_a_ggml_plan_uses_the_slot_values_not_nominal_bits(tmp_path):
    """In a ggml space a slot's value is a type index: the predicted cost must be the table's entry
    for that index (a space without Q4_1 has no index 4, and Q4_0's index 2 is not its nominal 4 bits)."""
    from bo_search.types import GGML_TYPE_NAMES

    layers = smollm2()
    path = tmp_path / "g.json"
    types = ["Q4_0", "Q5_0", "Q8_0"]
    path.write_text(
        json.dumps(
            {"scheme": "ggml", "parameters": [{"name": "ggml_type", "layers": [{"range": [0, 30], "type": "choice", "values": types}]}]}
        )
    )
    space = load_space(path, layers)
    cost = {t: 10.0**-i for i, t in enumerate(types)}  # Q4_0 1, Q5_0 0.1, Q8_0 0.01 per layer
    costs = {li.fqn: {choice_key(LayerQuant.of_ggml(t)): cost[t] for t in types} for li in layers.linears}
    sens = Sensitivity(
        "fit",
        "synthetic",
        "abc",
        {"n_tokens": 0},
        {},
        {f: (f,) for f in costs},
        dict.fromkeys(costs, 1.0),
        costs,
        space.source,
        space.fingerprint,
    )
    tables = sens.slot_costs(space)
    per_block = len(layers.in_block(0))
    for t in types:
        vals = {p.name: GGML_TYPE_NAMES.index(t) for p in space.tunable}
        assert sens.predicted(space, vals, tables) == pytest.approx(30 * per_block * cost[t])
    # and types of the same nominal width are priced apart
    assert len({choice_key(LayerQuant.of_ggml(t)) for t in ("Q4_0", "Q4_K", "Q4_1")}) == 3
