"""The search service end to end on a tiny model with real Ax and real Ray workers."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bo_search.search.history import read_history

pytestmark = pytest.mark.slow


def tiny_space(path: Path, n_blocks: int = 3) -> Path:
    spec = {
        "parameters": [
            {
                "name": "bitwidth",
                "name_format": "bitwidth.{i}.",
                "layers": [{"range": [0, n_blocks], "type": "choice", "values": [2, 3, 4, 8]}],
            },
            {
                "name": "groupsize",
                "name_format": "groupsize.{i}.",
                "layers": [{"range": [0, n_blocks], "type": "choice", "values": [32, 64]}],
            },
        ]
    }
    path.write_text(json.dumps(spec))
    return path


def base_args(ckpt, space, history, *extra):
    return [
        "--checkpoint", str(ckpt), "--parameters_list", str(space), "--history_output", str(history),
        "--eval_text", "pydoc", "--eval_tokens", "256", "--heldout_tokens", "128", "--max_seqlen", "64",
        "--avg_bits", "5", "--n_sobol", "2", *extra,
    ]  # fmt: skip


def run_cli(args, module="bo_search.acc_modelsize", timeout=600):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)


def test_end_to_end_two_workers_uneven(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    r = run_cli(base_args(tiny_llama, space, hist, "--num_trials", "5", "--num_workers", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_history(hist).rows
    evaluated = [x for x in rows if x.status in ("completed", "failed")]
    assert len(evaluated) == 5  # 5 trials on 2 workers: none dropped
    trials = [x for x in rows if x.status != "rescored"]
    assert len({x.trial_index for x in trials}) == len(trials)
    limit = None
    for line in r.stdout.splitlines():
        if line.startswith("size limit "):
            limit = float(line.split()[2])
    assert limit is not None
    assert all(x.model_size <= limit for x in evaluated)  # over-limit proposals are never evaluated
    assert {x.worker_id.split("@")[0] for x in evaluated} == {"w0", "w1"}
    assert all(x.cal_PPL > 1 and x.quantize_s is not None for x in evaluated)
    assert "best feasible trial" in r.stdout and "held-out" in r.stdout
    best = json.loads((tmp_path / "h.csv.best_plan.json").read_text())
    assert best["ppl_heldout"] > 1 and best["model_size_gb"] <= limit
    # the final plan is the validation winner among the finalists re-scored when the search ended
    resc = [x for x in read_history(hist).rows if x.status == "rescored"]
    assert resc and all(x.val_tokens and x.val_PPL > 1 and x.val_kl is not None for x in resc)
    winner = min(resc, key=lambda x: x.val_PPL)  # the default objective, nll
    assert best["picked_by"] == "validation" and best["val_PPL"] == winner.val_PPL and best["trial_index"] == winner.trial_index
    assert "the search's pick is" in r.stdout
    # the best plan loads in bo_search.evaluate
    r2 = run_cli(
        [
            "--checkpoint",
            str(tiny_llama),
            "--eval_text",
            "pydoc",
            "--eval_tokens",
            "256",
            "--heldout_tokens",
            "0",
            "--max_seqlen",
            "64",
            "--config",
            str(tmp_path / "h.csv.best_plan.json"),
        ],
        module="bo_search.evaluate",
    )
    assert r2.returncode == 0, r2.stderr[-2000:]
    ppl_eval = float(r2.stdout.strip().splitlines()[-1].split("|")[4])
    assert ppl_eval == pytest.approx(best["cal_PPL"], rel=1e-3)


def test_resume_after_sigkill(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    args = base_args(tiny_llama, space, hist, "--num_trials", "8", "--initial_samples", "none")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bo_search.acc_modelsize", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.time() + 300
    n = 0
    while time.time() < deadline:
        if hist.exists():
            n = sum(1 for x in csv.DictReader(hist.open()) if x["status"] == "completed")
            if n >= 3:
                break
        time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    assert n >= 3
    os.kill(proc.pid, signal.SIGKILL)  # the driver dies without any chance to clean up
    proc.wait()
    _kill_group(proc.pid)
    rows_before = read_history(hist, strict=False).rows
    completed_before = {x.trial_index: x for x in rows_before if x.status == "completed"}
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout
    rows = read_history(hist).rows

    # every row written before the kill comes back unchanged and in order; only the held-out
    # perplexity of the final best row may have been filled in
    def strip(x):
        return {**x.__dict__, "ppl_heldout": None}

    assert [strip(x) for x in rows[: len(rows_before)]] == [strip(x) for x in rows_before]
    after = {x.trial_index: x for x in rows if x.status == "completed"}
    assert set(completed_before) <= set(after)
    assert all(after[i].cal_PPL == completed_before[i].cal_PPL for i in completed_before)
    assert sum(x.status in ("completed", "failed") for x in rows) == 8
    trials = [x for x in rows if x.status != "rescored"]
    assert len({x.trial_index for x in trials}) == len(trials)


def _kill_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _interrupt_search(tiny_llama, tmp_path, attempt):
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / f"h{attempt}.csv"
    # many windows: a trial takes long enough that one is usually in flight when Ctrl-C lands
    args = base_args(tiny_llama, space, hist, "--num_trials", "50", "--initial_samples", "none", "--eval_tokens", "4096")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bo_search.acc_modelsize", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (hist.exists() and sum(1 for x in csv.DictReader(hist.open()) if x["status"] == "completed") >= 2):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    _kill_group(proc.pid)
    return proc.returncode, err, hist


def test_ctrl_c_marks_abandoned_and_says_how_to_resume(tiny_llama, tmp_path):
    for attempt in range(3):
        code, err, hist = _interrupt_search(tiny_llama, tmp_path, attempt)
        if code == 0:  # the interrupt landed outside Python (inside Ray's wait) and the tiny search ran to its end
            continue
        assert code == 130, err[-2000:]
        assert "resume with the same command" in err
        rows = read_history(hist).rows  # still a valid CSV
        assert sum(x.status == "completed" for x in rows) >= 2
        m = re.search(r"\((\d+) in-flight trial\(s\) marked abandoned in Ax and in the history\)", err)
        assert m is not None, err[-2000:]
        abandoned = [x for x in rows if x.status == "abandoned"]
        # what Ax holds as abandoned is exactly what the CSV records, each with its reason
        assert len(abandoned) == int(m.group(1)) <= 1
        assert all(x.reason == "interrupted (Ctrl-C)" and x.cal_PPL is None for x in abandoned)
        assert len({x.trial_index for x in rows}) == len(rows)
        if abandoned:
            return
    pytest.skip("no trial was in flight in 3 interrupted searches (the tiny model's trials are milliseconds): not exercised here")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--avg_bits", "1.0"], "below the smallest plan of the space"),
        (["--model_size_constraint", "100"], "not below the full-precision size"),
        (["--gpu_list", "7"], "--gpu_list names GPU 7"),
        (["--num_trials", "0"], "--num_trials must be at least 1"),
        (["--initial_samples", "/nonexistent.json"], "initial samples file not found"),
        (["--resume"], "does not exist or is empty"),
        (["--finalists", "-1"], "--finalists must be 0"),
        (["--objective", "kll"], "did you mean 'kl'"),
        (["--ts_shared_sd", "-1"], "--ts_shared_sd must be zero or positive"),
    ],
)
def test_bad_input_exits_2_before_any_trial(tiny_llama, tmp_path, extra, message):
    space = tiny_space(tmp_path / "space.json")
    args = base_args(tiny_llama, space, tmp_path / "h.csv", "--num_trials", "3")
    args = (
        [a for a in args if a not in ("--avg_bits", "5")] + extra
        if "--avg_bits" in extra or "--model_size_constraint" in extra
        else args + extra
    )
    r = run_cli(args, timeout=120)
    assert r.returncode == 2, (r.stdout[-1000:], r.stderr[-2000:])
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "h.csv").exists()


def test_final_choice_names_a_seed_reuses_rescores_on_resume_and_finalists_0_picks_on_the_search_split(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    best_json = tmp_path / "h.csv.best_plan.json"
    # only seeds evaluated: the pick is a seed, and the summary says so
    r = run_cli(base_args(tiny_llama, space, hist, "--num_trials", "2", "--initial_samples", "uniform", "--val_tokens", "1024"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the search's pick is a seed (trial" in r.stdout, r.stdout[-2000:]
    first = [x for x in read_history(hist).rows if x.status == "rescored"]
    assert first and all(x.source == "seed" for x in first)
    # resumed to more trials: the finalists re-scored before are reused, not measured again
    r = run_cli(base_args(tiny_llama, space, hist, "--num_trials", "5", "--initial_samples", "uniform", "--val_tokens", "1024"))
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"finalists: (\d+) \((\d+) re-scores reused from the history\)", r.stdout)
    assert m and int(m.group(2)) >= 1, r.stdout[-2000:]
    rows = read_history(hist).rows
    resc = [x for x in rows if x.status == "rescored"]
    assert len({x.plan for x in resc}) == len(resc)  # no plan re-scored twice
    before = hist.read_bytes()
    r = run_cli(base_args(tiny_llama, space, hist, "--num_trials", "5", "--initial_samples", "uniform", "--val_tokens", "1024"))
    assert r.returncode == 0 and f"finalists: {int(m.group(1))} ({int(m.group(1))} re-scores reused" in r.stdout, r.stdout[-2000:]
    assert hist.read_bytes() == before  # nothing measured, nothing written
    chosen = json.loads(best_json.read_text())
    winner = min(resc, key=lambda x: x.val_PPL)
    assert chosen["picked_by"] == "validation" and chosen["val_PPL"] == winner.val_PPL
    # --finalists 0: the old rule, the best trial on the search split
    r = run_cli(base_args(tiny_llama, space, hist, "--num_trials", "5", "--initial_samples", "uniform", "--finalists", "0"))
    assert r.returncode == 0, r.stderr[-3000:]
    chosen = json.loads(best_json.read_text())
    done = [x for x in rows if x.status == "completed"]
    assert chosen["picked_by"] == "search split" and chosen["cal_PPL"] == min(x.cal_PPL for x in done)
    assert "final pick by validation" not in r.stdout


def test_text_too_short_for_a_validation_split_is_one_line(tiny_llama, tmp_path):
    from test_text_split import _sentences

    from bo_search.data import Document

    docs = []
    for i, text in enumerate(_sentences(80)):
        title = f"doc {i}"
        if Document(title, text).split != "validation":  # a text whose documents all miss the validation split
            docs.append({"title": title, "text": text})
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps(d) + "\n" for d in docs))
    space = tiny_space(tmp_path / "space.json")
    args = base_args(tiny_llama, space, tmp_path / "h.csv", "--num_trials", "2")
    args[args.index("--eval_text") + 1] = str(text)
    r = run_cli(args, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert re.search(r"error: the validation split of .* so the text needs at least about \d+ tokens", r.stderr), r.stderr[-2000:]
    assert not (tmp_path / "h.csv").exists()


def test_corrupt_or_foreign_history_is_refused_and_kept(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    r = run_cli(base_args(tiny_llama, space, hist, "--num_trials", "2", "--initial_samples", "none"))
    assert r.returncode == 0, r.stderr[-2000:]
    good = hist.read_text()
    lines = good.splitlines()
    hist.write_text("\n".join(lines[:2] + ["3,completed,bo,{not json"] + lines[2:]) + "\n")
    corrupt = hist.read_text()
    r = run_cli(base_args(tiny_llama, space, hist, "--num_trials", "4"))
    assert r.returncode == 2 and "line 3 is corrupt" in r.stderr and "Traceback" not in r.stderr
    assert hist.read_text() == corrupt  # never overwritten
    hist.write_text(good)
    other = tiny_space(tmp_path / "other.json", 3)
    spec = json.loads(other.read_text())
    spec["parameters"][0]["layers"][0]["values"] = [3, 4, 8]
    other.write_text(json.dumps(spec))
    r = run_cli(base_args(tiny_llama, other, hist, "--num_trials", "4"))
    assert r.returncode == 2 and "different parameter space" in r.stderr
    assert hist.read_text() == good
    old = tmp_path / "old.csv"
    old.write_text("trial_id,cal_PPL,model_size,config\n0,7.9,5.4,\"{'bitwidth.0.': 4}\"\n")
    r = run_cli(base_args(tiny_llama, space, old, "--num_trials", "4"))
    assert r.returncode == 2 and "not a bo_search history" in r.stderr


def test_pareto_search_front(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "p.csv"
    args = [a for a in base_args(tiny_llama, space, hist, "--num_trials", "6", "--max_ppl", "100000") if a not in ("--avg_bits", "5")]
    r = run_cli(args, module="bo_search.pareto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Pareto front" in r.stdout
    rows = [x for x in read_history(hist).rows if x.status == "completed"]
    assert len(rows) == 6 and all(x.search == "pareto" for x in rows)
    front = json.loads((tmp_path / "p.csv.pareto.json").read_text())["front"]
    assert front and all(p["ppl_heldout"] > 1 for p in front)
    sizes = [p["model_size_gb"] for p in front]
    ppls = [p["ppl"] for p in front]
    assert sizes == sorted(sizes) and ppls == sorted(ppls, reverse=True)  # a real trade-off curve
    # no completed trial dominates a front point
    for p in front:
        assert not any(x.model_size < p["model_size_gb"] and x.cal_PPL < p["ppl"] for x in rows)


def test_real_model_short_search(tmp_path):
    """The default strategy on the embedded model: 2 uniform seeds, then Thompson proposals."""
    hist = tmp_path / "real.csv"
    r = run_cli(
        ["--num_trials", "8", "--eval_tokens", "512", "--heldout_tokens", "512", "--history_output", str(hist),
         "--initial_samples", "uniform", "--prior", "none"],
        timeout=1200,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_history(hist).rows
    done = [x for x in rows if x.status == "completed"]
    assert len(done) == 8 and all(10 < x.cal_PPL < 200 for x in done if x.source == "seed")  # real model, 4.25 avg bits
    own = [x for x in done if x.source == "thompson"]
    assert len(own) >= 2 and all(x.proposal_s is not None and x.proposal_s < 30 and x.cal_PPL > 10 for x in own)
    assert not any(x.status == "infeasible" for x in rows)  # Thompson proposals fit by construction
    limit = own[0].limit
    assert limit is not None and all(x.model_size <= limit for x in done) and own[0].limit_metric == "model_size_gb"
    assert "best feasible trial" in r.stdout and "strategy thompson (prior: flat)" in r.stdout


def test_strategy_rows_and_bad_strategy(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    r = run_cli(base_args(tiny_llama, space, hist, "--num_trials", "6", "--initial_samples", "none"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_history(hist).rows
    rows = [x for x in rows if x.status != "rescored"]
    assert [x.source for x in rows] == ["thompson"] * 6 and all(x.status == "completed" for x in rows)
    assert len({x.plan for x in rows}) == 6  # every proposal new
    r = run_cli(base_args(tiny_llama, space, tmp_path / "x.csv", "--strategy", "thomson"))
    assert r.returncode == 2 and "did you mean 'thompson'" in r.stderr and r.stderr.strip().count("\n") == 0


def test_gp_strategy_proposes_repairs_and_records_over_limit_rows(tiny_llama, tmp_path):
    """The GP strategy's own proposals run (Sobol, then BO), and over-limit proposals are recorded as
    infeasible (never evaluated) and repaired into a plan that fits."""
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    args = base_args(tiny_llama, space, hist, "--num_trials", "8", "--initial_samples", "none", "--strategy", "gp")
    args[args.index("--avg_bits") + 1] = "3.5"  # tight: most of the space is over the limit
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_history(hist).rows
    sources = {x.source for x in rows}
    assert "sobol" in sources and "bo" in sources, sources  # its own proposals, evaluated or over the limit
    limit = rows[0].limit
    over = [x for x in rows if x.status == "infeasible"]
    assert over, "a tight limit must produce over-limit proposals"
    for x in over:
        assert x.model_size > limit and x.cal_PPL is None and "over the limit; not evaluated" in x.reason
    for x in rows:
        if x.status == "completed":
            assert x.model_size <= limit and x.cal_PPL is not None and x.nll is not None
    assert any(x.source == "repaired" for x in rows)


def test_heldout_zero_skips_heldout_everywhere(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    args = base_args(tiny_llama, space, hist, "--num_trials", "3")
    args[args.index("--heldout_tokens") + 1] = "0"
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    best = json.loads((tmp_path / "h.csv.best_plan.json").read_text())
    assert best["ppl_heldout"] is None and best["cal_PPL"] > 1
    assert all(x.ppl_heldout is None for x in read_history(hist).rows)
    assert "(held-out)" not in r.stdout
    p = [
        a
        for a in base_args(tiny_llama, space, tmp_path / "p.csv", "--num_trials", "3", "--max_ppl", "100000")
        if a not in ("--avg_bits", "5")
    ]
    p[p.index("--heldout_tokens") + 1] = "0"
    r = run_cli(p, module="bo_search.pareto")
    assert r.returncode == 0, r.stderr[-3000:]
    front = json.loads((tmp_path / "p.csv.pareto.json").read_text())["front"]
    assert front and all(x["ppl_heldout"] is None for x in front)
    rep = subprocess.run([sys.executable, "-m", "bo_search.report", str(hist)], capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]


def test_history_records_its_limit_and_refuses_another(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    r = run_cli(base_args(tiny_llama, space, hist, "--num_trials", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_history(hist).rows
    assert {x.limit_metric for x in rows} == {"model_size_gb"} and len({x.limit for x in rows}) == 1
    assert rows[0].goal == "min nll s.t. model_size_gb <= limit"
    before = hist.read_bytes()
    args = base_args(tiny_llama, space, hist, "--num_trials", "3")
    args[args.index("--avg_bits") + 1] = "6"
    r = run_cli(args)
    assert r.returncode == 2 and "--change_limit" in r.stderr and r.stderr.strip().count("\n") == 0
    assert hist.read_bytes() == before
    r = run_cli([*args, "--change_limit"])
    assert r.returncode == 0, r.stderr[-3000:]
    after = read_history(hist).rows
    assert len({x.limit for x in after}) == 2 and after[-1].limit > after[0].limit  # the change is recorded per row
    # the report draws the limit in force now
    rep = subprocess.run([sys.executable, "-m", "bo_search.report", str(hist)], capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    md = (tmp_path / "h_report" / "report.md").read_text()
    assert f"{after[-1].limit:.6g}" in md


def test_second_search_on_a_history_in_use_is_refused(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    args = base_args(tiny_llama, space, hist, "--num_trials", "40", "--initial_samples", "none")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bo_search.acc_modelsize", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (tmp_path / "h.csv.lock").exists():
            time.sleep(0.2)
        r = run_cli(args)
        assert r.returncode == 2 and f"in use by another search (process {proc.pid}" in r.stderr, r.stderr[-2000:]
        assert r.stderr.strip().count("\n") == 0
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _kill_group(proc.pid)
