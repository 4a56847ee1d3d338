"""The search service end to end on a tiny model with real Ax and real Ray workers."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from clitools import base_args, run_cli, run_main, tiny_space

from bo_search.search.history import read_history

pytestmark = pytest.mark.slow


def test_end_to_end_two_workers_uneven(tiny_llama, tiny_search, tmp_path):
    """The shared search (conftest's ``tiny_search``): 5 trials on 2 workers, run as a subprocess."""
    _, hist = tiny_search.copy_to(tmp_path)
    r = tiny_search.result
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
    # (over-limit proposals are never evaluated: Thompson makes none, so test_gp_strategy_... asserts it)
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
    # the best plan loads in bo_search.evaluate (in this process: its own subprocess runs are in test_evaluate)
    code, out, err = run_main(
        "bo_search.evaluate",
        ["--checkpoint", tiny_llama, "--eval_text", "pydoc", "--eval_tokens", "256", "--heldout_tokens", "0", "--max_seqlen", "64",
         "--config", tmp_path / "h.csv.best_plan.json"],
    )  # fmt: skip
    assert code == 0, err[-2000:]
    ppl_eval = float(out.strip().splitlines()[-1].split("|")[4])
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
    # a row cut off mid-write is a last line without its newline: make one (unless the kill already did)
    text = hist.read_text()
    if text.endswith("\n"):
        fragment = text.splitlines()[-1][:60]
        hist.write_text(text + fragment)
    else:
        fragment = text[text.rfind("\n") + 1 :]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout
    assert "its last row was cut off mid-write" in r.stderr and (tmp_path / "h.csv.torn-1").read_text() == fragment
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


def test_ctrl_c_marks_abandoned_and_says_how_to_resume(tiny_llama, tmp_path):
    """Deterministic: trial 1 sleeps (the test delay hook), so it is in flight when Ctrl-C lands; a
    swallowed interrupt leaves the search waiting on it and fails the test."""
    from bo_search.search.workers import TEST_TRIAL_DELAY_ENV

    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    args = base_args(tiny_llama, space, hist, "--num_trials", "3", "--initial_samples", "none")
    out_f, err_f = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_f, "w") as out, open(err_f, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bo_search.acc_modelsize", *args],
            stdout=out,
            stderr=err,
            env={**os.environ, TEST_TRIAL_DELAY_ENV: "600@1"},
            start_new_session=True,
        )
    try:
        deadline = time.time() + 300
        while "trial 1: test delay" not in err_f.read_text():  # the worker says so as trial 1 starts sleeping
            assert time.time() < deadline and proc.poll() is None, err_f.read_text()[-3000:]
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGINT)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("Ctrl-C was swallowed: the search kept waiting on its in-flight trial")
    finally:
        _kill_group(proc.pid)
    err = err_f.read_text()
    assert code == 130, err[-2000:]
    assert "resume with the same command" in err and "Traceback" not in err
    rows = read_history(hist).rows  # still a valid CSV
    # trial 1 was running; trial 2 (the last of --num_trials 3) may have been proposed and queued
    assert f"({len(rows) - 1} unfinished trial(s), running or proposed, marked abandoned in Ax and in the history)" in err, err[-2000:]
    assert [(x.trial_index, x.status) for x in rows[:2]] == [(0, "completed"), (1, "abandoned")]
    assert rows[1].reason == "interrupted (Ctrl-C)" and rows[1].cal_PPL is None
    assert [(x.trial_index, x.status, x.reason) for x in rows[2:]] in (
        [],
        [(2, "abandoned", "interrupted (Ctrl-C) (proposed, not started)")],
    )


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
    """The first case runs as a user would (a subprocess: one line, no traceback, exit status 2);
    the others in this process through main(argv), which reaches the same checks."""
    from bo_search.search.workers import ray_is_initialized

    space = tiny_space(tmp_path / "space.json")
    args = base_args(tiny_llama, space, tmp_path / "h.csv", "--num_trials", "3")
    args = (
        [a for a in args if a not in ("--avg_bits", "5")] + extra
        if "--avg_bits" in extra or "--model_size_constraint" in extra
        else args + extra
    )
    if extra == ["--avg_bits", "1.0"]:
        r = run_cli(args, timeout=120)
        code, out, err = r.returncode, r.stdout, r.stderr
    else:
        code, out, err = run_main("bo_search.acc_modelsize", args)
        assert not ray_is_initialized()
    assert code == 2, (out[-1000:], err[-2000:])
    assert message in err and "Traceback" not in err
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
    # nothing left to measure: no worker starts, so the last two runs cost no Ray start and run in this process
    code, out, err = run_main(
        "bo_search.acc_modelsize",
        base_args(tiny_llama, space, hist, "--num_trials", "5", "--initial_samples", "uniform", "--val_tokens", "1024"),
    )
    assert code == 0 and f"finalists: {int(m.group(1))} ({int(m.group(1))} re-scores reused" in out, (out[-2000:], err[-2000:])
    assert hist.read_bytes() == before  # nothing measured, nothing written
    chosen = json.loads(best_json.read_text())
    winner = min(resc, key=lambda x: x.val_PPL)
    assert chosen["picked_by"] == "validation" and chosen["val_PPL"] == winner.val_PPL
    # --finalists 0: the old rule, the best trial on the search split
    code, out, err = run_main(
        "bo_search.acc_modelsize",
        base_args(tiny_llama, space, hist, "--num_trials", "5", "--initial_samples", "uniform", "--finalists", "0"),
    )
    assert code == 0, err[-3000:]
    chosen = json.loads(best_json.read_text())
    done = [x for x in rows if x.status == "completed"]
    assert chosen["picked_by"] == "search split" and chosen["cal_PPL"] == min(x.cal_PPL for x in done)
    assert "final pick by validation" not in out


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
    code, _, err = run_main("bo_search.acc_modelsize", args)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert re.search(r"error: the validation split of .* so the text needs at least about \d+ tokens", err), err[-2000:]
    assert not (tmp_path / "h.csv").exists()


