"""Export of a chosen plan: plan JSON, a torchao ``FqnToConfig`` description, a packed checkpoint
that loads back in one call, and the nearest llama.cpp ``--tensor-type`` arguments.

- :func:`plan_document` -> the JSON ``python -m bo_search.evaluate --config`` reads (``QuantPlan.to_json()``
  plus the trial's numbers, which the reader ignores).
- :func:`torchao_document` -> per layer the torchao config class and its arguments, and the whole
  ``FqnToConfig`` serialised with torchao's own ``config_to_dict``; apply it with::

      import json
      from torchao.core.config import config_from_dict
      from torchao.quantization import quantize_
      quantize_(model, config_from_dict(json.load(open("torchao_config.json"))["torchao"]), filter_fn=None)

- :func:`save_checkpoint` / :func:`load_quantized` -> bit-packed safetensors (``quant.save_packed``) plus
  config and tokenizer; ``model, tok = load_quantized(dir)`` returns a transformers model holding the
  dequantized weights (bit-identical to the fake-quantized model the search scored).
- :func:`gguf_tensor_types` / :func:`llama_quantize_command` -> for each linear, the llama.cpp tensor
  name and the nearest ggml type. llama.cpp's formats (k-quant super-blocks of 256, Q4_1 blocks of 32
  with a float min, ...) are *not* the numerics the search measured; the mapping keeps the bit budget
  per tensor, nothing more.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bo_search.types import LayerQuant, QuantPlan, UserError, ggml_effective_type, read_text_utf8

log = logging.getLogger(__name__)

TORCHAO_FORMAT = "bo_search.torchao/1"
EXPORT_META = "bo_search_export.json"

TORCHAO_APPLY = """import json
from torchao.core.config import config_from_dict
from torchao.quantization import quantize_

cfg = config_from_dict(json.load(open("{path}"))["torchao"])
quantize_(model, cfg, filter_fn=None)  # filter_fn=None: FqnToConfig picks the layers by name"""


# ---------------------------------------------------------------------------------------------
# (a) plan JSON
# ---------------------------------------------------------------------------------------------


def plan_document(plan: QuantPlan, **info: Any) -> dict[str, Any]:
    """``plan.to_json()`` plus descriptive keys (trial, perplexities, size) that readers ignore."""
    doc = plan.to_json()
    doc.update({k: v for k, v in info.items() if v is not None})
    doc["histogram"] = plan.histogram()
    return doc


# ---------------------------------------------------------------------------------------------
# (b) torchao FqnToConfig
# ---------------------------------------------------------------------------------------------


