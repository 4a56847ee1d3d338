"""bo_search.export: torchao config, llama.cpp mapping, packed checkpoint round trips."""

import copy
import re

import pytest
import torch

from bo_search.quant import fake_quantize
from bo_search.report.export import (
    GgufTensorType,
    bits_per_weight,
    gguf_tensor_types,
    llama_quantize_command,
    load_quantized,
    load_torchao_config,
    nearest_ggml_type,
    plan_document,
    save_checkpoint,
    torchao_document,
)
from bo_search.types import FULL_PRECISION, LayerQuant, QuantPlan, UserError


def mixed_plan(ctx):
    """Every kind of setting: 2..8 bits, group sizes 32/64/per channel, symmetric, one layer left at 16 bits."""
    choices = [LayerQuant(4, 32), LayerQuant(3, 64), LayerQuant(8, -1, True), LayerQuant(2, 32), LayerQuant(6, 64, True), LayerQuant(5, 32)]
    layers = {li.fqn: choices[i % len(choices)] for i, li in enumerate(ctx.layers.linears)}
    layers[ctx.layers.linears[1].fqn] = FULL_PRECISION
    return QuantPlan(layers)


def test_plan_document_round_trips():
    plan = QuantPlan({"a.q": LayerQuant(4, 64), "a.k": LayerQuant(8, 32, True)})
    doc = plan_document(plan, trial_index=3, cal_PPL=12.5, ppl_heldout=None)
    assert QuantPlan.from_json(doc) == plan
    assert doc["trial_index"] == 3 and "ppl_heldout" not in doc and doc["histogram"] == {"4b/g64": 1, "8b/g32/sym": 1}


def test_torchao_export_applies_with_quantize_and_matches_fake_quant(tiny_ctx, tmp_path):
    import json

    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    plan = mixed_plan(tiny_ctx)
    doc = torchao_document(plan, {li.fqn: li.in_features for li in tiny_ctx.layers.linears})
    assert doc["unquantized"] == [tiny_ctx.layers.linears[1].fqn]
    first = tiny_ctx.layers.linears[0].fqn
    assert doc["layers"][first]["config"] == "IntxWeightOnlyConfig"
    assert doc["layers"][first]["args"]["weight_dtype"] == "torch.int4" and doc["layers"][first]["args"]["mapping_type"] == "ASYMMETRIC"
    path = tmp_path / "torchao_config.json"
    path.write_text(json.dumps(doc))
    tiny_ctx.safe_restore()
    model = copy.deepcopy(tiny_ctx.model)
    # the lines docs/report.md gives, verbatim
    quantize_(model, config_from_dict(json.load(open(path))["torchao"]), filter_fn=None)
    modules = dict(model.named_modules())
    for li in tiny_ctx.layers.linears:
        w = modules[li.fqn].weight
        lq = plan.setting(li.fqn)
        orig = tiny_ctx.applier.original(li.fqn)
        if lq.is_quantized:
            assert torch.equal(w.dequantize(), fake_quantize(orig, lq)), li.fqn
        else:
            assert torch.equal(w, orig)
    assert type(load_torchao_config(path)).__name__ == "FqnToConfig"


def test_torchao_cuda_description_prefers_fast_kernels():
    plan = QuantPlan({"x.a": LayerQuant(4, 64), "x.b": LayerQuant(8, -1, True), "x.c": LayerQuant(3, 64)})
    doc = torchao_document(plan, {"x.a": 256, "x.b": 256, "x.c": 256}, device="cuda")
    assert [doc["layers"][f]["config"] for f in ("x.a", "x.b", "x.c")] == [
        "Int4WeightOnlyConfig",
        "Int8WeightOnlyConfig",
        "IntxWeightOnlyConfig",
    ]
    with pytest.raises(UserError, match="use cpu or cuda"):
        torchao_document(plan, device="mps")


def test_load_torchao_config_rejects_other_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"layers": {}}')
    with pytest.raises(UserError, match="not a bo_search torchao export"):
        load_torchao_config(p)


@pytest.mark.parametrize(
    "lq, in_features, expected",
    [
        (LayerQuant(4, 64), 1536, "q4_k"),
        (LayerQuant(4, 64), 576, "q4_1"),  # 576 % 256 != 0: no k-quants
        (LayerQuant(4, 64, True), 576, "q4_0"),
        (LayerQuant(5, 32), 576, "q5_1"),
        (LayerQuant(5, 32, True), 576, "q5_0"),
        (LayerQuant(3, 64), 576, "iq4_nl"),  # llama-quantize's own fallback for q3_k
        (LayerQuant(2, 64), 4096, "q2_k"),
        (LayerQuant(3, 64), 4096, "q3_k"),
        (LayerQuant(5, 64), 4096, "q5_k"),
        (LayerQuant(6, 64), 4096, "q6_k"),
        (LayerQuant(6, 64), 576, "q8_0"),
        (LayerQuant(8, -1), 576, "q8_0"),
        (LayerQuant(8, 64), 4096, "q8_0"),
        (FULL_PRECISION, 4096, "f16"),
        (LayerQuant(4, 50), 100, "f16"),  # rows not a multiple of 32: llama.cpp cannot quantize
    ],
)
def test_nearest_ggml_type(lq, in_features, expected):
    assert nearest_ggml_type(lq, in_features)[0] == expected


