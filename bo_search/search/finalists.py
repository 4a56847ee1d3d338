"""Choosing the final plan: when a search ends, its finalists are re-scored on the validation split
and the pick is the validation winner.

Why: a trial's score comes from a few thousand search tokens, a handful of articles. Among the best
plans of a search, differences are often smaller than the spread of the damage from article to
article, so the search split's order is partly noise, and the plan that leads there need not lead
on other text. The finalists are measured once more on text neither the search nor the seeding
saw (the validation split, ``--val_tokens``, many articles), and the best there is the pick. The
test split stays the only source of reported (held-out) numbers.

Finalists (``finalists``): the ``k`` best distinct plans by search score, the best seed, and the
uniform plans that fit and are not beaten on both bits and group size by another that fits (the
"best uniform plan" is the one of them that scores best on validation). Each re-score is a history
row with status ``rescored`` (so a resumed search reuses it); the held-out numbers of the pick, the
best seed and the best uniform plan are filled into their rows.

The pure part (which plans, which wins) needs no model; :func:`choose_final` runs the measurements
through the worker pool.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bo_search.search.history import HistoryRow, HistoryWriter, read_history, update_rows
from bo_search.search.metric_registry import search_score, val_score
from bo_search.types import QuantPlan, UserError

if TYPE_CHECKING:
    from bo_search.search.experiment import Goal
    from bo_search.search.workers import WorkerPool

#: default number of top plans re-scored (with the best seed and the best uniform plans)
DEFAULT_FINALISTS = 4

ROLE_TOP = "top"
ROLE_SEED = "best seed"
ROLE_UNIFORM = "uniform"


def check_finalists(k: int, val_tokens: int) -> None:
    if k < 0:
        raise UserError(f"--finalists must be 0 (off) or a positive number of plans, got {k}")
    if k > 0 and val_tokens <= 0:
        raise UserError(
            "--finalists needs validation tokens: give --val_tokens N (default 8192), or --finalists 0 to pick on the search split"
        )


@dataclass
class Finalist:
    """A plan to re-score, why (``roles``), and the trial row whose plan it is (None: never a trial)."""

    plan: QuantPlan
    roles: list[str] = field(default_factory=list)
    row: HistoryRow | None = None

    @property
    def label(self) -> str:
        return ", ".join(self.roles)


def is_uniform(plan: QuantPlan) -> bool:
    """Every quantized layer of the plan shares one setting (and none is left at full precision)."""
    settings = set(plan.values())
    return len(settings) == 1 and next(iter(settings)).is_quantized


def fits(row: HistoryRow, goal: Goal) -> bool:
    limit = goal.size_limit
    return limit is None or limit.holds(row.model_size)


def finalists(rows: Sequence[HistoryRow], goal: Goal, k: int, uniform: Sequence[QuantPlan] = ()) -> list[Finalist]:
    """The plans to re-score: the ``k`` best distinct completed plans within the limit by search
    score (rows without the objective's value, from an older history, ranked by NLL among
    themselves and merged in turn), the best seed, and the ``uniform`` candidate plans."""
    objective = goal.objective.split(",")[0].strip()
    done = [r for r in rows if r.status == "completed" and fits(r, goal)]
    with_obj = sorted((r for r in done if math.isfinite(search_score(r, objective))), key=lambda r: search_score(r, objective))
    without = sorted((r for r in done if not math.isfinite(search_score(r, objective))), key=lambda r: search_score(r, "nll"))
    ranked: list[HistoryRow] = []
    for a, b in zip_longest_rows(with_obj, without):
        ranked += [x for x in (a, b) if x is not None]
    out: dict[QuantPlan, Finalist] = {}

    def add(plan: QuantPlan, role: str, row: HistoryRow | None) -> None:
        f = out.setdefault(plan, Finalist(plan, row=row))
        if f.row is None:
            f.row = row
        if role not in f.roles:
            f.roles.append(role)

    for r in ranked:
        if len({p for p, f in out.items() if ROLE_TOP in f.roles}) >= k:
            break
        add(r.plan, ROLE_TOP, r)
    seeds = [r for r in ranked if r.source == "seed"]
    if seeds and k > 0:
        add(seeds[0].plan, ROLE_SEED, seeds[0])
    by_plan = {r.plan: r for r in ranked}
    for plan in uniform if k > 0 else ():
        add(plan, ROLE_UNIFORM, by_plan.get(plan))
    return list(out.values())


def zip_longest_rows(a: Sequence[HistoryRow], b: Sequence[HistoryRow]) -> list[tuple[HistoryRow | None, HistoryRow | None]]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else None, b[i] if i < len(b) else None) for i in range(n)]


def recorded_rescores(rows: Sequence[HistoryRow], val_tokens: int) -> dict[QuantPlan, HistoryRow]:
    """Validation re-scores already in the history (the latest per plan) made on ``val_tokens``."""
    out: dict[QuantPlan, HistoryRow] = {}
    for r in rows:
        if r.status == "rescored" and r.val_tokens == val_tokens and r.val_PPL is not None:
            out[r.plan] = r
    return out


def pending(rows: Sequence[HistoryRow], goal: Goal, k: int, uniform: Sequence[QuantPlan], val_tokens: int, heldout_tokens: int) -> bool:
    """Whether choosing the final plan still needs a worker (a finalist not re-scored yet, or a
    held-out number of the pick, best seed or best uniform plan not measured yet)."""
    cands = finalists(rows, goal, k, uniform)
    recorded = recorded_rescores(rows, val_tokens)
    if any(c.plan not in recorded for c in cands):
        return True
    rescored = [recorded[c.plan] for c in cands]
    if not rescored or heldout_tokens <= 0:
        return False
    objective = goal.objective.split(",")[0].strip()
    return any(r is not None and r.ppl_heldout is None for r in winners(rescored, objective))


@dataclass
class FinalChoice:
    """The outcome: the pick, the best seed and the best uniform plan (rescored rows; None where
    there was none), the per-window measurements of this run (for paired comparisons) and costs."""

    pick: HistoryRow
    best_seed: HistoryRow | None
    best_uniform: HistoryRow | None
    rescored: list[HistoryRow]
    reused: int
    val_s: float
    heldout_s: float
    windows: dict[tuple[QuantPlan, str], list[float]] = field(default_factory=dict)


def winners(rescored: Sequence[HistoryRow], objective: str) -> tuple[HistoryRow, HistoryRow | None, HistoryRow | None]:
    """(pick, best seed, best uniform plan) among rescored rows, each by validation score."""

    def best(rs: list[HistoryRow]) -> HistoryRow | None:
        return min(rs, key=lambda r: val_score(r, objective)) if rs else None

    pick = best(list(rescored))
    assert pick is not None
    return pick, best([r for r in rescored if r.source == "seed"]), best([r for r in rescored if is_uniform(r.plan)])


def choose_final(
    path: Any,
    writer: HistoryWriter,
    goal: Goal,
    pool: WorkerPool | None,
    k: int,
    val_tokens: int,
    heldout_tokens: int,
    uniform: Sequence[QuantPlan],
    size_model: Any,
    row_defaults: Mapping[str, Any],
    progress: Any,
) -> FinalChoice | None:
    """Re-score the finalists on validation (reusing recorded re-scores), pick the winner, measure
    held-out perplexity of the pick, the best seed and the best uniform plan. None when no
    finalist could be re-scored (no worker, or none fits)."""
    objective = goal.objective.split(",")[0].strip()
    rows = read_history(path, strict=True).rows
    cands = finalists(rows, goal, k, uniform)
    if not cands:
        return None
    recorded = recorded_rescores(rows, val_tokens)
    todo = [c for c in cands if c.plan not in recorded]
    windows: dict[tuple[QuantPlan, str], list[float]] = {}
    t0 = time.perf_counter()
    if todo:
        if pool is None or not pool.has_ready():
            print("finalists not re-scored: no worker is placed (resume the search to re-score them)")
            return None
        print(f"re-scoring {len(todo)} finalist(s) on {val_tokens:,} validation tokens", flush=True)
        bar = progress(range(len(todo)), desc="validation", total=len(todo))
        for i, res in pool.rescore([c.plan for c in todo], "validation", [c.row is None for c in todo]):
            c = todo[i]
            bar.update(1)
            if "error" in res:
                print(f"finalist ({c.label}) not re-scored: {res['error']}")
                continue
            row = _rescored_row(c, res, size_model, row_defaults)
            writer.append(row)
            if bar.disable:
                print(
                    f"  finalist ({c.label}) {_name(row)}: validation ppl {row.val_PPL:.4f}, KL {row.val_kl:.4f} ({res['seconds']:.0f} s)",
                    flush=True,
                )
            recorded[c.plan] = row
            windows[(c.plan, "validation")] = res["nll_w"]
        bar.close()
    val_s = time.perf_counter() - t0
    rescored = [recorded[c.plan] for c in cands if c.plan in recorded]
    if not rescored:
        return None
    pick, seed, unif = winners(rescored, objective)
    t1 = time.perf_counter()
    three = {x.plan: x for x in (unif, seed, pick) if x is not None}
    need = [r for r in three.values() if r.ppl_heldout is None]
    if need and heldout_tokens > 0 and pool is not None and pool.has_ready():
        bar = progress(range(len(need)), desc="held-out", total=len(need))
        for i, res in pool.rescore([r.plan for r in need], "test"):
            bar.update(1)
            if "error" in res:
                print(f"held-out perplexity of trial {need[i].trial_index} not measured: {res['error']}")
                continue
            r = need[i]
            r.ppl_heldout, r.ppl_heldout_sem = res["ppl"], res["ppl"] * res["nll_sem"]
            windows[(r.plan, "test")] = res["nll_w"]
            update_rows(path, _rescored_of(r.plan), {"ppl_heldout": r.ppl_heldout, "ppl_heldout_sem": r.ppl_heldout_sem})
        bar.close()
    return FinalChoice(pick, seed, unif, rescored, len(cands) - len(todo), val_s, time.perf_counter() - t1, windows)


def _rescored_of(plan: QuantPlan) -> Callable[[Mapping[str, str]], bool]:
    """Matches the raw CSV rows that re-scored ``plan``."""
    key = plan.dumps()

    def match(raw: Mapping[str, str]) -> bool:
        if raw.get("status") != "rescored":
            return False
        try:
            return QuantPlan.loads(raw.get("quant_config", "")).dumps() == key
        except UserError:
            return False

    return match


def _rescored_row(c: Finalist, res: Mapping[str, Any], size_model: Any, row_defaults: Mapping[str, Any]) -> HistoryRow:
    src = c.row
    if src is not None:
        search = {"cal_PPL": src.cal_PPL, "cal_PPL_sem": src.cal_PPL_sem, "nll": src.nll, "nll_delta_sem": src.nll_delta_sem,
                  "kl": src.kl, "kl_sem": src.kl_sem, "avg_bits": src.avg_bits, "model_size": src.model_size}  # fmt: skip
    else:  # a uniform plan no trial evaluated: measured on the search split with its validation score
        s = res.get("search") or {}
        size = size_model.report(c.plan)
        search = {"cal_PPL": s.get("ppl"), "cal_PPL_sem": s.get("ppl_sem"), "nll": s.get("nll"), "nll_delta_sem": s.get("nll_delta_sem"),
                  "kl": s.get("kl"), "kl_sem": s.get("kl_sem"), "avg_bits": round(size.avg_bits, 4), "model_size": size.gb}  # fmt: skip
    return HistoryRow(
        **{
            **row_defaults,
            **search,
            "trial_index": src.trial_index if src is not None else -1,
            "status": "rescored",
            "source": src.source if src is not None else "uniform",
            "reason": c.label,
            "val_PPL": res["ppl"],
            "val_nll_delta_sem": res["nll_delta_sem"],
            "val_kl": res["kl"],
            "val_kl_sem": res["kl_sem"],
            "val_tokens": int(res["tokens"]),
            "evaluate_s": res.get("seconds"),
            "quant_config": c.plan.dumps(),
        }
    )


def paired_change(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Relative perplexity change from ``b`` to ``a`` (negative: ``a`` is better) and its standard
    error, paired over the same windows: exp(mean(a - b)) - 1, from per-window mean NLLs."""
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    sem = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return math.exp(mean) - 1.0, math.exp(mean) * sem


