"""GPTQ (bo_search.gptq): the per-layer algorithm against plain rounding, the per-model calibration
(Hessians on the calibration split, damping chosen on validation, cached), the FIT cache key, the
export to torchao, and the bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bo_search.gptq import (
    DAMP_GRID,
    Regulariser,
    dequantize,
    gptq_codes,
    inverse_factor,
    rtn_codes,
)
from bo_search.quant import fake_quantize
from bo_search.types import LayerQuant, QuantPlan, UserError


def _problem(seed: int = 0, out_f: int = 48, in_f: int = 128, n: int = 1024):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_f, generator=g) @ (torch.randn(in_f, in_f, generator=g) * 0.3 + torch.eye(in_f)) + 0.5
    h = x.T @ x / n
    return torch.randn(out_f, in_f, generator=g), h, x.mean(0)


def _out_err(w, h, dq):
    d = w - dq
    return float(torch.einsum("oi,ij,oj->", d, h, d))


@pytest.mark.parametrize("group", [32, 64, -1])
def test_huge_damping_is_plain_rounding_bit_for_bit(group):
    w, h, mu = _problem()
    u = inverse_factor(h, mu, Regulariser(1e9))
    [(codes, scale, zp)] = gptq_codes(w, u, [3], group)
    assert torch.equal(dequantize(codes, scale, zp, w.dtype), fake_quantize(w, LayerQuant(3, group)))
    assert codes.min() >= -4 and codes.max() <= 3 and scale.dtype == torch.float16


@pytest.mark.parametrize("group", [32, -1])
def test_compensation_cuts_the_output_error_and_rows_of_bit_widths_are_independent(group):
    w, h, mu = _problem(1)
    u = inverse_factor(h, mu, Regulariser(0.01))
    both = gptq_codes(w, u, [3, 4], group)
    alone = gptq_codes(w, u, [4], group)[0]
    assert all(torch.equal(a, b) for a, b in zip(both[1], alone))  # one pass for several widths changes nothing
    rtn = _out_err(w, h, fake_quantize(w, LayerQuant(3, group)))
    ours = _out_err(w, h, dequantize(*both[0], w.dtype))
    assert ours < 0.7 * rtn  # measured about half
    order = torch.argsort(h.diagonal(), descending=True)
    act = gptq_codes(w, inverse_factor(h, mu, Regulariser(0.01, act_order=True), order), [3], group, order=order)[0]
    assert _out_err(w, h, dequantize(*act, w.dtype)) < 0.7 * rtn
    # weaker compensation lies in between
    mid = _out_err(w, h, dequantize(*gptq_codes(w, inverse_factor(h, mu, Regulariser(100.0)), [3], group)[0], w.dtype))
    assert ours < mid < rtn


def test_mean_term_keeps_the_output_mean():
    """With heavy damping, the mean variant's error on the mean input is smaller than without it."""
    w, h, mu = _problem(2)
    plain = dequantize(*gptq_codes(w, inverse_factor(h, mu, Regulariser(30.0)), [3], 32)[0], w.dtype)
    kept = dequantize(*gptq_codes(w, inverse_factor(h, mu, Regulariser(30.0, mean=True)), [3], 32)[0], w.dtype)
    assert float(((w - kept) @ mu).norm()) < 0.8 * float(((w - plain) @ mu).norm())


def test_rtn_codes_dequantize_to_fake_quantize():
    w, _, _ = _problem(3)
    lq = LayerQuant(5, 64, True)
    assert torch.equal(dequantize(*rtn_codes(w, lq), w.dtype), fake_quantize(w, lq))


# ---------------------------------------------------------------------------------------------
# A tiny model: calibration, cache, applier, FIT, export
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_ctx(tiny_llama):
    from bo_search.trial import EvalConfig, ModelContext

    cfg = EvalConfig(
        checkpoint=str(tiny_llama),
        eval_text="pydoc",
        eval_tokens=256,
        heldout_tokens=256,
        max_seqlen=64,
        quantizer="gptq",
        gptq_tokens=2048,
    )
    return ModelContext(cfg)


def _calibration_json():
    from bo_search.model import cache_dir

    [meta] = [p for p in (cache_dir() / "gptq").glob("*.json")]
    return json.loads(meta.read_text())


