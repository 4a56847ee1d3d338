"""``python -m bo_search.sensitivity``: compute a table, or compare tables of several methods."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bo_search import cli
from bo_search.sensitivity.compute import METHODS, compute
from bo_search.sensitivity.table import DEFAULT_NSAMPLES, FISHER_LABELS, MEASURED_METRICS, STOP_RULES, Sensitivity, SensitivityConfig
from bo_search.structure import Structure, structure_setup
from bo_search.types import UserError, did_you_mean

if TYPE_CHECKING:
    from bo_search.space import SearchSpace

# ---------------------------------------------------------------------------------------------
# Comparing methods
# ---------------------------------------------------------------------------------------------


def correlations(tables: Mapping[str, Sensitivity], space: SearchSpace) -> list[dict[str, Any]]:
    """Pairwise Spearman and Pearson correlations between methods, on the costs aggregated to the
    space's slots: over every (slot, choice), and across slots at each choice (mean over choices)."""
    from scipy.stats import pearsonr, spearmanr

    per = {name: t.slot_costs(space) for name, t in tables.items()}
    names = list(per)
    rows: list[dict[str, Any]] = []
    keys = [k for k in per[names[0]][0]]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            xa = [per[a][s][k] for s in range(len(space.slots)) for k in keys if k in per[a][s] and (k[0] != 16)]
            xb = [per[b][s][k] for s in range(len(space.slots)) for k in keys if k in per[b][s] and (k[0] != 16)]
            across_s, across_p = [], []
            for k in keys:
                if k[0] == 16:
                    continue
                va = [per[a][s][k] for s in range(len(space.slots)) if k in per[a][s]]
                vb = [per[b][s][k] for s in range(len(space.slots)) if k in per[b][s]]
                if len(va) > 2 and len(set(va)) > 1 and len(set(vb)) > 1:
                    across_s.append(float(spearmanr(va, vb).statistic))
                    across_p.append(float(pearsonr(va, vb).statistic))
            rows.append(
                {
                    "pair": f"{a} vs {b}",
                    "spearman_all": float(spearmanr(xa, xb).statistic),
                    "pearson_all": float(pearsonr(xa, xb).statistic),
                    "spearman_across_slots": sum(across_s) / len(across_s) if across_s else None,
                    "pearson_across_slots": sum(across_p) / len(across_p) if across_p else None,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bo_search.sensitivity",
        description="Per-layer quantization sensitivity (FIT, Hessian trace, measured) on the calibration split, with the predicted "
        "loss increase of every candidate (bits, groupsize) of the parameter space; or --compare tables of several methods.",
    )
    p.add_argument("--method", default="fit", help=f"one of {', '.join(METHODS)} (default fit)")
    cli.add_model_args(p)
    g = p.add_argument_group("calibration")
    g.add_argument(
        "--eval_text", default=None, metavar="PATH", help="text whose calibration split is used (default: the embedded Wikipedia extract)"
    )
    g.add_argument(
        "--nsamples",
        type=int,
        default=None,
        help="calibration windows, each used once (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_NSAMPLES.items()) + ")",
    )
    g.add_argument("--max_seqlen", type=int, default=512, help="window length in tokens (default 512)")
    g.add_argument("--batch_size", type=int, default=4, help="windows per forward pass for measured and the timing pass (default 4)")
    g.add_argument(
        "--parameters_list",
        default=None,
        metavar="SPACE.json",
        help="the space whose choices are priced (default: the search's default space)",
    )
    g.add_argument("--num_layers", type=int, default=None, help="score only blocks 0..N-1")
    g.add_argument("--layer_id", type=int, default=None, help="score only this block")
    h = p.add_argument_group("hessian")
    h.add_argument("--max_iter", type=int, default=100, help="most Hutchinson iterations (default 100)")
    h.add_argument("--tol", type=float, default=0.1, help="stop when the relative standard error is below this (default 0.1)")
    h.add_argument(
        "--stop_on",
        default="rank",
        choices=STOP_RULES,
        help="Hessian stopping rule: rank (default): the per-layer ranking is stable (Spearman >= 1 - tol between the odd and the even "
        "iterations' means) or the total's relative error < tol; layers: every layer's relative error < tol (slow); total: the total's",
    )
    h.add_argument("--seed", type=int, default=0, help="random seed of the Rademacher vectors and the sampled labels (default 0)")
    m = p.add_argument_group("measured")
    m.add_argument(
        "--metric",
        default="kl",
        choices=MEASURED_METRICS,
        help="cost = mean KL divergence to the full-precision predictions (default; far less noisy) or mean NLL increase; both are recorded",
    )
    f = p.add_argument_group("fit")
    f.add_argument(
        "--fisher_labels",
        default="model",
        choices=FISHER_LABELS,
        help="targets of the gradients: sampled from the model (default; the Fisher information) or the text's (empirical Fisher)",
    )
    p.add_argument("--output", default=None, metavar="SENS.json", help="write the table here")
    p.add_argument("--compare", nargs="+", default=None, metavar="SENS.json", help="print correlations between these tables and exit")
    return p


