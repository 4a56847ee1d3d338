import json
import subprocess
import sys

import pytest
import torch

from bo_search.data import make_windows
from bo_search.metrics import lm_eval_token_perplexity, perplexity, window_nll


def test_perplexity_matches_explicit_loop(tiny_ctx):
    ctx = tiny_ctx
    w = ctx.search_windows
    total = 0.0
    with torch.no_grad():
        for row in w.ids:
            logits = ctx.model(row[None, :-1]).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
    ppl = perplexity(ctx.model, w, batch_size=3)
    assert ppl.n_tokens == w.ids.shape[0] * w.seq_len
    assert ppl.nll == pytest.approx(total / ppl.n_tokens, rel=1e-5)
    assert ppl.nll_sem > 0


def test_batch_size_does_not_change_result(tiny_ctx):
    a = window_nll(tiny_ctx.model, tiny_ctx.search_windows, batch_size=1)
    b = window_nll(tiny_ctx.model, tiny_ctx.search_windows, batch_size=4)
    assert torch.allclose(a, b, rtol=1e-5)


def test_lm_eval_path_agrees_with_fast_path(tiny_ctx):
    ours = perplexity(tiny_ctx.model, tiny_ctx.search_windows).ppl
    theirs = lm_eval_token_perplexity(tiny_ctx.model, tiny_ctx.tok, tiny_ctx.search_windows)
    assert theirs["token_perplexity"] == pytest.approx(ours, rel=0.005)


@pytest.mark.slow
def test_lm_eval_path_agrees_on_real_model(real_ctx):
    w = make_windows(real_ctx.search_windows.ids[:, 1:].reshape(-1), 1024, 512, int(real_ctx.search_windows.ids[0, 0]))
    ours = perplexity(real_ctx.model, w).ppl
    theirs = lm_eval_token_perplexity(real_ctx.model, real_ctx.tok, w)
    assert theirs["token_perplexity"] == pytest.approx(ours, rel=0.005)
    assert 5 < ours < 60  # a real pretrained model on real English


def test_lm_eval_local_task_and_unknown_task(tiny_ctx):
    import math
    import re

    from bo_search.metrics import lm_eval_tasks, perplexity, windows_as_documents
    from bo_search.types import UserError

    res = lm_eval_tasks(tiny_ctx.model, tiny_ctx.tok, ["bo_search_text"], tiny_ctx.search_windows)["bo_search_text"]
    docs = windows_as_documents(tiny_ctx.tok, tiny_ctx.search_windows)
    n_words = sum(len(re.split(r"\s+", d)) for d in docs)  # lm_eval's wikitext word count
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    # closed form: all three metrics are one total NLL divided by words or bytes
    total = math.log(res["word_perplexity"]) * n_words
    assert math.log(res["byte_perplexity"]) * n_bytes == pytest.approx(total, rel=1e-6)
    assert res["bits_per_byte"] == pytest.approx(total / n_bytes / math.log(2), rel=1e-6)
    # and that total is the fast path's NLL over the same windows (lm_eval re-tokenises the text)
    fast = perplexity(tiny_ctx.model, tiny_ctx.search_windows)
    assert total == pytest.approx(fast.nll * tiny_ctx.search_windows.n_tokens, rel=0.02)
    with pytest.raises(UserError, match="unknown lm_eval task 'bo_search_txt'; did you mean bo_search_text"):
        lm_eval_tasks(tiny_ctx.model, tiny_ctx.tok, ["bo_search_txt"], tiny_ctx.search_windows)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "bo_search.evaluate", *args], capture_output=True, text=True, timeout=600, env=env)


def test_cli_table_and_json(tiny_llama, tmp_path):
    out = tmp_path / "r.json"
    r = _cli(
        "--checkpoint",
        str(tiny_llama),
        "--eval_text",
        "pydoc",
        "--eval_tokens",
        "128",
        "--heldout_tokens",
        "128",
        "--max_seqlen",
        "64",
        "--uniform",
        "fp",
        "8:32",
        "2:32",
        "--output",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "uniform 8b/g32" in r.stdout and "model_size_gb" in r.stdout
    rows = json.loads(out.read_text())["results"]
    assert [set(("model_size_gb", "avg_bits", "ppl", "ppl_heldout")) <= set(row) for row in rows] == [True] * 3
    fp, b8, b2 = rows
    assert fp["model_size_gb"] > b8["model_size_gb"] > b2["model_size_gb"]
    assert b8["avg_bits"] == pytest.approx(8 + 32 / 32)
    assert abs(b8["ppl"] - fp["ppl"]) / fp["ppl"] < 0.01  # 8-bit is near lossless even on a random model
    assert b2["ppl"] != fp["ppl"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "/nonexistent/model"], "checkpoint not found: /nonexistent/model"),
        (["--eval_tokens", "0"], "--eval_tokens must be positive"),
        (["--eval_tokens", "-5"], "--eval_tokens must be positive"),
        (["--uniform", "4:100"], "does not divide"),
        (["--uniform", "four"], "expected BITS:GROUPSIZE"),
        (["--config", "/nonexistent/plan.json"], "--config file not found"),
    ],
)
def test_cli_bad_input_one_line(tiny_llama, args, message):
    """The first case as a user runs it (a subprocess), the others in this process through main(argv)."""
    from clitools import run_main

    base = ["--checkpoint", str(tiny_llama), "--eval_text", "pydoc", "--max_seqlen", "64", "--eval_tokens", "64", "--heldout_tokens", "0"]
    if args[0] == "--checkpoint":
        r = _cli(*base, *args)
        code, stderr = r.returncode, r.stderr
    else:
        code, _, stderr = run_main("bo_search.evaluate", [*base, *args])
    assert code == 2, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: ") and message in lines[-1], stderr
    assert "Traceback" not in stderr


def test_cli_short_text_and_unknown_task(tiny_llama, tmp_path):
    from clitools import run_main  # in this process: test_cli_bad_input_one_line runs a refusal as a subprocess

    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"Paragraph {i} is short." for i in range(30)))
    code, _, err = run_main(
        "bo_search.evaluate", ["--checkpoint", tiny_llama, "--eval_text", short, "--max_seqlen", "512", "--uniform", "fp"]
    )
    assert code == 2 and "fewer than one window of 512" in err and "Traceback" not in err
    task = ["--checkpoint", tiny_llama, "--eval_text", "pydoc", "--max_seqlen", "64", "--eval_tokens", "64", "--heldout_tokens", "0"]
    code, _, err = run_main("bo_search.evaluate", [*task, "--uniform", "fp", "--tasks", "no_such_task_xyz"])
    assert code == 2 and "unknown lm_eval task 'no_such_task_xyz'" in err and "Traceback" not in err
