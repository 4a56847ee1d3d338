"""Snapshot of user-visible behaviour, for refactors that must not change it.

Writes, under OUT: every command's ``--help`` text, and the report (Markdown, JSON, CSV; not the
plots' pixels) of every history shipped under docs/bench, rendered from the history alone, with the
repository's path written as <REPO>. Run it before and after a change (in two checkouts, say) and
compare with ``diff -r BEFORE AFTER``.

    python scripts/behaviour_snapshot.py OUT
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile

COMMANDS = [
    "acc_modelsize",
    "acc_throughput",
    "pareto",
    "seed",
    "evaluate",
    "sensitivity",
    "report",
]
KEEP = {".md", ".json", ".csv", ".txt"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--no_reports", action="store_true", help="only the --help texts")
    args = parser.parse_args()
    root = pathlib.Path(__file__).resolve().parent.parent
    out: pathlib.Path = args.out
    (out / "help").mkdir(parents=True, exist_ok=True)
    for cmd in COMMANDS:
        res = subprocess.run(
            [sys.executable, "-m", f"bo_search.{cmd}", "--help"],
            cwd=root,
            capture_output=True,
            text=True,
            env={"COLUMNS": "100", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        )
        (out / "help" / f"{cmd}.txt").write_text(f"rc={res.returncode}\n{res.stdout}{res.stderr}".replace(str(root), "<REPO>"))
    if args.no_reports:
        return 0
    histories = sorted(p for p in (root / "docs" / "bench").rglob("*.csv") if "_report" not in str(p))
    for hist in histories:
        rel = hist.relative_to(root / "docs" / "bench")
        dest = out / "report" / rel.with_suffix("")
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run(
                [sys.executable, "-m", "bo_search.report", str(hist), "--out", tmp],
                cwd=root,
                capture_output=True,
                text=True,
                env={"COLUMNS": "100", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HOME": str(pathlib.Path.home())},
            )
            text = (res.stdout + res.stderr).replace(tmp, "<OUT>").replace(str(root), "<REPO>")
            (dest / "_output.txt").write_text(f"rc={res.returncode}\n{text}")
            for f in sorted(pathlib.Path(tmp).rglob("*")):
                if f.is_file() and f.suffix in KEEP:
                    target = dest / f.relative_to(tmp)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(f, target)
                    target.write_text(target.read_text().replace(tmp, "<OUT>").replace(str(root), "<REPO>"))
    print(f"{len(COMMANDS)} help texts, {len(histories)} reports -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
