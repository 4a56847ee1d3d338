"""Sensitivity: FIT against explicit per-window gradients, Hutchinson against the exact Hessian,
measured replay against full forwards, JSON checks, the CLIs, the cached auto seeds."""

import argparse
import json
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bo_search.data import split_windows
from bo_search.quant import fake_quantize
from bo_search.sensitivity.compute import compute
from bo_search.sensitivity.fit import _eager_attention, _grad_on, fisher_diagonal, sample_labels, window_loss
from bo_search.sensitivity.hessian import hutchinson_sample, hutchinson_traces
from bo_search.sensitivity.measured import measured_costs
from bo_search.sensitivity.table import STOP_RULES, Sensitivity, SensitivityConfig, choice_key
from bo_search.space import build_space, default_space_spec
from bo_search.types import LayerQuant, UserError


def _weights(model, fqns):
    mods = dict(model.named_modules())
    return {f: mods[f].weight for f in fqns}


def _small_space(layers, bits=(2, 4, 8), groups=(32, 64)):
    return build_space(default_space_spec(layers, bits, groups), layers, "<small>")


# ---------------------------------------------------------------------------------------------
# FIT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels", ["data", "model"])
def test_fit_equals_mean_of_squared_per_window_gradients(tiny_ctx, labels):
    ctx = tiny_ctx
    win = split_windows(ctx.tok, ctx.corpus, "calibration", 4 * 32, 32)
    assert win.ids.shape == (4, 33) and len(set(win.starts)) == 4  # four distinct windows
    fqns = ctx.layers.fqns
    weights = _weights(ctx.model, fqns)
    # batches of 3 and 1 windows; with sampled labels one window per batch, so the test can draw the same labels
    fisher = fisher_diagonal(ctx.model, fqns, win.ids, batch_size=3 if labels == "data" else 1, labels=labels, seed=7)
    # brute force: one backward per window of the shifted mean next-token loss, squared, averaged
    ref = {f: torch.zeros_like(w) for f, w in weights.items()}
    params = list(weights.values())
    gen = torch.Generator().manual_seed(7)
    with _grad_on(params):
        for row in win.ids:
            logits = ctx.model(row[None, :-1]).logits[0]
            target = row[1:] if labels == "data" else sample_labels(logits.detach(), gen)
            loss = F.cross_entropy(logits, target)
            for f, g in zip(fqns, torch.autograd.grad(loss, params)):
                ref[f] += g * g / 4
    assert not any(p.requires_grad for p in params)  # left as found
    for f in fqns:
        torch.testing.assert_close(fisher[f], ref[f], rtol=1e-4, atol=1e-12)
    assert all(float(fisher[f].sum()) > 0 for f in fqns)


def test_sampled_labels_follow_the_model_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.0, 0.0, 0.0, 1.0]]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_labels(logits, gen) for _ in range(4000)])
    freq = torch.bincount(draws[:, 0], minlength=4).double() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1, 0.0], dtype=torch.float64), atol=0.025, rtol=0)
    assert bool((draws[:, 1] == 3).all())


def test_fit_table_uses_real_quantization_error(tiny_ctx):
    ctx = tiny_ctx
    space = _small_space(ctx.layers)
    sens = compute(ctx, space, SensitivityConfig("fit", nsamples=3, seq_len=32))
    assert sens.method == "fit" and sens.model_id == ctx.ref.fingerprint
    assert sens.windows["split"] == "calibration" and sens.windows["n_tokens"] == 96
    assert set(sens.units) == set(ctx.layers.fqns)
    # recompute one entry by hand: 0.5 * sum(F * (W - Q(W))^2)
    f = ctx.layers.fqns[4]
    win = split_windows(ctx.tok, ctx.corpus, "calibration", 96, 32)
    # the same default labels and seed as compute(), times the scored tokens per window (nats per token)
    fisher = fisher_diagonal(ctx.model, [f], win.ids)[f] * (win.ids.shape[1] - 1)
    w = ctx.applier.original(f)
    lq = LayerQuant(2, 32)
    want = 0.5 * float((fisher * (w - fake_quantize(w, lq)) ** 2).sum())
    assert sens.costs[f]["2:32"] == pytest.approx(want, rel=1e-4)
    assert sens.scores[f] == pytest.approx(float(fisher.sum()), rel=1e-4)
    for row in sens.costs.values():  # fewer bits cost more; smaller groups cost less
        assert row["2:32"] > row["4:32"] > row["8:32"] > 0
        assert row["2:64"] > row["2:32"]
    t = sens.timings
    assert t["compute_s"] > 0 and t["eval_pass_s"] > 0 and t["ratio_to_eval_pass"] == pytest.approx(t["compute_s"] / t["eval_pass_s"])
    back = Sensitivity.from_json(json.loads(json.dumps(sens.to_json())))
    assert back.units == sens.units and all(back.costs[u] == pytest.approx(sens.costs[u], rel=1e-12) for u in sens.units)


