"""Sensitivity tables cached on disk, keyed by model, space, method and settings."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bo_search.cli import write_json
from bo_search.model import cache_dir
from bo_search.sensitivity.compute import compute, quantizer_key
from bo_search.sensitivity.table import COMPUTE_VERSION, FORMAT, Sensitivity, SensitivityConfig
from bo_search.types import UserError

if TYPE_CHECKING:
    from bo_search.model import CheckpointRef, ModelLayers
    from bo_search.space import SearchSpace
    from bo_search.trial import EvalConfig

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Cached sensitivity for the search driver (--initial_samples auto)
# ---------------------------------------------------------------------------------------------


def cache_key(
    cfg: SensitivityConfig, model_id: str, corpus_id: str, space_id: str, scheme: Mapping[str, Any], include_lm_head: bool
) -> str:
    """Everything the table depends on: model, method and its settings, calibration windows, space, scheme."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("nsamples", "batch_size", "time_eval")}
    blob = json.dumps(
        [FORMAT, COMPUTE_VERSION, model_id, settings, cfg.windows, corpus_id, space_id, dict(sorted(scheme.items())), include_lm_head]
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cached_sensitivity(
    eval_cfg: EvalConfig,
    ref: CheckpointRef,
    layers: ModelLayers,
    space: SearchSpace,
    method: str = "fit",
    nsamples: int | None = None,
    progress: Callable[..., Any] | None = None,
) -> tuple[Sensitivity, Path, bool]:
    """The sensitivity table for this model, space, scheme and calibration windows: read from
    ``cache_dir()/sensitivity/`` when present, else computed (model loaded here) and written there.
    Returns (table, path, whether it came from the cache)."""
    from bo_search.data import load_corpus
    from bo_search.trial import EvalConfig, ModelContext

    cfg = SensitivityConfig(method=method, nsamples=nsamples, seq_len=eval_cfg.max_seqlen, batch_size=eval_cfg.batch_size, time_eval=False)
    corpus = load_corpus(eval_cfg.eval_text)
    scheme = {"scale_dtype": eval_cfg.scale_dtype, "zero_bits": eval_cfg.zero_bits, "mse_clip": eval_cfg.mse_clip}
    # the weights' content (a retrained checkpoint of the same shape has the same fingerprint) and the
    # dtype the table is computed in are part of the key
    scheme["compute_dtype"] = str(eval_cfg.torch_dtype).removeprefix("torch.")
    ctx = None
    eval_cfg = replace(EvalConfig(**eval_cfg.to_dict()), eval_tokens=cfg.seq_len, heldout_tokens=0)
    if eval_cfg.quantizer != "rtn":  # the key holds the quantizer and its regulariser, chosen per model (calibrated once)
        from bo_search.gptq import cached_description

        desc = cached_description(eval_cfg, ref, layers)
        if desc is None:
            ctx = ModelContext(eval_cfg, heldout=False)
            desc = ctx.quantizer_description()
        scheme.update(quantizer_key(desc))
    key = cache_key(cfg, f"{ref.fingerprint}/{ref.weights_id}", corpus.fingerprint, space.fingerprint, scheme, eval_cfg.include_lm_head)
    path = cache_dir() / "sensitivity" / f"{ref.fingerprint}-{method}-{key}.json"
    if path.is_file():
        try:
            sens = Sensitivity.load(path)
            sens.check_model(ref.fingerprint, ref.name, layers.fqns)
            sens.slot_costs(space)
            return sens, path, True
        except UserError as err:
            log.warning("ignoring the cached sensitivity %s: %s", path, err)
    if ctx is None:
        ctx = ModelContext(eval_cfg, heldout=False)
    sens = compute(ctx, space, cfg, progress=progress)
    del ctx
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, sens.to_json())
    return sens, path, False
