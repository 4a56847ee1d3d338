"""The original torchao prototype's ``fit.py`` command line, on ``python -m bo_search.sensitivity --method fit``.

    python scripts/fit.py --checkpoint DIR --max_seqlen 512 --nsamples 8 [--num_layers N] [--output fit.json]

Differences from the original, on purpose: the loss has the next-token shift; every calibration
window is used once (the original repeated identical passes ``--max_iter`` times, which gives the
same gradients each time, so ``--max_iter`` is accepted and has no effect); the result is a JSON
table the search can use (``python -m bo_search.seed --sensitivity fit.json``), not a printout.
Other flags of ``python -m bo_search.sensitivity`` (``--parameters_list``, ``--device``, ...) pass through.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def to_sensitivity_argv(argv: Sequence[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(prog="scripts/fit.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="Hugging Face checkpoint directory or .gguf (default: the embedded model)")
    p.add_argument("--max_seqlen", type=int, default=None, help="calibration window length (default 512)")
    p.add_argument("--max_iter", type=int, default=None, help="accepted for compatibility; FIT uses every window once")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 8)")
    p.add_argument("--num_layers", type=int, default=None, help="score only blocks 0..N-1 (default: all)")
    p.add_argument("--output", default="fit_sensitivity.json", help="JSON output (default fit_sensitivity.json)")
    args, rest = p.parse_known_args(argv)
    if args.max_iter is not None and args.max_iter != 1:
        print(
            f"note: --max_iter {args.max_iter} has no effect: the original repeated the same passes, which gives identical "
            "gradients; every calibration window is used once",
            file=sys.stderr,
        )
    out = ["--method", "fit", "--output", args.output]
    for flag in ("checkpoint", "max_seqlen", "nsamples", "num_layers"):
        if getattr(args, flag) is not None:
            out += [f"--{flag}", str(getattr(args, flag))]
    return out + rest


def main(argv: Sequence[str] | None = None) -> int:
    from bo_search.sensitivity import main as sensitivity_main

    return sensitivity_main(to_sensitivity_argv(argv))


if __name__ == "__main__":
    sys.exit(main())
