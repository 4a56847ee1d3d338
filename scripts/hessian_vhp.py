"""The original torchao prototype's ``hessian_vhp.py`` command line, on ``python -m bo_search.sensitivity --method hessian``.

    python scripts/hessian_vhp.py --checkpoint DIR --max_seqlen 256 --nsamples 8 --max_iter 64 [--layer_id 3] [--output hessian.json]

Per-layer Hessian traces by Hutchinson's estimator with Hessian-vector products (double backward).
Unlike the original, all layers are estimated in one run (``--layer_id`` restricts it to one
block), the loss has the next-token shift, ``--max_iter`` is an upper bound: the estimate stops
once its relative standard error is below ``--tol`` (default 0.1), and the errors are reported.
Other flags of ``python -m bo_search.sensitivity`` (``--tol``, ``--stop_on``, ``--parameters_list``, ...) pass through.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    from bo_search.sensitivity.cli import original_tool_main

    sys.exit(original_tool_main("hessian", "scripts/hessian_vhp.py", __doc__.splitlines()[0], sys.argv[1:], extra=("layer_id",)))