def test_corrupt_or_foreign_history_is_refused_and_kept(tiny_llama, tiny_search, tmp_path):
    space, hist = tiny_search.copy_to(tmp_path)  # a finished search's history (the refusals run in this process)
    good = hist.read_text()
    lines = good.splitlines()
    hist.write_text("\n".join(lines[:2] + ["3,completed,bo,{not json"] + lines[2:]) + "\n")
    corrupt = hist.read_text()
    code, _, err = run_main("bo_search.acc_modelsize", base_args(tiny_llama, space, hist, "--num_trials", "7"))
    assert code == 2 and "line 3 is corrupt" in err and "Traceback" not in err
    assert hist.read_text() == corrupt  # never overwritten
    hist.write_text(good)
    other = tiny_space(tmp_path / "other.json", 3)
    spec = json.loads(other.read_text())
    spec["parameters"][0]["layers"][0]["values"] = [3, 4, 8]
    other.write_text(json.dumps(spec))
    code, _, err = run_main("bo_search.acc_modelsize", base_args(tiny_llama, other, hist, "--num_trials", "7"))
    assert code == 2 and "different parameter space" in err
    assert hist.read_text() == good
    old = tmp_path / "old.csv"
    old.write_text("trial_id,cal_PPL,model_size,config\n0,7.9,5.4,\"{'bitwidth.0.': 4}\"\n")
    code, _, err = run_main("bo_search.acc_modelsize", base_args(tiny_llama, space, old, "--num_trials", "7"))
    assert code == 2 and "not a bo_search history" in err
    # another tool's CSV (issue 31): refused before anything writes to it, even with its last line like a torn row
    for content in (b"trial_index,cal_PPL\n0,7.9\n", b"trial_index,cal_PPL\n0,7.9\n1,8.1"):
        foreign = tmp_path / "foreign.csv"
        foreign.write_bytes(content)
        code, _, err = run_main("bo_search.acc_modelsize", base_args(tiny_llama, space, foreign, "--resume"))
        assert code == 2 and "not a bo_search history" in err and err.count("\n") == 1
        assert foreign.read_bytes() == content
        assert not list(tmp_path.glob("foreign.csv?*"))  # no .torn-N, no temp file, no lock left


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
    # --val_tokens 1024: the finalists' re-scores (about 14 s a plan at the default 8192) decide nothing asserted here
    r = run_cli(
        ["--num_trials", "8", "--eval_tokens", "512", "--heldout_tokens", "512", "--history_output", str(hist),
         "--initial_samples", "uniform", "--prior", "none", "--val_tokens", "1024"],
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
    code, _, err = run_main("bo_search.acc_modelsize", base_args(tiny_llama, space, tmp_path / "x.csv", "--strategy", "thomson"))
    assert code == 2 and "did you mean 'thompson'" in err and err.strip().count("\n") == 0


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
    repaired = [x for x in rows if x.source == "repaired" and x.status != "rescored"]  # trials, not their validation re-scores
    assert repaired and all(x.status in ("completed", "failed") and x.model_size <= limit for x in repaired)  # re-checked


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
    code, _, err = run_main("bo_search.report.cli", [hist])  # the report's own subprocess run is in test_report
    assert code == 0, err[-2000:]


def test_history_records_its_limit_and_refuses_another(tiny_llama, tiny_search, tmp_path):
    space, hist = tiny_search.copy_to(tmp_path)  # a finished search (5 trials) at --avg_bits 5
    rows = read_history(hist).rows
    assert {x.limit_metric for x in rows} == {"model_size_gb"} and len({x.limit for x in rows}) == 1
    assert rows[0].goal == "min nll s.t. model_size_gb <= limit"
    before = hist.read_bytes()
    args = base_args(tiny_llama, space, hist, "--num_trials", "7")
    args[args.index("--avg_bits") + 1] = "6"
    code, _, err = run_main("bo_search.acc_modelsize", args)
    assert code == 2 and "--change_limit" in err and err.strip().count("\n") == 0
    assert hist.read_bytes() == before
    # issue 31: the weights' content and the evaluation settings are recorded on every row and
    # checked on resume (in this process: the refusals come before any model or Ray work)
    from bo_search.model import resolve_checkpoint

    settings = json.loads(rows[0].eval_settings)
    assert rows[0].weights_id == resolve_checkpoint(str(tiny_llama)).weights_id
    assert settings["eval_tokens"] == 256 and settings["max_seqlen"] == 64 and settings["compute_dtype"] == "float32"
    same_limit = base_args(tiny_llama, space, hist, "--num_trials", "7")
    for flag, value, message in (
        ("--eval_tokens", "128", "scored with --eval_tokens 256"),
        ("--compute_dtype", "bfloat16", "--change_compute_dtype"),
    ):
        changed = [*same_limit, flag, value] if flag not in same_limit else [value if a == "256" else a for a in same_limit]
        code, _, err = run_main("bo_search.acc_modelsize", changed)
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert hist.read_bytes() == before
    r = run_cli([*args, "--change_limit"])  # 2 more trials under the new limit
    assert r.returncode == 0, r.stderr[-3000:]
    after = read_history(hist).rows
    assert len({x.limit for x in after}) == 2 and after[-1].limit > after[0].limit  # the change is recorded per row
    # the report draws the limit in force now
    code, _, err = run_main("bo_search.report.cli", [hist])
    assert code == 0, err[-2000:]
    md = (tmp_path / "h_report" / "report.md").read_text()
    assert f"{after[-1].limit:.6g}" in md


def test_two_searches_started_at_once_on_one_history(tiny_llama, tmp_path):
    """One takes the history; the other exits 2 with one line naming the winner's process."""
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    args = base_args(tiny_llama, space, hist, "--num_trials", "40", "--initial_samples", "none")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bo_search.acc_modelsize", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    try:
        deadline = time.time() + 300
        while all(p.poll() is None for p in procs):
            assert time.time() < deadline, "neither search was refused"
            time.sleep(0.2)
        [loser] = [p for p in procs if p.poll() is not None]
        [winner] = [p for p in procs if p is not loser]
        err = loser.stderr.read()
        assert loser.returncode == 2 and f"in use by another search (process {winner.pid}," in err, err[-2000:]
        assert err.strip().count("\n") == 0
        assert winner.poll() is None  # the winner goes on
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait()
            _kill_group(p.pid)


# ---------------------------------------------------------------------------------------------
# Issue 31: hangs, and one line for every ordinary mistake (in this process, through main(argv))
# ---------------------------------------------------------------------------------------------


def test_hung_trial_times_out_and_its_worker_is_replaced(tiny_llama, tmp_path, monkeypatch):
    from bo_search.search.workers import TEST_TRIAL_DELAY_ENV

    monkeypatch.setenv(TEST_TRIAL_DELAY_ENV, "600@0")  # trial 0 hangs
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    t0 = time.time()
    code, out, err = run_main(
        "bo_search.acc_modelsize",
        base_args(tiny_llama, space, hist, "--num_trials", "3", "--initial_samples", "none", "--trial_timeout", "8", "--finalists", "0"),
    )
    assert code == 0, err[-3000:]
    assert time.time() - t0 < 300  # not the 600 s the trial would have slept
    rows = read_history(hist).rows
    assert [x.status for x in rows] == ["failed", "completed", "completed"]
    assert rows[0].reason.startswith("timeout: trial ran over 8 s") and "was replaced" in rows[0].reason
    assert "1 replacement worker(s) requested this run" in out


def test_a_flag_mistake_costs_no_sensitivity_pass_and_no_ray(tiny_llama, tmp_path, monkeypatch):
    """Flags are checked before FIT (--initial_samples auto) and before Ray starts."""
    from bo_search.search.workers import ray_is_initialized

    monkeypatch.setenv("BO_SEARCH_CACHE", str(tmp_path / "cache"))
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    args = base_args(tiny_llama, space, hist, "--initial_samples", "auto")
    for extra, message in (
        (["--strategy", "thomson"], "did you mean 'thompson'"),
        (["--gpus", "all"], "the Ray cluster has no GPU"),
        (["--ts_temper", "0"], "ts_temper"),
        (["--trial_timeout", "0"], "--trial_timeout must be positive"),
        (["--prior", str(tmp_path / "missing.json")], "--prior file not found"),
        (["--avg_bits", "nan"], "--avg_bits nan: expected a finite number"),
        (["--max_failure_rate", "nan"], "--max_failure_rate nan: expected a finite number"),
    ):
        code, _, err = run_main("bo_search.acc_modelsize", [*args, *extra])  # a repeated flag: the last one counts
        assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
        assert not ray_is_initialized()
    assert not hist.exists() and not (tmp_path / "cache" / "sensitivity").exists()


def _latin1(path):
    path.write_bytes('{"note": "caf\xe9"}'.encode("latin-1"))
    return path


def test_non_utf8_files_are_one_line(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    bad = _latin1(tmp_path / "bad.json")
    hist = tmp_path / "h.csv"
    cases = [
        ("bo_search.acc_modelsize", base_args(tiny_llama, bad, hist), "parameter space"),
        ("bo_search.acc_modelsize", base_args(tiny_llama, space, hist, "--initial_samples", str(bad)), "initial samples"),
        (
            "bo_search.acc_modelsize",
            base_args(tiny_llama, space, hist, "--initial_samples", "none", "--prior", str(bad)),
            "sensitivity file",
        ),
        ("bo_search.evaluate", ["--checkpoint", str(tiny_llama), "--eval_text", "pydoc", "--config", str(bad)], "--config"),
    ]
    for module, args, what in cases:
        code, _, err = run_main(module, args)
        assert code == 2 and f"{what} {bad} is not UTF-8 text" in err and err.count("\n") == 1, (what, err)


def test_a_read_only_history_is_refused_before_ray(tiny_llama, tmp_path):
    from test_history import make_read_only

    from bo_search.search.history import HistoryWriter
    from bo_search.search.workers import ray_is_initialized

    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    HistoryWriter(hist).close()  # an empty history (header only)
    undo = make_read_only(hist)
    try:
        code, _, err = run_main("bo_search.acc_modelsize", base_args(tiny_llama, space, hist, "--initial_samples", "none"))
    finally:
        undo()
    assert code == 2 and "cannot write the history" in err and err.count("\n") == 1, err
    assert not ray_is_initialized() and not (tmp_path / "h.csv.lock").exists()


def test_a_full_disk_is_one_line_and_the_workers_stop(tiny_llama, tmp_path):
    from bo_search.search.workers import ray_is_initialized

    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    hist.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    code, _, err = run_main("bo_search.acc_modelsize", base_args(tiny_llama, space, hist, "--initial_samples", "none"))
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err, err[-3000:]
    assert not ray_is_initialized() and not (tmp_path / "h.csv.lock").exists()
