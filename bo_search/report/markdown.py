"""The Markdown report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bo_search.report.analysis import Analysis, objective_of
from bo_search.report.baselines import CACHE_NAME, Evaluation
from bo_search.report.bundle import ExportResult
from bo_search.report.export import TORCHAO_APPLY
from bo_search.report.plots import source_style
from bo_search.search.history import OLD_TEST_SPLIT_FORMATS
from bo_search.search.metric_registry import val_score
from bo_search.types import QuantPlan


def _dur(s: float) -> str:
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _num(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "-"
    if abs(v) >= 10000:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.2f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bits_histogram(plan: QuantPlan) -> dict[int, int]:
    return dict(sorted(Counter(lq.bits for lq in plan.values()).items()))


def render_markdown(an: Analysis, ev: Evaluation | None, export_res: ExportResult | None, images: Sequence[Path], out_dir: Path) -> str:
    heldout = dict(ev.heldout) if ev is not None else {}
    for r in an.rows:  # rescored rows first: their held-out numbers are on today's test split
        if r.ppl_heldout is not None and r.status == "rescored":
            heldout.setdefault(r.trial_index, r.ppl_heldout)
    for r in an.rows:
        if r.ppl_heldout is not None and r.status == "completed" and r.format not in OLD_TEST_SPLIT_FORMATS:
            heldout.setdefault(r.trial_index, r.ppl_heldout)
    out = _summary(an, ev)
    for img in images:
        out.append(f"![{img.stem}]({img.relative_to(out_dir).as_posix()})")
        out.append("")
    out += _best_section(an, ev, heldout)
    out += _finalists_section(an)
    out += _front_section(an, heldout)
    out += _baselines_section(ev)
    out += _failures_section(an)
    if export_res is not None:
        out += _export_section(export_res, out_dir)
    return "\n".join(out)


def _limit_line(an: Analysis) -> list[str]:
    """The limit the search ran under, or what the history tells of it."""
    out: list[str] = []
    lim = an.limit
    if an.by_throughput:
        out.append(
            f"- **Perplexity limit**: {lim.value:.4g} ({lim.source})"
            if lim.known
            else "- **Perplexity limit**: not recorded in the history (pass `--ppl_limit`)"
        )
    elif lim.known:
        out.append(f"- **Size limit**: {lim.value:.6g} GB ({lim.source})")
    elif lim.low is not None:
        out.append(
            f"- **Size limit**: not recorded in the history; between {lim.low:.6g} GB (largest evaluated plan) and {lim.high:.6g} GB "
            "(smallest proposal refused as over the limit). Pass `--model_size_constraint GB` to draw it exactly."
        )
    elif an.search == "modelsize":
        out.append("- **Size limit**: not recorded in the history (pass `--model_size_constraint GB`)")
    return out


def _timing_lines(an: Analysis) -> list[str]:
    """Search and proposal time, from the history's timestamps."""
    out: list[str] = []
    t = an.timing
    if t is not None:
        pause = (
            f" including {t.pauses} pause(s) of {_dur(t.paused_s)} (the search was resumed); active {_dur(t.active_s)}" if t.pauses else ""
        )
        share = f"{100 * t.proposal_share:.1f}% of evaluation time" if t.proposal_share is not None else "no evaluation time recorded"
        out.append(f"- **Search time**: {_dur(t.span_s)} from the first trial's start to the last row{pause} (timestamps)")
        out.append(
            f"- **Proposal time**: {_dur(t.proposal_s)} in total = {share} ({_dur(t.evaluation_s)} of quantize + evaluate summed over workers)"
        )
    return out


def _evaluation_lines(ev: Evaluation | None) -> list[str]:
    """What the report itself measured, and whether it agrees with the search."""
    out: list[str] = []
    if ev is not None:
        s = ev.settings
        out.append(
            f"- **Report evaluations**: text `{s.get('text')}`, {s.get('search_tokens')} search tokens, {s.get('heldout_tokens')} held-out tokens, "
            f"windows of {s.get('seq_len')}; {ev.measured} new measurement(s), {ev.cache_hits} from the cache (`{CACHE_NAME}`), {_dur(ev.seconds)}"
        )
        if ev.check is not None:
            tr, hist, now = ev.check
            verdict = (
                "consistent with the search"
                if ev.consistent
                else "**NOT consistent with the search: baselines are not comparable; rerun with the search's --eval_tokens/--eval_text/--max_seqlen and model flags**"
            )
            out.append(f"- **Evaluator check**: trial {tr} perplexity {hist:.4f} in the history, {now:.4f} re-measured: {verdict}")
    else:
        out.append(
            "- **Report evaluations**: none (rendered from the history alone; `--evaluate` measures baselines): held-out perplexities only where the history has them"
        )
    return out


