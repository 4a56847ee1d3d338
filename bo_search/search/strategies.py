"""Proposal strategies, a registry: ``thompson`` (the default; :mod:`bo_search.search.thompson`)
and ``gp`` (Ax's BoTorch GP after a Sobol start). Builds the Ax generation strategy for either."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bo_search.types import UserError, did_you_mean

STRATEGIES = ("thompson", "gp")
#: the strategy of a search that names none (``--strategy``'s default)
DEFAULT_STRATEGY = "thompson"


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        raise did_you_mean(name, STRATEGIES, "--strategy")
    return name


@dataclass(frozen=True)
class DriverConfig:
    encoding: str = "relaxed"
    num_restarts: int = 4
    raw_samples: int = 256
    n_sobol: int = 4
    seed: int | None = None
    strategy: str = DEFAULT_STRATEGY

    def __post_init__(self) -> None:
        check_strategy(self.strategy)
        if self.num_restarts < 1 or self.raw_samples < 1:
            raise UserError("--num_restarts and --raw_samples must be positive")
        if self.n_sobol < 0:
            raise UserError("--n_sobol must be zero or positive")


def make_generation_strategy(cfg: DriverConfig, node: Any = None) -> Any:
    """``thompson``: the single node ``node`` (thompson.make_thompson_node; it needs no quasi-random
    start: with no data its draws come from the prior). ``gp``: Sobol for ``n_sobol`` trials (beyond
    attached seeds and history), then BoTorch with a cheap acquisition optimiser
    (``num_restarts``/``raw_samples``; Ax's defaults cost minutes per proposal)."""
    from ax.generation_strategy.generation_strategy import GenerationStrategy

    if cfg.strategy == "thompson":
        if node is None:
            raise ValueError("the thompson strategy needs its generation node")
        return GenerationStrategy(name="Thompson", nodes=[node])
    from ax.adapter.registry import Generators
    from ax.core.trial_status import TrialStatus
    from ax.generation_strategy.generation_node import GenerationNode
    from ax.generation_strategy.generator_spec import GeneratorSpec
    from ax.generation_strategy.transition_criterion import MinTrials

    gen_kwargs = {"model_gen_options": {"optimizer_kwargs": {"num_restarts": cfg.num_restarts, "raw_samples": cfg.raw_samples}}}
    model_kwargs: dict[str, Any] = {}
    if cfg.encoding == "relaxed":
        from ax.adapter.registry import Cont_X_trans, Y_trans

        # Choice parameters relaxed to a continuous box for the acquisition optimiser (and rounded
        # back): 1-3 s per proposal at 60-420 parameters instead of minutes of discrete local search.
        model_kwargs["transforms"] = Cont_X_trans + Y_trans
    mbm = GenerationNode(
        name="BO",
        generator_specs=[
            GeneratorSpec(generator_enum=Generators.BOTORCH_MODULAR, generator_kwargs=model_kwargs, generator_gen_kwargs=gen_kwargs)
        ],
        should_deduplicate=True,
    )
    if cfg.n_sobol == 0:
        return GenerationStrategy(name="BO", nodes=[mbm])
    sobol = GenerationNode(
        name="Sobol",
        generator_specs=[GeneratorSpec(generator_enum=Generators.SOBOL, generator_kwargs={"seed": cfg.seed})],
        transition_criteria=[
            MinTrials(
                threshold=cfg.n_sobol,
                transition_to="BO",
                use_all_trials_in_exp=True,
                not_in_statuses=[TrialStatus.FAILED, TrialStatus.ABANDONED],
            )
        ],
        should_deduplicate=True,
    )
    return GenerationStrategy(name=f"Sobol{cfg.n_sobol}+BO", nodes=[sobol, mbm])
