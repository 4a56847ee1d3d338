"""What a search prints: worker placement at the start, one line per trial without a progress
bar, and the end summary (best plan, held-out perplexity, front, trials per worker)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bo_search import cli
from bo_search.search.experiment import row_defaults
from bo_search.search.finalists import FinalChoice, choose_final, describe, pending
from bo_search.search.history import (
    FORMAT_VERSION,
    OLD_TEST_SPLIT_FORMATS,
    HistoryRow,
    HistoryWriter,
    pareto_front,
    read_history,
    update_rows,
)
from bo_search.search.metric_registry import search_score

if TYPE_CHECKING:
    from bo_search.search.driver import SearchStats
    from bo_search.search.experiment import Goal
    from bo_search.search.setup import Setup
    from bo_search.search.workers import WorkerPool
    from bo_search.types import QuantPlan


def workers_ready(pool: WorkerPool) -> None:
    pool.wait_ready()
    nodes = len({i["node_id"] for i in pool.infos})
    on_driver = sum(i["node_id"] == pool.driver_node for i in pool.infos)
    print(
        f"workers ready (model load {max(pool.load_times):.1f} s; {pool.size} worker(s) on {nodes} Ray node(s), {on_driver} on the driver's node)",
        flush=True,
    )
    print("\n".join(pool.placement_lines()), flush=True)


def print_row(row: Any) -> None:
    """One line per finished trial when stderr is not a terminal (no progress bar)."""
    what = f"ppl {row.cal_PPL:.4g}" if row.cal_PPL is not None else ""
    if row.cal_throughput is not None:
        what += f" {row.cal_throughput:.1f} tok/s"
    took = (row.quantize_s or 0) + (row.evaluate_s or 0)
    print(
        f"trial {row.trial_index} {row.status} ({row.source}) {what} size {row.model_size:.6g} GB {took:.1f} s {row.reason}".rstrip(),
        flush=True,
    )


def print_placement(rows: Any, pool: WorkerPool | None) -> None:
    """Where the trials ran (the CSV's worker_id: worker@node-ip/node-id:gpuN), and nodes lost."""
    from collections import Counter

    per = Counter(r.worker_id for r in rows if r.status in ("completed", "failed") and r.worker_id)
    if per:
        print("trials per worker (whole history): " + ", ".join(f"{w} {n}" for w, n in sorted(per.items())))
    lost = sum(r.status == "failed" and r.reason.startswith("node lost") for r in rows)
    if lost or (pool is not None and getattr(pool, "restarts", 0)):
        print(f"{lost} trial(s) failed with their node lost; {getattr(pool, 'restarts', 0)} replacement worker(s) requested this run")


def summarize(
    setup: Setup, goal: Goal, stats: SearchStats | None, pool: WorkerPool | None, wall_s: float, writer: HistoryWriter | None = None
) -> None:
    """Best feasible plan (chosen among re-scored finalists on the validation split, with held-out
    perplexity), run statistics, best-plan JSON."""

    rows = read_history(setup.history_path, strict=True).rows
    comp = [r for r in rows if r.status == "completed"]
    if goal.multi:
        pareto_summary(setup, comp, pool)
        return
    feas = [r for r in comp if goal.feasible(r)]
    n_failed = sum(r.status == "failed" for r in rows)
    n_inf = sum(r.status == "infeasible" for r in rows)
    print(f"\n{len(comp)} completed, {n_failed} failed, {n_inf} proposals over the limit (not evaluated), in {wall_s:.0f} s")
    print_placement(rows, pool)
    if stats is not None and stats.evaluated:
        props = stats.proposal_s
        mean_prop = sum(props) / len(props) if props else 0.0
        print(
            f"proposal time: mean {mean_prop:.2f} s over {len(props)} proposals; worker idle waiting for proposals: {100 * stats.idle_fraction:.1f}%"
        )
    if not feas:
        smallest = min((r.model_size for r in comp if r.model_size is not None), default=None)
        what = f"size limit {goal.limit:.6g} GB" if goal.size_limit is not None else f"perplexity limit {goal.limit:.6g}"
        print(
            f"no completed trial fits the {what}" + (f"; the smallest evaluated size was {smallest:.6g} GB" if smallest is not None else "")
        )
        if goal.size_limit is None and comp:
            print(f"the lowest perplexity seen was {min(r.cal_PPL for r in comp if r.cal_PPL is not None):.4g}")
        return
    if goal.minimize:
        best = min(feas, key=lambda r: search_score(r, goal.objective))
    else:
        best = max(feas, key=lambda r: r.cal_throughput or -math.inf)
    choice = _final_choice(setup, goal, pool, writer)
    if choice is not None:
        _print_search_best(best, goal)
        print("\n".join(describe(choice, goal.objective, setup.eval_cfg.val_tokens, setup.eval_cfg.heldout_tokens)))
        print(
            f"finalists: {len(choice.rescored)} ({choice.reused} re-scores reused from the history), validation {choice.val_s:.0f} s, "
            f"held-out {choice.heldout_s:.0f} s"
        )
        _write_best(setup, choice.pick, choice.pick.ppl_heldout, picked_by="validation")
        return
    heldout = best.ppl_heldout if best.format not in OLD_TEST_SPLIT_FORMATS else None
    if heldout is None and pool is not None and _can_measure(pool, setup):
        heldout = pool.heldout([best.plan])[0]
        if heldout is not None:
            _fill_heldout(setup.history_path, best.trial_index, heldout)
    _write_best(setup, best, heldout, picked_by="search split")


def finalists_wanted(setup: Setup, goal: Goal) -> int:
    """--finalists for a size-limited search (0: the final plan is the search split's best)."""
    k = int(setup.options.finalists or 0)
    return k if goal.size_limit is not None and not goal.multi else 0


def uniform_candidates(setup: Setup, goal: Goal) -> list[QuantPlan]:
    from bo_search.sensitivity.seeds import best_uniform_candidates

    limit = goal.size_limit
    assert limit is not None, "uniform candidates of a size-limited search"
    return [setup.space.decode(v) for v in best_uniform_candidates(setup.space, setup.size_model, limit)]


def final_choice_pending(setup: Setup, goal: Goal) -> bool:
    """Whether the final choice needs a worker although every trial is done (see finalists.pending)."""
    k = finalists_wanted(setup, goal)
    if not k or not setup.history_rows:
        return False
    cfg = setup.eval_cfg
    return pending(setup.history_rows, goal, k, uniform_candidates(setup, goal), cfg.val_tokens, cfg.heldout_tokens)


def _final_choice(setup: Setup, goal: Goal, pool: WorkerPool | None, writer: HistoryWriter | None) -> FinalChoice | None:
    """The finalists re-scored on the validation split (size-limited searches with --finalists > 0)."""
    k = finalists_wanted(setup, goal)
    if not k or writer is None:
        return None
    uniform = uniform_candidates(setup, goal)
    return choose_final(
        setup.history_path,
        writer,
        goal,
        pool,
        k,
        setup.eval_cfg.val_tokens,
        setup.eval_cfg.heldout_tokens,
        uniform,
        setup.size_model,
        row_defaults(setup, goal),
        cli.progress,
    )


def _print_search_best(best: HistoryRow, goal: Goal) -> None:
    score = f", KL {best.kl:.4f}" if best.kl is not None else ""
    print(
        f"best by search-split {goal.objective}: trial {best.trial_index} ({best.source}), perplexity {best.cal_PPL:.4f}{score} (search split)"
    )


def _write_best(setup: Setup, best: HistoryRow, heldout: float | None, picked_by: str) -> None:
    out = Path(setup.options.best_plan_output or str(setup.history_path) + ".best_plan.json")
    cli.write_json(
        out,
        {
            **best.plan.to_json(),
            "trial_index": best.trial_index,
            "source": best.source,
            "picked_by": picked_by,
            "cal_PPL": best.cal_PPL,
            "kl": best.kl,
            "val_PPL": best.val_PPL,
            "val_kl": best.val_kl,
            "val_tokens": best.val_tokens,
            "ppl_heldout": heldout,
            "ppl_heldout_sem": best.ppl_heldout_sem if heldout is not None else None,
            "model_size_gb": best.model_size,
            "avg_bits": best.avg_bits,
            "cal_throughput": best.cal_throughput,
        },
    )
    where = f"trial {best.trial_index}" if best.trial_index >= 0 else "plan: a uniform plan, not a trial"
    print(
        f"best feasible {where} ({best.source}; chosen on the {picked_by}): size {best.model_size:.6g} GB, {best.avg_bits:.3f} avg bits, "
        f"perplexity {best.cal_PPL:.4f} (search split)"
        + (f", {best.val_PPL:.4f} (validation)" if best.val_PPL is not None else "")
        + (f", {heldout:.4f} (held-out)" if heldout is not None else "")
    )
    if best.cal_throughput is not None:
        print(f"  throughput {best.cal_throughput:.2f} tok/s {best.throughput_kind}")
    kind = "ggml types" if any(lq.ggml_type for lq in best.plan.values()) else "bit widths"
    print(f"  {kind}: {json.dumps(best.plan.histogram())}")
    print(f"  plan written to {out} (python -m bo_search.evaluate --config {out})")


def pareto_summary(setup: Setup, comp: list[Any], pool: WorkerPool | None) -> None:
    """Print the perplexity/size Pareto front (held-out perplexity of each point computed once and
    recorded in the history) and write it as JSON."""

    pts = [r for r in comp if r.cal_PPL is not None and r.model_size is not None]
    if not pts:
        print("no completed trial: no Pareto front")
        return
    front = [pts[i] for i in pareto_front([(r.model_size, r.cal_PPL) for r in pts])]
    missing = [r for r in front if r.ppl_heldout is None or r.format in OLD_TEST_SPLIT_FORMATS]
    if missing and pool is not None and _can_measure(pool, setup):
        for r, value in zip(missing, pool.heldout([r.plan for r in missing])):
            if value is not None:
                r.ppl_heldout = value
                _fill_heldout(setup.history_path, r.trial_index, value)
    rows = [
        {
            "trial": r.trial_index,
            "source": r.source,
            "model_size_gb": r.model_size,
            "avg_bits": r.avg_bits,
            "ppl": r.cal_PPL,
            "ppl_heldout": r.ppl_heldout,
        }
        for r in front
    ]
    print(f"Pareto front ({len(front)} of {len(pts)} completed trials; perplexity and size both minimised):")
    print(cli.table(rows, ["trial", "source", "model_size_gb", "avg_bits", "ppl", "ppl_heldout"]))
    out = Path(setup.options.best_plan_output or str(setup.history_path) + ".pareto.json")
    cli.write_json(out, {"front": [{**row, **r.plan.to_json()} for row, r in zip(rows, front)]})
    print(f"front written to {out}")


def _can_measure(pool: WorkerPool, setup: Setup) -> bool:
    """Whether held-out perplexity can be measured now (a worker is up; --heldout_tokens > 0)."""
    if pool is None or setup.eval_cfg.heldout_tokens <= 0:
        return False
    if not pool.has_ready():
        print("held-out perplexity not measured: no worker is placed (python -m bo_search.report HISTORY.csv measures it later)")
        return False
    return True


def _fill_heldout(path: Path, trial_index: int, value: float) -> None:
    """Record a held-out perplexity in a trial's row (measured on today's test split, so the row's
    format is brought up to date with it)."""
    update_rows(
        path,
        lambda r: r.get("trial_index") == str(trial_index) and r.get("status") == "completed",
        {"ppl_heldout": value, "format": FORMAT_VERSION},
    )
