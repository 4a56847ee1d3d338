import random

import pytest

from bo_search.budget import SizeLimit, SlotTable, random_feasible, repair_to_budget
from bo_search.space import build_space

SPEC = {
    "granularity": "linear",
    "parameters": [
        {
            "name": "bitwidth",
            "name_format": "bitwidth.{i}.{group}",
            "layers": [{"range": [0, 3], "type": "choice", "values": [2, 3, 4, 6, 8]}],
        },
        {
            "name": "groupsize",
            "name_format": "groupsize.{i}.{group}",
            "layers": [{"range": [0, 3], "type": "choice", "values": [32, 64, -1]}],
        },
    ],
}


@pytest.fixture(scope="module")
def setup(tiny_ctx):
    space = build_space(SPEC, tiny_ctx.layers)
    return space, tiny_ctx.size_model, SlotTable.build(space, tiny_ctx.size_model)


def test_slot_sizes_exact(setup):
    space, sm, sizes = setup
    rng = random.Random(0)
    for _ in range(20):
        vals = {p.name: rng.choice(p.values) for p in space.tunable}
        assert sizes.bits(vals) == sm.report(space.decode(vals)).total_bytes * 8
        assert sizes.values_of(sizes.pick_of(vals)) == vals
    lo, hi = sizes.bounds_gb()
    bottom = {p.name: (min(p.values) if p.kind == "bits" else -1) for p in space.tunable}
    top = {p.name: (max(p.values) if p.kind == "bits" else 32) for p in space.tunable}
    assert (lo, hi) == (sm.gb(space.decode(bottom)), sm.gb(space.decode(top)))


def test_repair_fits_and_only_downgrades(setup):
    space, sm, sizes = setup
    top = {p.name: (max(p.values) if p.kind == "bits" else 32) for p in space.tunable}
    bottom = {p.name: (min(p.values) if p.kind == "bits" else -1) for p in space.tunable}
    lo, hi = sm.gb(space.decode(bottom)), sm.gb(space.decode(top))
    limit = lo + 0.4 * (hi - lo)
    fixed = repair_to_budget(sizes, SizeLimit(limit), top)
    assert fixed is not None and sm.gb(space.decode(fixed)) <= limit
    for p in space.tunable:
        if p.kind == "bits":
            assert fixed[p.name] <= top[p.name]
    # widest slots give up bits first: the result is balanced, no slot far above the others
    bits = [fixed[p.name] for p in space.tunable if p.kind == "bits"]
    assert max(bits) - min(bits) <= 2
    assert repair_to_budget(sizes, SizeLimit(lo * 0.99), top) is None
    assert repair_to_budget(sizes, SizeLimit(hi), top) == top  # already fits: unchanged


def test_random_feasible_fits_and_uses_budget(setup):
    space, sm, sizes = setup
    bottom = {p.name: (min(p.values) if p.kind == "bits" else -1) for p in space.tunable}
    lo = sm.gb(space.decode(bottom))
    limit = lo * 1.3
    rng = random.Random(1)
    plans = [random_feasible(sizes, SizeLimit(limit), rng) for _ in range(10)]
    assert all(sm.gb(space.decode(v)) <= limit for v in plans)
    assert all(sm.gb(space.decode(v)) > lo for v in plans)
    assert len({tuple(sorted(v.items())) for v in plans}) > 5
