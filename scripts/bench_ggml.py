"""The ggml scheme on the embedded model: apply/restore cost, and uniform llama.cpp types.

Prints (1) the time to apply a random per-block ggml plan in place (every layer rewritten, and a
next trial that changes a third of the blocks) and to restore, as a share of one evaluation of
``--eval_tokens`` tokens; (2) for each uniform type: its exact size (the tensors of the GGUF the
export writes: planned linears in the type, everything else as the source GGUF stores it) and its
perplexity on the search and held-out splits.

    python scripts/bench_ggml.py [--eval_tokens 2048] [--heldout_tokens 4096] [--types Q4_0,Q4_K,...]
"""

import argparse
import dataclasses
import random

from bench_quant import timed  # scripts/ is on sys.path when a script runs

from bo_search.gguf_file import ggml_other_bits
from bo_search.metrics import perplexity
from bo_search.sizes import SizeModel
from bo_search.trial import EvalConfig, ModelContext
from bo_search.types import GGML_TYPE_NAMES, LayerQuant, QuantPlan, ggml_effective_type


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval_tokens", type=int, default=2048)
    p.add_argument("--heldout_tokens", type=int, default=4096)
    p.add_argument("--types", default=",".join(GGML_TYPE_NAMES))
    p.add_argument("--skip_timing", action="store_true")
    p.add_argument("--skip_uniform", action="store_true")
    args = p.parse_args()
    cfg = dataclasses.replace(EvalConfig(eval_tokens=args.eval_tokens, heldout_tokens=args.heldout_tokens), ggml_sizes=True)
    ctx = ModelContext(cfg)
    layers, ap = ctx.layers, ctx.applier
    sm = SizeModel(ctx.model, layers, ctx.scheme, ctx.ref.storage_dtype, stored_other_bits=ggml_other_bits(True, ctx.ref, layers))
    if not args.skip_timing:
        rng = random.Random(0)
        choices = [LayerQuant.of_ggml(n) for n in GGML_TYPE_NAMES]
        blocks = [rng.choice(choices) for _ in range(layers.n_blocks)]
        plan_a = QuantPlan({li.fqn: blocks[li.block] for li in layers.linears})
        for b in rng.sample(range(layers.n_blocks), layers.n_blocks // 3):
            blocks[b] = rng.choice(choices)
        plan_b = QuantPlan({li.fqn: blocks[li.block] for li in layers.linears})
        t_eval = timed(lambda: perplexity(ctx.model, ctx.search_windows, ctx.cfg.batch_size))

        def full():
            ap.restore()
            ap.apply(plan_a)

        t_full = timed(full)  # restore() has nothing to undo after the first call's restore below
        t_restore = timed(lambda: (ap.apply(plan_a), ap.restore())) - t_full
        ap.apply(plan_a)

        def step():
            ap.apply(plan_b)
            ap.apply(plan_a)

        t_step = timed(step) / 2
        ap.restore()
        print(f"one evaluation of {ctx.search_windows.n_tokens} tokens: {t_eval:.2f} s (torch threads: default)")
        print(f"apply a random ggml plan, every layer rewritten: {t_full:.3f} s ({100 * t_full / t_eval:.1f}% of an evaluation)")
        print(f"apply, a third of the blocks new: {t_step:.3f} s ({100 * t_step / t_eval:.1f}%)")
        print(f"restore every layer: {t_restore:.3f} s ({100 * t_restore / t_eval:.1f}%)")
    if args.skip_uniform:
        return
    print("| type | bits/weight | size GB | search ppl | held-out ppl |")
    print("|---|---|---|---|---|")
    for name in args.types.split(","):
        plan = QuantPlan.uniform(layers.fqns, LayerQuant.of_ggml(name))
        eff = {li.fqn: ggml_effective_type(name, li.in_features) for li in layers.linears}
        bpw = 8 * sm.report(plan).quantized_weight_bits / 8 / sum(li.numel for li in layers.linears)
        ap.apply(plan)
        s = perplexity(ctx.model, ctx.search_windows, ctx.cfg.batch_size).ppl
        h = perplexity(ctx.model, ctx.heldout_windows, ctx.cfg.batch_size).ppl
        ap.restore()
        note = "" if set(eff.values()) == {name} else f" ({sum(v != name for v in eff.values())} linears fall back)"
        print(f"| {name}{note} | {bpw:.3f} | {sm.gb(plan):.6f} | {s:.3f} | {h:.3f} |", flush=True)


if __name__ == "__main__":
    main()
