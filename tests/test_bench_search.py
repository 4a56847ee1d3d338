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
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_search.py"), "--quick", "--arms", "uniform,exact,ts_seeded", "--out", str(out)]
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
    assert (out / "best_so_far.png").stat().st_size > 10_000
    # every evaluated plan of the seeded search fitted the budget
    from bo_search.search.history import read_history

    [hist] = out.glob("ts_seeded_*.csv")
    rows = [x for x in read_history(hist).rows if x.status == "completed"]
    limit = float(report.split("average bits (")[1].split(" GB")[0])
    assert rows and all(x.model_size is not None and x.model_size <= limit * (1 + 1e-5) for x in rows)
