"""bo_search.report: Pareto extraction, report generation (synthetic and real histories), PNGs, bad input."""

import itertools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bo_search.report.analysis import ReportOptions, hypervolume_2d, search_timing
from bo_search.report.build import build_report
from bo_search.report.cli import main
from bo_search.search.history import FORMAT_VERSION, HistoryRow, HistoryWriter, pareto_front, read_history
from bo_search.types import LayerQuant, QuantPlan

T0 = 1.8e9


# ---------------------------------------------------------------------------------------------
# Pareto front and hypervolume
# ---------------------------------------------------------------------------------------------


def brute_force_front(points):
    """Distinct points that no other point dominates (<= in both, < in one), minimising both."""
    front = set()
    for p in points:
        if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points):
            front.add(p)
    return front


@pytest.mark.parametrize("seed", range(40))
def test_pareto_front_matches_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    if seed % 2:  # integer grid: many ties in one or both coordinates
        points = [(rng.randint(0, 8), rng.randint(0, 8)) for _ in range(n)]
    else:
        points = [(rng.random(), rng.lognormvariate(3, 1)) for _ in range(n)]
    idx = pareto_front(points)
    got = [points[i] for i in idx]
    assert set(got) == brute_force_front(points)
    assert len(got) == len(set(got))  # one index per distinct front point
    assert got == sorted(got)  # sorted by the first coordinate, second strictly decreasing
    assert all(a[1] > b[1] for a, b in itertools.pairwise(got))


def test_hypervolume_2d_known_values():
    assert hypervolume_2d([(1.0, 3.0), (2.0, 1.0)], (4.0, 4.0)) == pytest.approx(3 * 1 + 2 * 2)
    # a dominated point and a point outside the reference box add nothing
    assert hypervolume_2d([(1.0, 3.0), (2.0, 1.0), (3.0, 3.5), (5.0, 0.5)], (4.0, 4.0)) == pytest.approx(7.0)
    assert hypervolume_2d([], (1.0, 1.0)) == 0.0


# ---------------------------------------------------------------------------------------------
# A synthetic history with real measurements on the tiny model
# ---------------------------------------------------------------------------------------------


def block_plan(ctx, per_block):
    """Plan giving every linear of block i the setting per_block[i]."""
    return QuantPlan({li.fqn: per_block[li.block] for li in ctx.layers.linears})


def synthetic_history(path: Path, ctx, search="modelsize"):
    """12 rows: 2 seeds, Sobol, BO, repaired, 2 failed, 1 infeasible, 1 abandoned; metrics measured for real."""
    rng = random.Random(7)
    n = ctx.layers.n_blocks
    plans = [
        ("seed", block_plan(ctx, [LayerQuant(4, 32)] * n)),
        ("seed", block_plan(ctx, [LayerQuant(8, 64)] * n)),
    ]
    for source in ("sobol", "sobol", "bo", "bo", "repaired", "bo"):
        plans.append((source, block_plan(ctx, [LayerQuant(rng.choice([2, 3, 4, 8]), rng.choice([32, 64])) for _ in range(n)])))
    writer = HistoryWriter(path)
    rows = []
    ts = T0
    for i, (source, plan) in enumerate(plans):
        m = ctx.measure(plan)
        ts += 6.0
        row = HistoryRow(
            trial_index=i, status="completed", source=source, cal_PPL=m["ppl"], cal_PPL_sem=m["ppl_sem"], nll=m["nll"],
            model_size=m["model_size_gb"], avg_bits=m["avg_bits"], quantize_s=1.0, evaluate_s=4.0, proposal_s=0.5,
            worker_id="w0", timestamp=ts, search=search, model_id=ctx.ref.fingerprint, space_id="testspace", quant_config=plan.dumps(),
        )  # fmt: skip
        if search == "throughput":
            row.cal_throughput = 1000.0 / m["avg_bits"]
            row.throughput_kind = "predicted"
        rows.append(row)
    big = block_plan(ctx, [LayerQuant(8, 32)] * n)
    extra = [
        HistoryRow(8, "failed", "bo", reason="RuntimeError: boom", quantize_s=1.0, evaluate_s=0.5, proposal_s=0.5),
        HistoryRow(9, "infeasible", "bo", reason="size over the limit; not evaluated", model_size=ctx.size_model.gb(big), proposal_s=0.5),
        HistoryRow(10, "failed", "sobol", reason="FloatingPointError: non-finite loss", quantize_s=1.0, evaluate_s=2.0, proposal_s=0.5),
        HistoryRow(11, "abandoned", "bo", reason="interrupted (Ctrl-C)", proposal_s=0.5),
    ]
    for r in extra:
        ts += 6.0
        r.timestamp, r.search, r.model_id, r.space_id = ts, search, ctx.ref.fingerprint, "testspace"
        r.quant_config = (big if r.status == "infeasible" else plans[0][1]).dumps()
        rows.append(r)
    for r in rows:
        writer.append(r)
    writer.close()
    return rows


