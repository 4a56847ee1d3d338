"""The ggml scheme: llama.cpp tensor types judged by the gguf package's own decoder, sizes against
real files, ggml spaces, and a searched plan written as a GGUF that transformers loads."""

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from bo_search import ggml
from bo_search.search.history import read_history
from bo_search.types import GGML_TYPE_NAMES, GGML_TYPES, LayerQuant, QuantPlan, UserError, ggml_effective_type, ggml_row_bytes

BLOCK32 = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
REPO = Path(__file__).resolve().parent.parent


def _weights(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :300] = 0.0  # all-zero blocks and super-blocks
    w[1] = w[1].abs()  # all-positive rows (no negative minimum)
    w[2] = -w[2].abs()  # all-negative rows
    w[3, 5] = 1.5  # an outlier
    return w


@pytest.mark.parametrize("name", GGML_TYPE_NAMES)
def test_fake_quant_is_bit_for_bit_what_gguf_decodes(name):
    w = _weights(8, 1024)
    eff, codes = ggml.quantize(w, name)
    assert eff == name  # 1024 fits every block
    fq = ggml.decode(eff, codes, tuple(w.shape))
    packed = ggml.pack(eff, codes).reshape(w.shape[0], -1)
    assert (
        packed.shape[1]
        == ggml_row_bytes(name, 1024)
        == 1024 // GGML_TYPES[name].block * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]][1]
    )
    decoded = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[name])
    assert np.array_equal(decoded.view(np.uint32), fq.numpy().view(np.uint32))
    assert torch.equal(ggml.fake_quantize(w, name), fq)
    # and it is a quantizer: fewer bits, more error (F16 is nearly exact)
    rmse = (fq - w).square().mean().sqrt().item()
    assert rmse < {"Q2_K": 0.03, "Q3_K": 0.015}.get(name, 0.008)


@pytest.mark.parametrize("name", BLOCK32)
def test_block32_bytes_equal_the_gguf_reference_quantizer(name):
    w = _weights(6, 512, seed=1)
    eff, packed = ggml.pack_weight(w, name)
    assert np.array_equal(packed, gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[name]))


def test_k_quant_error_ordering():
    w = _weights(16, 1536, seed=2)
    err = {n: (ggml.fake_quantize(w, n) - w).square().mean().item() for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}
    assert err["Q2_K"] > err["Q3_K"] > err["Q4_K"] > err["Q5_K"] > err["Q6_K"] > 0