def describe(choice: FinalChoice, objective: str, val_tokens: int, heldout_tokens: int) -> list[str]:
    """The closing lines: the three plans' validation and held-out scores, then one sentence on what
    the search added over the rules."""
    lines = []
    name = _name

    def pm(sem: float | None) -> str:  # no "± nan": one window has no standard error
        return f" ± {sem:.4f}" if sem is not None and math.isfinite(sem) else ""

    def scores(r: HistoryRow) -> str:
        v = f"validation ppl {r.val_PPL:.4f}" if r.val_PPL is not None else "validation n/a"
        if r.val_kl is not None:
            v += f", KL {r.val_kl:.4f}{pm(r.val_kl_sem)}"
        h = f"held-out ppl {r.ppl_heldout:.4f}{pm(r.ppl_heldout_sem)}" if r.ppl_heldout is not None else "held-out n/a"
        return f"{v}; {h}"

    lines.append(f"final pick by validation {objective} on {val_tokens:,} tokens ({len(choice.rescored)} finalists):")
    for what, r in (("pick", choice.pick), ("best seed", choice.best_seed), ("best uniform", choice.best_uniform)):
        if r is not None:
            lines.append(f"  {what:12s} {name(r)}: {scores(r)}")
    lines.append(verdict(choice))
    return lines


