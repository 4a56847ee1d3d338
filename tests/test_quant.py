import math

import pytest
import torch

from bo_search.packing import load_packed_state, pack_bits, save_packed, unpack_bits
from bo_search.quant import QuantScheme, fake_quantize, torchao_fqn_config, uniform_plan
from bo_search.sizes import SizeModel
from bo_search.types import LayerQuant, QuantPlan, UserError


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group", [32, 64, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_torchao_intx_bit_for_bit(bits, group, symmetric):
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    torch.manual_seed(bits * 100 + group)
    lin = torch.nn.Linear(192, 48, bias=False)
    w = lin.weight.detach().clone()
    cfg = IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{bits}"),
        granularity=PerAxis(0) if group == -1 else PerGroup(group),
        mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
        scale_dtype=torch.float16,
    )
    model = torch.nn.Sequential(lin)
    quantize_(model, cfg)
    ref = model[0].weight.dequantize()
    ours = fake_quantize(w, LayerQuant(bits, group, symmetric))
    assert torch.equal(ref, ours)


def test_fewer_bits_more_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    errs = [float((fake_quantize(w, LayerQuant(b, 64)) - w).square().mean()) for b in (2, 3, 4, 6, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-3 * errs[0]  # ~4x less error per extra bit


def test_mse_clip_never_worse_and_helps_at_3_bits():
    torch.manual_seed(1)
    w = torch.randn(128, 512) * torch.rand(128, 1)
    w[:, ::97] *= 8  # outliers make clipping worthwhile
    lq = LayerQuant(3, 64)
    plain = (fake_quantize(w, lq) - w).square().sum()
    clipped = (fake_quantize(w, lq, QuantScheme(mse_clip=True)) - w).square().sum()
    assert clipped < 0.97 * plain


def test_ragged_group_rejected():
    with pytest.raises(UserError, match="does not divide"):
        fake_quantize(torch.randn(4, 576), LayerQuant(4, 128))


def test_pack_unpack_round_trip():
    torch.manual_seed(2)
    for bits in range(1, 9):
        codes = torch.randint(0, 1 << bits, (1003,), dtype=torch.int32)
        packed = pack_bits(codes, bits)
        assert packed.numel() == math.ceil(1003 * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, 1003), codes)


def _mixed_plan(layers):
    choices = [LayerQuant(2, 32), LayerQuant(3, 64), LayerQuant(4, 64, True), LayerQuant(8, -1), LayerQuant(16), LayerQuant(5, 32)]
    return QuantPlan({li.fqn: choices[i % len(choices)] for i, li in enumerate(layers.linears)})


def test_apply_restore_bit_identical(tiny_ctx):
    ctx = tiny_ctx
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    plan = _mixed_plan(ctx.layers)
    assert ctx.applier.apply(plan) == sum(1 for li in ctx.layers.linears if plan.setting(li.fqn).is_quantized)
    w = dict(ctx.model.named_modules())[ctx.layers.linears[0].fqn].weight
    assert not torch.equal(w, before[ctx.layers.linears[0].fqn + ".weight"])
    assert ctx.applier.apply(plan) == 0  # nothing changes the second time
    ctx.applier.restore()
    after = ctx.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_size_accounting_matches_packed_file(tiny_ctx, tmp_path):
    ctx = tiny_ctx
    plan = _mixed_plan(ctx.layers)
    predicted = ctx.size_model.report(plan).total_bytes
    path = save_packed(ctx.model, ctx.layers, plan, tmp_path / "packed", ctx.scheme)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    # The tensor payload is exactly what the accounting counts; the JSON header (names, plan) is
    # large relative to a tiny model, so the whole-file 1% check runs on the real model.
    assert path.stat().st_size - header == predicted
    # and the file loads back to exactly the fake-quantized weights
    state, plan2 = load_packed_state(path)
    assert plan2 == plan
    ctx.applier.apply(plan)
    try:
        live = ctx.model.state_dict()
        for name, t in live.items():
            assert torch.equal(state[name], t), name
    finally:
        ctx.applier.restore()


def test_size_formula_exact_numbers():
    from layers import smollm2

    class _Cfg:
        dtype = "float32"

    class _Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = _Cfg()
            self.emb = torch.nn.Parameter(torch.zeros(10, 4))

    layers = smollm2()
    sm = SizeModel.__new__(SizeModel)
    sm.layers, sm.scheme, sm.fp_bits, sm.other_bits, sm.fp_dtype = layers, QuantScheme(), 32, 0, "float32"
    li = layers.linears[0]  # 576 x 576
    assert sm.layer_bits(li, LayerQuant(4, 64)) == 576 * 576 * 4 + 576 * 9 * 32
    assert sm.layer_bits(li, LayerQuant(4, 64, True)) == 576 * 576 * 4 + 576 * 9 * 16
    assert sm.layer_bits(li, LayerQuant(3, -1)) == math.ceil(576 * 576 * 3 / 8) * 8 + 576 * 32
    assert sm.layer_bits(li, LayerQuant(16)) == 576 * 576 * 32


def test_uniform_avg_bits(tiny_ctx):
    rep = tiny_ctx.size_model.report(uniform_plan(tiny_ctx.layers, LayerQuant(4, 32)))
    assert rep.avg_bits == pytest.approx(4 + 32 / 32)
    assert rep.gb == rep.total_bytes / 1e9


def test_tied_weights_counted_once(tiny_ctx, tiny_llama):
    from bo_search.model import safetensors_float_bytes

    m = tiny_ctx.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    fp = tiny_ctx.size_model.report(QuantPlan()).total_bytes
    # measured against the checkpoint file, which stores the tied tensor once (not against
    # model.parameters(), which the accounting itself walks)
    stored = sum(sum(safetensors_float_bytes(f).values()) for f in tiny_llama.glob("*.safetensors"))
    assert fp == stored
    assert fp + m.lm_head.weight.numel() * 4 != stored  # counting lm_head apart would be caught


def test_torchao_fqn_config_applies(tiny_ctx):
    import copy

    from torchao.quantization import quantize_

    plan = uniform_plan(tiny_ctx.layers, LayerQuant(4, 32))
    model = copy.deepcopy(tiny_ctx.model)
    quantize_(model, torchao_fqn_config(plan, tiny_ctx.layers), filter_fn=None)
    fqn = tiny_ctx.layers.linears[0].fqn
    deq = dict(model.named_modules())[fqn].weight.dequantize()
    assert torch.equal(deq, fake_quantize(tiny_ctx.applier.original(fqn), LayerQuant(4, 32)))


@pytest.mark.slow
def test_real_model_packed_file_within_1_percent(real_ctx, tmp_path):
    ctx = real_ctx
    plan = QuantPlan({li.fqn: [LayerQuant(3, 64), LayerQuant(4, 32), LayerQuant(8, 192)][li.block % 3] for li in ctx.layers.linears})
    predicted = ctx.size_model.report(plan).total_bytes
    # unquantized tensors at the storage dtype the size model counts (16-bit for the GGUF source)
    path = save_packed(ctx.model, ctx.layers, plan, tmp_path / "packed", ctx.scheme, fp_dtype=ctx.size_model.fp_dtype)
    actual = path.stat().st_size
    assert abs(actual - predicted) / predicted < 0.01, (actual, predicted)
    state, _ = load_packed_state(path)
    ctx.applier.apply(plan)
    try:
        fqn = ctx.layers.linears[5].fqn
        assert torch.equal(state[fqn + ".weight"], dict(ctx.model.named_modules())[fqn].weight)
    finally:
        ctx.applier.restore()


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_half_precision_fake_quant_matches_torchao(wdtype, scale_dtype, symmetric):
    """GPU workers hold the model in bf16 (--compute_dtype auto): qparams are computed in the
    weight's dtype with torchao's type promotions, so the result equals torchao's bit for bit."""
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    for bits, group in [(2, 32), (3, 64), (4, -1), (8, 32)]:
        torch.manual_seed(bits)
        lin = torch.nn.Linear(192, 48, bias=False).to(wdtype)
        w = lin.weight.detach().clone()
        cfg = IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{bits}"),
            granularity=PerAxis(0) if group == -1 else PerGroup(group),
            mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
            scale_dtype=getattr(torch, scale_dtype),
        )
        model = torch.nn.Sequential(lin)
        quantize_(model, cfg)
        ours = fake_quantize(w, LayerQuant(bits, group, symmetric), QuantScheme(scale_dtype=scale_dtype))
        assert ours.dtype == wdtype
        assert torch.equal(model[0].weight.dequantize(), ours), (bits, group)


