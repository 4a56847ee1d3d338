"""The search benchmark's CI mode (`scripts/bench_search.py --quick`) on the embedded model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_search_quick(tmp_path):
    out = tmp_path / "bench"
    # --val_tokens 1024: the finalists' re-scores (the default 8192 tokens cost about 14 s a plan here) decide
    # nothing this test asserts
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_search.py"), "--quick", "--arms", "uniform,exact,ts_seeded", "--out", str(out),
           "--search_args", "--val_tokens 1024"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())["results"]
    assert set(res) == {"uniform", "exact", "ts_seeded"}
    for arm, runs in res.items():
        for run in runs:
            assert math.isfinite(run["heldout"]) and run["heldout"] > 1, (arm, run)
    # one-plan arms have no "trials to within 1%": the report says n/a instead of a constant
    assert res["uniform"][0]["trials_1pct"] is None and res["exact"][0]["trials_1pct"] is None
    # the seeded search evaluates its seeds (which include the best budget-filling uniform plans) and
    # then proposes plans of its own (Thompson), none over the limit; the model's calibration is recorded
    [ts] = res["ts_seeded"]
    assert ts["trials"] == 8 and 1 <= ts["trials_1pct"] <= 8
    assert ts["own"] >= 1 and ts["over_limit"] == 0 and 0 <= ts["own_beat_seeds"] <= ts["own"]
    assert ts["proposal_s_mean"] is not None and ts["idle_pct"] is not None
    assert len(ts["calibration"]) == ts["own"] and all(sd > 0 for _, sd, _ in ts["calibration"])
    report = (out / "BENCH.md").read_text()
    for needle in (
        "| exact |",
        "| ts_seeded |",
        "| n/a |",
        "trial time (apply + evaluate) / bare forward",
        "Calibration of the Thompson model",
    ):
        assert needle in report, needle
    # the best-so-far held-out curve costs a held-out evaluation per mark: only with --curves
    assert not (out / "best_so_far.png").exists() and not any(json.loads((out / "results.json").read_text())["curves"].values())
    # every evaluated plan of the seeded search fitted the budget
    from bo_search.search.history import read_history

    [hist] = out.glob("ts_seeded_*.csv")
    rows = [x for x in read_history(hist).rows if x.status == "completed"]
    limit = float(report.split("average bits (")[1].split(" GB")[0])
    assert rows and all(x.model_size is not None and x.model_size <= limit * (1 + 1e-5) for x in rows)


def _results(path, arms, eval_tokens=1024):
    meta = {"avg_bits": 3.75, "space": "s.json", "eval_tokens": eval_tokens, "fp_held": 20.0, "ref_held": 60.0}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "results": arms, "curves": {}, "scaling": {}}))
    return str(path)


def test_merge_lists_one_plan_arms_once_per_group_and_the_best_per_group(tmp_path):
    one = {"heldout": 60.0, "trials_1pct": None}
    seeded = {"heldout": 40.0, "trials_1pct": 30, "own": 45, "own_beat_seeds": 20, "best_own_heldout": 40.0, "best_seed_heldout": 45.0}
    unseeded = {"heldout": 38.0, "trials_1pct": 40, "own": 50, "own_beat_seeds": 0, "best_own_heldout": 38.0, "best_seed_heldout": None}
    a = _results(tmp_path / "a" / "results.json", {"uniform": [one], "ts_seeded": [seeded]})
    b = _results(tmp_path / "b" / "results.json", {"uniform": [one], "ts": [unseeded]})
    c = _results(tmp_path / "c" / "results.json", {"uniform": [one], "ts_seeded": [dict(seeded, heldout=39.0)]}, eval_tokens=4096)
    d = _results(tmp_path / "d" / "results.json", {"uniform": [one], "ts_seeded": [dict(seeded, heldout=42.0, own_beat_seeds=7)]})
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_search.py"), "--merge", a, b, c, d, "--out", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    text = (tmp_path / "m" / "MERGED.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| 3.75 |")]
    # uniform once for the 1,024-token group (a and b) and once for the 4,096-token group (c)
    assert [line.split(" | ")[3] for line in rows] == ["uniform", "ts_seeded", "ts", "uniform", "ts_seeded"]
    # a stochastic arm's runs in a and d pool into one row of 2 runs
    pooled = rows[1].split(" | ")
    assert pooled[4:6] == ["2", "41.000 ± 1.414"] and pooled[-2] == "20/45, 7/45", rows[1]
    # an unseeded arm has no seeds to beat: n/a, not 0/50
    ts_row = next(line for line in rows if line.split(" | ")[3] == "ts")
    assert "0/50" not in ts_row and ts_row.endswith("| n/a | n/a |")
    best = [line for line in text.splitlines() if line.startswith("- ")]
    assert best == [
        "- 3.75 avg bits, s.json, 1,024 search tokens: best held-out ppl of any arm 38.000 (ts; uniform reference 60.000, full precision 20.000)",
        "- 3.75 avg bits, s.json, 4,096 search tokens: best held-out ppl of any arm 39.000 (ts_seeded; uniform reference 60.000, full precision 20.000)",
    ]
    # a file that is not a results.json: one line naming it, non-zero exit, no traceback
    (tmp_path / "bad.json").write_text('{"results": {}}')
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_search.py"), "--merge", a, str(tmp_path / "bad.json"), "--out", str(tmp_path / "m2")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert "bad.json: not a bench_search results.json" in r.stderr and not (tmp_path / "m2").exists()
