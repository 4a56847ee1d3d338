"""``python -m bo_search.report``: a report (and exports) from a search history."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bo_search import cli, llamacpp
from bo_search.model import discover_layers, load_structure, resolve_checkpoint
from bo_search.report.analysis import ReportOptions, analyse, choose_export_row, load_history
from bo_search.report.build import build_report, check_model
from bo_search.report.gguf import CONVERT_HINT, check_gguf_plan, export_gguf
from bo_search.runtime import DecodeSpec, measure_file
from bo_search.search import identity
from bo_search.search.history import HistoryRow
from bo_search.types import UserError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bo_search.report",
        description="Plots, a Markdown report and exports from a search history (size, throughput or Pareto search; finished or interrupted). "
        "Pass the search's model and evaluation flags so baselines are measured the same way.",
    )
    p.add_argument("history", metavar="HISTORY.csv", help="history written by bo_search.acc_modelsize / acc_throughput / pareto")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: HISTORY_report/ next to the history)")
    p.add_argument("--trial", type=int, default=None, metavar="N", help="trial to export (default: the best feasible)")
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="load the model and measure uniform baselines and missing held-out perplexities (cached; minutes the first time). "
        "Default: render from the history alone, in seconds",
    )
    p.add_argument("--no_eval", action="store_true", help="render from the history alone (the default; kept for old command lines)")
    p.add_argument(
        "--model_size_constraint",
        type=float,
        default=None,
        metavar="GB",
        help="size limit to draw and to choose the best plan under (default: inferred)",
    )
    p.add_argument("--ppl_limit", type=float, default=None, help="perplexity limit of a throughput search")
    p.add_argument(
        "--baselines",
        nargs="+",
        default=None,
        metavar="BITS:GROUPSIZE",
        help="uniform baselines (default: fp, then 8, 4 and 3 bits at every group size the history's plans use)",
    )
    p.add_argument(
        "--save_checkpoint",
        action="store_true",
        help="also write the exported trial as a packed checkpoint (loads with bo_search.export.load_quantized)",
    )
    p.add_argument(
        "--gguf",
        default=None,
        metavar="OUT.gguf",
        help="write the exported trial as a GGUF file llama.cpp and transformers load: a plan searched in llama.cpp types "
        "(a ggml space) on a GGUF checkpoint; metadata and tokenizer are copied from the checkpoint",
    )
    p.add_argument("--force", action="store_true", help="let --gguf overwrite an existing file")
    p.add_argument(
        "--no_llamacpp",
        action="store_true",
        help="--gguf: write the file without measuring it in llama.cpp (by default its perplexity on the search and held-out windows "
        "of --eval_tokens/--heldout_tokens and its decode tokens/s are measured there and printed next to this tool's)",
    )
    p.add_argument("--threads", type=int, default=1, help="--gguf: llama.cpp threads for that measurement (default 1)")
    p.add_argument(
        "--torchao_device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="torchao export: cpu = IntxWeightOnlyConfig everywhere (default); cuda = int4/int8 kernels where possible",
    )
    cli.add_model_args(p)
    cli.add_eval_args(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_main(_main, build_parser(), argv)


def _structure(checkpoint: str | None, include_lm_head: bool, model_id: str) -> tuple[Any, str | None]:
    """Layer shapes and model_type without loading weights (for --no_eval exports); (None, None) if unavailable."""

    try:
        ref = resolve_checkpoint(checkpoint)
        if model_id and ref.fingerprint != model_id:
            log.warning("--checkpoint %s is not the history's model (%s): exports use generic names", ref.name, model_id)
            return None, None
        model, _ref = load_structure(checkpoint)
        return discover_layers(model, include_lm_head=include_lm_head), getattr(model.config, "model_type", None)
    except UserError as err:
        log.warning("model structure unavailable (%s): exports use generic names", err)
        return None, None


def _main(args: argparse.Namespace) -> int:
    from bo_search.trial import ModelContext

    history = Path(args.history).expanduser()
    out = Path(args.out).expanduser() if args.out else history.with_name(history.stem + "_report")
    cli.check_output_path(out)
    opts = ReportOptions(
        out_dir=out,
        trial=args.trial,
        evaluate=bool(args.evaluate) and not args.no_eval,
        size_limit=args.model_size_constraint,
        ppl_limit=args.ppl_limit,
        baselines=tuple(args.baselines) if args.baselines else None,
        save_checkpoint=args.save_checkpoint,
        torchao_device=args.torchao_device,
        gguf=Path(args.gguf).expanduser() if args.gguf else None,
        force=args.force,
    )
    loaded = load_history(history)
    an = analyse(loaded, history, opts)
    export_row = choose_export_row(an, opts.trial)  # a bad --trial fails before any model is loaded
    if opts.gguf is not None:
        _check_gguf_request(opts, export_row, args.checkpoint)
        if not args.no_llamacpp:
            try:
                llamacpp.check_available()
            except UserError as err:
                raise UserError(f"{err}; or add --no_llamacpp to write the GGUF without measuring it") from None
    for line, why in an.skipped:
        print(f"warning: {history.name} line {line} skipped ({why})", file=sys.stderr)
    _quantizer_from_history(args, loaded.rows, history)
    ctx = None
    layers = model_type = None
    if opts.evaluate or opts.save_checkpoint:
        ref = resolve_checkpoint(args.checkpoint)
        check_model(an, ref.fingerprint, ref.name)
        ctx = ModelContext.from_args(args, heldout=args.heldout_tokens > 0)
    else:
        layers, model_type = _structure(args.checkpoint, args.include_lm_head, an.model_id)
    res = build_report(history, opts, ctx, layers, model_type)
    a = res.analysis
    print(
        f"{len(a.completed)} completed, {len(a.failed)} failed, {len(a.infeasible)} over the limit, {len(a.skipped)} corrupt rows skipped"
    )
    if a.best is not None:
        held = res.evaluation.heldout.get(a.best.trial_index) if res.evaluation else a.best.ppl_heldout
        print(
            f"best feasible trial {a.best.trial_index}: size {a.best.model_size:.6g} GB, perplexity {a.best.cal_PPL:.4f}"
            + (f", held-out {held:.4f}" if held is not None else "")
            + f" ({a.best_why})"
        )
    print(f"Pareto front: {len(a.front)} trials")
    if res.evaluation is not None:
        ev = res.evaluation
        print(cli.table([{"config": b.label, "model_size_gb": b.model_size_gb, "avg_bits": b.avg_bits, "ppl": b.ppl, "ppl_heldout": b.ppl_heldout} for b in ev.baselines],
                        ["config", "model_size_gb", "avg_bits", "ppl", "ppl_heldout"]))  # fmt: skip
        if not ev.consistent and ev.check is not None:
            print(
                f"warning: trial {ev.check[0]} re-measured at {ev.check[2]:.4f} (history {ev.check[1]:.4f}): pass the search's evaluation flags",
                file=sys.stderr,
            )
    print(f"wrote {res.markdown}, {res.tradeoff_png.name}, {res.progress_png.name}")
    if res.export is not None:
        print(f"exported trial {res.export.trial} to {res.export.directory}")
    if opts.gguf is not None and export_row is not None:
        _write_gguf(opts, export_row, args.checkpoint, args.include_lm_head, history)
        if not args.no_llamacpp:
            _measure_gguf(args, opts.gguf, export_row)
    return 0


def _quantizer_from_history(args: argparse.Namespace, rows: Sequence[HistoryRow], history: Path) -> None:
    """Plans are re-measured and exported with the quantizer they were searched with: the history's,
    unless --quantizer names another (refused)."""
    recorded = sorted({identity.recorded_quantizer(r) for r in rows})
    if len(recorded) != 1 or recorded[0] == args.quantizer:
        return
    if args.quantizer != "rtn":  # the flag's default is rtn: anything else was asked for
        raise UserError(f"{history.name} was searched with --quantizer {recorded[0]}, not {args.quantizer}: pass --quantizer {recorded[0]}")
    args.quantizer = recorded[0]
    print(f"{history.name} was searched with --quantizer {recorded[0]}: re-measuring and exporting with it", flush=True)


def _measure_gguf(args: argparse.Namespace, path: Path, row: HistoryRow) -> None:
    """The written file in llama.cpp, next to this tool's perplexity of the same plan on the same windows."""
    from bo_search.trial import ModelContext

    ctx = ModelContext.from_args(args, heldout=args.heldout_tokens > 0)
    ours = ctx.measure(row.plan, heldout=ctx.heldout_windows is not None)
    m = measure_file(path, ctx.search_windows, ctx.heldout_windows, DecodeSpec(threads=args.threads), ctx.tok)
    assert m.ppl is not None and m.timing is not None

    def cmp(theirs: float, mine: float) -> str:
        return f"{theirs:.4f} (this tool on the same windows: {mine:.4f}, {100 * (theirs / mine - 1):+.2f}%)"

    held = ""
    if m.ppl_heldout is not None and ctx.heldout_windows is not None:
        held = f"; held-out ({ctx.heldout_windows.n_tokens} tokens) {cmp(m.ppl_heldout.ppl, ours['ppl_heldout'])}"
    print(
        f"{llamacpp.check_available()}, {m.timing.threads} thread(s): perplexity on the search split ({ctx.search_windows.n_tokens} tokens) "
        f"{cmp(m.ppl.ppl, ours['ppl'])}{held}; decode {m.timing.tokens_per_s:.1f} ± {m.timing.sem:.1f} tokens/s "
        f"({m.timing.new_tokens} tokens after {m.timing.prompt_tokens}, median of {len(m.timing.rates)} after a warm-up)"
    )
    if row.cal_PPL is not None:
        print(
            f"(the search recorded {row.cal_PPL:.4f} on its search windows"
            + (f", {row.ppl_heldout:.4f} held-out" if row.ppl_heldout is not None else "")
            + "; pass the search's --eval_tokens/--heldout_tokens to measure on those)"
        )


