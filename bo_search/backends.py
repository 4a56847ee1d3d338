"""The quantization-backend registry: how a layer setting (:class:`LayerQuant`) is checked against a
layer, fake-quantized, sized, and whether it can be packed or exported to torchao, behind one
interface.

Two backends are built in (defined and registered by ``bo_search.quant``): ``affine`` (integer codes with a scale and zero point per group, what
torchao stores; the codes chosen by plain rounding or an error-compensating quantizer such as GPTQ,
see ``quant.PlanApplier.quantizer``) and ``ggml`` (llama.cpp tensor types, exported as GGUF).
A new backend is one module with a class implementing :class:`QuantBackend` plus one
``register_backend(...)`` call; it claims the settings it handles (``claims``), the latest
registration first, so it can take over settings the built-in ones would otherwise handle.

Imports no torch at module level.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from bo_search.types import LayerQuant, UserError, did_you_mean

if TYPE_CHECKING:
    import torch

    from bo_search.model import LinearInfo
    from bo_search.quant import QuantScheme

AFFINE = "affine"
GGML = "ggml"

BUILTIN = (AFFINE, GGML)

#: what a plan is exported to: a bit-packed safetensors checkpoint, or torchao tensors
EXPORT_TARGETS = ("packed", "torchao")


class QuantBackend(Protocol):
    """One quantization scheme. ``fake_quantize`` and ``layer_bits`` see only quantized settings
    (``lq.is_quantized``); a layer left unquantized is the caller's (full precision)."""

    name: str

    def claims(self, lq: LayerQuant) -> bool:
        """Whether this backend handles the setting ``lq``."""
        ...

    def check(self, info: LinearInfo, lq: LayerQuant) -> None:
        """UserError when ``lq`` cannot be applied to the layer (e.g. a group that does not divide it)."""
        ...

    def fake_quantize(self, w: torch.Tensor, lq: LayerQuant, scheme: QuantScheme) -> torch.Tensor:
        """A 2-D weight quantized and dequantized at ``lq``: a new tensor of ``w``'s dtype."""
        ...

    def layer_bits(self, info: LinearInfo, lq: LayerQuant, scheme: QuantScheme) -> int:
        """Exact stored bits of the layer's weight at ``lq`` (codes and every per-group parameter)."""
        ...

    def export_error(self, lq: LayerQuant, target: str) -> str | None:
        """None when a plan with ``lq`` can be exported to ``target`` (``EXPORT_TARGETS``), else the
        one-line message saying what to do instead."""
        ...


class _Registry:
    """Registered backends, the latest first when claiming a setting."""

    def __init__(self, builtin: list[QuantBackend]):
        self._backends: list[QuantBackend] = list(builtin)

    def register(self, backend: QuantBackend) -> None:
        if any(b.name == backend.name for b in self._backends):
            raise ValueError(f"a quantization backend named {backend.name!r} is already registered")
        self._backends.append(backend)

    def unregister(self, name: str) -> None:
        if name in BUILTIN:
            raise ValueError(f"the built-in backend {name!r} cannot be unregistered")
        self._backends = [b for b in self._backends if b.name != self.get(name).name]

    def get(self, name: str) -> QuantBackend:
        for b in self._backends:
            if b.name == name:
                return b
        raise did_you_mean(name, [b.name for b in self._backends], "quantization backend")

    def for_setting(self, lq: LayerQuant) -> QuantBackend:
        for b in reversed(self._backends):
            if b.claims(lq):
                return b
        raise UserError(f"no quantization backend handles the setting {lq.label()}")

    @property
    def names(self) -> list[str]:
        return [b.name for b in self._backends]


#: the built-in backends register themselves when ``bo_search.quant`` is imported (it defines them)
_REGISTRY = _Registry([])


def register_builtin(*backends: QuantBackend) -> None:
    """``bo_search.quant`` registers the built-in backends with this, once, at import."""
    for b in backends:
        if b.name not in _REGISTRY.names:
            _REGISTRY.register(b)


def register_backend(backend: QuantBackend) -> None:
    """Add a backend; it claims its settings before every backend registered earlier."""
    _REGISTRY.register(backend)


def unregister_backend(name: str) -> None:
    _REGISTRY.unregister(name)


@contextmanager
def registered(backend: QuantBackend) -> Iterator[QuantBackend]:
    """``backend`` registered for the duration of a ``with`` block."""
    register_backend(backend)
    try:
        yield backend
    finally:
        unregister_backend(backend.name)


def get_backend(name: str) -> QuantBackend:
    """The backend registered as ``name`` (UserError with "did you mean" otherwise)."""
    return _REGISTRY.get(name)


def backend_for(lq: LayerQuant) -> QuantBackend:
    """The backend that handles the setting ``lq``."""
    return _REGISTRY.for_setting(lq)


def backend_names() -> list[str]:
    return _REGISTRY.names


def export_error(settings: Any, target: str) -> str | None:
    """The first refusal among ``settings`` (LayerQuants) for export ``target``, or None."""
    for lq in settings:
        msg = backend_for(lq).export_error(lq, target) if lq.is_quantized else None
        if msg:
            return msg
    return None