def test_calibration_chooses_the_damping_with_the_best_validation_nll_and_is_cached(gptq_ctx, monkeypatch):
    from bo_search import gptq
    from bo_search.trial import ModelContext

    cal = _calibration_json()
    sweep = cal["sweep"]
    damps = sorted({float(r["damp"]) for r in sweep})
    assert set(DAMP_GRID) <= set(damps) and len(damps) == len(DAMP_GRID) + 2  # the grid, then the half-decades around the best
    assert {r["setting"] for r in sweep} == {"3b/g64", "4b/g64"}
    mean_nll = {d: sum(r["val_nll"] for r in sweep if float(r["damp"]) == d) / 2 for d in damps}
    assert float(cal["damp"]) == min(mean_nll, key=lambda d: mean_nll[d])
    assert cal["n_tokens"] >= 2 * 192 and cal["timings"]["hessians_s"] > 0 and cal["timings"]["choice_s"] > 0
    q = gptq_ctx.applier.quantizer
    assert q.describe()["damp"] == cal["damp"] and q.describe()["quantizer"] == "gptq"
    # a second context reads the calibration: neither Hessians nor the choice run again
    monkeypatch.setattr(gptq, "collect_hessians", lambda *a, **k: pytest.fail("Hessians recomputed"))
    monkeypatch.setattr(gptq, "choose_damp", lambda *a, **k: pytest.fail("damping chosen again"))
    again = ModelContext(gptq_ctx.cfg, heldout=False)
    assert again.applier.quantizer.describe() == q.describe()


def test_applier_uses_the_compensated_codes_and_caches_them(gptq_ctx):
    q = gptq_ctx.applier.quantizer
    if q.reg.is_rtn:  # the tiny random model may prefer plain rounding; force compensation for this check
        pytest.skip("damping chose plain rounding on the tiny model")
    fqn = gptq_ctx.layers.linears[0].fqn
    orig = gptq_ctx.applier.original(fqn)
    lq = LayerQuant(3, 32)
    plan = QuantPlan.uniform(gptq_ctx.layers.fqns, lq)
    gptq_ctx.applier.apply(plan)
    try:
        held = dict(gptq_ctx.model.named_modules())[fqn].weight.detach().clone()
    finally:
        gptq_ctx.applier.restore()
    assert not torch.equal(held, fake_quantize(orig, lq))
    u, order = q._factor(fqn)
    assert q.reg.act_order and order is not None  # the product's variant
    [direct] = gptq_codes(orig, u, [3], 32, order=order)
    assert torch.equal(held, dequantize(*direct, orig.dtype))
    assert q._path(fqn, lq).is_file()  # cached for other trials and workers
    read_before = q.stats["read"]
    assert torch.equal(q.fake_quantize(fqn, orig, lq), held)
    assert q.stats["read"] == read_before + 1


def test_fit_table_prices_the_quantizer_and_its_cache_key_holds_it(gptq_ctx, tiny_ctx):
    from bo_search.sensitivity.cache import cached_sensitivity
    from bo_search.space import build_space

    spec = {"parameters": [{"name": "bitwidth", "layers": [{"range": [0, 3], "type": "choice", "values": [3, 4]}]},
                           {"name": "groupsize", "layers": [{"range": [0, 3], "type": "choice", "values": [32]}]}]}  # fmt: skip
    space = build_space(spec, gptq_ctx.layers, "<test>")
    sens_g, path_g, hit_g = cached_sensitivity(gptq_ctx.cfg, gptq_ctx.ref, gptq_ctx.layers, space)
    sens_r, path_r, _ = cached_sensitivity(tiny_ctx.cfg, tiny_ctx.ref, tiny_ctx.layers, space)
    assert path_g != path_r and not hit_g
    assert sens_g.scheme["quantizer"]["quantizer"] == "gptq" and "quantizer" not in sens_r.scheme
    assert sens_g.scheme["quantizer"]["damp"] == gptq_ctx.applier.quantizer.describe()["damp"]
    if not gptq_ctx.applier.quantizer.reg.is_rtn:
        unit = next(iter(sens_g.costs))
        assert sens_g.costs[unit]["3:32"] != sens_r.costs[unit]["3:32"]
    again, path_again, hit = cached_sensitivity(gptq_ctx.cfg, gptq_ctx.ref, gptq_ctx.layers, space)
    assert hit and path_again == path_g and again.costs == sens_g.costs


