"""The report's two plots: the trade-off (perplexity against size or throughput) and progress."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bo_search.report.analysis import Analysis, hypervolume_2d
from bo_search.report.baselines import Baseline, Evaluation
from bo_search.search.history import HistoryRow

#: source -> (marker, colour, legend label)
SOURCE_STYLE: dict[str, tuple[str, str, str]] = {
    "seed": ("D", "tab:orange", "seed"),
    "sobol": ("s", "tab:green", "Sobol"),
    "bo": ("o", "tab:blue", "BO proposal"),
    "thompson": ("o", "tab:blue", "Thompson proposal"),  # the size limit is drawn in red
    "repaired": ("^", "tab:purple", "BO proposal repaired to fit"),
    "random": ("v", "tab:brown", "random feasible fallback"),
}


OTHER_STYLE = ("x", "tab:gray", "other")

#: the order trials are drawn in, by source: seeds first, so the search's own proposals are on top
DRAW_ORDER = ("seed", "sobol", "random", "repaired", "bo", "thompson")


def source_style(source: str) -> tuple[str, str, str]:
    return SOURCE_STYLE.get(source, OTHER_STYLE)


def _fmt_gb(v: float) -> str:
    return f"{v:.4g} GB"


def _annotate(ax: Any, x: float, y: float, text: str, color: str, dx: float, dy: float, fontsize: float) -> Any:
    leader = {"arrowstyle": "-", "lw": 0.5, "color": color, "shrinkA": 0, "shrinkB": 4} if abs(dy) > 10 else None
    return ax.annotate(
        text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, color=color,
        ha="left" if dx > 0 else "right", va="bottom", zorder=6, arrowprops=leader,
        bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.75},
    )  # fmt: skip


def _place_labels(
    ax: Any,
    items: list[tuple[float, float, str, str]],
    obstacles: Sequence[tuple[float, float]] = (),
    vlines: Sequence[float] = (),
    fontsize: float = 7.5,
) -> None:
    """Annotate points without overlapping text: for each label try offsets (nearest first) and keep
    the first whose box is inside the axes and clear of the labels already placed, of the plotted
    points (``obstacles``) and of vertical lines at ``vlines``; if none is clear, the offset with the
    least overlap. Labels far from their point get a thin leader line."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    r = 5.0 * fig.dpi / 72  # about a marker's radius, in pixels
    blocked: list[Any] = []
    for px, py in ax.transData.transform(list(obstacles)) if obstacles else []:
        blocked.append(Bbox([[px - r, py - r], [px + r, py + r]]))
    for x in vlines:
        px = ax.transData.transform((x, ax.get_ylim()[0]))[0]
        blocked.append(Bbox([[px - 1, axbox.y0], [px + 1, axbox.y1]]))
    offsets = [(dx, dy) for dy in (4, -11, 14, -21, 24, -31, 34, -41, 46, -53, 58, -65, 72, -79) for dx in (6, -6)]

    def overlap(a: Any, b: Any) -> float:
        w = min(a.x1, b.x1) - max(a.x0, b.x0)
        h = min(a.y1, b.y1) - max(a.y0, b.y0)
        return w * h if w > 0 and h > 0 else 0.0

    for x, y, text, color in items:
        best: tuple[float, tuple[int, int]] | None = None
        for dx, dy in offsets:
            ann = _annotate(ax, x, y, text, color, dx, dy, fontsize)
            box = ann.get_window_extent(renderer)
            ann.remove()
            outside = max(0.0, axbox.x0 - box.x0) + max(0.0, box.x1 - axbox.x1) + max(0.0, axbox.y0 - box.y0) + max(0.0, box.y1 - axbox.y1)
            score = sum(overlap(box, b) for b in blocked) + 1e4 * outside
            if best is None or score < best[0]:
                best = (score, (dx, dy))
            if score == 0:
                break
        assert best is not None
        ann = _annotate(ax, x, y, text, color, *best[1], fontsize)
        blocked.append(ann.get_window_extent(renderer))


