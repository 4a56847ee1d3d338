"""llama.cpp as a runtime: the glibc load fix, llama.cpp's logits against an independent forward
pass, its perplexity against ours on the same windows and weights, decode timing, its quantizer, and
the bad inputs (llama.cpp missing, a GGUF it refuses, a plan it cannot run).

Tolerances were measured on the embedded model (see docs/size-accounting.md, "Measured in
llama.cpp"): llama.cpp quantizes activations to 8 bits inside its quantized dot products, so its
numbers agree with ours within a fraction of a percent, not bit for bit.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from bo_search import llamacpp
from bo_search.model import LinearInfo, ModelLayers, embedded_gguf_path
from bo_search.runtime import PlanWriter, check_plan, measure_file, perplexity
from bo_search.types import LayerQuant, QuantPlan, UserError

#: |llama.cpp NLL / ours - 1| on the same weights and windows (measured: see the module docstring)
NLL_REL_TOL = 0.01
#: share of positions where llama.cpp's and our top-1 token agree (measured: see the module docstring)
TOP1_MIN = 0.9


def _readelf(*args: str) -> str:
    if shutil.which("readelf") is None:
        pytest.skip("binutils' readelf is not installed")
    return subprocess.run(["readelf", *args], capture_output=True, text=True, check=True).stdout


def test_glibc_fix_is_needed_only_below_2_38_and_edits_only_what_it_must(tmp_path):
    assert llamacpp.needs_glibc_fix((2, 36)) and llamacpp.needs_glibc_fix((2, 37))
    assert not llamacpp.needs_glibc_fix((2, 38)) and not llamacpp.needs_glibc_fix((2, 41)) and not llamacpp.needs_glibc_fix(None)
    pkg = llamacpp.package_dir()
    here = llamacpp.library_dir()
    assert (here == pkg) == (not llamacpp.needs_glibc_fix(llamacpp.glibc_version()))  # a no-op on glibc >= 2.38
    # the edit, judged by binutils' readelf on a fresh copy
    lib = tmp_path / "libllama.so"
    shutil.copy2(pkg / "libllama.so", lib)
    assert "__isoc23_strtol" in _readelf("--dyn-syms", "-W", str(lib))
    fixed = llamacpp.patch_isoc23(lib)
    assert sorted(fixed) == ["__isoc23_sscanf", "__isoc23_strtol", "__isoc23_strtoul", "__isoc23_strtoull"]
    syms = _readelf("--dyn-syms", "-W", str(lib))
    assert "__isoc23" not in syms and " strtol" in syms and " sscanf" in syms
    versions = _readelf("-V", "-W", str(lib))
    line = next(ln for ln in versions.splitlines() if "GLIBC_2.38" in ln)
    assert "WEAK" in line
    assert "GLIBC_2.34" in versions and "WEAK" not in next(ln for ln in versions.splitlines() if "Name: GLIBC_2.34" in ln)
    # a library with nothing to fix is left byte for byte
    clean = tmp_path / "libggml.so.0"
    shutil.copy2(pkg / "libggml.so.0", clean)
    before = clean.read_bytes()
    assert llamacpp.patch_isoc23(clean) == [] and clean.read_bytes() == before
    assert llamacpp.patch_isoc23(lib) == []  # and a second pass changes nothing


@pytest.fixture(scope="module")
def embedded_llama():
    with llamacpp.LlamaModel(embedded_gguf_path(), n_ctx=512, threads=2) as m:
        yield m


def test_logits_match_an_independent_forward_pass(real_ctx, embedded_llama):
    """The reference check: llama.cpp's logits on the embedded GGUF against transformers' forward pass
    on that GGUF's dequantized weights (the same weights, computed by code we did not write either)."""
    row = real_ctx.search_windows.ids[0]
    theirs = embedded_llama.logits(row[:-1].tolist())
    with torch.no_grad():
        ours = real_ctx.model(input_ids=row[None, :-1]).logits[0].double().numpy()
    assert theirs.shape == ours.shape == (512, embedded_llama.n_vocab)
    top1 = float((theirs.argmax(1) == ours.argmax(1)).mean())
    targets = row[1:].numpy()

    def nll(z: np.ndarray) -> float:
        return float((np.logaddexp.reduce(z, axis=1) - z[np.arange(z.shape[0]), targets]).mean())

    a, b = nll(theirs.astype(np.float64)), nll(ours)
    corr = float(np.corrcoef(theirs[::7].ravel(), ours[::7].ravel())[0, 1])
    print(f"top-1 agreement {top1:.4f}, NLL llama.cpp {a:.5f} ours {b:.5f} ({a / b - 1:+.4%}), logit correlation {corr:.6f}")
    assert top1 >= TOP1_MIN
    assert abs(a / b - 1) < NLL_REL_TOL
    assert corr > 0.999
    # and the windowed perplexity is the same quantity as ours on the same windows
    w = real_ctx.search_windows
    ppl = perplexity(embedded_llama, w)
    assert ppl.n_tokens == w.n_tokens and ppl.n_windows == w.ids.shape[0]
    from bo_search.metrics import perplexity as torch_perplexity

    assert abs(ppl.nll / torch_perplexity(real_ctx.model, w).nll - 1) < NLL_REL_TOL


