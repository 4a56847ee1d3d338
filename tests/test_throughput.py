import pytest
import torch

from bo_search.acc_throughput import parse_limit
from bo_search.quant import uniform_plan
from bo_search.throughput import BytesModel, RealKernels, decode_once, layers_without_kernel, measure_decode
from bo_search.types import LayerQuant, QuantPlan, UserError


def test_parse_limit():
    assert parse_limit("7.5") == (7.5, False)
    assert parse_limit("+3%") == pytest.approx((0.03, True))
    for bad in ("abc", "0.5", "-3%", "nan", "+nan%", "inf%"):
        with pytest.raises(UserError, match="--ppl_constraint"):
            parse_limit(bad)


def test_bytes_model_orders_plans(tiny_ctx):
    bm = BytesModel(tiny_ctx.model, tiny_ctx.size_model, bandwidth=1e10)
    fp, q8, q4 = (uniform_plan(tiny_ctx.layers, lq) for lq in (LayerQuant(16), LayerQuant(8, -1), LayerQuant(4, 32)))
    # tied embeddings are read in full as lm_head: full precision reads the whole model per token
    assert bm.bytes_per_token(fp) == pytest.approx(tiny_ctx.size_model.report(fp).total_bytes)
    t = [bm.predict(p) for p in (fp, q8, q4)]
    assert t[0].tokens_per_s < t[1].tokens_per_s < t[2].tokens_per_s
    assert all(x.kind == "predicted" for x in t)


def test_real_kernels_cpu_equal_fake_quant_and_restore(tiny_ctx):
    from bo_search.metrics import perplexity

    ctx = tiny_ctx
    plan = QuantPlan({li.fqn: (LayerQuant(4, 32) if i % 2 else LayerQuant(8, -1)) for i, li in enumerate(ctx.layers.linears)})
    ctx.applier.apply(plan)
    fake = perplexity(ctx.model, ctx.search_windows).nll
    ctx.applier.restore()
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    held = _linear_weights(ctx)
    rk = RealKernels(ctx.model, ctx.layers, ctx.applier.original, "cpu")
    rk.apply(plan, ctx.scheme)
    w = dict(ctx.model.named_modules())[ctx.layers.linears[0].fqn].weight
    assert type(w).__name__ != "Parameter" or type(w.data).__name__ != "Tensor"  # a torchao tensor subclass
    real = perplexity(ctx.model, ctx.search_windows).nll
    rk.restore()
    assert real == pytest.approx(fake, rel=1e-5)
    after = ctx.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the very Parameter objects come back (the PlanApplier of the shared fixture writes into them)
    assert all(w is held[f] for f, w in _linear_weights(ctx).items())


def _linear_weights(ctx):
    modules = dict(ctx.model.named_modules())
    return {li.fqn: modules[li.fqn].weight for li in ctx.layers.linears}


def test_after_a_measured_trial_heldout_evaluates_the_quantized_model(tiny_ctx):
    """Issue 31, item 1: a measured trial swaps real kernels in and out; afterwards held-out
    evaluation (``measure``) must still quantize the model that runs, not tensors it dropped."""
    import dataclasses

    ctx = tiny_ctx
    plan = uniform_plan(ctx.layers, LayerQuant(2, 32))  # 2 bits: on a random tiny model 4 bits moves perplexity by ~1e-4
    held, values = _linear_weights(ctx), {k: v.clone() for k, v in ctx.model.state_dict().items()}
    fp = ctx.measure(QuantPlan(), heldout=True)["ppl_heldout"]
    fake = ctx.measure(plan, heldout=True)["ppl_heldout"]
    assert abs(fake - fp) > 1e-3 * fp  # 2-bit quantization changes the number (else the test proves nothing)
    cfg = ctx.cfg
    ctx.cfg = dataclasses.replace(cfg, throughput_model="measured", decode_tokens=2, prompt_tokens=8, decode_repeats=2)
    try:
        res = ctx.run_trial(0, plan)
        assert res.ok and res.metrics["throughput"] > 0, res.reason
        after_trial = ctx.measure(plan, heldout=True)["ppl_heldout"]
    finally:
        ctx.cfg = cfg
        ctx.safe_restore()
    assert after_trial == pytest.approx(fake, rel=1e-5)  # IntxWeightOnly kernels on CPU match fake quant
    assert abs(after_trial - fp) > 1e-3 * fp
    # the shared fixture is left as it was found: the same Parameter objects holding the same values
    assert all(w is held[f] for f, w in _linear_weights(ctx).items())
    now = ctx.model.state_dict()
    assert all(torch.equal(values[k], now[k]) for k in values)


