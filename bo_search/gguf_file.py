"""Reading a GGUF checkpoint's layout: which tensor holds each linear, and how many bits the
tensors outside a plan take as the file stores them (a ggml plan is sized as the export writes it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from bo_search.model import ModelLayers
from bo_search.types import UserError

if TYPE_CHECKING:
    from bo_search.model import CheckpointRef


def open_reader(path: str | Path) -> Any:
    import gguf

    return gguf.GGUFReader(str(path))


def read_field(reader: Any, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def linear_tensor_names(reader: Any, layers: ModelLayers) -> dict[str, str]:
    """FQN of each planned linear -> its tensor name in the GGUF (gguf's own name map)."""
    import gguf

    arch_name = read_field(reader, "general.architecture")
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise UserError(f"GGUF architecture {arch_name!r} is not known to the gguf package; cannot map its tensors")
    n_blocks = int(read_field(reader, f"{arch_name}.block_count") or layers.n_blocks)
    tmap = gguf.get_tensor_name_map(arch, n_blocks)
    present = {t.name for t in reader.tensors}
    out: dict[str, str] = {}
    for li in layers.linears:
        base = tmap.get_name(li.fqn)
        name = f"{base}.weight" if base else None
        if name not in present:
            raise UserError(f"layer {li.fqn} has no tensor in the GGUF ({name or 'no name in the gguf map'}); cannot write a GGUF for it")
        out[li.fqn] = str(name)
    return out


def stored_other_bits(gguf_path: str | Path, layers: ModelLayers) -> int:
    """Bits of every tensor of the GGUF outside the planned linears, as stored (copied by the export)."""
    reader = open_reader(gguf_path)
    planned = set(linear_tensor_names(reader, layers).values())
    return sum(8 * int(t.n_bytes) for t in reader.tensors if t.name not in planned)


def ggml_other_bits(is_ggml: bool, ref: CheckpointRef, layers: ModelLayers) -> int | None:
    """A ggml plan on a GGUF checkpoint is sized as the export writes it: the tensors outside the
    plan as the source file stores them. None (count them at the storage dtype) otherwise."""
    if not is_ggml or ref.gguf is None:
        return None
    return stored_other_bits(ref.gguf, layers)


def metadata_bytes(gguf_path: str | Path) -> int:
    """Bytes before the first tensor's data in the GGUF: header, metadata (tokenizer included), tensor infos."""
    reader = open_reader(gguf_path)
    return min(int(t.data_offset) for t in reader.tensors)