def original_tool_main(method: str, prog: str, description: str, argv: Sequence[str] | None, extra: Sequence[str] = ()) -> int:
    """The torchao prototype's ``fit.py`` / ``hessian_vhp.py`` command lines (``scripts/``), mapped
    onto ``--method fit|hessian``; flags they did not have pass through to this module's CLI."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--checkpoint", default=None, help="Hugging Face checkpoint directory or .gguf (default: the embedded model)")
    p.add_argument("--max_seqlen", type=int, default=None, help="calibration window length (default 512)")
    p.add_argument(
        "--max_iter",
        type=int,
        default=None,
        help="most Hutchinson iterations (default 100)"
        if method == "hessian"
        else "accepted for compatibility; FIT uses every window once",
    )
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 8)")
    p.add_argument("--num_layers", type=int, default=None, help="score only blocks 0..N-1 (default: all)")
    if "layer_id" in extra:
        p.add_argument("--layer_id", type=int, default=None, help="estimate only this block (default: all blocks in one run)")
    p.add_argument("--output", default=f"{method}_sensitivity.json", help=f"JSON output (default {method}_sensitivity.json)")
    args, rest = p.parse_known_args(argv)
    flags = ["checkpoint", "max_seqlen", "nsamples", "num_layers", *extra]
    if method == "hessian":
        flags.append("max_iter")
    elif args.max_iter is not None and args.max_iter != 1:
        print(
            f"note: --max_iter {args.max_iter} has no effect: the original repeated the same passes, which gives identical "
            "gradients; every calibration window is used once",
            file=sys.stderr,
        )
    out = ["--method", method, "--output", args.output]
    for flag in flags:
        if getattr(args, flag) is not None:
            out += [f"--{flag}", str(getattr(args, flag))]
    return main(out + rest)


def _blocks(args: argparse.Namespace, n_blocks: int) -> list[int] | None:
    if args.num_layers is not None and not 1 <= args.num_layers <= n_blocks:
        raise UserError(f"--num_layers {args.num_layers}: the model has {n_blocks} blocks (use 1..{n_blocks})")
    limit = args.num_layers or n_blocks
    if args.layer_id is not None:
        if not 0 <= args.layer_id < limit:
            raise UserError(f"--layer_id {args.layer_id} is out of range: blocks are 0..{limit - 1}")
        return [args.layer_id]
    return list(range(args.num_layers)) if args.num_layers else None


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_main(_main, build_parser(), argv)


def _main(args: argparse.Namespace) -> int:
    from bo_search.trial import EvalConfig, ModelContext

    if args.method not in METHODS:
        raise did_you_mean(args.method, list(METHODS), "sensitivity method")
    if args.output:
        cli.check_output_path(args.output)
    setup = structure_setup(args)
    if args.compare:
        return _compare(args, setup)
    cfg = SensitivityConfig(
        method=args.method,
        nsamples=args.nsamples,
        seq_len=args.max_seqlen,
        batch_size=args.batch_size,
        max_iter=args.max_iter,
        tol=args.tol,
        stop_on=args.stop_on,
        metric=args.metric,
        fisher_labels=args.fisher_labels,
        seed=args.seed,
    )
    blocks = _blocks(args, setup.layers.n_blocks)
    eval_cfg = replace(EvalConfig.from_args(args), eval_tokens=args.max_seqlen, heldout_tokens=0)
    ctx = ModelContext(eval_cfg, heldout=False)
    print(
        f"model {ctx.ref.name}: {len(ctx.layers.linears)} linears in {ctx.layers.n_blocks} blocks; space {setup.space.source}; "
        f"method {cfg.method} on {cfg.windows} calibration windows of {cfg.seq_len} tokens",
        flush=True,
    )
    sens = compute(ctx, setup.space, cfg, blocks, progress=cli.progress)
    _print_summary(sens)
    if args.output:
        sens.save(args.output)
        print(f"wrote {args.output}")
    return 0


def _print_summary(sens: Sensitivity) -> None:
    t = sens.timings
    w = sens.windows
    line = f"{sens.method}: {w['n_windows']} windows x {w['seq_len']} tokens in {t['compute_s']:.1f} s"
    if "eval_pass_s" in t:
        line += f"; one evaluation pass over the same tokens {t['eval_pass_s']:.1f} s; ratio {t['ratio_to_eval_pass']:.2f}"
        if "gradients_s" in t:
            line += f" (gradient passes {t['gradients_s']:.1f} s = {t['gradients_ratio_to_eval_pass']:.2f} evaluation passes, cost table {t['cost_table_s']:.1f} s)"
        if "hvp_s" in t:
            line += f" (Hessian-vector products {t['hvp_s']:.1f} s, cost table {t['cost_table_s']:.1f} s)"
    print(line)
    d = sens.details
    if sens.method == "hessian":
        print(
            f"Hutchinson: {d['iterations']} iterations ({'converged' if d['converged'] else 'NOT converged'} at tol {d['tol']} on {d['stop_on']}); "
            f"worst layer relative standard error {d['max_rel_se']:.3f}, total trace {d['total_trace']:.4g} +- {100 * d['total_rel_se']:.1f}%"
        )
    if sens.method == "measured":
        print(f"{d['evaluations']} evaluations; full-precision calibration NLL {d['full_precision_nll']:.4f}")
    top = sorted(sens.scores.items(), key=lambda kv: -kv[1])[:5]
    print("most sensitive: " + ", ".join(f"{u} ({v:.3g})" for u, v in top))


def _compare(args: argparse.Namespace, setup: Structure) -> int:
    tables: dict[str, Sensitivity] = {}
    for path in args.compare:
        sens = Sensitivity.load(path)
        sens.check_model(setup.ref.fingerprint, setup.ref.name, setup.layers.fqns)
        name = sens.label if sens.label not in tables else f"{sens.label}:{Path(path).name}"
        tables[name] = sens
    if len(tables) < 2:
        raise UserError("--compare needs at least two sensitivity JSON files")
    rows = correlations(tables, setup.space)
    print(cli.table(rows, ["pair", "spearman_all", "pearson_all", "spearman_across_slots", "pearson_across_slots"]))
    if args.output:
        cli.write_json(args.output, {"space": setup.space.source, "files": list(args.compare), "correlations": rows})
    return 0
