"""What a history's numbers depend on (issue 31, items 2-3): the weights' content and the evaluation
settings, recorded per row and checked on resume; the content fingerprint itself."""

import dataclasses
import json
import shutil

import pytest
import torch

from bo_search import model as model_mod
from bo_search.model import content_fingerprint, resolve_checkpoint
from bo_search.search import identity
from bo_search.search.history import HistoryRow
from bo_search.trial import EvalConfig
from bo_search.types import UserError


def _retrained(src, dst):
    """A copy of checkpoint ``src`` whose weights are changed in place: same names, shapes and file sizes."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    state = load_file(str(f))
    name = sorted(k for k in state if k.endswith("mlp.down_proj.weight"))[-1]
    state[name] = state[name] + 0.01
    save_file(state, str(f), metadata={"format": "pt"})
    return dst


def test_weights_id_sees_content_that_the_fingerprint_does_not(tiny_llama, tmp_path):
    other = _retrained(tiny_llama, tmp_path / tiny_llama.name)  # the same directory name: only the content differs
    a, b = resolve_checkpoint(str(tiny_llama)), resolve_checkpoint(str(other))
    assert (other / "model.safetensors").stat().st_size == (tiny_llama / "model.safetensors").stat().st_size
    assert a.fingerprint == b.fingerprint  # names and sizes only: the gap issue 31 names
    assert a.weights_id != b.weights_id
    assert resolve_checkpoint(str(tiny_llama)).weights_id == a.weights_id  # stable


def test_sampled_fingerprint_sees_a_changed_region_of_a_large_file(tmp_path, monkeypatch):
    monkeypatch.setattr(model_mod, "FINGERPRINT_WHOLE_BYTES", 0)  # sample even this small file
    f = tmp_path / "w.bin"
    data = bytearray(torch.randn(1 << 20).numpy().tobytes())  # 4 MiB: samples 1 KiB apart
    f.write_bytes(bytes(data))
    before = content_fingerprint([f])
    data[1_000_000:1_004_096] = bytes(4096)  # one 4 KiB stretch, as a fine-tuned small tensor would be
    f.write_bytes(bytes(data))
    assert content_fingerprint([f]) != before


def _row(i, weights_id="", settings=None):
    return HistoryRow(
        trial_index=i,
        status="completed",
        source="seed",
        cal_PPL=10.0,
        model_size=0.1,
        weights_id=weights_id,
        eval_settings=json.dumps(settings) if settings is not None else "",
    )


class _Args:
    change_compute_dtype = False


def test_history_identity_checks(tiny_llama, tmp_path, capsys):
    ref = resolve_checkpoint(str(tiny_llama))
    cfg = EvalConfig(checkpoint=str(tiny_llama), eval_text="pydoc", eval_tokens=256, max_seqlen=64)
    now = identity.eval_settings(cfg, on_gpu=False)
    assert now["compute_dtype"] == "float32" and now["eval_text"].startswith("pydoc@") and now["mse_clip"] is False
    assert identity.eval_settings(cfg, on_gpu=True)["compute_dtype"] == "bfloat16"  # auto on GPU workers
    path, args = tmp_path / "h.csv", _Args()
    identity.check_history(path, [_row(0, ref.weights_id, now), _row(1, ref.weights_id, now)], ref, now, args)
    assert capsys.readouterr().out == ""
    # rows of an older history (nothing recorded): accepted, with one note
    identity.check_history(path, [_row(0), _row(1, ref.weights_id, now)], ref, now, args)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "1 row(s) were written before" in out
    with pytest.raises(UserError, match="trial 0 was evaluated on other weights"):
        identity.check_history(path, [_row(0, "0123456789ab", now)], ref, now, args)
    for key, value, flag in (
        ("eval_tokens", 1024, "--eval_tokens 1024"),
        ("max_seqlen", 128, "--max_seqlen 128"),
        ("mse_clip", True, "--mse_clip"),
        ("eval_text", "notes.txt@0123456789ab", "--eval_text notes.txt"),
    ):
        with pytest.raises(UserError, match=f"trial 3 was scored with {flag}") as err:
            identity.check_history(path, [_row(3, ref.weights_id, {**now, key: value})], ref, now, args)
        assert "\n" not in str(err.value)
    moved = {**now, "eval_text": "elsewhere/pydoc@" + now["eval_text"].rpartition("@")[2]}  # same text, another path
    identity.check_history(path, [_row(0, ref.weights_id, moved)], ref, now, args)
    # another compute dtype: consent needed, then each row says which it was
    bf16 = [_row(0, ref.weights_id, {**now, "compute_dtype": "bfloat16"})]
    with pytest.raises(UserError, match="--change_compute_dtype"):
        identity.check_history(path, bf16, ref, now, args)
    args.change_compute_dtype = True
    identity.check_history(path, bf16, ref, now, args)
    fields = identity.row_fields(ref, now)
    assert fields["weights_id"] == ref.weights_id and json.loads(fields["eval_settings"]) == now


def test_text_id_follows_the_content_of_a_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one\n\ntwo\n")
    a = identity.text_id(str(f))
    f.write_text("one\n\nthree\n")
    b = identity.text_id(str(f))
    assert a.startswith("t.txt@") and a != b


def test_worker_compute_dtype_follows_the_flag():
    cfg = EvalConfig(compute_dtype="float16")
    assert identity.worker_compute_dtype(cfg, on_gpu=False) == "float16"
    assert identity.worker_compute_dtype(dataclasses.replace(cfg, compute_dtype="auto"), on_gpu=False) == "float32"
