"""Evaluator speed on the embedded model: tokens/s of the built-in perplexity path, and its time
relative to bare ``model(input_ids)`` forwards over the same windows (goal: at most 5% more).

    python scripts/bench_eval.py [--eval_tokens 2048] [--repeats 3]
"""

import argparse
import statistics
import time

import torch

from bo_search.metrics import perplexity
from bo_search.trial import EvalConfig, ModelContext


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--eval_tokens", type=int, default=2048)
    p.add_argument("--max_seqlen", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    ctx = ModelContext(EvalConfig(checkpoint=args.checkpoint, eval_tokens=args.eval_tokens, max_seqlen=args.max_seqlen, heldout_tokens=0))
    w = ctx.search_windows

    @torch.inference_mode()
    def bare() -> None:
        for s in range(0, w.ids.shape[0], args.batch_size):
            ctx.model(input_ids=w.ids[s : s + args.batch_size, :-1], use_cache=False)  # as the measured path: no KV cache

    def ours() -> None:
        perplexity(ctx.model, w, args.batch_size)

    bare()  # warm-up
    t_bare, t_ours = [], []
    for _ in range(args.repeats):  # interleaved so drift affects both alike
        t0 = time.perf_counter()
        bare()
        t_bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ours()
        t_ours.append(time.perf_counter() - t0)
    mb, mo = statistics.median(t_bare), statistics.median(t_ours)
    print(f"threads {torch.get_num_threads()}, {w.n_tokens} tokens in {w.ids.shape[0]} windows of {w.seq_len}, batch {args.batch_size}")
    print(f"bare forward   : median {mb:.3f} s  ({w.n_tokens / mb:.0f} tok/s, {1000 * mb / w.n_tokens:.2f} ms/token)")
    print(f"perplexity path: median {mo:.3f} s  ({w.n_tokens / mo:.0f} tok/s)")
    print(f"overhead over bare forwards: {100 * (mo / mb - 1):+.1f}%")


if __name__ == "__main__":
    main()