@pytest.fixture(scope="module")
def synth(tiny_ctx, tmp_path_factory):
    path = tmp_path_factory.mktemp("synth") / "h.csv"
    rows = synthetic_history(path, tiny_ctx)
    return path, rows


def png_ok(path: Path, shape=(806, 1430)):
    import matplotlib.image as mpimg
    import numpy as np

    assert path.stat().st_size > 30_000
    img = mpimg.imread(path)
    assert img.shape[:2] == shape
    ink = (img[..., :3].mean(axis=2) < 0.9).mean()  # fraction of non-white pixels
    assert 0.02 < ink < 0.6
    assert np.unique(img[..., :3].reshape(-1, 3), axis=0).shape[0] > 50  # several colours, not a blank frame


def test_report_from_csv_alone(synth, tmp_path):
    path, rows = synth
    res = build_report(path, ReportOptions(out_dir=tmp_path / "r", evaluate=False))
    an = res.analysis
    done = [r for r in rows if r.status == "completed"]
    assert len(an.completed) == 8 and len(an.failed) == 2 and len(an.infeasible) == 1 and len(an.abandoned) == 1
    assert an.best.trial_index == min(done, key=lambda r: r.cal_PPL).trial_index
    pts = [(r.model_size, r.cal_PPL) for r in done]
    assert {(r.model_size, r.cal_PPL) for r in an.front} == brute_force_front(pts)
    big = rows[9].model_size
    assert an.limit.low == max(r.model_size for r in done) and an.limit.high == big
    png_ok(res.tradeoff_png)
    png_ok(res.progress_png, shape=(650, 1170))
    md = res.markdown.read_text()
    assert "**2 failed**" in md and "1 over-limit proposal(s)" in md and "1 abandoned" in md
    # proposal share: 12 proposals x 0.5 s over 8 x 5 s + 1.5 s + 3 s of evaluation
    assert f"{100 * 6.0 / 44.5:.1f}% of evaluation time" in md
    assert "RuntimeError: boom" in md and "Not evaluated (the report renders from the history alone" in md
    assert f"Trial **{an.best.trial_index}**" in md
    exp = res.export
    assert exp is not None and exp.trial == an.best.trial_index
    plan = QuantPlan.loads(exp.plan_json.read_text())
    assert plan == an.best.plan
    assert json.loads(exp.plan_json.read_text())["cal_PPL"] == pytest.approx(an.best.cal_PPL)


