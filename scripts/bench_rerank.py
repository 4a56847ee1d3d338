"""Does choosing the final plan on more tokens fix the search's overfitting to its search windows?

For each history: take the K best feasible completed trials by search-split perplexity, measure each
on R further tokens of the search split that do not overlap the search windows, and on the held-out
split. Prints, per history, the plan the search picked and the plan the re-ranking picks, with their
held-out perplexity, and the best seed's.

    .venv/bin/python scripts/bench_rerank.py docs/bench/b425/ts_seeded_s0_w1.csv docs/bench/b425/ts_seeded_s1_w1.csv \\
        --eval_tokens 1024 --rerank_tokens 4096 --heldout_tokens 2048 --top 5

``--measure HISTORY:TRIAL ...`` instead measures just those trials on ``--heldout_tokens`` held-out tokens.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from bo_search.data import Corpus, Windows, make_windows, prefix_token_id, token_stream


def rerank_windows(tok: Any, corpus: Corpus, search: Windows, n_tokens: int) -> Windows:
    """About ``n_tokens`` scored tokens in windows of the search split that overlap no search window."""
    seq = search.seq_len
    taken = set(search.starts)  # windows start on multiples of seq_len: overlapping means the same start
    stream = token_stream(tok, corpus, search.split)
    # ask for enough windows that the ones left after dropping overlaps still cover n_tokens
    want = n_tokens + (len(taken) + 1) * seq
    cand = make_windows(stream, want, seq, prefix_token_id(tok), search.split, corpus.name)
    keep = [i for i, s in enumerate(cand.starts) if s not in taken]
    keep = keep[: max(1, -(-n_tokens // seq))]
    return Windows(ids=cand.ids[torch.tensor(keep)], split=search.split, starts=tuple(cand.starts[i] for i in keep))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("histories", nargs="*")
    p.add_argument("--measure", nargs="+", default=None, metavar="HISTORY:TRIAL", help="held-out perplexity of these trials only")
    p.add_argument("--eval_tokens", type=int, default=1024, help="search tokens the histories were searched on")
    p.add_argument("--rerank_tokens", type=int, default=4096)
    p.add_argument("--heldout_tokens", type=int, default=2048)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from bo_search.metrics import perplexity
    from bo_search.search.history import read_history
    from bo_search.trial import EvalConfig, ModelContext

    ctx = ModelContext(EvalConfig(eval_tokens=a.eval_tokens, heldout_tokens=a.heldout_tokens, max_seqlen=512))
    if a.measure:
        for spec in a.measure:
            path, trial = spec.rsplit(":", 1)
            row = next(x for x in read_history(path).rows if x.trial_index == int(trial))
            ctx.applier.apply(row.plan)
            try:
                held = perplexity(ctx.model, ctx.heldout_windows, ctx.cfg.batch_size)
            finally:
                ctx.applier.restore()
            print(
                f"{spec} ({row.source}): held-out {held.ppl:.3f} on {held.n_tokens} tokens (sem of mean nll {held.nll_sem:.4f})", flush=True
            )
        return
    rr = rerank_windows(ctx.tok, ctx.corpus, ctx.search_windows, a.rerank_tokens)
    print(f"re-rank windows: {rr.ids.shape[0]} x {rr.seq_len} tokens, disjoint from the {ctx.search_windows.ids.shape[0]} search windows")
    cache: dict[str, tuple[float, float]] = {}
    out = []
    for path in a.histories:
        h = read_history(path)
        rows = [
            r
            for r in h.rows
            if r.status == "completed"
            and r.cal_PPL is not None
            and r.model_size is not None
            and r.limit is not None
            and r.model_size <= r.limit
        ]
        rows.sort(key=lambda r: r.cal_PPL)
        finalists = rows[: a.top]
        seeds = [r for r in rows if r.source == "seed"]
        if seeds and seeds[0] not in finalists:
            finalists.append(seeds[0])  # the best seed, for the comparison
        res = []
        for r in finalists:
            key = r.plan.dumps()
            if key not in cache:
                t0 = time.perf_counter()
                ctx.applier.apply(r.plan)
                try:
                    rr_ppl = perplexity(ctx.model, rr, ctx.cfg.batch_size).ppl
                    held = perplexity(ctx.model, ctx.heldout_windows, ctx.cfg.batch_size).ppl
                finally:
                    ctx.applier.restore()
                cache[key] = (rr_ppl, held)
                print(
                    f"  {path} trial {r.trial_index} ({r.source}): search {r.cal_PPL:.3f} re-rank {rr_ppl:.3f} held-out {held:.3f} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
            res.append({"trial": r.trial_index, "source": r.source, "search": r.cal_PPL, "rerank": cache[key][0], "heldout": cache[key][1]})
        top = [x for x in res if x["trial"] in {r.trial_index for r in rows[: a.top]}]
        by_search = min(top, key=lambda x: x["search"])
        by_rerank = min(top, key=lambda x: x["rerank"])
        own = [x for x in top if x["source"] != "seed"]
        best_seed = next((x for x in res if x["source"] == "seed"), None)
        own_rr = min(own, key=lambda x: x["rerank"]) if own else None
        line = (
            f"{path}: picked by search split trial {by_search['trial']} ({by_search['source']}) held-out {by_search['heldout']:.3f}; "
            f"by re-rank trial {by_rerank['trial']} ({by_rerank['source']}) held-out {by_rerank['heldout']:.3f}"
        )
        if own_rr and best_seed:
            line += f"; best own proposal by re-rank {own_rr['heldout']:.3f} vs best seed {best_seed['heldout']:.3f}"
        print(line, flush=True)
        out.append(
            {
                "history": path,
                "finalists": res,
                "by_search": by_search,
                "by_rerank": by_rerank,
                "own_by_rerank": own_rr,
                "best_seed": best_seed,
            }
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
