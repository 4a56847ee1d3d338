"""Running the command-line tools in tests: as a subprocess (a user's ``python -m``), or in this
process through the module's ``main(argv)`` (no fresh interpreter, no torch/ax import: seconds
saved per call), and the tiny search space and flags most search tests share."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


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


def run_main(module, args):
    """A command run in this process, as ``python -m module args`` would: (exit status, stdout, stderr).
    An argparse error (SystemExit) is returned as its exit status, as the shell would see it."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            mod = importlib.import_module(module)
            if not hasattr(mod, "main"):  # a package run with -m: its __main__ calls the cli module's main
                mod = importlib.import_module(f"{module}.cli")
            code = mod.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


@dataclass(frozen=True)
class SharedSearch:
    """One finished search (``tests/conftest.py``'s ``tiny_search``): its folder holds space.json,
    h.csv and h.csv.best_plan.json; ``result`` is the subprocess's exit status and output."""

    folder: Path
    result: subprocess.CompletedProcess

    FILES = ("space.json", "h.csv", "h.csv.best_plan.json")

    def copy_to(self, dest: Path) -> tuple[Path, Path]:
        """Copy the space and the history (and its best plan) into ``dest``, a test's own folder, so
        the test may resume or damage them freely: (space, history)."""
        assert self.result.returncode == 0, self.result.stderr[-3000:]
        for name in self.FILES:
            shutil.copyfile(self.folder / name, dest / name)
        return dest / "space.json", dest / "h.csv"