def test_search_timing_counts_pauses():
    rows = [
        HistoryRow(i, "completed", "bo", cal_PPL=2.0, model_size=1.0, quantize_s=1.0, evaluate_s=9.0, proposal_s=1.0, timestamp=T0 + 11 * i)
        for i in range(5)
    ]
    rows += [
        HistoryRow(
            5 + i,
            "completed",
            "bo",
            cal_PPL=2.0,
            model_size=1.0,
            quantize_s=1.0,
            evaluate_s=9.0,
            proposal_s=1.0,
            timestamp=T0 + 3600 + 11 * i,
        )
        for i in range(5)
    ]
    t = search_timing(rows)
    assert t.span_s == pytest.approx(3600 + 44 + 11)  # first start (T0 - 11) to the last row
    assert t.pauses == 1 and t.paused_s == pytest.approx(3600 - 44 - 10)
    assert t.proposal_share == pytest.approx(10 / 100)


def test_report_with_eval_and_cache(synth, tiny_ctx, tmp_path):
    from bo_search.quant import uniform_plan

    path, rows = synth
    opts = ReportOptions(out_dir=tmp_path / "r", evaluate=True)
    res = build_report(path, opts, tiny_ctx)
    ev = res.evaluation
    labels = [b.label for b in ev.baselines]
    assert labels == ["full precision"] + [f"uniform int{b} g{g}" for b in (8, 4, 3) for g in (32, 64)]
    by = {b.label: b for b in ev.baselines}
    m = tiny_ctx.measure(uniform_plan(tiny_ctx.layers, LayerQuant(4, 64)), heldout=True)
    assert by["uniform int4 g64"].ppl == pytest.approx(m["ppl"], rel=1e-9)
    assert by["uniform int4 g64"].ppl_heldout == pytest.approx(m["ppl_heldout"], rel=1e-9)
    assert by["uniform int4 g64"].model_size_gb == pytest.approx(m["model_size_gb"])
    sizes = [by[x].model_size_gb for x in ("full precision", "uniform int8 g32", "uniform int4 g32", "uniform int3 g32")]
    assert sizes == sorted(sizes, reverse=True)
    assert ev.consistent and ev.check[0] == res.analysis.best.trial_index
    front = {r.trial_index for r in res.analysis.front} | {res.analysis.best.trial_index}
    assert set(ev.heldout) == front  # held-out for the best plan and every Pareto point
    best = res.analysis.best
    assert ev.heldout[best.trial_index] == pytest.approx(tiny_ctx.measure(best.plan, heldout=True)["ppl_heldout"], rel=1e-9)
    assert ev.measured == 1 + len(front) - 1 + 7 and ev.cache_hits == 0
    png_ok(res.tradeoff_png)
    md = res.markdown.read_text()
    assert "consistent with the search" in md and "## Uniform baselines" in md and "uniform int3 g64" in md
    # a second report reads every number from the cache
    again = build_report(path, opts, tiny_ctx)
    assert again.evaluation.measured == 0 and again.evaluation.cache_hits >= 8
    assert [b.ppl for b in again.evaluation.baselines] == [b.ppl for b in ev.baselines]
    assert again.evaluation.heldout == ev.heldout