def test_decode_timing_path(tiny_ctx):
    prompt = tiny_ctx.search_windows.ids[:1, :17]
    import time

    calls = []
    handle = tiny_ctx.model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[1]), with_kwargs=True)
    try:
        assert decode_once(tiny_ctx.model, prompt, 4) > 0
        assert calls == [17, 1, 1, 1, 1]  # one prefill, then exactly one 1-token step per decoded token
        calls.clear()
        t0 = time.perf_counter()
        tp = measure_decode(tiny_ctx.model, prompt, new_tokens=8, repeats=3, warmup=1)
        wall = time.perf_counter() - t0
    finally:
        handle.remove()
    assert calls == [17] + [1] * 8 + ([17] + [1] * 8) * 3  # warm-up (min(8, 8) steps), then 3 timed runs
    assert tp.kind == "measured" and tp.repeats == 3 and tp.sem >= 0
    # the median of 3 rates: at least 2 timed runs took 8 / median seconds or longer, all inside the wall time
    assert tp.tokens_per_s > 0 and 2 * 8 / tp.tokens_per_s <= wall


def test_kernel_availability():
    plan = QuantPlan({"a": LayerQuant(4, 64), "b": LayerQuant(8, -1), "c": LayerQuant(3, 64), "d": LayerQuant(16)})
    assert layers_without_kernel(plan, "cuda") == ["c"]
    assert layers_without_kernel(plan, "cpu") == ["a", "b", "c"]


@pytest.mark.slow
def test_throughput_search_predicted_csv_and_resume(tiny_llama, tmp_path):
    from clitools import base_args, run_cli, run_main, tiny_space

    from bo_search.search.history import read_history

    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "t.csv"
    args = [a for a in base_args(tiny_llama, space, hist, "--ppl_constraint", "+50%", "--num_trials", "4") if a not in ("--avg_bits", "5")]
    r = run_cli(args, module="bo_search.acc_throughput")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "throughput model: predicted" in r.stdout and "tok/s predicted" in r.stdout
    header = hist.read_text().splitlines()[0].split(",")
    assert {"cal_PPL", "cal_throughput", "throughput_kind"} <= set(header)
    rows = [x for x in read_history(hist).rows if x.status == "completed"]
    assert len(rows) == 4 and all(x.throughput_kind == "predicted" and x.cal_throughput > 0 for x in rows)
    args6 = [a if a != "4" else "6" for a in args]
    r = run_cli(args6, module="bo_search.acc_throughput")
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-3000:]
    assert sum(x.status in ("completed", "failed") for x in read_history(hist).rows) == 6
    # another limit on resume is refused (in this process: test_ppl_limit_below_... runs a refusal as a subprocess)
    code, _, _ = run_main("bo_search.acc_throughput", [a if a != "+50%" else "1.0001" for a in args6])
    assert code == 2


@pytest.mark.slow
def test_ppl_limit_below_full_precision_is_refused(tiny_llama, tmp_path):
    from clitools import base_args, run_cli, tiny_space

    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "t.csv"
    args = [a for a in base_args(tiny_llama, space, hist, "--ppl_constraint", "1.5", "--num_trials", "4") if a not in ("--avg_bits", "5")]
    r = run_cli(args, module="bo_search.acc_throughput")
    assert r.returncode == 2 and "below the full-precision perplexity" in r.stderr and "Traceback" not in r.stderr
    assert not hist.exists() or "completed" not in hist.read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_real_kernels_timed_model_ppl_matches(tmp_path):
    from bo_search.metrics import perplexity
    from bo_search.trial import EvalConfig, ModelContext

    ctx = ModelContext(EvalConfig(device="cuda:0", eval_tokens=1024, heldout_tokens=0, throughput_model="measured"))
    plan = uniform_plan(ctx.layers, LayerQuant(4, 64))
    assert layers_without_kernel(plan, "cuda") == []
    tp, ppl = ctx.throughput(plan)
    assert tp.kind == "measured" and tp.tokens_per_s > 0
    ctx.applier.apply(plan)
    fake = perplexity(ctx.model, ctx.search_windows).ppl
    ctx.applier.restore()
    assert ppl.ppl == pytest.approx(fake, rel=0.05)  # tinygemm int4 numerics differ slightly from fake quant
