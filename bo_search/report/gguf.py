"""The GGUF export of a searched ggml plan (``report --gguf``). The writer lives in
:mod:`bo_search.gguf_write`, below the search, because trials measured in llama.cpp write GGUF files too."""

from bo_search.gguf_write import CONVERT_HINT, GgufExport, check_gguf_plan, export_gguf

__all__ = ["CONVERT_HINT", "GgufExport", "check_gguf_plan", "export_gguf"]