def _summary(an: Analysis, ev: Evaluation | None) -> list[str]:
    out: list[str] = []
    kind_text = {
        "modelsize": "lowest perplexity under a model size limit",
        "throughput": "highest throughput under a perplexity limit",
        "pareto": "perplexity / size Pareto front",
    }[an.search]
    out += [f"# Search report: `{an.path.name}`", ""]
    by_src = Counter(r.source for r in an.completed)
    out.append(
        f"- **History**: `{an.path}`: {len(an.rows)} rows"
        + (f", **{len(an.skipped)} corrupt rows skipped** (listed below)" if an.skipped else "")
    )
    out.append(f"- **Search**: {an.search} ({kind_text}); model `{an.model_id or '?'}`, space `{an.space_id or '?'}`")
    out.append(
        f"- **Trials**: {len(an.completed)} completed (by source: "
        + ", ".join(f"{n} {source_style(s)[2]}" for s, n in by_src.most_common())
        + f"), **{len(an.failed)} failed**, {len(an.infeasible)} over-limit proposal(s) (never evaluated), {len(an.abandoned)} abandoned"
    )
    out += _limit_line(an)
    out += _timing_lines(an)
    out += _evaluation_lines(ev)
    for n in an.notes:
        out.append(f"- Note: {n}")
    out.append("")
    return out


def _best_section(an: Analysis, ev: Evaluation | None, heldout: dict[int, float]) -> list[str]:
    out: list[str] = []
    lim = an.limit
    b = an.best
    out.append("## Best feasible plan")
    out.append("")
    if b is None:
        out.append("No completed trial is feasible" + (" under the given limit." if lim.known else "."))
    else:
        what = (
            f"Trial **{b.trial_index}**"
            if b.trial_index >= 0
            else f"The uniform plan **{next(iter(b.plan.values())).label()}** (not a trial)"
        )
        out.append(f"{what} ({source_style(b.source)[2]}): {an.best_why}.")
        out.append("")
        cols = ["model size (GB)", "avg bits", "perplexity (search split)", "perplexity (held-out)"] + (
            ["throughput (tok/s)"] if b.cal_throughput is not None else []
        )
        vals = [
            f"{b.model_size:.6g}" if b.model_size is not None else "-",
            _num(b.avg_bits),
            _num(b.cal_PPL),
            _num(heldout.get(b.trial_index)),
        ]
        if b.cal_throughput is not None:
            vals.append(_num(b.cal_throughput))
        out.append(_md_table(cols, [vals]))
        out.append("")
        if ev is not None and ev.baselines and b.model_size is not None:
            cap = lim.value if lim.known else b.model_size * 1.0001
            fits = [x for x in ev.baselines if x.model_size_gb <= (cap or 0.0)]
            if fits:
                ub = min(fits, key=lambda x: x.ppl)
                bh, uh = heldout.get(b.trial_index), ub.ppl_heldout
                comp = f"{100 * (1 - (b.cal_PPL or 0.0) / ub.ppl):.1f}% lower perplexity on the search split"
                if bh is not None and uh is not None:
                    comp += f" and {100 * (1 - bh / uh):.1f}% on held-out text ({bh:.2f} vs {uh:.2f})"
                out.append(f"Against the best uniform plan that fits the same budget, **{ub.label}** ({ub.model_size_gb:.6g} GB): {comp}.")
                out.append("")
        widths = bits_histogram(b.plan)
        out.append("Bit widths (layers): " + ", ".join(f"{k if k != 16 else 'fp16/32 (unquantized)'} bits: {v}" for k, v in widths.items()))
        out.append("")
        out.append(_md_table(["setting", "layers"], [[k, v] for k, v in b.plan.histogram().items()]))
        out.append("")
    return out


def _finalists_section(an: Analysis) -> list[str]:
    """The finalists re-scored on the validation split, best first (what chose the final plan)."""
    if not an.rescored:
        return []
    objective = objective_of(an.rescored)
    rows = sorted(an.rescored, key=lambda r: (-(r.val_tokens or 0), val_score(r, objective)))
    out = [f"## Finalists re-scored on the validation split ({len(rows)})", ""]
    out.append(
        f"The search's {objective} on its own windows is noisy; when it ended, these plans were measured on the validation "
        "split (text neither the search nor the seeding saw) and the best there is the pick. Held-out numbers (the test split) "
        "are measured for the pick, the best seed and the best uniform plan only."
    )
    out.append("")
    table = []
    for r in rows:
        trial = str(r.trial_index) if r.trial_index >= 0 else "-"
        kl = f"{r.val_kl:.4f} ± {r.val_kl_sem:.4f}" if r.val_kl is not None and r.val_kl_sem is not None else _num(r.val_kl)
        table.append(
            [
                trial,
                source_style(r.source)[2],
                r.reason or "-",
                _num(r.cal_PPL),
                _num(r.kl),
                f"{r.val_tokens or 0:,}",
                _num(r.val_PPL),
                kl,
                _num(r.ppl_heldout),
            ]
        )
    head = [
        "trial",
        "source",
        "role",
        "perplexity (search)",
        "KL (search)",
        "validation tokens",
        "perplexity (validation)",
        "KL (validation)",
        "perplexity (held-out)",
    ]
    out.append(_md_table(head, table))
    out.append("")
    return out


