"""Force the Hugging Face stack offline before any of it is imported.

bo_search never downloads weights or data: every checkpoint and text is local. Setting these here,
on import of the package, means no code path (transformers, huggingface_hub, datasets, lm_eval) can
reach a hub, and `datasets` makes no telemetry lookup.
"""

import os

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