def test_report_flags_other_eval_settings(synth, tiny_ctx, tmp_path):
    """A history whose perplexities were measured differently is flagged, not silently compared."""
    import csv

    path, _ = synth
    skewed = tmp_path / "skewed.csv"
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        if r["cal_PPL"]:
            r["cal_PPL"] = repr(float(r["cal_PPL"]) * 1.05)
    with open(skewed, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    res = build_report(skewed, ReportOptions(out_dir=tmp_path / "r", evaluate=True, baselines=("fp",)), tiny_ctx)
    assert not res.evaluation.consistent
    assert "NOT consistent with the search" in res.markdown.read_text()


def test_throughput_and_pareto_histories(tiny_ctx, tmp_path):
    thr = tmp_path / "thr.csv"
    rows = synthetic_history(thr, tiny_ctx, search="throughput")
    done = [r for r in rows if r.status == "completed"]
    limit = sorted(r.cal_PPL for r in done)[4]
    res = build_report(thr, ReportOptions(out_dir=tmp_path / "t", evaluate=False, ppl_limit=limit))
    an = res.analysis
    ok = [r for r in done if r.cal_PPL <= limit]
    assert an.best.trial_index == max(ok, key=lambda r: r.cal_throughput).trial_index
    pts = [(-r.cal_throughput, r.cal_PPL) for r in done]
    assert {(-r.cal_throughput, r.cal_PPL) for r in an.front} == brute_force_front(pts)
    png_ok(res.tradeoff_png)
    assert "throughput" in res.markdown.read_text()

    par = tmp_path / "par.csv"
    synthetic_history(par, tiny_ctx, search="pareto")
    res = build_report(par, ReportOptions(out_dir=tmp_path / "p", evaluate=False))
    assert res.analysis.search == "pareto" and "no size limit" in res.analysis.best_why
    png_ok(res.progress_png, shape=(650, 1170))


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit status 2; corrupt rows skipped and listed
# ---------------------------------------------------------------------------------------------


def run_main(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_partially_corrupt_history_renders_and_lists_skipped(synth, tiny_llama, tmp_path, capsys):
    path, _ = synth
    broken = tmp_path / "broken.csv"
    lines = path.read_text().splitlines()
    old = lines[2].replace(FORMAT_VERSION, "bo_search.history/0")
    broken.write_text("\n".join(lines[:2] + ["3,completed,bo,{not json", old] + lines[3:]) + "\n")
    code, out, err = run_main(capsys, broken, "--no_eval", "--checkpoint", tiny_llama, "--out", tmp_path / "r")
    assert code == 0, err
    assert "line 3 skipped" in err and "line 4 skipped" in err and "unsupported version" in err
    assert "2 corrupt rows skipped" in out
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Skipped rows (2)" in md and "- line 3:" in md and "- line 4:" in md
    assert len(read_history(broken, strict=False).rows) == len(lines) - 2
    png_ok(tmp_path / "r" / "tradeoff.png")


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        (None, "holds no trials"),  # header only
        ("trial_id,cal_PPL,model_size,config\n0,7.9,5.4,\"{'bitwidth.0.': 4}\"\n", "not a bo_search history"),
    ],
)
def test_bad_history_one_line_exit_2(tmp_path, capsys, content, message):
    from bo_search.search.history import COLUMNS

    p = tmp_path / "h.csv"
    p.write_text(",".join(COLUMNS) + "\n" if content is None else content)
    code, _out, err = run_main(capsys, p, "--no_eval")
    assert code == 2 and message in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


def test_history_from_older_version_exit_2(synth, tmp_path, capsys):
    path, _ = synth
    old = tmp_path / "old.csv"
    old.write_text(path.read_text().replace(FORMAT_VERSION, "bo_search.history/0"))
    code, _out, err = run_main(capsys, old, "--no_eval")
    assert code == 2 and "no readable trial" in err and "unsupported version" in err
    assert err.strip().count("\n") == 0


@pytest.mark.parametrize(
    "trial, message",
    [(8, "--trial 8 failed (RuntimeError: boom)"), (9, "never evaluated"), (11, "abandoned"), (99, "no such trial")],
)
def test_bad_trial_exit_2(synth, tmp_path, capsys, trial, message):
    path, _ = synth
    code, _out, err = run_main(capsys, path, "--no_eval", "--trial", trial, "--out", tmp_path / "r")
    assert code == 2 and message in err, err
    assert err.strip().count("\n") == 0
    assert not (tmp_path / "r").exists()  # nothing written


def test_other_model_exit_2(synth, tmp_path, capsys):
    from tiny import make_checkpoint

    other = make_checkpoint(tmp_path / "other", "llama", n_layers=2)
    path, _ = synth
    code, _out, err = run_main(capsys, path, "--evaluate", "--checkpoint", other, "--out", tmp_path / "r")
    assert code == 2 and "was searched on model" in err and err.strip().count("\n") == 0


