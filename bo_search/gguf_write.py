"""Write a searched ggml plan as a real GGUF file, from the GGUF checkpoint the search ran on
(``report --gguf``, and every plan measured in llama.cpp).

Every metadata key and the tokenizer are copied from the source file; every tensor outside the plan
(embeddings, norms) is copied byte for byte, with its type; every planned linear is written in its
searched type, quantized from the source tensor's decoded weights with ``bo_search.ggml``. Those are
the weights the search scored: rows are quantized independently, and the source tensor's rows are
the model's rows in llama.cpp's order (its q/k row permutation moves whole rows), so each row's bytes
are the same as those of the fake-quantized row the search evaluated. A reader that decodes the file
(transformers, llama.cpp) gets exactly those weights.

A :class:`PackCache` keeps each (tensor, type)'s bytes, so that writing one plan after another (a
search measured in llama.cpp) quantizes each tensor once per type, not once per trial.

A Hugging Face directory has no GGUF to start from: convert it first with llama.cpp's
``convert_hf_to_gguf.py DIR --outtype f16 --outfile model-f16.gguf`` and search with
``--checkpoint model-f16.gguf``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bo_search.gguf_file import linear_tensor_names, metadata_bytes, open_reader, read_field
from bo_search.model import ModelLayers
from bo_search.types import QuantPlan, UserError

CONVERT_HINT = (
    "convert it to GGUF first with llama.cpp: python convert_hf_to_gguf.py MODEL_DIR --outtype f16 --outfile model-f16.gguf, "
    "then search with --checkpoint model-f16.gguf"
)


@dataclass(frozen=True)
class GgufExport:
    path: Path
    file_bytes: int
    tensor_bytes: int  # as written
    metadata_bytes: int  # the source's, which the export copies
    types: Mapping[str, int]  # tensors written per ggml type (planned linears)


def check_gguf_plan(plan: QuantPlan) -> None:
    bad = [f for f, lq in plan.items() if not lq.ggml_type]
    if bad or not plan:
        example = plan.setting(bad[0]).label() if bad else "none"
        raise UserError(
            f"GGUF export needs a plan in llama.cpp types (a ggml-scheme space, e.g. parameter_spaces/smollm2_135m_ggml_per_block.json); "
            f"this plan has {len(bad) or 'no'} layer(s) in other settings (e.g. {example})"
        )


class PackCache:
    """Bytes of planned tensors by (tensor name, ggml type), filled as plans are written."""

    def __init__(self) -> None:
        self.packed: dict[tuple[str, str], tuple[str, Any]] = {}

    def get(self, tensor: Any, ggml_type: str) -> tuple[str, Any]:
        """(type written, packed bytes) of a source tensor in ``ggml_type``."""
        key = (str(tensor.name), ggml_type)
        if key not in self.packed:
            self.packed[key] = pack_tensor(tensor, ggml_type)
        return self.packed[key]


def pack_tensor(tensor: Any, ggml_type: str) -> tuple[str, Any]:
    """A source GGUF tensor's decoded weights quantized to ``ggml_type``: (type written, bytes)."""
    import gguf
    import numpy as np
    import torch

    from bo_search import ggml

    w = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
    return ggml.pack_weight(w, ggml_type)


def export_gguf(
    source: str | Path | None,
    plan: QuantPlan,
    layers: ModelLayers,
    out: str | Path,
    force: bool = False,
    info: Mapping[str, Any] | None = None,
    cache: PackCache | None = None,
) -> GgufExport:
    """Write ``plan`` as ``out`` (atomically: a temporary file renamed at the end, removed on error)."""
    import gguf
    import numpy as np

    if source is None:
        raise UserError(f"the checkpoint is a Hugging Face directory; {CONVERT_HINT}")
    check_gguf_plan(plan)
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise UserError(f"{out} exists; pass --force to overwrite it, or choose another --gguf path")
    out.parent.mkdir(parents=True, exist_ok=True)
    reader = open_reader(source)
    names = linear_tensor_names(reader, layers)
    by_name = {v: k for k, v in names.items()}
    arch = str(read_field(reader, "general.architecture"))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    counts: dict[str, int] = {}
    tensor_bytes = 0
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue  # the writer writes the header and the architecture itself
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
        writer.add_string("bo_search.plan", json.dumps({f: lq.ggml_type for f, lq in plan.items()}, sort_keys=True))
        if info:
            writer.add_string("bo_search.info", json.dumps(dict(info), sort_keys=True, default=str))
        for t in reader.tensors:
            fqn = by_name.get(t.name)
            if fqn is None:  # outside the plan: the source's bytes, unchanged
                data = np.asarray(t.data)
                raw = None if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else t.tensor_type
                writer.add_tensor(t.name, data, raw_dtype=raw)
                tensor_bytes += int(t.n_bytes)
                continue
            ggml_type = plan.setting(fqn).ggml_type
            eff, packed = cache.get(t, ggml_type) if cache is not None else pack_tensor(t, ggml_type)
            if eff == "F16":
                writer.add_tensor(t.name, packed.view(np.float16).reshape(packed.shape[0], -1))
            else:
                writer.add_tensor(t.name, packed, raw_dtype=gguf.GGMLQuantizationType[eff])
            counts[eff] = counts.get(eff, 0) + 1
            tensor_bytes += packed.nbytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return GgufExport(out, out.stat().st_size, tensor_bytes, metadata_bytes(source), dict(sorted(counts.items())))