def test_rows_not_a_multiple_of_256_fall_back_like_llama_quantize():
    assert [ggml_effective_type(n, 576) for n in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")] == ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]
    assert ggml_effective_type("q4_k", 1536) == "Q4_K"
    w = _weights(4, 576)
    eff, packed = ggml.pack_weight(w, "Q4_K")
    assert eff == "Q5_0" and packed.shape == (4, 576 // 32 * 22)
    with pytest.raises(UserError, match="do not fit Q4_0's blocks of 32"):
        ggml_effective_type("Q4_0", 100)
    with pytest.raises(UserError, match="did you mean Q4_K"):
        LayerQuant.of_ggml("Q4K")


def test_size_model_counts_the_types_bytes(tiny_llama):
    from bo_search.model import discover_layers, load_structure
    from bo_search.sizes import SizeModel

    model, _ = load_structure(str(tiny_llama))
    layers = discover_layers(model)
    sm = SizeModel(model, layers, fp_dtype="float32")
    for li in layers.linears:
        for name in ("Q4_0", "Q8_0", "F16", "Q6_K"):
            lq = LayerQuant.of_ggml(name)
            w = _weights(li.out_features, li.in_features)  # the structure is on the meta device
            _eff, packed = ggml.pack_weight(w, name)
            assert sm.layer_bits(li, lq) == 8 * packed.nbytes
    plan = QuantPlan.uniform(layers.fqns, LayerQuant.of_ggml("Q8_0"))
    assert plan.to_json()["layers"][layers.fqns[0]] == {"bits": 8, "group_size": -1, "symmetric": False, "ggml_type": "Q8_0"}
    assert QuantPlan.from_json(plan.to_json()) == plan
    assert "ggml_type" not in QuantPlan.uniform(layers.fqns, LayerQuant(4, 32)).to_json()["layers"][layers.fqns[0]]


def _ggml_space(path: Path, values, n_blocks: int = 3) -> Path:
    spec = {
        "scheme": "ggml",
        "parameters": [{"name": "ggml_type", "layers": [{"range": [0, n_blocks], "type": "choice", "values": values}]}],
    }
    path.write_text(json.dumps(spec))
    return path


def test_ggml_space_encodes_decodes_and_rejects_bad_types(tiny_llama, tmp_path):
    from bo_search.model import discover_layers, load_structure
    from bo_search.space import load_space

    model, _ = load_structure(str(tiny_llama))
    layers = discover_layers(model)  # in_features 64 and 192: block-32 types only
    space = load_space(_ggml_space(tmp_path / "s.json", ["q8_0", "Q4_0", "F16"]), layers)
    assert space.is_ggml and len(space.tunable) == 3
    assert [GGML_TYPE_NAMES[v] for v in space.tunable[0].values] == ["Q4_0", "Q8_0", "F16"]  # ordered by bytes
    vals = {p.name: p.values[i % 3] for i, p in enumerate(space.tunable)}
    plan = space.decode(vals)
    assert {lq.ggml_type for lq in plan.values()} == {"Q4_0", "Q8_0", "F16"}
    assert space.encode(plan) == vals
    with pytest.raises(UserError, match="takes ggml types"):
        space.encode(QuantPlan.uniform(layers.fqns, LayerQuant(4, 32)))
    with pytest.raises(UserError, match="did you mean Q8_0"):
        load_space(_ggml_space(tmp_path / "bad.json", ["Q4_0", "Q8_O"]), layers)
    k = load_space(_ggml_space(tmp_path / "k.json", ["Q4_0", "Q4_K"]), layers)  # rows of 64/192: Q4_K falls back to Q5_0
    assert {lq.ggml_type for lq in k.decode({p.name: p.values[1] for p in k.tunable}).values()} == {"Q4_K"}
    from clitools import run_main  # in this process: test_runner runs one refusal as a subprocess

    code, _, err = run_main(
        "bo_search.acc_modelsize",
        ["--checkpoint", str(tiny_llama), "--parameters_list", str(tmp_path / "bad.json"), "--history_output", str(tmp_path / "h.csv")],
    )
    assert code == 2 and "did you mean Q8_0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "h.csv").exists()


def test_shipped_ggml_spaces_load_on_the_embedded_model():
    from bo_search.gguf_file import ggml_other_bits
    from bo_search.model import discover_layers, load_structure
    from bo_search.sizes import SizeModel
    from bo_search.space import load_space

    model, ref = load_structure(None)
    layers = discover_layers(model)
    sm = SizeModel(model, layers, fp_dtype=ref.storage_dtype, stored_other_bits=ggml_other_bits(True, ref, layers))
    blk = load_space(REPO / "parameter_spaces" / "smollm2_135m_ggml_per_block.json", layers)
    lin = load_space(REPO / "parameter_spaces" / "smollm2_135m_ggml_per_linear.json", layers)
    assert (len(blk.tunable), len(lin.tunable)) == (30, 210)
    # uniform Q4_1 is the embedded GGUF itself (its linears are Q4_1): tensors = file size - metadata
    u = blk.decode(blk.uniform(GGML_TYPE_NAMES.index("Q4_1"), None, check_fixed=False))
    reader = gguf.GGUFReader(str(ref.gguf))
    assert sm.report(u).total_bytes == sum(int(t.n_bytes) for t in reader.tensors)


@pytest.mark.slow
def test_searched_ggml_plan_exports_a_gguf_transformers_reads_with_the_same_perplexity(tmp_path):
    """A short search on the ggml space, report --gguf, then transformers' own GGUF loader."""
    from transformers import AutoModelForCausalLM

    from bo_search.metrics import perplexity
    from bo_search.model import embedded_gguf_path
    from bo_search.trial import EvalConfig, ModelContext

    hist = tmp_path / "g.csv"
    run = [sys.executable, "-m", "bo_search.acc_modelsize", "--parameters_list", str(REPO / "parameter_spaces" / "smollm2_135m_ggml_per_block.json"),
           "--model_size_constraint", "0.0999", "--num_trials", "4", "--eval_tokens", "512", "--heldout_tokens", "512",
           "--initial_samples", "uniform", "--prior", "none", "--val_tokens", "1024", "--history_output", str(hist)]  # fmt: skip
    r = subprocess.run(run, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [x for x in read_history(hist).rows if x.status == "completed"]
    assert len(rows) == 4 and all(x.model_size <= 0.0999 for x in rows)
    assert all(lq.ggml_type for x in rows for lq in x.plan.values())
    best = min(rows, key=lambda x: x.cal_PPL)
    out = tmp_path / "out" / "model.gguf"
    rep = [sys.executable, "-m", "bo_search.report", str(hist), "--trial", str(best.trial_index), "--gguf", str(out),
           "--eval_tokens", "512", "--heldout_tokens", "512"]  # fmt: skip
    r = subprocess.run(rep, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote" in r.stdout and out.is_file()
    # the file measured in llama.cpp, next to this tool's perplexity of the plan on the same windows
    import re

    got = re.search(r"search split \(512 tokens\) ([\d.]+) \(this tool on the same windows: ([\d.]+), ([-+][\d.]+)%\)", r.stdout)
    assert got, r.stdout[-2000:]
    assert abs(float(got.group(3))) < 1.0 and "tokens/s" in r.stdout
    # refusing to overwrite: one line, exit 2, the file untouched (in this process)
    from clitools import run_main

    before = out.stat().st_mtime_ns
    code, _, err = run_main("bo_search.report.cli", rep[3:])
    assert code == 2 and "--force" in err and out.stat().st_mtime_ns == before

    reader = gguf.GGUFReader(str(out))
    src = gguf.GGUFReader(str(embedded_gguf_path()))
    assert {k for k in src.fields if not k.startswith("GGUF.")} <= set(reader.fields)  # every key copied
    assert reader.fields["tokenizer.ggml.tokens"].contents() == src.fields["tokenizer.ggml.tokens"].contents()
    # the file is the size the search reported (+ the copied metadata), within 0.5%
    predicted = best.model_size * 1e9 + min(int(t.data_offset) for t in src.tensors)
    assert abs(out.stat().st_size / predicted - 1) < 0.005

    ctx = ModelContext(EvalConfig(eval_tokens=512, heldout_tokens=512, max_seqlen=512))
    ctx.applier.apply(best.plan)
    want = perplexity(ctx.model, ctx.heldout_windows, 4).ppl
    ctx.applier.restore()
    theirs = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, torch_dtype=torch.float32)
    got = perplexity(theirs, ctx.heldout_windows, 4).ppl
    assert abs(got / want - 1) < 1e-4, (got, want)
    reported = json.loads(Path(f"{hist}.best_plan.json").read_text())
    assert reported["trial_index"] == best.trial_index and abs(reported["ppl_heldout"] / want - 1) < 1e-4


def test_every_search_runs_on_a_ggml_space_and_gguf_export_needs_a_gguf_checkpoint(tiny_llama, tmp_path):
    from clitools import base_args, run_cli, run_main

    space = _ggml_space(tmp_path / "g.json", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "F16"])
    runs = {
        "acc_modelsize": base_args(tiny_llama, space, tmp_path / "m.csv", "--num_trials", "4"),
        "pareto": [a for a in base_args(tiny_llama, space, tmp_path / "p.csv", "--num_trials", "4", "--max_ppl", "1e6") if a not in ("--avg_bits", "5")],
        "acc_throughput": [a for a in base_args(tiny_llama, space, tmp_path / "t.csv", "--num_trials", "4", "--ppl_constraint", "+50%") if a not in ("--avg_bits", "5")],
    }  # fmt: skip
    for module, args in runs.items():
        r = run_cli(args, module=f"bo_search.{module}")
        assert r.returncode == 0, (module, r.stderr[-3000:])
        hist = Path(args[args.index("--history_output") + 1])
        rows = [x for x in read_history(hist).rows if x.status == "completed"]
        assert len(rows) == 4 and all(lq.ggml_type in ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "F16") for x in rows for lq in x.plan.values())
    # the tiny checkpoint is a Hugging Face directory: --gguf says to convert it first, and writes nothing
    out = tmp_path / "x.gguf"
    code, _, err = run_main("bo_search.report.cli", [tmp_path / "m.csv", "--gguf", out, "--checkpoint", tiny_llama])
    assert code == 2 and "convert_hf_to_gguf.py" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "m_report").exists()
    # a plan in bits and group sizes cannot be written as GGUF
    with pytest.raises(UserError, match="needs a plan in llama.cpp types"):
        from bo_search.report.gguf import check_gguf_plan

        check_gguf_plan(QuantPlan({"a": LayerQuant(4, 32)}))
    # and a ggml plan is not silently written in the affine packed format
    from bo_search.packing import save_packed

    with pytest.raises(UserError, match="saved as a GGUF"):
        save_packed(None, None, QuantPlan({"a": LayerQuant.of_ggml("Q4_0")}), tmp_path / "ck")  # type: ignore[arg-type]
    assert not (tmp_path / "ck").exists()


