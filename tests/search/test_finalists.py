"""The final choice among finalists (validation split) and the KL objective, without Ray."""

import math

import pytest
import torch

from bo_search.data import SPLITS, split_windows, wikipedia_corpus
from bo_search.metrics import coarse_kl, reference, score
from bo_search.search.experiment import Goal
from bo_search.search.finalists import ROLE_SEED, ROLE_TOP, ROLE_UNIFORM, check_finalists, finalists, paired_change, pending, winners
from bo_search.search.history import HistoryRow
from bo_search.types import LayerQuant, QuantPlan, UserError

GOAL = Goal(objective="kl", minimize=True, constraint_metric="model_size_gb", limit=1.0, search="modelsize")
FQNS = ("a", "b")


def plan(b0, b1=None):
    return QuantPlan({"a": LayerQuant(b0, 32), "b": LayerQuant(b0 if b1 is None else b1, 32)})


def row(i, p, kl, source="thompson", size=0.5, **kw):
    return HistoryRow(
        trial_index=i, status="completed", source=source, cal_PPL=10.0, nll=2.3, kl=kl, model_size=size, quant_config=p.dumps(), **kw
    )


def rescored(r, val_kl, val_ppl=10.0):
    return HistoryRow(**{**r.__dict__, "status": "rescored", "val_kl": val_kl, "val_PPL": val_ppl, "val_tokens": 1024})


def test_finalists_are_top_k_best_seed_and_uniform():
    rows = [
        row(0, plan(4), 0.30, "seed"),
        row(1, plan(5, 3), 0.10),
        row(2, plan(3, 5), 0.12),
        row(3, plan(6, 2), 0.20),
        row(4, plan(8), 0.01, size=2.0),  # over the limit: never a finalist
        HistoryRow(trial_index=5, status="failed", source="thompson", quant_config=plan(2).dumps()),
    ]
    uniform = [plan(4), plan(3)]
    f = finalists(rows, GOAL, 2, uniform)
    roles = {x.plan: x.roles for x in f}
    assert roles[plan(5, 3)] == [ROLE_TOP] and roles[plan(3, 5)] == [ROLE_TOP]
    assert roles[plan(4)] == [ROLE_SEED, ROLE_UNIFORM]  # the seed is also a uniform candidate: one finalist
    assert roles[plan(3)] == [ROLE_UNIFORM] and next(x for x in f if x.plan == plan(3)).row is None
    assert plan(8) not in roles and plan(6, 2) not in roles and plan(2) not in roles
    assert finalists(rows, GOAL, 0, uniform) == []


def test_the_pick_is_the_validation_winner_not_the_search_winner():
    rows = [row(0, plan(4), 0.30, "seed"), row(1, plan(5, 3), 0.10), row(2, plan(3, 5), 0.12)]
    # on validation the search split's leader (trial 1) falls behind trial 2
    resc = [rescored(rows[0], 0.31), rescored(rows[1], 0.20), rescored(rows[2], 0.15)]
    pick, seed, unif = winners(resc, "kl")
    assert pick.trial_index == 2 and seed.trial_index == 0 and unif.trial_index == 0
    # nll objective: by validation perplexity
    resc = [rescored(rows[0], 0.31, 30.0), rescored(rows[1], 0.20, 25.0), rescored(rows[2], 0.15, 28.0)]
    assert winners(resc, "nll")[0].trial_index == 1


def test_pending_until_every_finalist_and_the_three_heldout_numbers_are_recorded():
    rows = [row(0, plan(4), 0.30, "seed"), row(1, plan(5, 3), 0.10)]
    assert pending(rows, GOAL, 2, [], 1024, 512)
    done = rows + [rescored(rows[0], 0.31), rescored(rows[1], 0.2)]
    assert not pending(done, GOAL, 2, [], 1024, 0)  # no held-out wanted
    assert pending(done, GOAL, 2, [], 1024, 512)  # the pick's held-out is missing
    assert pending(done, GOAL, 2, [], 2048, 0)  # re-scored on another number of tokens: not reused
    done = rows + [HistoryRow(**{**rescored(r, v).__dict__, "ppl_heldout": 20.0}) for r, v in zip(rows, (0.31, 0.2))]
    assert not pending(done, GOAL, 2, [], 1024, 512)


def test_bad_finalists_flags():
    with pytest.raises(UserError, match="--finalists must be 0"):
        check_finalists(-1, 8192)
    with pytest.raises(UserError, match="--val_tokens"):
        check_finalists(4, 0)
    check_finalists(0, 0)


def test_paired_change():
    a = [2.0, 2.1, 2.2]
    b = [2.1, 2.2, 2.3]
    change, sem = paired_change(a, b)
    assert change == pytest.approx(math.exp(-0.1) - 1) and sem == pytest.approx(0.0, abs=1e-12)


def test_embedded_text_splits_are_disjoint_and_test_keeps_30_percent():
    c = wikipedia_corpus()
    parts = {s: {d.title for d in c.split_documents(s)} for s in SPLITS}
    assert set(SPLITS) == {"calibration", "search", "validation", "test"}
    for s in SPLITS:
        for t in SPLITS:
            assert s == t or not parts[s] & parts[t]
    assert sum(len(v) for v in parts.values()) == len(c.documents)
    assert len(parts["test"]) >= 0.3 * len(c.documents)
    assert len(parts["validation"]) >= 15  # many articles to choose on


def test_kl_is_zero_for_full_precision_and_grows_with_fewer_bits(tiny_ctx):
    ctx = tiny_ctx
    ctx.applier.restore()
    ref = reference(ctx.model, ctx.search_windows, 4)
    fp = score(ctx.model, ctx.search_windows, 4, ref)
    assert fp.kl == pytest.approx(0.0, abs=1e-6) and float(fp.delta_w.abs().max()) < 1e-6
    kls = []
    try:
        for bits in (8, 4, 2):
            ctx.applier.apply(QuantPlan.uniform(list(ctx.layers.fqns), LayerQuant(bits, 32)))
            s = score(ctx.model, ctx.search_windows, 4, ref)
            kls.append(s.kl)
            assert s.kl_sem > 0 and s.delta_sem > 0
    finally:
        ctx.applier.restore()
    assert 0 < kls[0] < kls[1] < kls[2]


def test_coarse_kl_is_exact_when_k_covers_the_vocabulary_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    p = torch.log_softmax(torch.randn(2, 5, 50), -1)
    q = torch.log_softmax(torch.randn(2, 5, 50), -1)
    exact = (p.double().exp() * (p.double() - q.double())).sum(-1).mean(-1)
    ids = torch.arange(50).expand(2, 5, 50)
    assert torch.allclose(coarse_kl(p.gather(-1, ids), q.gather(-1, ids)), exact, atol=1e-6)
    top = p.topk(8, -1).indices
    part = coarse_kl(p.gather(-1, top), q.gather(-1, top))
    assert bool((part <= exact + 1e-9).all()) and bool((part > 0).all())


def test_validation_windows_too_few_warns_and_uses_what_is_there(tiny_ctx, caplog):
    w = split_windows(tiny_ctx.tok, tiny_ctx.corpus, "validation", 10**7, 64)
    assert w.ids.shape[0] >= 1 and "using all of them" in caplog.text