def test_bf16_model_plan_matches_torchao(tiny_llama):
    """A tiny model loaded in bf16 (as a GPU worker loads it): every planned linear after our plan
    application equals torchao's bf16 quantization of the same model, and restore is exact."""
    from torchao.quantization import quantize_

    from bo_search.trial import EvalConfig, ModelContext

    ctx = ModelContext(
        EvalConfig(
            checkpoint=str(tiny_llama), eval_text="pydoc", eval_tokens=128, heldout_tokens=0, max_seqlen=64, compute_dtype="bfloat16"
        )
    )
    assert next(ctx.model.parameters()).dtype == torch.bfloat16
    import copy

    ref_model = copy.deepcopy(ctx.model)
    settings = [LayerQuant(4, 32), LayerQuant(3, 64), LayerQuant(8, 32, True)]
    plan = QuantPlan({li.fqn: settings[i % 3] for i, li in enumerate(ctx.layers.linears)})
    quantize_(ref_model, torchao_fqn_config(plan, ctx.layers), filter_fn=None)
    before = {li.fqn: ctx.applier.original(li.fqn).clone() for li in ctx.layers.linears}
    ctx.applier.apply(plan)
    mods, ref_mods = dict(ctx.model.named_modules()), dict(ref_model.named_modules())
    for li in ctx.layers.linears:
        assert torch.equal(mods[li.fqn].weight, ref_mods[li.fqn].weight.dequantize()), li.fqn
    ctx.applier.restore()
    assert all(torch.equal(mods[f].weight, w) for f, w in before.items())
    # sizes follow the checkpoint's storage dtype, never the compute dtype
    f32 = ModelContext(EvalConfig(checkpoint=str(tiny_llama), eval_text="pydoc", eval_tokens=128, heldout_tokens=0, max_seqlen=64))
    assert ctx.size_model.report(plan).total_bytes == f32.size_model.report(plan).total_bytes