# ---------------------------------------------------------------------------------------------
# A real short search on the tiny model, reported through the CLI
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_report_on_real_search(tiny_llama, tiny_search, tmp_path, capsys):
    """The report CLI (a subprocess, as a user runs it) on the shared search of conftest's ``tiny_search``."""
    from clitools import run_main as run_module

    from bo_search.metrics import perplexity
    from bo_search.report.export import load_quantized
    from bo_search.trial import EvalConfig, ModelContext

    _, hist = tiny_search.copy_to(tmp_path)
    flags = [
        "--checkpoint",
        str(tiny_llama),
        "--eval_text",
        "pydoc",
        "--eval_tokens",
        "256",
        "--heldout_tokens",
        "128",
        "--max_seqlen",
        "64",
    ]
    rep = subprocess.run(
        [sys.executable, "-m", "bo_search.report", str(hist), *flags, "--evaluate", "--save_checkpoint"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rep.returncode == 0, rep.stderr[-3000:]
    out = tmp_path / "h_report"
    md = (out / "report.md").read_text()
    rows = read_history(hist).rows
    # the report's best plan is the search's final pick: the validation winner among the finalists
    pick = min((x for x in rows if x.status == "rescored"), key=lambda x: x.val_PPL)
    best = next((x for x in rows if x.status == "completed" and x.trial_index == pick.trial_index), pick)
    if best.trial_index >= 0:
        assert f"Trial **{best.trial_index}**" in md and "best by validation nll" in md
    else:
        assert "The uniform plan **" in md
    assert "## Finalists re-scored on the validation split" in md
    assert "consistent with the search" in md and "uniform int4 g32" in md and "uniform int8 g64" in md
    png_ok(out / "tradeoff.png")
    png_ok(out / "progress.png", shape=(650, 1170))
    # the exported checkpoint reproduces the plan's held-out perplexity
    ctx = ModelContext(EvalConfig(checkpoint=str(tiny_llama), eval_text="pydoc", eval_tokens=256, heldout_tokens=128, max_seqlen=64))
    ref = ctx.measure(best.plan, heldout=True)["ppl_heldout"]
    model, tok = load_quantized(out / f"export_trial_{best.trial_index}" / "checkpoint")
    got = perplexity(model, ctx.heldout_windows).ppl
    assert got == pytest.approx(ref, rel=1e-6)  # a float32 checkpoint: the same weights, bit for bit
    assert f"held-out perplexity {got:.4f} vs {ref:.4f}" in md
    # the exported plan JSON is what bo_search.evaluate --config reads
    plan_json = out / f"export_trial_{best.trial_index}" / "plan.json"
    code, out3, err3 = run_module("bo_search.evaluate", [*flags, "--heldout_tokens", "0", "--config", plan_json])
    assert code == 0, err3[-2000:]
    assert float(out3.strip().splitlines()[-1].split("|")[4]) == pytest.approx(best.cal_PPL, rel=1e-3)
    # a second report is served from the cache (in this process)
    code, _, err2 = run_main(capsys, hist, *flags, "--evaluate")
    assert code == 0, err2[-3000:]
    assert "0 new measurement(s)" in (out / "report.md").read_text()


def test_every_source_the_search_writes_has_its_own_plot_style():
    """The sources history.py documents (seed, random, repaired, the Ax node names, uniform
    finalists aside) are drawn with their own marker and legend, not as "other": the default
    strategy's proposals (thompson) were drawn as gray "other" crosses before."""
    from bo_search.report.plots import DRAW_ORDER, OTHER_STYLE, SOURCE_STYLE, source_style

    for src in ("seed", "random", "repaired", "thompson", "sobol", "bo"):
        assert source_style(src) != OTHER_STYLE, src
        assert src in DRAW_ORDER
    assert set(DRAW_ORDER) == set(SOURCE_STYLE)
    assert len({label for _, _, label in SOURCE_STYLE.values()}) == len(SOURCE_STYLE)
    assert source_style("?") == OTHER_STYLE