def _check_gguf_request(opts: ReportOptions, row: HistoryRow | None, checkpoint: str | None) -> None:
    """Everything --gguf needs, checked before any output is written."""

    assert opts.gguf is not None
    if opts.gguf.exists() and not opts.force:
        raise UserError(f"{opts.gguf} exists; pass --force to overwrite it, or choose another --gguf path")
    if row is None:
        raise UserError("--gguf: the history has no completed trial to export")
    check_gguf_plan(row.plan)
    ref = resolve_checkpoint(checkpoint)
    if ref.gguf is None:
        raise UserError(f"--gguf: the checkpoint {ref.name} is a Hugging Face directory; {CONVERT_HINT}")


def _write_gguf(opts: ReportOptions, row: HistoryRow, checkpoint: str | None, include_lm_head: bool, history: Path) -> None:
    assert opts.gguf is not None
    model, ref = load_structure(checkpoint)
    layers = discover_layers(model, include_lm_head=include_lm_head)
    info = {"trial_index": row.trial_index, "history": history.name, "cal_PPL": row.cal_PPL, "model_size_gb": row.model_size}
    res = export_gguf(ref.gguf, row.plan, layers, opts.gguf, force=opts.force, info=info)
    predicted = (row.model_size or 0.0) * 1e9 + res.metadata_bytes
    print(
        f"wrote {res.path}: {res.file_bytes:,} bytes (tensors {res.tensor_bytes:,}, the searched size {(row.model_size or 0) * 1e9:,.0f}; "
        f"with the source's {res.metadata_bytes:,} bytes of metadata predicted {predicted:,.0f}, "
        f"{100 * (res.file_bytes / predicted - 1):+.3f}%); types {res.types}"
    )