def _edge_groups(items: Sequence[Baseline], rel: float = 0.03) -> list[list[Baseline]]:
    """Baselines pinned to the same edge, grouped when their perplexities are within ``rel``."""
    groups: list[list[Baseline]] = []
    for b in sorted(items, key=lambda b: b.ppl):
        if groups and b.ppl <= groups[-1][0].ppl * (1 + rel):
            groups[-1].append(b)
        else:
            groups.append([b])
    return groups


def _edge_label(group: Sequence[Baseline]) -> str:
    parts: dict[str, list[str]] = {}  # "int8" -> ["g32", "g64"]; "fp" -> [""]
    for b in sorted(group, key=lambda b: b.model_size_gb):
        parts.setdefault(b.family, []).append(b.grouping)
    names = ", ".join(fam + (" " + "/".join(g for g in gs if g) if any(gs) else "") for fam, gs in parts.items())
    lo, hi = min(b.model_size_gb for b in group), max(b.model_size_gb for b in group)
    size = f"{lo:.4g} GB" if lo == hi else f"{lo:.4g}-{hi:.4g} GB"
    p_lo, p_hi = min(b.ppl for b in group), max(b.ppl for b in group)
    ppl = f"{p_lo:.4g}" if f"{p_lo:.4g}" == f"{p_hi:.4g}" else f"{p_lo:.4g}-{p_hi:.4g}"
    return f"{names}:\n{size}, ppl {ppl}"


def _limits(values: Sequence[float], pad: float = 0.08) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = hi - lo if hi > lo else max(abs(hi) * 0.05, 1e-9)
    return lo - pad * span, hi + pad * span