def test_bits_per_weight_of_ggml_types():
    assert bits_per_weight("q4_k") == 4.5
    assert bits_per_weight("q4_1") == 5.0
    assert bits_per_weight("q8_0") == 8.5
    assert bits_per_weight("q6_k") == pytest.approx(6.5625)
    assert bits_per_weight("f16") == 16.0


def test_gguf_names_and_args_for_a_llama(tiny_ctx):
    plan = mixed_plan(tiny_ctx)
    types, notes = gguf_tensor_types(plan, tiny_ctx.layers, "llama")
    assert notes == []
    by_fqn = {t.fqn: t for t in types}
    assert len(types) == len(plan)
    assert by_fqn["model.layers.2.self_attn.q_proj"].gguf_name == "blk.2.attn_q.weight"
    assert by_fqn["model.layers.0.self_attn.o_proj"].gguf_name == "blk.0.attn_output.weight"
    assert by_fqn["model.layers.1.mlp.down_proj"].gguf_name == "blk.1.ffn_down.weight"
    assert by_fqn["model.layers.1.mlp.gate_proj"].gguf_name == "blk.1.ffn_gate.weight"
    names = [t.gguf_name for t in types]
    assert len(set(names)) == len(names)
    for t in types:  # llama.cpp matches NAME with std::regex_search: each pattern hits exactly its tensor
        pattern = t.arg.split("=")[0]
        assert [n for n in names + ["blk.12.attn_q.weight", "blk.2.attn_q_norm.weight"] if re.search(pattern, n)] == [t.gguf_name]
    q = by_fqn["model.layers.0.self_attn.q_proj"]
    assert q.arg == r"blk\.0\.attn_q\.weight=" + q.ggml_type
    assert [t.fqn for t in types] == [li.fqn for li in tiny_ctx.layers.linears]  # model order
    cmd = llama_quantize_command(types, "in.gguf", "out.gguf")
    assert cmd.startswith("llama-quantize --token-embedding-type f16 --output-tensor-type f16")
    assert cmd.count("--tensor-type '") == len(types) and cmd.rstrip().endswith("in.gguf out.gguf Q8_0")


def test_gguf_names_for_other_architectures():
    plan = QuantPlan(
        {"gpt_neox.layers.1.attention.query_key_value": LayerQuant(4, 64), "gpt_neox.layers.1.mlp.dense_4h_to_h": LayerQuant(8, 64)}
    )
    types, notes = gguf_tensor_types(plan, None, "gpt_neox")
    assert {t.gguf_name for t in types} == {"blk.1.attn_qkv.weight", "blk.1.ffn_down.weight"}
    assert any("layer shapes unknown" in n for n in notes)
    plan = QuantPlan({"model.layers.0.self_attn.q_proj": LayerQuant(4, 64), "model.layers.0.mystery": LayerQuant(4, 64)})
    types, notes = gguf_tensor_types(plan, None, "no_such_arch")
    assert [t.gguf_name for t in types] == ["blk.0.attn_q.weight"]
    assert any("Llama tensor names assumed" in n for n in notes) and any("no llama.cpp tensor name" in n for n in notes)
    assert isinstance(types[0], GgufTensorType)


def test_checkpoint_round_trip_tiny(tiny_ctx, tmp_path):
    from bo_search.metrics import perplexity

    plan = mixed_plan(tiny_ctx)
    out = save_checkpoint(tiny_ctx, plan, tmp_path / "ckpt", {"trial_index": 4})
    assert {"model.safetensors", "config.json", "tokenizer.json", "bo_search_export.json"} <= {p.name for p in out.iterdir()}
    model, tok = load_quantized(out)
    assert tok.encode("hello") == tiny_ctx.tok.encode("hello")
    got = dict(model.named_modules())
    for li in tiny_ctx.layers.linears:
        expect = fake_quantize(tiny_ctx.applier.original(li.fqn), plan.setting(li.fqn))
        assert torch.equal(got[li.fqn].weight, expect), li.fqn
    ref = tiny_ctx.measure(plan, heldout=True)
    assert perplexity(model, tiny_ctx.heldout_windows).ppl == pytest.approx(ref["ppl_heldout"], rel=1e-6)


def test_load_quantized_rejects_other_directories(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="not an exported checkpoint"):
        load_quantized(tmp_path)
    with pytest.raises(UserError, match="not a bo_search packed checkpoint"):
        load_quantized(tiny_llama)  # a plain Hugging Face checkpoint


@pytest.mark.slow
def test_checkpoint_round_trip_embedded_model(real_ctx, tmp_path):
    """The exported checkpoint of a mixed plan reproduces the plan's held-out perplexity (within 0.5%)."""
    from bo_search.metrics import perplexity

    plan = QuantPlan(
        {
            li.fqn: [LayerQuant(4, 64), LayerQuant(8, 32), LayerQuant(3, 192), LayerQuant(5, 32, True), FULL_PRECISION][li.block % 5]
            for li in real_ctx.layers.linears
        }
    )
    ref = real_ctx.measure(plan, heldout=True)
    out = save_checkpoint(real_ctx, plan, tmp_path / "ckpt")
    model, _tok = load_quantized(out)
    got = perplexity(model, real_ctx.heldout_windows).ppl
    assert got == pytest.approx(ref["ppl_heldout"], rel=0.005)
    assert 15 < got < 100  # a working model, not noise
    assert (out / "model.safetensors").stat().st_size == pytest.approx(ref["model_size_gb"] * 1e9, rel=0.01)
