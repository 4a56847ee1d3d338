"""The public API for exported plans: ``from bo_search.export import load_quantized`` (the line the
report's export bundle prints), ``load_torchao`` (the same checkpoint as torchao tensors) and
``load_torchao_config``. The formats live in
:mod:`bo_search.report.export`."""

from bo_search.report.export import load_quantized, load_torchao, load_torchao_config

__all__ = ["load_quantized", "load_torchao", "load_torchao_config"]
