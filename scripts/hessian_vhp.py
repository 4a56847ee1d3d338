"""The original torchao prototype's ``hessian_vhp.py`` command line, on ``python -m bo_search.sensitivity --method hessian``.

    python scripts/hessian_vhp.py --checkpoint DIR --max_seqlen 256 --nsamples 8 --max_iter 64 [--layer_id 3] [--output hessian.json]

Per-layer Hessian traces by Hutchinson's estimator with Hessian-vector products (double backward).
Unlike the original, all layers are estimated in one run (``--layer_id`` restricts it to one
block), the loss has the next-token shift, ``--max_iter`` is an upper bound: the estimate stops
once its relative standard error is below ``--tol`` (default 0.1), and the errors are reported.
Other flags of ``python -m bo_search.sensitivity`` (``--tol``, ``--stop_on``, ``--parameters_list``, ...) pass through.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def to_sensitivity_argv(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="scripts/hessian_vhp.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="Hugging Face checkpoint directory or .gguf (default: the embedded model)")
    p.add_argument("--max_seqlen", type=int, default=None, help="calibration window length (default 512)")
    p.add_argument("--max_iter", type=int, default=None, help="most Hutchinson iterations (default 100)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows, cycled through by the iterations (default 8)")
    p.add_argument("--num_layers", type=int, default=None, help="estimate only blocks 0..N-1 (default: all)")
    p.add_argument("--layer_id", type=int, default=None, help="estimate only this block (default: all blocks in one run)")
    p.add_argument("--output", default="hessian_sensitivity.json", help="JSON output (default hessian_sensitivity.json)")
    args, rest = p.parse_known_args(argv)
    out = ["--method", "hessian", "--output", args.output]
    for flag in ("checkpoint", "max_seqlen", "max_iter", "nsamples", "num_layers", "layer_id"):
        if getattr(args, flag) is not None:
            out += [f"--{flag}", str(getattr(args, flag))]
    return out + rest


def main(argv: Sequence[str] | None = None) -> int:
    from bo_search.sensitivity import main as sensitivity_main

    return sensitivity_main(to_sensitivity_argv(argv))


if __name__ == "__main__":
    sys.exit(main())