def plot_tradeoff(an: Analysis, ev: Evaluation | None, path: Path) -> Path:
    """Perplexity against size (or throughput) of every completed trial, front, limit, baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = an.by_throughput
    pts = [r for r in an.completed if r.cal_PPL is not None and (r.cal_throughput if thr else r.model_size) is not None]

    def xval(r: HistoryRow) -> float:
        return float((r.cal_throughput if thr else r.model_size) or 0.0)

    fig, ax = plt.subplots(figsize=(11, 6.2), dpi=130)
    baselines = list(ev.baselines) if ev is not None else []
    ys = [float(r.cal_PPL or 0.0) for r in pts] + [b.ppl for b in baselines]
    if not pts:
        ax.text(0.5, 0.5, "no completed trial to plot", transform=ax.transAxes, ha="center", va="center", fontsize=12)
    log_y = bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 4
    if log_y:
        ax.set_yscale("log")
    _draw_trials(ax, an, pts, xval)
    lim = an.limit
    labels = _draw_baselines(ax, an, baselines, [xval(r) for r in pts])
    _draw_limit(ax, an)
    _label_axes(ax, an, pts, ys, log_y)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, borderaxespad=0.0)
    fig.tight_layout()
    if labels:
        obstacles = [(xval(r), float(r.cal_PPL or 0.0)) for r in pts] + [(x, y) for x, y, _t, _c in labels]
        vlines = [lim.value] if lim.known and not thr else []
        _place_labels(ax, labels, obstacles, [float(v) for v in vlines if v is not None])
    fig.savefig(path)
    plt.close(fig)
    return path


def _draw_rank(source: str) -> int:
    return DRAW_ORDER.index(source) if source in DRAW_ORDER else len(DRAW_ORDER)


def _draw_trials(ax: Any, an: Analysis, pts: Sequence[HistoryRow], xval: Callable[[HistoryRow], float]) -> None:
    """Completed trials by source, the Pareto front and the best feasible plan."""
    thr = an.by_throughput
    # trials by source (seeds first so BO points are drawn on top)
    sources = sorted({r.source for r in pts}, key=_draw_rank)
    for src in sources:
        group = [r for r in pts if r.source == src]
        marker, color, label = source_style(src)
        ax.scatter(
            [xval(r) for r in group], [float(r.cal_PPL or 0.0) for r in group], marker=marker, s=46 if src == "seed" else 34,
            c=color, edgecolors="black" if src == "seed" else None, linewidths=0.6, alpha=0.9, zorder=3,
            label=f"{label} ({len(group)})",
        )  # fmt: skip

    # Pareto front
    if len(an.front) >= 1:
        fx = [xval(r) for r in an.front]
        fy = [float(r.cal_PPL or 0.0) for r in an.front]
        ax.step(
            fx,
            fy,
            where="pre" if thr else "post",
            color="black",
            lw=1.2,
            alpha=0.8,
            zorder=2,
            label=f"Pareto front ({len(an.front)} trials)",
        )
        ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="black", linewidths=1.0, zorder=4)

    # best feasible
    if an.best is not None and an.best in pts:
        top = an.best
        what = f"{top.cal_throughput:.1f} tok/s" if thr else _fmt_gb(float(top.model_size or 0.0))
        ax.scatter([xval(top)], [float(top.cal_PPL or 0.0)], marker="*", s=320, c="gold", edgecolors="black", linewidths=0.9, zorder=5,
                   label=f"best feasible: trial {top.trial_index}, ppl {top.cal_PPL:.2f} at {what}")  # fmt: skip


def _draw_baselines(ax: Any, an: Analysis, baselines: Sequence[Baseline], xs: list[float]) -> list[tuple[float, float, str, str]]:
    """Uniform baselines (the ones far outside the trials' range pinned to the edge) and the x range;
    returns the labels to place."""
    thr = an.by_throughput
    # x range from the trials (and the limit); baselines far outside are pinned to the edge
    xs = list(xs)
    lim = an.limit
    if not thr:
        xs += [v for v in (lim.value, lim.low, lim.high) if v is not None]
    if xs:
        core_lo, core_hi = min(xs), max(xs)
        span = core_hi - core_lo if core_hi > core_lo else max(core_hi * 0.05, 1e-9)
        reach = (core_lo - 1.5 * span, core_hi + 1.5 * span)
    else:
        reach = (-math.inf, math.inf)

    labels: list[tuple[float, float, str, str]] = []
    if baselines and not thr:
        near = [b for b in baselines if reach[0] <= b.model_size_gb <= reach[1]]
        far = [b for b in baselines if b not in near]
        all_x = xs + [b.model_size_gb for b in near]
        x_lo, x_hi = _limits(all_x) if all_x else (0.0, 1.0)
        ax.scatter(
            [b.model_size_gb for b in near],
            [b.ppl for b in near],
            marker="X",
            s=70,
            c="black",
            zorder=4,
            label="uniform baseline (same evaluator)",
        )
        for b in near:
            labels.append((b.model_size_gb, b.ppl, b.short, "black"))
        if far:
            right = [b for b in far if b.model_size_gb > reach[1]]
            left = [b for b in far if b.model_size_gb < reach[0]]
            if right:
                ax.scatter([x_hi] * len(right), [b.ppl for b in right], marker=">", s=60, c="dimgray", zorder=4, clip_on=False,
                           label="baseline beyond the right edge (size in label)")  # fmt: skip
                for grp in _edge_groups(right):
                    labels.append((x_hi, grp[0].ppl, _edge_label(grp), "dimgray"))
            if left:
                ax.scatter([x_lo] * len(left), [b.ppl for b in left], marker="<", s=60, c="dimgray", zorder=4, clip_on=False,
                           label="baseline beyond the left edge (size in label)")  # fmt: skip
                for grp in _edge_groups(left):
                    labels.append((x_lo, grp[0].ppl, _edge_label(grp), "dimgray"))
        ax.set_xlim(x_lo, x_hi)
    elif xs:
        ax.set_xlim(*_limits(xs))
    if baselines and thr:
        for b in baselines:
            ax.axhline(b.ppl, color="dimgray", lw=0.8, ls=":", zorder=1)
            labels.append((ax.get_xlim()[0], b.ppl, f"{b.short}: ppl {b.ppl:.2f}", "dimgray"))

    return labels


def _draw_limit(ax: Any, an: Analysis) -> None:
    thr, lim = an.by_throughput, an.limit
    if thr and lim.known:
        ax.axhline(float(lim.value or 0.0), color="tab:red", ls="--", lw=1.2, zorder=1, label=f"perplexity limit {lim.value:.4g}")
    elif not thr and lim.known:
        ax.axvline(
            float(lim.value or 0.0), color="tab:red", ls="--", lw=1.2, zorder=1, label=f"size limit {float(lim.value or 0.0):.6g} GB"
        )
    elif not thr and lim.low is not None and lim.high is not None:
        ax.axvspan(lim.low, lim.high, color="tab:red", alpha=0.15, lw=0, zorder=0,
                   label=f"size limit (inferred: {lim.low:.5g}-{lim.high:.5g} GB)")  # fmt: skip


def _label_axes(ax: Any, an: Analysis, pts: Sequence[HistoryRow], ys: Sequence[float], log_y: bool) -> None:
    thr = an.by_throughput
    if thr:
        kind = {r.throughput_kind for r in pts if r.throughput_kind}
        ax.set_xlabel("throughput (tokens/s" + (f", {'/'.join(sorted(kind))}" if kind else "") + ")")
    else:
        ax.set_xlabel("model size (GB = 10^9 bytes: packed codes + scales + zero points + unquantized tensors)")
        _bits_axis(ax, an)
    ax.set_ylabel("perplexity on the search split" + (" (log scale)" if log_y else ""))
    if log_y:
        _log_axis(ax.yaxis, ys)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    not_shown = len(an.failed) + len(an.abandoned)
    title = f"{an.path.name}: {len(pts)} completed trials ({an.search} search)"
    sub = [
        f"{len(an.failed)} failed" + (f", {len(an.abandoned)} abandoned" if an.abandoned else "") + " (not shown)"
        if not_shown
        else "no failed trials"
    ]
    if an.infeasible:
        sub.append(f"{len(an.infeasible)} proposal{'s' if len(an.infeasible) > 1 else ''} over the limit, never evaluated")
    if an.skipped:
        sub.append(f"{len(an.skipped)} corrupt rows skipped")
    ax.set_title(title + "\n" + "; ".join(sub), fontsize=10, pad=10)


def _log_axis(axis: Any, values: Sequence[float]) -> None:
    """Plain numbers on a log axis; minor ticks labelled too when the range spans few decades."""
    from matplotlib.ticker import FuncFormatter

    decades = math.log10(max(values) / min(values)) if values and min(values) > 0 else 3.0
    mantissas = (2, 3, 4, 5, 6, 7, 8, 9) if decades < 1.3 else (2, 3, 5) if decades < 2.5 else ()

    def minor(v: float, _pos: Any) -> str:
        if v <= 0:
            return ""
        mant = v / 10 ** math.floor(math.log10(v))
        return f"{v:g}" if any(abs(mant - m) < 1e-6 for m in mantissas) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def _bits_axis(ax: Any, an: Analysis) -> None:
    """A top axis in average bits per quantized weight (size is affine in it: one line through the rows)."""
    pairs = sorted({(r.model_size, r.avg_bits) for r in an.rows if r.model_size is not None and r.avg_bits is not None})
    if len(pairs) < 2 or pairs[-1][0] == pairs[0][0]:
        return
    (s0, b0), (s1, b1) = pairs[0], pairs[-1]
    slope = (b1 - b0) / (s1 - s0)
    if slope <= 0 or any(abs(b0 + slope * (s - s0) - b) > 0.02 for s, b in pairs):
        return
    top = ax.secondary_xaxis("top", functions=(lambda s: b0 + slope * (s - s0), lambda b: s0 + (b - b0) / slope))
    top.set_xlabel("average bits per quantized weight (scales and zero points included)", fontsize=9)


def _draw_hypervolume(ax: Any, evaluated: list[HistoryRow]) -> None:
    """The Pareto search without a limit: the front's hypervolume after each trial."""
    sizes = [float(r.model_size or 0.0) for r in evaluated]
    logs = [math.log(float(r.cal_PPL or 1.0)) for r in evaluated]
    ref = (max(sizes) * 1.001, max(logs) * 1.001 if max(logs) > 0 else 1.0)
    hv = [hypervolume_2d(list(zip(sizes[: i + 1], logs[: i + 1])), ref) for i in range(len(evaluated))]
    ax.step([r.trial_index for r in evaluated], hv, where="post", color="black", lw=1.5, label="front hypervolume so far")
    ax.set_ylabel("hypervolume (GB x log perplexity, reference = worst seen)")


def _draw_best_so_far(ax: Any, an: Analysis, ev: Evaluation | None, evaluated: list[HistoryRow]) -> None:
    """Every trial by source, the best feasible value so far, and the best uniform baseline that fits."""
    thr = an.by_throughput
    feasible = {r.trial_index for r in an.feasible}
    value = [float((r.cal_throughput if thr else r.cal_PPL) or 0.0) for r in evaluated]
    for src in sorted({r.source for r in evaluated}, key=_draw_rank):
        marker, color, label = source_style(src)
        idx = [i for i, r in enumerate(evaluated) if r.source == src]
        ax.scatter([evaluated[i].trial_index for i in idx], [value[i] for i in idx], marker=marker, c=color, s=30, alpha=0.75,
                   edgecolors="black" if src == "seed" else None, linewidths=0.5, label=f"{label} ({len(idx)})", zorder=3)  # fmt: skip
    best_x, best_y = [], []
    cur: float | None = None
    for r, v in zip(evaluated, value):
        if r.trial_index in feasible and v > 0 and (cur is None or (v > cur if thr else v < cur)):
            cur = float(v)
        if cur is not None:
            best_x.append(r.trial_index)
            best_y.append(cur)
    if best_x:
        ax.step(best_x, best_y, where="post", color="black", lw=1.6, zorder=4, label=f"best feasible so far ({best_y[-1]:.4g})")
    if ev is not None and not thr:
        fits = [b for b in ev.baselines if an.limit.known and b.model_size_gb <= (an.limit.value or 0.0)] or (
            [b for b in ev.baselines if an.best is not None and b.model_size_gb <= (an.best.model_size or 0.0) * 1.0001]
        )
        if fits:
            ub = min(fits, key=lambda b: b.ppl)
            ax.axhline(
                ub.ppl,
                color="tab:red",
                ls="--",
                lw=1.0,
                label=f"best uniform baseline that fits: {ub.short} ({ub.ppl:.4g})",
            )
    vals = [v for v in value if v is not None]
    if not thr and vals and min(vals) > 0 and max(vals) / min(vals) > 4:
        ax.set_yscale("log")
        _log_axis(ax.yaxis, vals)
    ax.set_ylabel(
        "throughput (tokens/s)" if thr else "perplexity on the search split" + (" (log scale)" if ax.get_yscale() == "log" else "")
    )


def plot_progress(an: Analysis, ev: Evaluation | None, path: Path) -> Path:
    """Best feasible value so far against trial number."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thr = an.by_throughput
    evaluated = sorted((r for r in an.completed if r.cal_PPL is not None), key=lambda r: r.trial_index)
    fig, ax = plt.subplots(figsize=(9, 5), dpi=130)
    hv_mode = an.search == "pareto" and not an.limit.known
    if not evaluated:
        ax.text(0.5, 0.5, "no completed trial", transform=ax.transAxes, ha="center", va="center", fontsize=12)
    elif hv_mode:
        _draw_hypervolume(ax, evaluated)
    else:
        _draw_best_so_far(ax, an, ev, evaluated)
    ax.set_xlabel("trial number (order proposed; gaps are proposals over the limit, never evaluated)" if an.infeasible else "trial number")
    what = "throughput" if thr else ("Pareto-front hypervolume" if hv_mode else "perplexity")
    ax.set_title(f"{an.path.name}: best feasible {what} so far ({len(evaluated)} completed, {len(an.failed)} failed)", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
