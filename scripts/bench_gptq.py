"""GPTQ's regulariser and variants on one model: every block linear at a uniform setting, scored on
the validation split (what the product's damping choice sees) and on the test split (held out).

    python scripts/bench_gptq.py --out runs/gptq/smollm2_base.json                      # damping sweep, 3/4 bits x g64/g32
    python scripts/bench_gptq.py --variant act_order --damps 1,10,100 --out runs/gptq/act.json
    python scripts/bench_gptq.py --variant mean --damps 1,10,100 --out runs/gptq/mean.json
    python scripts/bench_gptq.py --sequential --damps 1,100 --settings 3:64 --out runs/gptq/seq.json
    python scripts/bench_gptq.py --checkpoint MODEL.gguf --settings 3:64,4:64 --out runs/gptq/other.json
    python scripts/bench_gptq.py --choice --out runs/gptq/choice.json                   # the product's choice, timed

Hessians come from the calibration split (``--gptq_tokens``), cached as the product caches them.
Variants: ``base`` (columns in order, groups fixed when they start), ``act_order`` (columns by
decreasing Hessian diagonal, groups fixed from the original weights), ``mean`` (the regulariser
keeps the input mean: ``H + damp * (mean(diag H) I + mu mu^T)``). ``--sequential``: each block's
Hessians from inputs that went through the already-quantized blocks before it (codes then depend on
upstream choices and cannot be cached per layer; measured here only). Writes JSON rows and prints a
table; ``damp`` inf is plain rounding.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from bo_search import gptq
from bo_search.cli import parse_uniform
from bo_search.data import split_windows
from bo_search.metrics import perplexity
from bo_search.trial import EvalConfig, ModelContext
from bo_search.types import LayerQuant


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--eval_text", default=None)
    p.add_argument("--settings", default="3:64,4:64,3:32,4:32", help="uniform settings BITS:GROUP, comma-separated")
    p.add_argument("--damps", default="0.01,0.1,1,10,30,100,300,1000,inf", help="damping values (times mean diag H); inf = plain rounding")
    p.add_argument("--variant", default="base", choices=["base", "act_order", "mean"])
    p.add_argument("--sequential", action="store_true")
    p.add_argument("--choice", action="store_true", help="run the product's damping choice (as a gptq search would) and time it")
    p.add_argument(
        "--apply_cost",
        type=int,
        default=0,
        metavar="N",
        help="time PlanApplier.apply of N random plans of the embedded space with rtn and with the product's gptq (codes read "
        "from the cache the FIT sensitivity fills), against one evaluation of --eval_tokens",
    )
    p.add_argument("--eval_tokens", type=int, default=2048)
    p.add_argument("--gptq_tokens", type=int, default=8192)
    p.add_argument("--val_tokens", type=int, default=gptq.CHOICE_TOKENS)
    p.add_argument("--heldout_tokens", type=int, default=8192)
    p.add_argument("--max_seqlen", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4, help="windows per forward pass (2 for a 262k vocabulary)")
    p.add_argument("--out", required=True)
    return p.parse_args()


def apply_uniform(ctx: ModelContext, fake: Any, lq: LayerQuant) -> float:
    """Every planned linear at ``lq`` via ``fake(fqn, original, lq)``; returns the seconds it took."""
    modules = dict(ctx.model.named_modules())
    t0 = time.perf_counter()
    with torch.no_grad():
        for li in ctx.layers.linears:
            modules[li.fqn].weight.copy_(fake(li.fqn, ctx.applier.original(li.fqn), lq))
    return time.perf_counter() - t0


def restore(ctx: ModelContext) -> None:
    modules = dict(ctx.model.named_modules())
    with torch.no_grad():
        for li in ctx.layers.linears:
            modules[li.fqn].weight.copy_(ctx.applier.original(li.fqn))


@torch.no_grad()
def sequential_apply(ctx: ModelContext, windows: Any, reg: gptq.Regulariser, lq: LayerQuant) -> float:
    """Block by block: Hessians of block i from inputs through the quantized blocks before it (the
    forward pass stops after block i), then block i quantized. Returns seconds."""
    modules = dict(ctx.model.named_modules())
    t0 = time.perf_counter()
    for b in range(ctx.layers.n_blocks):
        lins = ctx.layers.in_block(b)
        hess = gptq.collect_hessians(
            ctx.model, [li.fqn for li in lins], windows.ids, ctx.cfg.batch_size, stop_after=f"{ctx.layers.blocks_fqn}.{b}"
        )
        q = gptq.GptqQuantizer(lambda h=hess: h, reg, None, ctx.scheme)
        for li in lins:
            modules[li.fqn].weight.copy_(q.fake_quantize(li.fqn, ctx.applier.original(li.fqn), lq))
    return time.perf_counter() - t0


def main() -> None:
    args = parse()
    torch.manual_seed(0)
    cfg = EvalConfig(checkpoint=args.checkpoint, eval_text=args.eval_text, eval_tokens=args.max_seqlen, heldout_tokens=args.heldout_tokens,
                     max_seqlen=args.max_seqlen, gptq_tokens=args.gptq_tokens, batch_size=args.batch_size)  # fmt: skip
    t0 = time.perf_counter()
    ctx = ModelContext(cfg)
    print(f"model {ctx.ref.name}: {len(ctx.layers.linears)} linears; loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    meta: dict[str, Any] = {"model": ctx.ref.name, "args": vars(args)}

    def save() -> None:
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")

    val = split_windows(ctx.tok, ctx.corpus, "validation", args.val_tokens, args.max_seqlen)
    held = ctx.heldout_windows
    assert held is not None
    t0 = time.perf_counter()
    fp_val = perplexity(ctx.model, val, cfg.batch_size)
    eval_s = time.perf_counter() - t0
    fp_test = perplexity(ctx.model, held, cfg.batch_size)
    meta.update(fp_val_ppl=fp_val.ppl, fp_test_ppl=fp_test.ppl, val_tokens=val.n_tokens, test_tokens=held.n_tokens, val_eval_s=eval_s)
    print(
        f"full precision: validation {fp_val.ppl:.3f} ({val.n_tokens} tokens, {eval_s:.1f} s), test {fp_test.ppl:.3f} ({held.n_tokens})",
        flush=True,
    )

    if args.apply_cost:
        meta["apply_cost"] = apply_cost(cfg, args)
        save()
        return

    if args.choice:  # the product path, from scratch for this cache: Hessians, then the damping choice
        t0 = time.perf_counter()
        gctx = ModelContext(EvalConfig(**{**cfg.to_dict(), "quantizer": "gptq"}), heldout=False)
        meta["choice"] = {**gctx.quantizer_description(), "wall_s": time.perf_counter() - t0, "calibration": _calibration(gctx)}
        print(f"product choice: {meta['choice']}", flush=True)
        save()
        return

    gcfg = gptq.GptqConfig(tokens=args.gptq_tokens, damp=1.0)
    t0 = time.perf_counter()
    cal = gptq.calibrate(ctx, gcfg)  # Hessians only (damping fixed): computed once, cached
    hess = gptq.Hessians.load(Path(cal.hessian_path))
    meta.update(hessian_tokens=hess.n_tokens, hessian_timings=cal.timings, hessians_wall_s=time.perf_counter() - t0)
    calib = split_windows(ctx.tok, ctx.corpus, "calibration", args.gptq_tokens, args.max_seqlen)
    for spec in args.settings.split(","):
        lq = parse_uniform(spec)
        for d in args.damps.split(","):
            damp = float(d)
            reg = gptq.Regulariser(damp, mean=args.variant == "mean", act_order=args.variant == "act_order")
            if args.sequential and not reg.is_rtn:
                quant_s = sequential_apply(ctx, calib, reg, lq)
            else:
                q = gptq.GptqQuantizer(lambda: hess, reg, None, ctx.scheme)
                quant_s = apply_uniform(ctx, q.fake_quantize, lq)
            try:
                v = perplexity(ctx.model, val, cfg.batch_size)
                t = perplexity(ctx.model, held, cfg.batch_size)
            finally:
                restore(ctx)
            row = {"setting": lq.label(), "variant": args.variant, "sequential": args.sequential, "damp": d, "val_ppl": v.ppl, "val_nll": v.nll,
                   "test_ppl": t.ppl, "test_ppl_sem": t.ppl_sem, "quantize_s": quant_s}  # fmt: skip
            rows.append(row)
            save()
            print(
                f"{lq.label():8s} {args.variant:9s} seq={int(args.sequential)} damp {d:>6s}: val {v.ppl:8.3f}  test {t.ppl:8.3f}  ({quant_s:.1f} s)",
                flush=True,
            )
    for setting in dict.fromkeys(r["setting"] for r in rows):
        rs = [r for r in rows if r["setting"] == setting]
        bv, bt = min(rs, key=lambda r: r["val_nll"]), min(rs, key=lambda r: r["test_ppl"])
        print(
            f"{setting}: validation picks damp {bv['damp']} (test {bv['test_ppl']:.3f}); test-best damp {bt['damp']} ({bt['test_ppl']:.3f})"
        )


def apply_cost(cfg: EvalConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Seconds to apply random plans (each from the previous one, as consecutive trials do; and from
    full precision), with each quantizer, against one evaluation of the search windows."""
    import random
    import statistics

    from bo_search.metrics import perplexity
    from bo_search.structure import resolve_space

    out: dict[str, Any] = {}
    for name in ("rtn", "gptq"):
        ctx = ModelContext(EvalConfig(**{**cfg.to_dict(), "quantizer": name, "eval_tokens": args.eval_tokens}), heldout=False)
        space = resolve_space(None, ctx.layers, ctx.ref)
        rng = random.Random(0)
        plans = [space.decode({p.name: rng.choice(p.values) for p in space.tunable}) for _ in range(args.apply_cost)]
        t0 = time.perf_counter()
        perplexity(ctx.model, ctx.search_windows, ctx.cfg.batch_size)
        eval_s = time.perf_counter() - t0
        steps, full = [], []
        for plan in plans:
            t0 = time.perf_counter()
            ctx.applier.apply(plan)  # from the previous plan
            steps.append(time.perf_counter() - t0)
        for plan in plans:
            ctx.applier.restore()
            t0 = time.perf_counter()
            ctx.applier.apply(plan)  # every layer rewritten
            full.append(time.perf_counter() - t0)
        ctx.applier.restore()
        q = ctx.applier.quantizer
        out[name] = {"eval_s": eval_s, "apply_next_s": statistics.mean(steps), "apply_all_s": statistics.mean(full),
                     "next_ratio": statistics.mean(steps) / eval_s, "all_ratio": statistics.mean(full) / eval_s,
                     "stats": dict(q.stats) if q is not None else None}  # fmt: skip
        print(f"{name}: {out[name]}", flush=True)
    return out


def _calibration(ctx: ModelContext) -> dict[str, Any]:
    cfg = gptq.GptqConfig(tokens=ctx.cfg.gptq_tokens)
    _key, meta, _h, _lock = gptq._paths(ctx.ref.fingerprint, ctx.corpus.fingerprint, ctx.cfg.max_seqlen, cfg, ctx.scheme, ctx.layers.fqns)
    return dict(json.loads(meta.read_text()))


if __name__ == "__main__":
    main()
