"""What a search starts from: its seeds (``--initial_samples``) and the Thompson strategy's prior
table and generation node."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bo_search import cli
from bo_search.sensitivity.table import Sensitivity
from bo_search.space import load_initial_samples
from bo_search.types import UserError

if TYPE_CHECKING:
    from bo_search.budget import SizeLimit
    from bo_search.search.experiment import Goal
    from bo_search.search.setup import Setup

log = logging.getLogger(__name__)


def fit_table(setup: Setup) -> Sensitivity:
    """FIT on the calibration split for this model and space: computed in this process once (then
    cached on disk, see sensitivity.cached_sensitivity)."""
    from bo_search.sensitivity.cache import cached_sensitivity
    from bo_search.sensitivity.seeds import AUTO_METHOD

    if AUTO_METHOD not in setup.tables:
        t0 = time.perf_counter()
        log.info("%s sensitivity on the calibration split (computed once per model and space, then cached)", AUTO_METHOD)
        sens, path, hit = cached_sensitivity(setup.eval_cfg, setup.ref, setup.layers, setup.space, AUTO_METHOD, progress=cli.progress)
        log.info(
            "%s sensitivity %s %s (%.1f s)", AUTO_METHOD, "read from" if hit else "computed and cached in", path, time.perf_counter() - t0
        )
        setup.tables[AUTO_METHOD] = sens
    return setup.tables[AUTO_METHOD]


def resolve_prior(setup: Setup) -> Sensitivity | None:
    """The Sensitivity table the thompson strategy's prior is centred on, or None (flat)."""
    opts = setup.options
    spec = opts.prior
    if spec == "none":
        return None
    if spec == "auto":
        init = opts.initial_samples
        if init not in ("auto", "uniform", "none", "") and Path(init).is_file():
            try:
                rec = json.loads(Path(init).read_text(encoding="utf-8")).get("seeding", {}).get("sensitivity", {})
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
                rec = {}
            if isinstance(rec, dict) and rec.get("path") and Path(rec["path"]).is_file():
                spec = rec["path"]
                log.info("prior: the sensitivity table the seeds were allocated from, %s", spec)
        if spec == "auto":
            return fit_table(setup)
    sens = Sensitivity.load(spec)
    sens.check_model(setup.ref.fingerprint, setup.ref.name, setup.layers.fqns)
    sens.slot_costs(setup.space)  # UserError if it cannot price every choice of this space
    table_q = (sens.scheme.get("quantizer") or {}).get("quantizer", "rtn")
    if table_q != setup.eval_cfg.quantizer:
        raise UserError(
            f"the prior {spec} priced its errors with --quantizer {table_q}, this search uses --quantizer "
            f"{setup.eval_cfg.quantizer}: recompute it with python -m bo_search.sensitivity --quantizer {setup.eval_cfg.quantizer}"
        )
    return sens


def thompson_node(setup: Setup, goal: Goal, prior: Sensitivity | None, encoding: str) -> Any:
    """The Thompson generation node for ``goal``: budget = the size limit (bits left for the space's
    slots), the perplexity limit (NLL), or a sweep of budgets (Pareto)."""
    from bo_search.search.thompson import Acquisition, ThompsonConfig, make_thompson_node

    opts = setup.options
    cfg = ThompsonConfig(rel_sd=opts.ts_prior_sd, temper=opts.ts_temper, seed=opts.seed, shared_sd=opts.ts_shared_sd)
    problem = setup.slots.with_prior(prior)
    if goal.multi:
        acq = Acquisition("sweep", 0.0)
    elif goal.size_limit is not None:
        acq = Acquisition("budget", float(goal.size_limit.bits - problem.base_bits))
    else:
        acq = Acquisition("loss", math.log(goal.limit))
    objective = "nll" if acq.kind == "loss" else goal.objective.split(",")[0].strip()  # a perplexity limit is on NLL
    return make_thompson_node(setup.space, encoding, problem, acq, objective, cfg)


def seeds_for(setup: Setup, spec: str, limit: SizeLimit) -> list[dict[str, int]]:
    if spec in ("none", ""):
        return []
    if spec == "uniform":
        from bo_search.sensitivity.seeds import uniform_seeds

        return uniform_seeds(setup.space, setup.size_model, limit)
    if spec == "auto":
        from bo_search.sensitivity.seeds import auto_seeds

        return auto_seeds(setup, limit, fit_table(setup))
    return load_initial_samples(spec, setup.space)


def ladder_seeds(setup: Setup) -> list[dict[str, int]]:
    """Uniform plans at every bit width of the space (middle group size): seeds spanning a trade-off."""
    space = setup.space
    groups = sorted({v for p in space.tunable if p.kind == "group_size" for v in p.values})
    g = groups[len(groups) // 2] if groups else None
    bits = sorted({v for p in space.tunable if p.kind == "bits" for v in p.values})
    return [vals for b in bits if (vals := space.uniform(b, g, check_fixed=False)) is not None]