def test_a_ggml_search_with_the_default_prior_prices_each_type_by_its_own_cost(tiny_llama, tmp_path, monkeypatch):
    """Issue 32's suspected bug: the prior's costs were keyed by "bits:group", which would merge Q4_0
    and Q4_1 (both 4 nominal bits). The search's own wiring (the default prior, FIT on the calibration
    split, then the Thompson node's table) must give each type its own cost."""
    import argparse
    import math

    from bo_search.search import seeding
    from bo_search.search.experiment import Goal
    from bo_search.search.setup import Setup
    from bo_search.sensitivity.table import choice_key
    from bo_search.structure import size_limit, structure_setup
    from bo_search.types import GGML_TYPE_NAMES

    monkeypatch.setenv("BO_SEARCH_CACHE", str(tmp_path / "cache"))
    types = ["Q4_0", "Q4_1", "Q8_0"]
    space = _ggml_space(tmp_path / "g.json", types)
    args = argparse.Namespace(
        checkpoint=str(tiny_llama), parameters_list=str(space), eval_text="pydoc", max_seqlen=32, batch_size=4, device="cpu"
    )
    setup = Setup.from_structure(structure_setup(args), args)
    assert setup.options.prior == "auto" and setup.space.is_ggml  # the default prior
    prior = seeding.resolve_prior(setup)
    assert prior is not None and prior.method == "fit"
    goal = Goal("nll", True, "model_size_gb", size_limit(setup, None, 5.0).gb, "modelsize")
    node = seeding.thompson_node(setup, goal, prior, "relaxed")
    table = node.posterior.problem
    assert table.prior is not None
    unit_of = {f: u for u, fqns in prior.units.items() for f in fqns}
    distinct = 0
    for s, slot in enumerate(setup.space.slots):
        for c, (b, _g) in enumerate(table.choices[s]):
            name = GGML_TYPE_NAMES[b]  # a ggml slot's value is the type's index
            want = sum(prior.costs[unit_of[f]][choice_key(LayerQuant.of_ggml(name))] for f in slot.fqns)
            assert math.isclose(table.prior[s][c], want, rel_tol=1e-12), (slot.block, name)
        by_type = {GGML_TYPE_NAMES[b]: table.prior[s][c] for c, (b, _) in enumerate(table.choices[s])}
        assert set(by_type) == set(types)
        distinct += by_type["Q4_0"] != by_type["Q4_1"]
    assert distinct == len(setup.space.slots)  # same nominal bits, each type its own cost