def test_export_carries_the_codes_and_torchao_reproduces_the_searched_perplexity(gptq_ctx, tmp_path):
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    from bo_search.export import load_quantized, load_torchao
    from bo_search.metrics import perplexity
    from bo_search.report.export import save_checkpoint, torchao_document

    settings = [LayerQuant(3, 32), LayerQuant(4, 64), LayerQuant(5, 32, True), LayerQuant(8, -1)]
    plan = QuantPlan({li.fqn: settings[i % len(settings)] for i, li in enumerate(gptq_ctx.layers.linears)})
    trial = gptq_ctx.run_trial(0, plan)  # what a search worker records as the trial's perplexity
    gptq_ctx.safe_restore()
    assert trial.status == "completed"
    searched = trial.metrics["ppl"]
    out = save_checkpoint(gptq_ctx, plan, tmp_path / "ckpt")
    meta = json.loads((out / "bo_search_export.json").read_text())
    assert meta["quantizer"]["quantizer"] == "gptq"
    model, _tok = load_torchao(out)
    weights = {f: m.weight for f, m in model.named_modules() if f in plan}
    assert all(isinstance(w, IntxUnpackedToInt8Tensor) for w in weights.values())
    assert perplexity(model, gptq_ctx.search_windows).ppl == pytest.approx(searched, rel=1e-6)
    plain, _ = load_quantized(out)
    assert perplexity(plain, gptq_ctx.search_windows).ppl == pytest.approx(searched, rel=1e-6)
    # torchao's own min/max rounding of the original weights gives other codes: the export must carry them
    from torchao.quantization import quantize_

    from bo_search.quant import torchao_fqn_config

    requant, _ = load_quantized(out)
    for fqn, mod in requant.named_modules():
        if fqn in plan:
            mod.weight = torch.nn.Parameter(gptq_ctx.applier.original(fqn).clone(), requires_grad=False)
    quantize_(requant, torchao_fqn_config(plan, gptq_ctx.layers), filter_fn=None)
    if not gptq_ctx.applier.quantizer.reg.is_rtn:
        assert perplexity(requant, gptq_ctx.search_windows).ppl != pytest.approx(searched, rel=1e-6)
    doc = torchao_document(plan, quantizer="gptq")
    assert "load_torchao" in doc["codes_note"]


def test_resume_with_another_quantizer_is_refused(tiny_llama, tmp_path):
    import json

    from bo_search.model import resolve_checkpoint
    from bo_search.search import identity
    from bo_search.search.history import HistoryRow
    from bo_search.trial import EvalConfig

    ref = resolve_checkpoint(str(tiny_llama))
    now = identity.eval_settings(EvalConfig(checkpoint=str(tiny_llama), eval_text="pydoc", quantizer="gptq"), on_gpu=False)
    assert now["quantizer"] == "gptq"
    old = {k: v for k, v in now.items() if k != "quantizer"}  # written before --quantizer was recorded: plain rounding

    def row(i, settings):
        return HistoryRow(i, "completed", "seed", weights_id=ref.weights_id, eval_settings=json.dumps(settings))

    class Args:
        change_compute_dtype = False

    identity.check_history(tmp_path / "h.csv", [row(0, old), row(1, {**now, "quantizer": "rtn"})], ref, {**now, "quantizer": "rtn"}, Args())
    for rows in ([row(0, old)], [row(0, {**now, "quantizer": "rtn"})]):
        with pytest.raises(UserError, match=r"scored with --quantizer rtn, this run with --quantizer gptq.*pass --quantizer rtn") as err:
            identity.check_history(tmp_path / "h.csv", rows, ref, now, Args())
        assert "\n" not in str(err.value)
    assert identity.recorded_quantizer(row(0, old)) == "rtn" and identity.recorded_quantizer(row(0, now)) == "gptq"


def test_unknown_quantizer_gets_did_you_mean_and_exit_2(capsys):
    from bo_search import evaluate

    assert evaluate.main(["--quantizer", "gtpq", "--uniform", "4:64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown quantizer 'gtpq'; did you mean 'gptq'?"


def test_mse_clip_does_not_combine_with_gptq():
    from bo_search.trial import EvalConfig

    with pytest.raises(UserError, match="--mse_clip"):
        EvalConfig(quantizer="gptq", mse_clip=True)


def test_too_short_calibration_text_says_how_much_is_needed(tiny_llama, tmp_path):
    from bo_search.trial import EvalConfig, ModelContext

    text = tmp_path / "short.txt"
    text.write_text("\n\n".join(f"Document {i}. " + "words of text " * 2 for i in range(40)), encoding="utf-8")
    cfg = EvalConfig(checkpoint=str(tiny_llama), eval_text=str(text), eval_tokens=64, heldout_tokens=0, max_seqlen=64, quantizer="gptq")
    with pytest.raises(UserError, match=r"GPTQ needs at least 384 calibration tokens") as err:
        ModelContext(cfg, heldout=False)
    assert "\n" not in str(err.value)


def test_choice_rows_are_finite(gptq_ctx):
    assert all(math.isfinite(r["val_nll"]) for r in _calibration_json()["sweep"])
