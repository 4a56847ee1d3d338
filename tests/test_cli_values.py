"""Documented option values that no other test reaches, each run as a user would (issue 12, item 7).

One command per group of flags on the tiny model; each asserts the flag's documented effect. Searches
run as subprocesses; refusals and the light tools (sensitivity, seed, evaluate) run in this process
through their ``main(argv)``, the code a ``python -m`` run calls (other tests run those as
subprocesses)."""

import csv
import json
import re
import subprocess
import sys

from clitools import base_args, run_main, tiny_space

from bo_search.search.history import read_history


def _run(module, args, timeout=600):
    r = subprocess.run([sys.executable, "-m", f"bo_search.{module}", *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _run_here(module, args):
    """``_run`` in this process: (stdout, stderr) of a run that must succeed."""
    code, out, err = run_main(f"bo_search.{module}", args)
    assert code == 0, err[-3000:]
    return out, err


def test_gp_encodings_scale_zero_and_clip_flags(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    sizes = {}
    for enc, zero, extra in (("choice", "8", ["--mse_clip", "--scale_dtype", "bfloat16"]), ("float", "32", [])):
        hist, best = tmp_path / f"{enc}.csv", tmp_path / "plans" / f"{enc}.json"
        _run(
            "acc_modelsize",
            base_args(tiny_llama, space, hist, "--num_trials", "3", "--strategy", "gp", "--encoding", enc, "--zero_bits", zero,
                      "--threads_per_worker", "1", "--initial_samples", "uniform", "--best_plan_output", str(best), *extra),
        )  # fmt: skip
        rows = [x for x in read_history(hist).rows if x.status == "completed"]
        assert len(rows) == 3 and best.is_file() and json.loads(best.read_text())["trial_index"] in {x.trial_index for x in rows}
        sizes[enc] = {x.plan.dumps(): x.model_size for x in rows}
    # the same plan costs more with 32-bit zero points than with 8-bit ones
    common = set(sizes["choice"]) & set(sizes["float"])
    assert common and all(sizes["float"][p] > sizes["choice"][p] for p in common)


def test_output_file_alias_and_lm_head_outside_the_space(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    args = [a if a != "--history_output" else "--output_file" for a in base_args(tiny_llama, space, hist, "--num_trials", "2")]
    _run("acc_modelsize", args + ["--initial_samples", "uniform"])
    assert sum(x.status == "completed" for x in read_history(hist).rows) == 2
    # a search chooses settings per block: a space without a slot for lm_head cannot quantize it
    code, _, err = run_main("bo_search.acc_modelsize", [*args, "--include_lm_head", "--history_output", tmp_path / "x.csv"])
    assert code == 2 and "lm_head" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.csv").exists()


def test_pareto_size_threshold(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "p.csv"
    args = [a for a in base_args(tiny_llama, space, hist, "--num_trials", "3") if a not in ("--avg_bits", "5")]
    r = _run("pareto", args + ["--max_size_gb", "0.001", "--max_ppl", "1e6"])
    # the threshold handed to Ax (its objective threshold on size) is the flag's, not the space's largest plan
    assert "thresholds size <= 0.001 GB, perplexity <= 1e+06" in r.stdout, r.stdout
    # and a threshold no plan of the space can meet is refused, in one line
    code, _, err = run_main("bo_search.pareto", [*args, "--max_size_gb", "1e-06"])
    assert code == 2 and "--max_size_gb 1e-06 is not above the smallest plan" in err and err.count("\n") == 1


def test_sensitivity_stop_rules_metric_and_compare(tiny_llama, tmp_path):
    common = ["--checkpoint", str(tiny_llama), "--eval_text", "pydoc", "--nsamples", "2", "--max_seqlen", "32"]
    outs = []
    for rule in ("layers", "total"):
        out = tmp_path / "sens" / f"h_{rule}.json"
        stdout, _ = _run_here("sensitivity", common + ["--method", "hessian", "--stop_on", rule, "--max_iter", "3", "--output", str(out)])
        m = re.search(r"Hutchinson: (\d+) iterations \((converged|NOT converged) at tol \S+ on (\w+)\)", stdout)
        assert m is not None, stdout
        assert m.group(3) == rule and int(m.group(1)) <= 3  # the rule in force, and --max_iter bounds the iterations
        details = json.loads(out.read_text())["details"]
        assert details["stop_on"] == rule and details["iterations"] == int(m.group(1))
        outs.append(out)
    out = tmp_path / "sens" / "m_nll.json"
    _run_here("sensitivity", common + ["--method", "measured", "--metric", "nll", "--output", str(out)])
    doc = json.loads(out.read_text())
    assert doc["method"] == "measured" and json.dumps(doc).count('"nll"') >= 1
    stdout, _ = _run_here("sensitivity", ["--checkpoint", str(tiny_llama), "--compare", str(outs[0]), str(out)])
    assert "spearman" in stdout.lower()


def test_seed_bitops_budgets_and_solver(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    out = tmp_path / "seeds" / "s.json"
    stdout, _ = _run_here(
        "seed",
        ["--checkpoint", str(tiny_llama), "--eval_text", "pydoc", "--max_seqlen", "32", "--nsamples", "2", "--parameters_list", str(space),
         "--bitops", "0.05", "--budgets", "1,0.9", "--solver", "greedy", "--output", str(out)],
    )  # fmt: skip
    doc = json.loads(out.read_text())
    assert 1 <= len(doc["initial_samples"]) <= 2 and "GBOPs per token" in stdout
    seeding = doc["seeding"]
    allocs = seeding["allocations"]
    assert seeding["bitops_limit_gbops_per_token"] == 0.05 and seeding["limit_gb"] is None  # the budget is in bit operations
    assert sorted(a["budget_fraction"] for a in allocs) == [0.9, 1.0]  # --budgets 1,0.9
    assert {a["solver"] for a in allocs} == {"greedy"}  # --solver greedy: no exact allocation
    for a in allocs:
        assert a["gbops_per_token"] <= 0.05 * a["budget_fraction"] * (1 + 1e-9)


def test_evaluate_sample_of_a_space(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    samples = tmp_path / "init.json"
    samples.write_text(
        json.dumps({"initial_samples": [{f"bitwidth.{i}.": 4 for i in range(3)} | {f"groupsize.{i}.": 32 for i in range(3)}]})
    )
    out = tmp_path / "eval.json"
    _run_here(
        "evaluate",
        ["--checkpoint", str(tiny_llama), "--eval_text", "pydoc", "--eval_tokens", "128", "--heldout_tokens", "128", "--max_seqlen", "64",
         "--parameters_list", str(space), "--initial_samples", str(samples), "--sample", "0", "--output", str(out)],
    )  # fmt: skip
    res = json.loads(out.read_text())["results"]
    assert [r["config"] for r in res] == ["sample 0"] and res[0]["avg_bits"] == 5.0  # 4-bit codes + 16+16 bits per 32 weights


def test_report_baselines_and_cuda_torchao_export(tiny_llama, tiny_search, tmp_path):
    _, hist = tiny_search.copy_to(tmp_path)  # conftest's shared search
    out = tmp_path / "rep"
    r = _run(
        "report",
        [str(hist), "--out", str(out), "--evaluate", "--baselines", "fp", "8:32", "--torchao_device", "cuda",
         "--checkpoint", str(tiny_llama), "--eval_text", "pydoc", "--eval_tokens", "256", "--heldout_tokens", "128", "--max_seqlen", "64"],
    )  # fmt: skip
    assert "| uniform int8 g32 |" in r.stdout and "| full precision " in r.stdout
    tao = next(out.glob("export_trial_*/torchao_config.json"))
    assert json.loads(tao.read_text())["device"] == "cuda"
    with open(hist) as f:
        assert sum(1 for _ in csv.DictReader(f)) >= 2


def test_compute_dtype_reaches_every_worker(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    r = _run(
        "acc_modelsize",
        base_args(
            tiny_llama,
            space,
            hist,
            "--num_trials",
            "2",
            "--num_workers",
            "2",
            "--compute_dtype",
            "bfloat16",
            "--initial_samples",
            "uniform",
        ),
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("  w")]
    assert len(lines) == 2 and all(", cpu, bfloat16," in ln for ln in lines), r.stdout
    rows = [x for x in read_history(hist).rows if x.status == "completed"]
    assert len(rows) == 2 and all(x.worker_id.startswith(("w0@127.0.0.1/", "w1@127.0.0.1/")) and x.worker_id.endswith(":cpu") for x in rows)


def test_worker_flag_errors_are_one_line(tiny_llama, tmp_path):
    space = tiny_space(tmp_path / "space.json")
    cases = [
        (["--gpus", "2", "--gpu_list", "0"], "--gpus and --gpu_list cannot be combined"),
        (["--gpus", "many"], "expected 'all' or a positive number"),
        (["--ray_address", "127.0.0.1:9"], "no Ray head answers there"),
        (["--compute_dtype", "bf16"], "did you mean 'bfloat16'"),
        (["--placement_timeout", "0"], "--placement_timeout must be positive"),
        (["--gpus", "all"], "the Ray cluster has no GPU"),  # a local cluster on this GPU-less machine
    ]
    from bo_search.search.workers import ray_is_initialized

    for extra, msg in cases:  # in this process (test_runner runs one such refusal as a subprocess)
        args = base_args(tiny_llama, space, tmp_path / "h.csv", "--num_trials", "1", *extra)
        code, _, err = run_main("bo_search.acc_modelsize", args)
        assert code == 2 and msg in err and "Traceback" not in err, (extra, err[-1500:])
        assert err.strip().count("\n") == 0, (extra, err)  # one line: every check comes before Ray starts
        assert not ray_is_initialized()
