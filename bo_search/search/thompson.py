"""The ``thompson`` proposal strategy (the default): a Bayesian per-slot loss model, sampled and
solved exactly under the budget (BOCS-style; Baptista & Poloczek, ICML 2018), as an Ax generation
node. The strategy registry and the other strategy, ``gp`` (Ax's BoTorch GP), are in
:mod:`bo_search.search.strategies`.

The Thompson model
------------------
The measured objective of a plan x (mean next-token NLL on the search split) is modelled as a sum
over slots, one term per slot's choice::

    nll(x) = b0 + a * P(x) + sum_s [ u[key(s, x_s)] * f_s + w[s, x_s] ] + noise

- ``P(x)`` is the sensitivity table's predicted loss increase of the plan (FIT, Hessian or measured,
  whichever seeded the search; zero when there is none). Its absolute scale is not trusted: the
  scale ``k`` is chosen by the marginal likelihood of the data, and ``a`` has prior N(k, (0.3 k)^2).
- ``w[s, c]`` corrects the table per slot and choice; prior N(0, (rel_sd * k * |table[s, c]| + floor_s)^2),
  so the model believes the table where it has no data and trusts measurements where it has them.
- ``u[key]`` is one correction per (bits, group size) shared by every slot, weighted by the slot's
  fraction ``f_s`` of the planned weights: the table's bias per choice (FIT over-buys some choices)
  is learnt from a handful of trials. Without a table this shared term carries the model.
- Noise (what the sum misses, not evaluation noise: windows are fixed) is chosen by the marginal
  likelihood on a grid, jointly with ``k``. Catastrophic plans are capped at best + ``cap`` nats
  before fitting, so one plan at perplexity 3000 does not swamp the linear fit.

Everything is conjugate: the posterior is Gaussian. A draw is exact and cheap by Matheron's rule
(a prior draw corrected through the N x N data system, O(N^2 D), no D x D matrix), and tempered
(deviation from the posterior mean x sqrt(temper)) so exploration suits 20-50 trials.

The acquisition solves the sampled problem exactly (``solve_mckp``: multiple-choice knapsack as a
0/1 integer program, ``scipy.optimize.milp``) with one no-good cut per evaluated or pending plan, so
every proposal is new and fits the budget by construction:

- size (or bit operations) limit: lowest sampled loss within the budget;
- perplexity limit: fewest bytes read per token with sampled NLL within the limit;
- Pareto: lowest sampled loss within a budget drawn uniformly between the smallest and largest plan.

Imports neither torch nor ray.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from bo_search.space import from_ax, to_ax
from bo_search.types import UserError

if TYPE_CHECKING:
    from bo_search.budget import SlotTable
    from bo_search.space import SearchSpace
from bo_search.search.mckp import DRAW_TIME_LIMIT, solve_mckp
from bo_search.search.metric_registry import nll_of_ppl


@dataclass(frozen=True)
class ThompsonConfig:
    """Settings of the Thompson strategy (chosen on scripts/bench_search.py; see BENCHMARKS.md)."""

    rel_sd: float = 0.2  # prior sd of a per-slot correction, as a fraction of its table cost
    temper: float = 0.25  # posterior covariance multiplier of a draw (1 = plain Thompson sampling)
    cap: float = 1.0  # measured NLL capped at best + cap nats before fitting
    seed: int = 0
    #: prior sd of the shared per-choice term ``u`` as a multiple of its original scale (0 drops it).
    #: Its features are 82-98% collinear with the table term; at full scale it carried more than half
    #: of a per-linear plan's prior variance and the model predicted unseen trials poorly there
    #: (Spearman 0.21 -> 0.63 on 136 recorded per-linear trials at 0.1; per-block unchanged)
    shared_sd: float = 0.1

    def __post_init__(self) -> None:
        if not self.rel_sd > 0:
            raise UserError(f"--ts_prior_sd must be positive, got {self.rel_sd}")
        if not 0 < self.temper <= 1:
            raise UserError(f"--ts_temper must be in (0, 1], got {self.temper}")
        if not self.cap > 0:
            raise UserError(f"the NLL cap must be positive, got {self.cap}")
        if not self.shared_sd >= 0:
            raise UserError(f"--ts_shared_sd must be zero or positive, got {self.shared_sd}")


NOISE_GRID = (0.003, 0.006, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3)


#: candidate scales of the prior table (its units are only roughly nats per token)
SCALE_GRID = tuple(float(x) for x in np.logspace(-1, 3.5, 28))


FLAT_CHOICE_SD = 2.0  # nats: a shared per-choice effect with no table (all slots at one choice)


FLAT_SLOT_SD = 0.5  # nats per unit of weight share: a per-slot correction with no table


FLOOR = 0.15  # nats per unit of weight share: the floor of a per-slot correction's prior sd


INTERCEPT_SD = 3.0


@dataclass
class Posterior:
    """Gaussian posterior over the per-slot model; ``mean``/``draw`` give per-slot per-choice losses."""

    problem: SlotTable
    cfg: ThompsonConfig
    n: int = 0
    scale: float = 1.0
    noise: float = 0.0
    log_evidence: float = 0.0
    y_offset: float = 0.0
    theta_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _prior_mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _prior_sd: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _phi: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    _y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _kinv_chol: Any = None
    _sem2: np.ndarray = field(default_factory=lambda: np.zeros(0))

    # layout of theta: [b0, a, u (one per key), w (one per slot choice)]
    def _layout(self) -> tuple[int, int, int]:
        k = len(self.problem.keys)
        return 2, 2 + k, 2 + k + self.problem.n_onehot

    def features(self, picks: Sequence[Sequence[int]]) -> np.ndarray:
        p = self.problem
        u0, w0, d = self._layout()
        key_index = {key: i for i, key in enumerate(p.keys)}
        phi = np.zeros((len(picks), d))
        for i, pick in enumerate(picks):
            phi[i, 0] = 1.0
            for s, c in enumerate(pick):
                if p.prior is not None:
                    phi[i, 1] += p.prior[s][c]
                phi[i, u0 + key_index[p.choices[s][c]]] += p.weight[s]
                phi[i, w0 + p.offset(s) + c] = 1.0
        return phi

    def _prior(self, scale: float, y_ref: float) -> tuple[np.ndarray, np.ndarray]:
        p = self.problem
        u0, w0, d = self._layout()
        mean = np.zeros(d)
        sd = np.zeros(d)
        mean[0], sd[0] = y_ref, INTERCEPT_SD
        if p.prior is not None:
            mean[1], sd[1] = scale, 0.3 * scale
            key_tot: dict[tuple[int, int], float] = {}
            for s, ch in enumerate(p.choices):
                for c, key in enumerate(ch):
                    key_tot[key] = key_tot.get(key, 0.0) + abs(p.prior[s][c])
            for i, key in enumerate(p.keys):
                sd[u0 + i] = self.cfg.shared_sd * (self.cfg.rel_sd * scale * key_tot[key] + FLOOR)
            for s, ch in enumerate(p.choices):
                for c in range(len(ch)):
                    sd[w0 + p.offset(s) + c] = self.cfg.rel_sd * scale * abs(p.prior[s][c]) + FLOOR * p.weight[s]
        else:
            sd[u0:w0] = FLAT_CHOICE_SD
            for s, ch in enumerate(p.choices):
                sd[w0 + p.offset(s) : w0 + p.offset(s) + len(ch)] = FLAT_SLOT_SD * p.weight[s]
        return mean, sd

    def fit(self, picks: Sequence[Sequence[int]], y: Sequence[float], sems: Sequence[float | None] | None = None) -> Posterior:
        """Condition on measured objectives ``y`` of ``picks``; scale and noise by marginal likelihood.

        ``sems``: each measurement's own standard error (the spread of its damage across the
        evaluation windows), or None where unknown. A measurement's noise variance is the model's
        misfit ``noise**2`` (chosen on a grid) plus its ``sem**2``; an unknown sem counts as the
        median of the known ones, so old histories without them still fit."""
        yv = np.asarray(y, dtype=float)
        self.n = len(yv)
        if self.n:
            yv = np.minimum(yv, yv.min() + self.cfg.cap)
        self._sem2 = _sem_squares(sems, self.n)
        y_ref = float(np.median(yv)) if self.n else 0.0
        self.y_offset = y_ref
        phi = self.features(picks) if self.n else np.zeros((0, self._layout()[2]))
        scales = SCALE_GRID if self.problem.prior is not None else (1.0,)
        best: tuple[float, float, float] | None = None
        for k in scales:
            m, sd = self._prior(k, y_ref)
            if not self.n:
                best = (0.0, k, NOISE_GRID[len(NOISE_GRID) // 2])
                break
            kxx = (phi * sd**2) @ phi.T + np.diag(self._sem2)
            r = yv - phi @ m
            for sig in NOISE_GRID:
                ev = _log_evidence(kxx, r, sig)
                if best is None or ev > best[0]:
                    best = (ev, k, sig)
        assert best is not None
        self.log_evidence, self.scale, self.noise = best
        self._prior_mean, self._prior_sd = self._prior(self.scale, y_ref)
        self._phi, self._y = phi, yv
        if self.n:
            import scipy.linalg

            kyy = (phi * self._prior_sd**2) @ phi.T + np.diag(self.noise**2 + self._sem2)
            self._kinv_chol = scipy.linalg.cho_factor(kyy, lower=True)
            alpha = scipy.linalg.cho_solve(self._kinv_chol, yv - phi @ self._prior_mean)
            self.theta_mean = self._prior_mean + self._prior_sd**2 * (phi.T @ alpha)
        else:
            self.theta_mean = self._prior_mean.copy()
        return self

    def draw_theta(self, rng: np.random.Generator) -> np.ndarray:
        """One tempered posterior draw of theta (Matheron's rule)."""
        import scipy.linalg

        t0 = self._prior_mean + self._prior_sd * rng.standard_normal(len(self._prior_sd))
        if self.n:
            eps = np.sqrt(self.noise**2 + self._sem2) * rng.standard_normal(self.n)
            corr = scipy.linalg.cho_solve(self._kinv_chol, self._y - self._phi @ t0 - eps)
            t0 = t0 + self._prior_sd**2 * (self._phi.T @ corr)
        return self.theta_mean + math.sqrt(self.cfg.temper) * (t0 - self.theta_mean)

    def slot_losses(self, theta: np.ndarray) -> list[list[float]]:
        """Per slot, per choice: the loss term of theta (the intercept left out)."""
        p = self.problem
        u0, w0, _ = self._layout()
        key_index = {key: i for i, key in enumerate(p.keys)}
        out = []
        for s, ch in enumerate(p.choices):
            row = []
            for c, key in enumerate(ch):
                v = theta[w0 + p.offset(s) + c] + theta[u0 + key_index[key]] * p.weight[s]
                if p.prior is not None:
                    v += theta[1] * p.prior[s][c]
                row.append(float(v))
            out.append(row)
        return out

    def predict(self, picks: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and sd (untempered, noise excluded) of the objective of ``picks``."""
        import scipy.linalg

        phi = self.features(picks)
        mean = phi @ self.theta_mean
        prior_cov = (phi * self._prior_sd**2) @ phi.T
        if self.n:
            cross = (phi * self._prior_sd**2) @ self._phi.T
            v = scipy.linalg.cho_solve(self._kinv_chol, cross.T)
            cov = prior_cov - cross @ v
        else:
            cov = prior_cov
        return mean, np.sqrt(np.maximum(np.diag(cov), 0.0))


def _sem_squares(sems: Sequence[float | None] | None, n: int) -> np.ndarray:
    """Per-measurement noise variance from its standard error; unknown ones take the median known one."""
    if sems is None:
        return np.zeros(n)
    known = [float(v) for v in sems if v is not None and math.isfinite(v) and v >= 0]
    fill = float(np.median(known)) if known else 0.0
    return np.array([float(v) if v is not None and math.isfinite(v) and v >= 0 else fill for v in sems]) ** 2


def _log_evidence(kxx: np.ndarray, r: np.ndarray, sig: float) -> float:
    import scipy.linalg

    k = kxx + sig**2 * np.eye(len(r))
    try:
        c, low = scipy.linalg.cho_factor(k, lower=True)
    except np.linalg.LinAlgError:
        return -math.inf
    alpha = scipy.linalg.cho_solve((c, low), r)
    return float(-0.5 * r @ alpha - np.log(np.diag(c)).sum() - 0.5 * len(r) * math.log(2 * math.pi))


@dataclass(frozen=True)
class Acquisition:
    """What a proposal optimises: ``kind`` is ``budget`` (lowest loss with the budget cost <= cap),
    ``loss`` (lowest ``speed`` cost with intercept + loss <= cap, a NLL limit) or ``sweep`` (lowest loss
    within a budget drawn between the smallest and largest plan)."""

    kind: str
    cap: float

    def __post_init__(self) -> None:
        if self.kind not in ("budget", "loss", "sweep"):
            raise ValueError(f"unknown acquisition kind {self.kind!r}")


def propose(
    post: Posterior,
    acq: Acquisition,
    rng: np.random.Generator,
    exclude: Sequence[Sequence[int]] = (),
    tries: int = 3,
    time_limit: float = DRAW_TIME_LIMIT,
) -> tuple[tuple[int, ...], float] | None:
    """One Thompson proposal: (pick, the draw's predicted objective), or None when no new plan fits.

    Each draw's problem is solved with a ``time_limit`` (seconds): a draw is random anyway, and the
    solver's best plan within that time is a fine proposal (it still fits the limit exactly)."""
    p = post.problem
    solve = functools.partial(solve_mckp, time_limit=time_limit)
    for _ in range(tries):
        theta = post.draw_theta(rng)
        loss = post.slot_losses(theta)
        if acq.kind == "budget":
            pick = solve(loss, p.budget, acq.cap, exclude)
        elif acq.kind == "sweep":
            lo = sum(min(b) for b in p.budget)
            hi = sum(max(b) for b in p.budget)
            pick = solve(loss, p.budget, lo + (hi - lo) * float(rng.uniform()), exclude)
        else:
            pick = solve(p.budget, loss, acq.cap - float(theta[0]), exclude)
            if pick is None:  # no plan meets the sampled limit: the best sampled quality instead
                pick = solve(loss, p.budget, math.inf, exclude)
        if pick is not None:
            return pick, float(theta[0]) + p.total(loss, pick)
    return None


def make_thompson_node(
    space: SearchSpace, encoding: str, problem: SlotTable, acq: Acquisition, objective_metric: str, cfg: ThompsonConfig
) -> Any:
    """An Ax ``ExternalGenerationNode`` named ``Thompson``: the experiment of record stays in Ax
    (attached seeds and history, failed and abandoned trials); every ``gen`` refits the posterior
    from the experiment's completed trials, so a resumed search rebuilds the same posterior."""
    from ax.core.trial_status import TrialStatus
    from ax.generation_strategy.external_generation_node import ExternalGenerationNode

    class ThompsonNode(ExternalGenerationNode):  # type: ignore[misc]
        def __init__(self) -> None:
            t0 = time.monotonic()
            super().__init__(name="Thompson", should_deduplicate=True)
            self.posterior = Posterior(problem, cfg)
            self.seen: list[tuple[int, ...]] = []
            self.fit_time_since_gen = time.monotonic() - t0

        def update_generator_state(self, experiment: Any, data: Any) -> None:
            df = data.full_df if hasattr(data, "full_df") else data.df
            values: dict[int, float] = {}
            sems: dict[int, float | None] = {}
            for row in df.itertuples():
                if row.metric_name == objective_metric:
                    values[int(row.trial_index)] = float(row.mean)
                    sem = getattr(row, "sem", None)
                    sems[int(row.trial_index)] = float(sem) if sem is not None and math.isfinite(float(sem)) else None
                elif row.metric_name == "ppl" and objective_metric == "nll" and int(row.trial_index) not in values:
                    values[int(row.trial_index)] = nll_of_ppl(float(row.mean))  # a history row without NLL
            picks, ys, noise, seen = [], [], [], []
            for idx, trial in experiment.trials.items():
                arm = trial.arms[0] if trial.arms else None
                if arm is None:
                    continue
                pick = problem.pick_of(from_ax(space, arm.parameters, encoding))
                seen.append(pick)
                if trial.status == TrialStatus.COMPLETED and idx in values and math.isfinite(values[idx]):
                    picks.append(pick)
                    ys.append(values[idx])
                    noise.append(sems.get(idx))
            self.seen = seen
            self.posterior = Posterior(problem, cfg).fit(picks, ys, noise)
            self._rng = np.random.default_rng([cfg.seed, len(experiment.trials)])

        def get_next_candidate(self, pending_parameters: list[Any]) -> Any:
            pending = [problem.pick_of(from_ax(space, pp, encoding)) for pp in pending_parameters]
            got = propose(self.posterior, acq, self._rng, exclude=self.seen + pending)
            if got is None:
                raise UserError("the Thompson strategy found no new plan that fits the limit: the space may be exhausted")
            pick, _ = got
            return to_ax(space, problem.values_of(pick), encoding)

    return ThompsonNode()
