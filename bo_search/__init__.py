"""bo_search: Bayesian-optimisation search for per-layer weight quantization of causal LMs."""

from bo_search import offline  # noqa: F401  (must run before transformers / datasets are imported)

__version__ = "0.1.0"