def _readable(value: Any) -> Any:
    """A JSON value a person can read for one torchao config argument."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        args = ", ".join(f"{f.name}={_readable(getattr(value, f.name))!r}" for f in dataclasses.fields(value))
        return f"{type(value).__name__}({args})"
    return str(value)


def torchao_document(
    plan: QuantPlan, in_features: Mapping[str, int] | None = None, device: str = "cpu", scheme: Any = None, quantizer: str = "rtn"
) -> dict[str, Any]:
    """Per layer the torchao config (class + arguments) and the whole ``FqnToConfig`` as torchao serialises it.

    ``device="cpu"`` (default) gives ``IntxWeightOnlyConfig`` for every layer, numerically identical to
    the search's fake quantization (``tests/test_quant.py``); ``"cuda"`` prefers the tinygemm int4 and
    int8 weight-only kernels where a layer's setting allows (slightly different zero-point numerics).
    Layers at 16 bits are left out (unquantized).
    """
    import torchao
    from torchao.core.config import config_to_dict
    from torchao.quantization import FqnToConfig

    from bo_search.quant import DEFAULT_SCHEME, torchao_layer_config

    if device not in ("cpu", "cuda"):
        raise UserError(f"torchao export device {device!r}: use cpu or cuda")
    scheme = scheme or DEFAULT_SCHEME
    mapping: dict[str, Any] = {}
    layers: dict[str, Any] = {}
    unquantized: list[str] = []
    ggml_layers: list[str] = []
    for fqn, lq in plan.items():
        if lq.ggml_type:
            ggml_layers.append(fqn)
            continue
        if not lq.is_quantized:
            unquantized.append(fqn)
            continue
        # in_features only matters for a per-channel int4 CUDA kernel, which has_fast_kernel never picks.
        n_in = (in_features or {}).get(fqn, 0)
        cfg = torchao_layer_config(lq, n_in, device, scheme)
        mapping[fqn] = cfg
        layers[fqn] = {
            "config": type(cfg).__name__,
            "args": {f.name: _readable(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)},
            "setting": lq.label(),
        }
    return {
        "format": TORCHAO_FORMAT,
        "torchao_version": torchao.__version__,
        "device": device,
        "apply": TORCHAO_APPLY.format(path="torchao_config.json"),
        "layers": layers,
        "unquantized": unquantized,
        **({"ggml_layers_not_in_torchao": ggml_layers, "note": GGML_TORCHAO_NOTE} if ggml_layers else {}),
        **({"quantizer": quantizer, "codes_note": CODES_NOTE.format(quantizer=quantizer)} if quantizer != "rtn" else {}),
        "torchao": config_to_dict(FqnToConfig(fqn_to_config=mapping)),
    }


def load_torchao_config(path: str | Path) -> Any:
    """The ``FqnToConfig`` stored in a ``torchao_config.json`` written by :func:`torchao_document`."""
    from torchao.core.config import config_from_dict

    p = Path(path)
    if not p.is_file():
        raise UserError(f"torchao config not found: {p}")
    try:
        doc = json.loads(read_text_utf8(p, "torchao config"))
    except json.JSONDecodeError as err:
        raise UserError(f"{p} is not valid JSON ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != TORCHAO_FORMAT or "torchao" not in doc:
        raise UserError(f"{p} is not a bo_search torchao export (format {TORCHAO_FORMAT})")
    return config_from_dict(doc["torchao"])


# ---------------------------------------------------------------------------------------------
# (c) packed checkpoint
# ---------------------------------------------------------------------------------------------


def save_checkpoint(ctx: ModelContext, plan: QuantPlan, out_dir: str | Path, info: Mapping[str, Any] | None = None) -> Path:
    """Write ``plan`` applied to ``ctx``'s model as a packed checkpoint directory.

    Files: ``model.safetensors`` (bit-packed codes, float16 scales, integer zero points, every other
    tensor at the checkpoint's storage dtype), ``config.json``, the tokenizer, and ``bo_search_export.json``
    (the plan, ``info``, and how to load it). Load with :func:`load_quantized`.
    """
    from bo_search.packing import save_packed

    out = Path(out_dir)
    ctx.applier.check(plan)
    ctx.safe_restore()  # layers left at 16 bits are written from the model itself: it must hold originals
    save_packed(
        ctx.model,
        ctx.layers,
        plan,
        out,
        ctx.scheme,
        fp_dtype=ctx.size_model.fp_dtype,
        originals=ctx.applier,
        quantizer=ctx.applier.quantizer,
    )
    ctx.tok.save_pretrained(str(out))
    meta = {
        "format": "bo_search.export/1",
        "load": f"from bo_search.export import load_quantized; model, tok = load_quantized({str(out)!r})",
        "source_model": ctx.ref.name,
        "source_fingerprint": ctx.ref.fingerprint,
        "scheme": {"scale_dtype": ctx.scheme.scale_dtype, "zero_bits": ctx.scheme.zero_bits, "mse_clip": ctx.scheme.mse_clip},
        "quantizer": ctx.quantizer_description(),
        "torchao": "from bo_search.export import load_torchao; model, tok = load_torchao(DIR): torchao IntxWeightOnlyConfig tensors holding these codes",
        "storage_dtype": ctx.size_model.fp_dtype,
        "histogram": plan.histogram(),
        **dict(info or {}),
    }
    (out / EXPORT_META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


def load_quantized(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a directory written by :func:`save_checkpoint`.

    The model is an ordinary transformers model (float32, eval mode) whose quantized linears hold the
    dequantized weights, exactly the values the search evaluated.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bo_search.packing import load_packed_state

    p = Path(path)
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise UserError(
            f"{p} is not an exported checkpoint (needs config.json and model.safetensors; write one with bo_search.report --save_checkpoint)"
        )
    state, _plan = load_packed_state(p, torch.float32)
    config = AutoConfig.from_pretrained(str(p))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"{p}: the checkpoint does not match its config "
            f"(missing {list(result.missing_keys)[:3]}, unexpected {list(result.unexpected_keys)[:3]})"
        )
    tok = AutoTokenizer.from_pretrained(str(p))
    model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tok


def load_torchao(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a directory written by :func:`save_checkpoint`, every quantized
    linear holding torchao's ``IntxUnpackedToInt8Tensor`` (what ``IntxWeightOnlyConfig`` stores on
    CPU) built from the checkpoint's own codes, float16 scales and zero points, so whatever quantizer
    chose the codes (plain rounding or GPTQ), torchao runs exactly the weights that were searched."""
    import torch
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import IntxUnpackedToInt8Tensor

    from bo_search.packing import load_packed_codes

    model, tok = load_quantized(path, device)
    modules = dict(model.named_modules())
    for fqn, (lq, codes, scale, zero) in load_packed_codes(path).items():
        g = codes.shape[1] // scale.shape[1]
        weight = IntxUnpackedToInt8Tensor(
            qdata=codes.to(torch.int8).to(device),
            scale=scale.to(device),
            zero_point=zero.to(torch.int8).to(device),
            target_dtype=getattr(torch, f"int{lq.bits}"),
            block_size=(1, g),
            dtype=torch.float32,
            activation_quantization=None,
        )
        modules[fqn].weight = torch.nn.Parameter(weight, requires_grad=False)
    return model, tok


# ---------------------------------------------------------------------------------------------
# (d) llama.cpp --tensor-type
# ---------------------------------------------------------------------------------------------

#: Rows (in_features) must be a multiple of this for llama.cpp's k-quants (QK_K).
K_QUANT_BLOCK = 256
#: ... and a multiple of this for the legacy types (q4_0, q4_1, q5_0, q5_1, q8_0, iq4_nl).
LEGACY_BLOCK = 32
_K_TYPES = {1: "q2_k", 2: "q2_k", 3: "q3_k", 4: "q4_k", 5: "q5_k", 6: "q6_k", 7: "q8_0", 8: "q8_0"}
#: HF ``model_type`` -> GGUF architecture name, where they differ.
_ARCH_ALIASES = {"mistral": "llama", "mixtral": "llama", "gpt_neox": "gptneox"}


@dataclass(frozen=True)
class GgufTensorType:
    """The llama.cpp tensor and ggml type closest to one layer's setting."""

    fqn: str
    gguf_name: str  # e.g. "blk.3.attn_q.weight"
    setting: str  # e.g. "4b/g64"
    ggml_type: str  # e.g. "q4_k"
    bits_per_weight: float  # of the ggml type, its block scales included
    note: str = ""

    @property
    def arg(self) -> str:
        """``NAME=TYPE`` for ``--tensor-type``: NAME is a regular expression (llama.cpp matches with
        ``std::regex_search``), so dots are escaped and the name matches exactly one tensor."""
        return f"{self.gguf_name.replace('.', chr(92) + '.')}={self.ggml_type}"


def nearest_ggml_type(lq: LayerQuant, in_features: int | None) -> tuple[str, str]:
    """(ggml type, note) nearest to a layer setting, honouring llama.cpp's row-size rules.

    k-quants (q2_k..q6_k) need rows that are a multiple of 256; otherwise llama-quantize falls back
    (q2_k/q3_k -> iq4_nl, q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0), so we pick the closest type that
    fits instead: q4_1/q5_1 for asymmetric codes (a float min per block of 32, like our zero point),
    q4_0/q5_0 for symmetric ones.
    """
    if lq.ggml_type:  # searched in llama.cpp's own types: exact, with llama.cpp's row fallback
        eff = ggml_effective_type(lq.ggml_type, in_features) if in_features is not None else lq.ggml_type
        return eff.lower(), "" if eff == lq.ggml_type else f"rows of {in_features}: {lq.ggml_type} falls back to {eff}"
    if not lq.is_quantized:
        return "f16", "unquantized in the plan"
    bits = lq.bits
    if in_features is None or in_features % K_QUANT_BLOCK == 0:
        note = "" if bits in (2, 3, 4, 5, 6, 8) else f"no {bits}-bit ggml type; nearest chosen"
        return _K_TYPES[bits], note
    if in_features % LEGACY_BLOCK == 0:
        why = f"rows of {in_features} are not a multiple of {K_QUANT_BLOCK} (k-quants impossible)"
        if bits <= 3:
            return "iq4_nl", why + f": no ggml type below 4 bits fits; iq4_nl is llama-quantize's own fallback (more bits than {bits})"
        if bits == 4:
            return ("q4_0" if lq.symmetric else "q4_1"), why
        if bits == 5:
            return ("q5_0" if lq.symmetric else "q5_1"), why
        return "q8_0", why + ("" if bits == 8 else f": no {bits}-bit type fits, q8_0 used")
    return "f16", f"rows of {in_features} are not a multiple of {LEGACY_BLOCK}: llama.cpp cannot quantize this tensor"


def bits_per_weight(ggml_type: str) -> float:
    import gguf

    qt = gguf.GGMLQuantizationType[ggml_type.upper()]
    block, nbytes = gguf.GGML_QUANT_SIZES[qt]
    return 8.0 * nbytes / block


def gguf_arch(model_type: str | None) -> Any:
    """The gguf ``MODEL_ARCH`` for a transformers ``model_type`` (None if llama.cpp has no such arch)."""
    import gguf

    if not model_type:
        return None
    by_name = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    mt = _ARCH_ALIASES.get(model_type, model_type)
    return by_name.get(mt) or by_name.get(mt.replace("_", ""))


def gguf_tensor_types(
    plan: QuantPlan, layers: ModelLayers | None = None, model_type: str | None = None
) -> tuple[list[GgufTensorType], list[str]]:
    """(tensor types, notes) for every layer of ``plan``.

    ``layers`` (a ``ModelLayers``) gives each layer's in_features and the block count; without it the
    k-quant row rule cannot be checked. ``model_type`` (``config.model_type``) picks llama.cpp's tensor
    names through gguf-py's ``TensorNameMap`` (the table ``convert_hf_to_gguf.py`` uses); unknown or
    missing -> Llama names, with a note.
    """
    import gguf

    notes: list[str] = []
    arch = gguf_arch(model_type)
    if arch is None:
        arch = gguf.MODEL_ARCH.LLAMA
        notes.append(
            f"llama.cpp architecture for model_type {model_type!r} unknown: Llama tensor names assumed"
            if model_type
            else "model architecture unknown (no model loaded): Llama tensor names assumed"
        )
    infos = layers.by_fqn() if layers is not None else {}
    n_blocks = layers.n_blocks if layers is not None else 256
    name_map = gguf.get_tensor_name_map(arch, n_blocks)
    out: list[GgufTensorType] = []
    unmapped: list[str] = []
    position = {fqn: i for i, fqn in enumerate(layers.fqns)} if layers is not None else {}
    for fqn in sorted(plan, key=lambda f: (position.get(f, len(position)), f)):  # model order when known
        lq = plan[fqn]
        name = name_map.get_name(fqn + ".weight", try_suffixes=(".weight",))
        if name is None:
            unmapped.append(fqn)
            continue
        info = infos.get(fqn)
        gtype, note = nearest_ggml_type(lq, info.in_features if info is not None else None)
        out.append(GgufTensorType(fqn, name, lq.label(), gtype, bits_per_weight(gtype), note))
    if unmapped:
        notes.append(
            f"{len(unmapped)} layer(s) have no llama.cpp tensor name for this architecture, e.g. {unmapped[0]!r}; they are left out"
        )
    if layers is None:
        notes.append("layer shapes unknown: k-quant types assumed; llama-quantize falls back where rows are not a multiple of 256")
    return out, notes


def llama_quantize_command(types: Sequence[GgufTensorType], src: str = "model-f16.gguf", dst: str = "model-bo_search.gguf") -> str:
    """A shell command for llama.cpp's ``llama-quantize`` applying ``types``.

    The base type (last argument) must be a quantized type or llama-quantize ignores ``--tensor-type``;
    Q8_0 is used, and embeddings and output stay f16 as in the plan (bo_search keeps them unquantized).
    """
    lines = ["llama-quantize --token-embedding-type f16 --output-tensor-type f16"]
    lines += [f"  --tensor-type '{t.arg}'" for t in types]
    lines.append(f"  {src} {dst} Q8_0")
    return " \\\n".join(lines)


CODES_NOTE = (
    "the codes were chosen by --quantizer {quantizer}; quantize_ with this config rounds the original weights with min/max "
    "instead and does not reproduce them. For torchao tensors holding the searched codes, export the checkpoint "
    "(report --save_checkpoint) and load it with bo_search.export.load_torchao(DIR)"
)
GGML_TORCHAO_NOTE = "these layers are in llama.cpp types, which torchao does not have: write the GGUF (report --gguf out.gguf)"
GGUF_EXACT = (
    "SEARCHED TYPES: the plan was searched in llama.cpp's own types, listed here exactly. llama-quantize rounds with "
    "its own quantizer, so its file differs slightly from the one the search scored; for that file use report --gguf."
)
GGUF_DISCLAIMER = (
    "NEAREST MAPPING, NOT IDENTICAL NUMERICS: each layer gets the llama.cpp type closest to its bit width "
    "(llama.cpp blocks, scales and rounding differ from bo_search's group-wise affine codes); measure the "
    "resulting GGUF's perplexity before relying on it."
)

if TYPE_CHECKING:
    from bo_search.model import ModelLayers
    from bo_search.trial import ModelContext
