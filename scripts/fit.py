"""The original torchao prototype's ``fit.py`` command line, on ``python -m bo_search.sensitivity --method fit``.

    python scripts/fit.py --checkpoint DIR --max_seqlen 512 --nsamples 8 [--num_layers N] [--output fit.json]

Differences from the original, on purpose: the loss has the next-token shift; every calibration
window is used once (the original repeated identical passes ``--max_iter`` times, which gives the
same gradients each time, so ``--max_iter`` is accepted and has no effect); the result is a JSON
table the search can use (``python -m bo_search.seed --sensitivity fit.json``), not a printout.
Other flags of ``python -m bo_search.sensitivity`` (``--parameters_list``, ``--device``, ...) pass through.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":
    from bo_search.sensitivity.cli import original_tool_main

    sys.exit(original_tool_main("fit", "scripts/fit.py", __doc__.splitlines()[0], sys.argv[1:]))