def _mixed_plan(layers: ModelLayers) -> QuantPlan:
    cycle = ["Q4_0", "Q8_0", "Q4_K", "Q6_K", "Q5_1", "Q3_K", "Q5_0"]
    return QuantPlan({li.fqn: LayerQuant.of_ggml(cycle[(li.block + i) % len(cycle)]) for i, li in enumerate(layers.linears)})


def test_llamacpp_perplexity_of_a_written_plan_agrees_with_ours(real_ctx, tmp_path):
    """Deliverable 1's check: a mixed ggml plan, fake-quantized in our model and written as a GGUF
    that llama.cpp runs, scores the same perplexity on the same windows within the tolerance."""
    plan = _mixed_plan(real_ctx.layers)
    with PlanWriter(real_ctx.ref.gguf, real_ctx.layers, workdir=tmp_path) as writer:
        path = writer.write(plan)
        m = measure_file(path, real_ctx.search_windows, None, None, real_ctx.tok, threads=2)
        types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"Q4_0", "Q8_0", "Q4_K", "Q6_K", "Q5_1", "Q5_0"} <= types  # k-quants only on rows of 1536, fallbacks elsewhere
    ours = real_ctx.measure(plan)
    from bo_search.gguf_file import ggml_other_bits
    from bo_search.sizes import SizeModel

    ctx = real_ctx
    sizes = SizeModel(
        ctx.model, ctx.layers, ctx.scheme, ctx.ref.storage_dtype, stored_other_bits=ggml_other_bits(True, ctx.ref, ctx.layers)
    )
    assert m.ppl is not None and m.tensor_bytes == sizes.report(plan).total_bytes  # the file is the size the search counts
    print(f"llama.cpp {m.ppl.ppl:.4f} ours {ours['ppl']:.4f} ({m.ppl.nll / ours['nll'] - 1:+.4%} in NLL)")
    assert abs(m.ppl.nll / ours["nll"] - 1) < NLL_REL_TOL


def test_decode_timing_and_llama_quantize(embedded_llama, tmp_path):
    t = embedded_llama.time_decode(list(range(100, 132)), new_tokens=8, repeats=3, warmup=1)
    assert len(t.rates) == 3 and all(r > 1 for r in t.rates) and t.threads == 2 and t.new_tokens == 8
    assert min(t.rates) <= t.tokens_per_s <= max(t.rates) and t.sem >= 0
    out = tmp_path / "q4_0.gguf"
    llamacpp.quantize(embedded_gguf_path(), out, "Q4_0", threads=2)
    tensors = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert tensors["blk.0.attn_q.weight"] == "Q4_0" and tensors["blk.0.ffn_down.weight"] == "Q4_0"
    assert out.stat().st_size < embedded_gguf_path().stat().st_size
    ids = np.random.default_rng(0).integers(100, 20000, size=(1, 65))
    with llamacpp.LlamaModel(out, n_ctx=64, threads=2) as m:
        assert np.isfinite(m.window_nll(ids)).all()
    with pytest.raises(UserError, match="did you mean 'Q4_K_M'"):
        llamacpp.quantize(embedded_gguf_path(), tmp_path / "x.gguf", "Q4_KM")
    assert not (tmp_path / "x.gguf").exists()