# ---------------------------------------------------------------------------------------------
# Hessian
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=1,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    return model, ids


def _exact_hessian(model, params, ids):
    """The full Hessian over the concatenated params, one double-backward row per entry."""
    n = sum(p.numel() for p in params)
    H = torch.zeros(n, n, dtype=torch.float64)
    with _grad_on(params), _eager_attention(model):
        grads = torch.autograd.grad(window_loss(model, ids), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        for i in range(n):
            row = torch.autograd.grad(flat[i], params, retain_graph=True)
            H[i] = torch.cat([r.reshape(-1) for r in row]).double()
    return H


def test_hessian_vector_products_match_the_exact_hessian(micro_llama):
    model, ids = micro_llama
    fqns = ["model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]
    params = list(_weights(model, fqns).values())
    H = _exact_hessian(model, params, ids)
    torch.testing.assert_close(H, H.T, rtol=1e-4, atol=1e-7)
    sizes = [p.numel() for p in params]
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        vs = [torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1 for p in params]
        v = torch.cat([x.reshape(-1) for x in vs]).double()
        with _grad_on(params), _eager_attention(model):
            got = hutchinson_sample(model, params, ids, vs)
        hv = H @ v
        want = torch.tensor([float(a.sum()) for a in (v * hv).split(sizes)], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_hutchinson_trace_converges_to_exact_diagonal_sum(micro_llama):
    model, ids = micro_llama
    fqn = "model.layers.0.self_attn.o_proj"
    params = list(_weights(model, [fqn]).values())
    H = _exact_hessian(model, params, ids[:1])
    exact = float(torch.diagonal(H).sum())
    # the estimator's variance with Rademacher probes: 2 * sum of squared off-diagonal entries
    sd = math.sqrt(2 * float((H**2).sum() - (torch.diagonal(H) ** 2).sum()))
    est = hutchinson_traces(model, _weights(model, [fqn]), ids[:1], max_iter=3000, tol=0.03, stop_on="layers", seed=0)
    assert est.converged and est.rel_se[fqn] < 0.03
    se = sd / math.sqrt(est.iterations)
    assert abs(est.traces[fqn] - exact) < 4 * se
    assert est.rel_se[fqn] * abs(est.traces[fqn]) == pytest.approx(se, rel=0.3)  # the reported error is the real one
    assert exact == pytest.approx(1.3287, rel=1e-3)  # golden value of this seeded micro model
    assert not any(p.requires_grad for p in params)


def test_hutchinson_stops_at_max_iter_and_reports_error(tiny_ctx):
    ctx = tiny_ctx
    win = split_windows(ctx.tok, ctx.corpus, "calibration", 2 * 16, 16)
    fqns = [li.fqn for li in ctx.layers.in_block(1)]
    est = hutchinson_traces(ctx.model, _weights(ctx.model, fqns), win.ids, max_iter=6, tol=1e-6, stop_on="layers")
    assert est.iterations == 6 and not est.converged
    assert all(r > 1e-6 for r in est.rel_se.values())
    assert ctx.model.config._attn_implementation == "sdpa"  # eager only during the HVPs


def test_hutchinson_rank_rule_stops_when_the_ranking_is_stable():
    """The default rule stops once the layers' ranking is reliable (odd vs even iterations) or the
    total is tight, long before every single layer's error is small; it does not stop on noise."""
    from bo_search.sensitivity.hessian import hutchinson_should_stop

    gen = torch.Generator().manual_seed(0)
    traces = torch.logspace(0, 3, 50, dtype=torch.float64)  # layers whose traces span 3 decades
    # Hutchinson samples are the trace plus noise of the trace's own size: single layers stay noisy
    samples = traces + traces * 3 * torch.randn(400, 50, generator=gen, dtype=torch.float64)
    first = {rule: next(k for k in range(4, 401) if hutchinson_should_stop(samples[:k], 4, 0.1, rule) or k == 400) for rule in STOP_RULES}
    assert first["rank"] < 60 and first["layers"] == 400, first
    # equal traces: no ranking to find; the rank rule waits for the total instead
    flat = 10 + 100 * torch.randn(400, 50, generator=gen, dtype=torch.float64)
    assert not any(hutchinson_should_stop(flat[:k], 4, 0.1, "rank") for k in range(8, 60))


# ---------------------------------------------------------------------------------------------
# Measured
# ---------------------------------------------------------------------------------------------


def test_measured_replay_equals_full_forwards(tiny_ctx):
    ctx = tiny_ctx
    win = split_windows(ctx.tok, ctx.corpus, "calibration", 3 * 32, 32)
    blocks = ctx.model.get_submodule(ctx.layers.blocks_fqn)
    units = {f"model.layers.{b}": tuple(li.fqn for li in ctx.layers.in_block(b)) for b in range(3)}
    unit_blocks = {u: b for b, u in enumerate(units)}
    choices = {u: (LayerQuant(2, 32), LayerQuant(8, 64)) for u in units}
    nll_r, kl_r, base_r = measured_costs(ctx.model, ctx.applier, blocks, win.ids, units, unit_blocks, choices, batch_size=2, replay=True)
    nll_f, kl_f, base_f = measured_costs(ctx.model, ctx.applier, blocks, win.ids, units, unit_blocks, choices, batch_size=2, replay=False)
    assert base_r == pytest.approx(base_f, rel=1e-6)
    for u in units:
        for k in ("2:32", "8:64"):
            assert nll_r[u][k] == pytest.approx(nll_f[u][k], abs=1e-6)
            assert kl_r[u][k] == pytest.approx(kl_f[u][k], abs=1e-6)
        assert kl_r[u]["2:32"] > 10 * kl_r[u]["8:64"] > 0
    # by hand for block 1 at 2:32: quantize, evaluate, restore
    from bo_search.metrics import perplexity
    from bo_search.types import QuantPlan

    ctx.applier.apply(QuantPlan({f: LayerQuant(2, 32) for f in units["model.layers.1"]}))
    q = perplexity(ctx.model, win).nll
    ctx.applier.restore()
    assert nll_r["model.layers.1"]["2:32"] == pytest.approx(q - perplexity(ctx.model, win).nll, abs=1e-5)
    assert not any("forward" in blk.__dict__ for blk in blocks)


def test_measured_compute_units_are_slots(tiny_ctx):
    ctx = tiny_ctx
    space = _small_space(ctx.layers, bits=(2, 8), groups=(32,))
    sens = compute(ctx, space, SensitivityConfig("measured", nsamples=2, seq_len=32, metric="kl"), blocks=[0, 2])
    assert list(sens.units) == ["model.layers.0", "model.layers.2"]
    assert sens.units["model.layers.0"] == tuple(li.fqn for li in ctx.layers.in_block(0))
    assert set(sens.costs["model.layers.2"]) == {"2:32", "8:32"}
    assert sens.scores["model.layers.0"] == sens.costs["model.layers.0"]["2:32"]
    assert sens.details["evaluations"] == 4 and "nll_costs" in sens.details
    with pytest.raises(UserError, match="no entry for layer model.layers.1"):
        sens.slot_costs(space)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_unknown_method_did_you_mean():
    with pytest.raises(UserError, match=r"unknown sensitivity method 'hesian'; did you mean 'hessian'\?"):
        SensitivityConfig("hesian")
    with pytest.raises(UserError, match="--tol must be in"):
        SensitivityConfig("hessian", tol=0)
    with pytest.raises(UserError, match="not a bo_search sensitivity JSON"):
        Sensitivity.from_json({"method": "fit"})


def _run(module, *args, timeout=600):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)


def test_cli_fit_then_seed_round_trip(tiny_llama, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps(default_space_spec_for_tiny()))
    sens = tmp_path / "fit.json"
    common = ["--checkpoint", str(tiny_llama), "--parameters_list", str(space)]
    r = _run("bo_search.sensitivity", *common, "--eval_text", "pydoc", "--max_seqlen", "32", "--nsamples", "3", "--output", str(sens))
    assert r.returncode == 0, r.stderr
    assert "ratio" in r.stdout and "fit: 3 windows x 32 tokens" in r.stdout
    obj = json.loads(sens.read_text())
    assert obj["method"] == "fit" and obj["windows"]["n_windows"] == 3 and len(obj["costs"]) == 21
    seeds = tmp_path / "seeds.json"
    r = _run("bo_search.seed", *common, "--sensitivity", str(sens), "--avg_bits", "4.5", "--output", str(seeds))
    assert r.returncode == 0, r.stderr
    assert "exact" in r.stdout and "greedy" in r.stdout and "bit widths" in r.stdout
    from bo_search.model import discover_layers, load_structure
    from bo_search.space import load_initial_samples, load_space

    model, _ = load_structure(str(tiny_llama))
    sp = load_space(space, discover_layers(model))
    samples = load_initial_samples(seeds, sp)
    meta = json.loads(seeds.read_text())["seeding"]
    assert 1 <= len(samples) <= 6
    for a in meta["allocations"]:
        assert a["model_size_gb"] <= meta["limit_gb"]
    # the same seeds drive a search: --initial_samples FILE is accepted by the runner's loader
    assert all(set(s) == {p.name for p in sp.tunable} for s in samples)


def default_space_spec_for_tiny():
    return {
        "parameters": [
            {"name": "bitwidth", "layers": [{"range": [0, 3], "type": "choice", "values": [2, 3, 4, 8]}]},
            {"name": "groupsize", "layers": [{"range": [0, 3], "type": "choice", "values": [32, 64]}]},
        ]
    }


@pytest.mark.parametrize(
    "module, extra, message",
    [
        ("bo_search.sensitivity", ["--method", "fitt"], "error: unknown sensitivity method 'fitt'; did you mean 'fit'?"),
        ("bo_search.seed", ["--avg_bits", "1.0", "--sensitivity", "SENS"], "below the smallest plan of the space"),
        ("bo_search.seed", ["--avg_bits", "4", "--sensitivity", "OTHER"], "was computed for model other-model (0123456789ab)"),
        ("bo_search.seed", ["--avg_bits", "4", "--solver", "exakt"], "error: unknown solver 'exakt'; did you mean 'exact'?"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_llama, tmp_path, module, extra, message):
    """One case per command as a user runs it (a subprocess); the others in this process through main(argv)."""
    from clitools import run_main

    good = _fake_sensitivity_file(tiny_llama, tmp_path)
    other = tmp_path / "other.json"
    obj = json.loads(good.read_text())
    other.write_text(json.dumps({**obj, "model": "other-model", "model_id": "0123456789ab"}))
    extra = [{"SENS": str(good), "OTHER": str(other)}.get(x, x) for x in extra]
    if "fitt" in extra or "exakt" in extra:
        r = _run(module, "--checkpoint", str(tiny_llama), *extra, timeout=300)
        code, stdout, stderr = r.returncode, r.stdout, r.stderr
    else:
        code, stdout, stderr = run_main(module, ["--checkpoint", str(tiny_llama), *extra])
    assert code == 2, stdout + stderr
    # torch's own logger may print glog-style "W1123 07:38:12..." lines when transformers imports torchao
    lines = [ln for ln in stderr.strip().splitlines() if not re.match(r"[WI]\d{4} \d\d:", ln)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr


def _fake_sensitivity_file(tiny_llama, tmp_path):
    """A FIT-shaped table for the tiny model's default space, without running the model."""
    from bo_search.model import discover_layers, load_structure, resolve_checkpoint
    from bo_search.sensitivity.table import layer_choices

    model, ref = load_structure(str(tiny_llama))
    layers = discover_layers(model)
    space = build_space(default_space_spec(layers), layers)
    choices = layer_choices(space)
    costs = {f: {choice_key(lq): 2.0**-lq.bits for lq in lqs} for f, lqs in choices.items()}
    sens = Sensitivity(
        "fit", ref.name, resolve_checkpoint(str(tiny_llama)).fingerprint, {}, {}, {f: (f,) for f in costs}, {f: 1.0 for f in costs}, costs
    )
    path = tmp_path / "fake_fit.json"
    sens.save(path)
    return path


# ---------------------------------------------------------------------------------------------
# --initial_samples auto: computed once in the driver, then cached
# ---------------------------------------------------------------------------------------------


def test_auto_seeds_compute_once_then_reuse_the_cache(tiny_llama, tmp_path, monkeypatch):
    from bo_search.budget import SizeLimit
    from bo_search.search import seeding as search_seeding
    from bo_search.search.setup import Setup
    from bo_search.sensitivity import seeds as seeding
    from bo_search.sensitivity.cache import cached_sensitivity
    from bo_search.sensitivity.table import DEFAULT_NSAMPLES
    from bo_search.structure import structure_setup

    monkeypatch.setenv("BO_SEARCH_CACHE", str(tmp_path / "cache"))
    args = argparse.Namespace(
        checkpoint=str(tiny_llama), parameters_list=None, eval_text="pydoc", max_seqlen=32, batch_size=4, device="cpu"
    )
    setup = Setup.from_structure(structure_setup(args), args)
    limit = SizeLimit((setup.min_gb + setup.max_gb) / 2)
    seeds = search_seeding.seeds_for(setup, "auto", limit)
    files = list((tmp_path / "cache" / "sensitivity").glob("*-fit-*.json"))
    assert len(files) == 1
    assert 3 <= len(seeds) <= 6
    bits = [p.name for p in setup.space.tunable if p.kind == "bits"]
    assert sum(len({s[b] for b in bits}) == 1 for s in seeds) >= 1  # a uniform seed is among them
    for s in seeds:
        assert setup.size_model.gb(setup.space.decode(s)) <= limit.gb
    sens = Sensitivity.load(files[0])
    assert sens.windows["n_windows"] == DEFAULT_NSAMPLES["fit"] and sens.windows["seq_len"] == 32
    assert sens.details["fisher_labels"] == "model"
    mtime = files[0].stat().st_mtime_ns
    _, path, hit = cached_sensitivity(setup.eval_cfg, setup.ref, setup.layers, setup.space, "fit")
    assert hit and path == files[0] and files[0].stat().st_mtime_ns == mtime
    assert seeding.auto_seeds(setup, limit) == seeds


def test_cache_is_keyed_by_the_weights_content(tiny_llama, tmp_path, monkeypatch):
    """Issue 31, item 3: a retrained checkpoint of the same shape (same names and sizes) must not reuse
    the table cached for the old weights."""
    from search.test_identity import _retrained

    from bo_search.sensitivity.cache import cached_sensitivity
    from bo_search.structure import structure_setup

    monkeypatch.setenv("BO_SEARCH_CACHE", str(tmp_path / "cache"))
    other = _retrained(tiny_llama, tmp_path / tiny_llama.name)  # the same directory name: only the content differs

    def table(ckpt):
        args = argparse.Namespace(checkpoint=str(ckpt), parameters_list=None, eval_text="pydoc", max_seqlen=32, batch_size=4, device="cpu")
        st = structure_setup(args)
        return cached_sensitivity(st.eval_cfg, st.ref, st.layers, st.space, "fit", nsamples=2)

    first, path, hit = table(tiny_llama)
    assert not hit
    assert table(tiny_llama)[1:] == (path, True)
    retrained, other_path, hit = table(other)
    assert not hit and other_path != path
    assert retrained.scores != first.scores


# ---------------------------------------------------------------------------------------------
# The embedded model
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fit_on_real_model_is_cheap_and_its_allocation_is_sane(real_ctx):
    """FIT on 2 x 256 calibration tokens of the embedded model; the exact allocation on 1024 held-out
    tokens. At the size of uniform 3-bit g64 (3.5 avg bits) FIT's allocation does *not* beat uniform
    here (59.1 against 49.3; the README's 3072-token benchmark: 70.5 vs 72.4, within noise), so the
    quality bar is set at 3.75 avg bits, where uniform plans cannot use the budget: there the
    allocation must beat the best uniform plan that fits, and be 100x better than a random plan."""
    import random

    from bo_search.budget import SizeLimit, SlotTable, random_feasible
    from bo_search.metrics import perplexity
    from bo_search.search.runner import EMBEDDED_SPACE
    from bo_search.sensitivity.seeds import allocate
    from bo_search.space import load_space

    ctx = real_ctx
    space = load_space(EMBEDDED_SPACE, ctx.layers)
    # cheap: one forward (and one backward) pass over the 2 windows, then the one evaluation pass the
    # timing compares against; counted, not timed (a timing ratio fails under load)
    calls = []
    handle = ctx.model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape), with_kwargs=True)
    try:
        sens = compute(ctx, space, SensitivityConfig("fit", nsamples=2, seq_len=256))
    finally:
        handle.remove()
    assert [tuple(c) for c in calls] == [(2, 256), (2, 256)], calls
    assert all(v > 0 for v in sens.scores.values())
    tables = sens.slot_costs(space)
    assert all(t[(2, 64)] > t[(3, 64)] > t[(4, 64)] > t[(8, 64)] > 0 for t in tables)
    n = sum(li.numel for li in ctx.layers.linears)
    limit = (ctx.size_model.other_bits + 3.75 * n) / 8 / 1e9
    uniforms = [v for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 192) if (v := space.uniform(b, g)) is not None]
    fits = [v for v in uniforms if ctx.size_model.gb(space.decode(v)) <= limit]
    best = allocate(SlotTable.build(space, ctx.size_model), ctx.size_model, sens, SizeLimit(limit), fractions=(1.0,))[0]
    assert best.size_gb <= limit
    rnd = random_feasible(SlotTable.build(space, ctx.size_model), SizeLimit(limit), random.Random(0))

    def heldout(vals):
        ctx.applier.apply(space.decode(vals))
        return perplexity(ctx.model, ctx.heldout_windows).ppl

    ppl = {"uniform": min(heldout(v) for v in fits), "exact": heldout(best.values), "random": heldout(rnd)}
    ctx.applier.restore()
    # Measured on these windows (deterministic: fixed windows and label seed): exact 39.40, best uniform
    # that fits (3-bit) 49.27, a ratio of 0.80; a random feasible plan 36,407. The bar is 0.9.
    assert ppl["exact"] < 0.9 * ppl["uniform"] and ppl["exact"] < 0.01 * ppl["random"], ppl


def test_original_tool_wrappers(tiny_llama, tmp_path, monkeypatch):
    common = ["--checkpoint", str(tiny_llama), "--eval_text", "pydoc", "--max_seqlen", "16", "--nsamples", "2"]
    out = tmp_path / "fit.json"
    r = subprocess.run(
        [sys.executable, "scripts/fit.py", *common, "--max_iter", "100", "--num_layers", "2", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "--max_iter 100 has no effect" in r.stderr
    fit = json.loads(out.read_text())
    assert fit["method"] == "fit" and {f.split(".")[2] for f in fit["units"]} == {"0", "1"} and len(fit["units"]) == 14
    out = tmp_path / "h.json"
    r = subprocess.run(
        [sys.executable, "scripts/hessian_vhp.py", *common, "--max_iter", "3", "--layer_id", "1", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    h = json.loads(out.read_text())
    assert h["method"] == "hessian" and h["details"]["iterations"] == 3 and len(h["units"]) == 7
    assert all(f.startswith("model.layers.1.") for f in h["units"]) and set(h["details"]["rel_se"]) == set(h["units"])
    # the refusal, in this process: the script run as __main__, as python runs it
    import contextlib
    import io
    import runpy

    err = io.StringIO()
    monkeypatch.setattr(sys, "argv", ["scripts/hessian_vhp.py", *common, "--layer_id", "7"])
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        runpy.run_path("scripts/hessian_vhp.py", run_name="__main__")
    assert exc.value.code == 2 and "error: --layer_id 7 is out of range: blocks are 0..2" in err.getvalue()
