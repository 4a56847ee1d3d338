"""Which search-split score ranks plans the way held-out perplexity does: NLL or KL to full precision?

Takes the best plans of recorded searches (per history: the ``--top`` best completed plans by the
recorded search score, plus every seed), and measures each plan on

- the search split (``--eval_tokens``, the search's default): mean NLL and KL(full precision || plan);
- the validation split (``--val_tokens``): the same two;
- the test split (``--heldout_tokens``, at least 16,384): perplexity, the number users are shown.

Prints per group of histories (one budget and space) the Spearman rank correlation of each score with
held-out perplexity over the same plans, and the held-out perplexity of the plan each score would
pick. KL is measured against the top-k coarsening of :mod:`bo_search.metrics` (``--kl_top_k``).

    .venv/bin/python scripts/bench_objective.py --group b425=docs/bench/b425/ts_seeded_s0_w1.csv,docs/bench/b425/ts_seeded_s1_w1.csv \\
        --group b375=docs/bench/b375_50_a/ts_seeded_s0_w1.csv --out runs/objective
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench_search import spearman  # scripts/ is on sys.path when a script runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", action="append", required=True, metavar="NAME=H1.csv,H2.csv")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--eval_tokens", type=int, default=2048)
    p.add_argument("--val_tokens", type=int, default=8192)
    p.add_argument("--heldout_tokens", type=int, default=16384)
    p.add_argument("--kl_top_k", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/objective")
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from bo_search.data import split_windows
    from bo_search.metrics import reference, score
    from bo_search.search.history import read_history
    from bo_search.trial import EvalConfig, ModelContext

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_path = out / "measured.json"
    cache: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    ctx = ModelContext(EvalConfig(eval_tokens=a.eval_tokens, heldout_tokens=a.heldout_tokens), heldout=True)
    val = split_windows(ctx.tok, ctx.corpus, "validation", a.val_tokens, ctx.cfg.max_seqlen)
    t0 = time.perf_counter()
    ref_s = reference(ctx.model, ctx.search_windows, 4, a.kl_top_k)
    ref_v = reference(ctx.model, val, 4, a.kl_top_k)
    print(f"references in {time.perf_counter() - t0:.0f} s", flush=True)
    summary: dict[str, Any] = {}
    for spec in a.group:
        name, files = spec.split("=", 1)
        plans: dict[str, Any] = {}
        for h in files.split(","):
            rows = [r for r in read_history(h).rows if r.status == "completed" and r.cal_PPL is not None]
            rows.sort(key=lambda r: r.cal_PPL)
            for r in rows[: a.top] + [r for r in rows if r.source == "seed"]:
                plans.setdefault(r.plan.dumps(), (r.plan, f"{Path(h).parent.name}/{Path(h).name}:{r.trial_index}:{r.source}"))
        results = []
        for key, (plan, label) in plans.items():
            if key not in cache:
                t1 = time.perf_counter()
                ctx.applier.apply(plan)
                try:
                    s = score(ctx.model, ctx.search_windows, 4, ref_s)
                    v = score(ctx.model, val, 4, ref_v)
                    held = score(ctx.model, ctx.heldout_windows, 4)
                finally:
                    ctx.applier.restore()
                cache[key] = {
                    "label": label,
                    "search_nll": s.perplexity.nll,
                    "search_kl": s.kl,
                    "search_delta_sem": s.delta_sem,
                    "search_kl_sem": s.kl_sem,
                    "val_nll": v.perplexity.nll,
                    "val_kl": v.kl,
                    "val_delta_sem": v.delta_sem,
                    "val_kl_sem": v.kl_sem,
                    "heldout_ppl": held.perplexity.ppl,
                    "heldout_nll_sem": held.perplexity.nll_sem,
                }
                cache_path.write_text(json.dumps(cache, indent=1))
                c = cache[key]
                print(
                    f"{name} {label}: search nll {c['search_nll']:.4f} kl {c['search_kl']:.4f}; val nll {c['val_nll']:.4f} "
                    f"kl {c['val_kl']:.4f}; held-out ppl {c['heldout_ppl']:.3f} ({time.perf_counter() - t1:.0f} s)",
                    flush=True,
                )
            results.append(cache[key])
        held = [r["heldout_ppl"] for r in results]
        line = {"plans": len(results), "best_heldout": min(held)}
        for score_name in ("search_nll", "search_kl", "val_nll", "val_kl"):
            vals = [r[score_name] for r in results]
            picked = min(results, key=lambda r: r[score_name])
            line[score_name] = {"spearman": spearman(vals, held), "picked_heldout": picked["heldout_ppl"], "picked": picked["label"]}
        summary[name] = line
        print(
            f"== {name}: {len(results)} plans; best held-out {min(held):.3f}; "
            + "; ".join(
                f"{k}: Spearman {line[k]['spearman']:+.3f}, its pick {line[k]['picked_heldout']:.3f}"
                for k in ("search_nll", "search_kl", "val_nll", "val_kl")
            ),
            flush=True,
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
