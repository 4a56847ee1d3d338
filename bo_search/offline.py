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

# Known-harmless import noise on CPU machines: torchao reports CUDA-only extension libraries it
# cannot load, and torch warns about torchao's enum registration. Neither is actionable for a user.
import logging as _logging  # noqa: E402

for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)
