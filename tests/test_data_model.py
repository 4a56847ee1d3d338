import pytest
import torch

from bo_search.data import SPLITS, Document, file_corpus, make_windows, pydoc_corpus, token_stream, wikipedia_corpus
from bo_search.model import discover_layers, load_model, resolve_checkpoint
from bo_search.types import UserError


def test_splits_are_disjoint_and_deterministic():
    c = pydoc_corpus()
    parts = {s: {d.title for d in c.split_documents(s)} for s in SPLITS}
    assert sum(len(v) for v in parts.values()) == len(c.documents)
    assert not (parts["search"] & parts["test"]) and not (parts["calibration"] & parts["search"])
    assert all(parts.values())
    assert Document("Albert Einstein", "x").split == Document("Albert Einstein", "y").split


def test_windows_fixed_non_overlapping():
    stream = torch.arange(10_000)
    w = make_windows(stream, 2048, 512, prefix_id=-1)
    assert w.ids.shape == (4, 513) and (w.ids[:, 0] == -1).all()
    starts = list(w.starts)
    assert all(b - a >= 512 for a, b in zip(starts, starts[1:]))
    assert starts[-1] > 5000  # spread over the split, not only its beginning
    assert torch.equal(w.ids[1, 1:], stream[starts[1] : starts[1] + 512])
    assert make_windows(stream, 2048, 512, -1).starts == w.starts


def test_window_errors():
    with pytest.raises(UserError, match="must be positive"):
        make_windows(torch.arange(100), 0, 10, 0)
    with pytest.raises(UserError, match="fewer than one window"):
        make_windows(torch.arange(100), 64, 512, 0)


def test_file_corpus_formats(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "hello world", "title": "a"}\n\n{"text": "second"}\n')
    assert [d.text for d in file_corpus(p).documents] == ["hello world", "second"]
    p.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(UserError, match=r"t.jsonl:2: each JSONL line"):
        file_corpus(p)
    q = tmp_path / "t.txt"
    q.write_text("\n\n\n".join(f"block {i}\nline two of {i}" for i in range(12)))  # 12 blank-line blocks
    assert [d.text for d in file_corpus(q).documents][:2] == ["block 0\nline two of 0", "block 1\nline two of 1"]
    with pytest.raises(UserError, match="not found"):
        file_corpus(tmp_path / "missing.txt")


def test_token_stream_cached(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("BO_SEARCH_CACHE", str(tmp_path))
    _, tok, _ = load_model(str(tiny_llama))
    a = token_stream(tok, pydoc_corpus(), "search")
    assert list((tmp_path / "tokens").glob("*-search-v*.pt"))
    assert torch.equal(a, token_stream(tok, pydoc_corpus(), "search"))


@pytest.mark.parametrize("arch, per_block", [("llama", 7), ("qwen2", 7), ("gpt_neox", 4), ("opt", 6)])
def test_layer_discovery_architectures(tmp_path, arch, per_block):
    from tiny import make_checkpoint

    model, _, _ = load_model(str(make_checkpoint(tmp_path / arch, arch, n_layers=3)))
    layers = discover_layers(model)
    assert layers.n_blocks == 3
    assert len(layers.linears) == 3 * per_block
    modules = dict(model.named_modules())
    assert all(isinstance(modules[li.fqn], torch.nn.Linear) for li in layers.linears)
    head = model.get_output_embeddings()
    assert all(modules[li.fqn] is not head for li in layers.linears)
    with_head = discover_layers(model, include_lm_head=True)
    assert len(with_head.linears) == len(layers.linears) + 1 and with_head.linears[-1].block == -1


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_checkpoint(tmp_path / "empty")
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"123")
    with pytest.raises(UserError, match="not a .gguf"):
        resolve_checkpoint(bad)


@pytest.mark.slow
def test_embedded_model_and_text(real_ctx):
    assert real_ctx.layers.n_blocks == 30
    assert len(real_ctx.layers.linears) == 210
    assert {li.in_features for li in real_ctx.layers.linears} == {576, 1536}
    docs = wikipedia_corpus().documents
    assert 100 <= len(docs) <= 110
    assert all(not d.text.lower().startswith("#redirect") for d in docs)
    sizes = {s: token_stream(real_ctx.tok, wikipedia_corpus(), s).numel() for s in SPLITS}
    assert 600_000 < sum(sizes.values()) < 800_000
    assert all(v > 50_000 for v in sizes.values())


def test_cache_is_isolated_in_tests_and_subprocesses(_isolated_cache):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from bo_search.model import cache_dir

    assert cache_dir() == Path(_isolated_cache) and Path.home() / ".cache" not in cache_dir().parents
    out = subprocess.run(
        [sys.executable, "-c", "from bo_search.model import cache_dir; print(cache_dir())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == str(_isolated_cache) and os.environ["BO_SEARCH_CACHE"] == out
