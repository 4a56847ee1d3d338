"""Plan application cost and MSE-clipping gain on the embedded model.

Prints (1) the time to apply a plan in place (every layer rewritten, and a typical next trial that
changes a third of the blocks) and to restore, relative to one search evaluation of the same
model; (2) perplexity of uniform 3-bit with plain min/max against MSE-optimal clipping.

    python scripts/bench_quant.py [--eval_tokens 2048] [--heldout_tokens 4096]
"""

import argparse
import random
import statistics
import time

from bo_search.metrics import perplexity
from bo_search.quant import PlanApplier, QuantScheme, uniform_plan
from bo_search.trial import EvalConfig, ModelContext
from bo_search.types import LayerQuant, QuantPlan


def timed(fn, repeats=3):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--eval_tokens", type=int, default=2048)
    p.add_argument("--heldout_tokens", type=int, default=4096)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group", type=int, default=64)
    args = p.parse_args()
    ctx = ModelContext(EvalConfig(checkpoint=args.checkpoint, eval_tokens=args.eval_tokens, heldout_tokens=args.heldout_tokens))
    layers, ap = ctx.layers, ctx.applier
    rng = random.Random(0)
    choices = [LayerQuant(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64, 192)]
    blocks = [rng.choice(choices) for _ in range(layers.n_blocks)]
    plan_a = QuantPlan({li.fqn: blocks[li.block] for li in layers.linears})
    for b in rng.sample(range(layers.n_blocks), layers.n_blocks // 3):
        blocks[b] = rng.choice(choices)
    plan_b = QuantPlan({li.fqn: blocks[li.block] for li in layers.linears})

    def full():
        ap.restore()
        ap.apply(plan_a)

    t_eval = timed(lambda: perplexity(ctx.model, ctx.search_windows, ctx.cfg.batch_size))
    t_full = timed(full) - timed(ap.restore)
    ap.restore()
    ap.apply(plan_a)

    def step():
        ap.apply(plan_b)
        ap.apply(plan_a)

    t_step = timed(step) / 2
    t_restore = timed(lambda: (ap.apply(plan_a), ap.restore()))
    ap.restore()
    n = sum(li.numel for li in layers.linears)
    print(f"{len(layers.linears)} linears, {n / 1e6:.1f} M weights; one evaluation of {ctx.search_windows.n_tokens} tokens: {t_eval:.2f} s")
    print(f"apply, every layer rewritten : {t_full:.3f} s  ({100 * t_full / t_eval:.1f}% of an evaluation)")
    print(f"apply, a third of blocks new : {t_step:.3f} s  ({100 * t_step / t_eval:.1f}% of an evaluation)")
    print(f"apply + restore              : {t_restore:.3f} s")

    plain_plan = uniform_plan(layers, LayerQuant(args.bits, args.group))
    rows = []
    for name, scheme in (("min/max", QuantScheme()), ("MSE clip", QuantScheme(mse_clip=True))):
        applier = PlanApplier(ctx.model, layers, scheme)
        applier.apply(plain_plan)
        s = perplexity(ctx.model, ctx.search_windows).ppl
        h = perplexity(ctx.model, ctx.heldout_windows).ppl
        applier.restore()
        rows.append((name, s, h))
        print(f"uniform {args.bits}-bit g{args.group}, {name:8s}: ppl {s:.2f} (search split), {h:.2f} (held-out)")
    print(f"MSE clipping changes held-out ppl by {rows[1][2] - rows[0][2]:+.2f} ({100 * (rows[1][2] / rows[0][2] - 1):+.1f}%)")


if __name__ == "__main__":
    main()