def _layers(in_features: int) -> ModelLayers:
    return ModelLayers("model.layers", 1, (LinearInfo("model.layers.0.mlp.down_proj", 0, "mlp.down_proj", in_features, 64),))


def test_plans_llamacpp_cannot_run_are_refused_before_anything_is_written():
    fqn = "model.layers.0.mlp.down_proj"
    check_plan(QuantPlan({fqn: LayerQuant.of_ggml("Q4_K")}), _layers(576))  # falls back to Q5_0: runs
    with pytest.raises(UserError, match=r"layer model.layers.0.mlp.down_proj: rows of 100 weights do not fit Q4_0's blocks of 32"):
        check_plan(QuantPlan({fqn: LayerQuant.of_ggml("Q4_0")}), _layers(100))
    with pytest.raises(UserError, match="llama.cpp runs plans in llama.cpp tensor types"):
        check_plan(QuantPlan({fqn: LayerQuant(4, 32)}), _layers(576))


def _bad_arch_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "no_such_arch")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_llamacpp_refuses_is_one_line(tmp_path):
    bad = _bad_arch_gguf(tmp_path / "bad.gguf")
    with pytest.raises(UserError, match="llama.cpp refused .*bad.gguf: .*no_such_arch"):
        llamacpp.LlamaModel(bad, n_ctx=64)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    from bo_search.runtime import tensor_bytes

    with pytest.raises(UserError, match="not a readable GGUF"):
        tensor_bytes(junk)


def _run(args: list[str], block_llamacpp: bool = False, module: str = "bo_search.evaluate") -> subprocess.CompletedProcess:
    pre = "import sys; sys.modules['llama_cpp_py_sync'] = None; " if block_llamacpp else "import sys; "
    code = pre + f"from {module} import main; sys.exit(main({args!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_missing_llamacpp_and_refused_files_are_one_line_with_nothing_written(tmp_path):
    out = tmp_path / "out" / "r.json"
    r = _run(["--runtime", "llamacpp", "--uniform", "Q8_0", "--output", str(out)], block_llamacpp=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "llama.cpp is not installed" in r.stderr and "make install" in r.stderr and not out.exists()
    hist = tmp_path / "h.csv"
    space = Path(__file__).resolve().parents[1] / "parameter_spaces" / "smollm2_135m_ggml_per_block.json"
    search = ["--throughput_model", "llamacpp", "--parameters_list", str(space), "--history_output", str(hist)]
    r = _run(search, block_llamacpp=True, module="bo_search.acc_throughput")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "make install" in r.stderr and "--fallback_predicted" in r.stderr and not hist.exists()
    r = _run(["--runtime", "llamacpp", "--gguf", str(_bad_arch_gguf(tmp_path / "bad.gguf")), "--output", str(out)])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert "llama.cpp refused" in r.stderr and not out.exists()
    r = _run(["--runtime", "llamacpp", "--uniform", "4:32", "--output", str(out)])
    assert r.returncode == 2 and "llama.cpp runs plans in llama.cpp tensor types" in r.stderr and not out.exists()


@pytest.mark.slow
def test_evaluate_runtime_llamacpp_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    args = ["--runtime", "llamacpp", "--uniform", "Q8_0", "--gguf", str(embedded_gguf_path()), "--eval_tokens", "512",
            "--heldout_tokens", "512", "--threads", "2", "--decode_repeats", "2", "--output", str(out)]  # fmt: skip
    r = _run(args)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {x["config"]: x for x in json.loads(out.read_text())["results"]}
    assert set(rows) == {"uniform Q8_0", embedded_gguf_path().name}
    src = rows[embedded_gguf_path().name]
    assert src["file_mb"] == pytest.approx(embedded_gguf_path().stat().st_size / 1e6, abs=1e-3)
    assert rows["uniform Q8_0"]["model_size_gb"] > src["model_size_gb"]  # Q8_0 is larger than the source's Q4_1
    for x in rows.values():
        assert 5 < x["ppl"] < 60 and 5 < x["ppl_heldout"] < 60 and x["tok_s"] > 1 and x["threads"] == 2
    assert "tok_s" in r.stdout