def _name(r: HistoryRow) -> str:
    if r.trial_index < 0:
        return f"uniform {next(iter(r.plan.values())).label()} (not a trial)"
    return f"trial {r.trial_index} ({r.source})"


def verdict(choice: FinalChoice) -> str:
    """One sentence: by how much the pick beats (or not) the best seed on held-out text."""
    pick, seed, unif = choice.pick, choice.best_seed, choice.best_uniform
    if pick.source == "seed":
        return f"the search's pick is a seed (trial {pick.trial_index}): its own proposals did not beat the rule-based seeds on validation text"
    if pick.trial_index < 0 or (unif is not None and pick.plan == unif.plan):
        return "the search's pick is the uniform plan: neither its proposals nor the seeds beat it on validation text"
    if seed is None:
        base = unif
        what = "the best uniform plan"
    else:
        base, what = seed, "the best rule-based seed"
    if base is None or pick.ppl_heldout is None or base.ppl_heldout is None:
        return f"the search's pick is trial {pick.trial_index} ({pick.source}); held-out perplexity not measured (--heldout_tokens 0)"
    change = pick.ppl_heldout / base.ppl_heldout - 1.0
    a, b = choice.windows.get((pick.plan, "test")), choice.windows.get((base.plan, "test"))
    err = ""
    if a is not None and b is not None and len(a) == len(b) and len(a) > 1:
        _, sem = paired_change(a, b)
        err = f" (± {100 * sem:.1f}% paired over {len(a)} windows)"
    word = "better" if change < 0 else "worse"
    line = f"the search's pick is {100 * abs(change):.1f}% {word}{err} than {what} on held-out text"
    if seed is not None and unif is not None and unif.ppl_heldout is not None:
        u = pick.ppl_heldout / unif.ppl_heldout - 1.0
        line += f", and {100 * abs(u):.1f}% {'better' if u < 0 else 'worse'} than the best uniform plan"
    return line
