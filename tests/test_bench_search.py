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
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_search.py"), "--quick", "--arms", "uniform,exact,bo_seeded", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())["results"]
    assert set(res) == {"uniform", "exact", "bo_seeded"}
    for arm, runs in res.items():
        for run in runs:
            assert math.isfinite(run["heldout"]) and run["heldout"] > 1, (arm, run)
            assert 1 <= run["trials_1pct"] <= run["trials"]
    # the seeded search evaluates its seeds (which include the best budget-filling uniform plans) and
    # then searches: its best held-out plan can only be a real plan that fits, and the report says so
    assert len(res["bo_seeded"]) == 1 and res["bo_seeded"][0]["trials"] == 6
    report = (out / "BENCH.md").read_text()
    for needle in ("| exact |", "| bo_seeded |", "trial time (apply + evaluate) / bare forward", "worker idle waiting for proposals"):
        assert needle in report, needle
    assert (out / "best_so_far.png").stat().st_size > 10_000
    # every evaluated plan of the seeded search fitted the budget
    from bo_search.history import read_history

    [hist] = out.glob("bo_auto_*.csv")
    rows = [x for x in read_history(hist).rows if x.status == "completed"]
    limit = float(report.split("average bits (")[1].split(" GB")[0])
    assert rows and all(x.model_size is not None and x.model_size <= limit * (1 + 1e-5) for x in rows)