def _front_section(an: Analysis, heldout: dict[int, float]) -> list[str]:
    out: list[str] = []
    thr, b = an.by_throughput, an.best
    out.append(f"## Pareto front ({len(an.front)} trials)")
    out.append("")
    if an.front:
        head = (
            ["trial", "source"]
            + (["throughput (tok/s)"] if thr else [])
            + ["model size (GB)", "avg bits", "perplexity (search)", "perplexity (held-out)", "bit widths (layers)"]
        )
        rows_md = []
        for r in an.front:
            hb = ", ".join(f"{k}b:{v}" for k, v in bits_histogram(r.plan).items())
            mark = " (best)" if b is not None and r.trial_index == b.trial_index else ""
            rows_md.append(
                [f"{r.trial_index}{mark}", source_style(r.source)[2]]
                + ([_num(r.cal_throughput)] if thr else [])
                + [
                    f"{r.model_size:.6g}" if r.model_size is not None else "-",
                    _num(r.avg_bits),
                    _num(r.cal_PPL),
                    _num(heldout.get(r.trial_index)),
                    hb,
                ]
            )
        out.append(_md_table(head, rows_md))
    else:
        out.append("No completed trial.")
    out.append("")
    return out


def _baselines_section(ev: Evaluation | None) -> list[str]:
    out: list[str] = []
    out.append("## Uniform baselines")
    out.append("")
    if ev is None:
        out.append("Not evaluated (the report renders from the history alone; `--evaluate` measures them).")
    elif ev.baselines:
        out.append("Measured by this report with the same evaluator (search split and held-out split).")
        out.append("")
        out.append(
            _md_table(
                ["config", "model size (GB)", "avg bits", "perplexity (search)", "perplexity (held-out)"],
                [[x.label, f"{x.model_size_gb:.6g}", _num(x.avg_bits), _num(x.ppl), _num(x.ppl_heldout)] for x in ev.baselines],
            )
        )
    for skipped in ev.skipped_baselines if ev is not None else []:
        out.append(f"- skipped {skipped}")
    out.append("")
    return out


def _failures_section(an: Analysis) -> list[str]:
    out: list[str] = []
    if an.failed:
        out.append(f"## Failed trials ({len(an.failed)})")
        out.append("")
        out.append(
            _md_table(
                ["trial", "source", "reason"],
                [[r.trial_index, source_style(r.source)[2], (r.reason or "-").replace("|", "/")[:160]] for r in an.failed],
            )
        )
        out.append("")
    if an.skipped:
        out.append(f"## Skipped rows ({len(an.skipped)})")
        out.append("")
        out += [f"- line {line}: {why}" for line, why in an.skipped]
        out.append("")
    return out


def _export_section(export_res: ExportResult, out_dir: Path) -> list[str]:
    out: list[str] = []
    e = export_res
    rel = e.directory.relative_to(out_dir).as_posix()
    out.append(f"## Export of trial {e.trial}")
    out.append("")
    out.append(f"- `{rel}/plan.json`: `python -m bo_search.evaluate --config {e.plan_json}`")
    out.append(f"- `{rel}/torchao_config.json`: torchao `FqnToConfig` (per layer: config class and arguments); apply with:")
    out.append("")
    out.append("```python")
    out.append(_apply_snippet(e.torchao_json))
    out.append("```")
    out.append("")
    types = ", ".join(f"{k} x{v}" for k, v in e.ggml_types.items())
    out.append(
        f"- `{rel}/llama_cpp_tensor_types.txt` and `{rel}/llama_quantize.sh`: llama.cpp `--tensor-type NAME=TYPE` per tensor ({types})."
    )
    out.append("  **Nearest mapping, not identical numerics**: llama.cpp's block formats differ from bo_search's codes.")
    for n in e.gguf_notes:
        out.append(f"  - {n}")
    if e.checkpoint is not None:
        out.append(
            f"- `{rel}/checkpoint/`: packed weights + config + tokenizer; `from bo_search.export import load_quantized; model, tok = load_quantized('{e.checkpoint}')`"
        )
        if e.checkpoint_check is not None:
            c = e.checkpoint_check
            out.append(
                f"  - reloaded and checked: held-out perplexity {c['ppl_heldout_checkpoint']:.4f} vs {c['ppl_heldout_plan']:.4f} for the plan ({100 * c['rel_diff']:+.3f}%)"
            )
    out.append("")
    return out


def _apply_snippet(path: Path) -> str:
    return TORCHAO_APPLY.format(path=path.as_posix())
