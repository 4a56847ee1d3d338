"""Perplexity (a fast built-in path and an lm_eval path that agree), and the ``evaluate`` CLI.

``python -m bo_search.evaluate`` prints, for each configuration, its exact size, average bits per
quantized weight and perplexity on the search and held-out splits, and writes the same as JSON.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bo_search.data import Windows
from bo_search.types import Perplexity, UserError

log = logging.getLogger(__name__)


@torch.inference_mode()
def window_nll(model: Any, windows: Windows, batch_size: int = 4) -> torch.Tensor:
    """Summed next-token NLL (nats) of each window's ``seq_len`` scored tokens, float64 per window."""
    device = next(model.parameters()).device
    ids = windows.ids
    sums = torch.empty(ids.shape[0], dtype=torch.float64)
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits
        nll = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
        sums[start : start + batch.shape[0]] = nll.view(batch.shape[0], -1).sum(dim=1).double().cpu()
    return sums


def perplexity(model: Any, windows: Windows, batch_size: int = 4) -> Perplexity:
    """Token-level perplexity over fixed windows, with the standard error of the mean NLL across windows."""
    sums = window_nll(model, windows, batch_size)
    per_window = sums / windows.seq_len
    n = per_window.numel()
    nll = float(per_window.mean())
    sem = float(per_window.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    return Perplexity.from_nll(nll, sem, windows.n_tokens, n)


# ---------------------------------------------------------------------------------------------
# lm_eval path
# ---------------------------------------------------------------------------------------------

LOCAL_TASK = "bo_search_text"


def windows_as_documents(tok: Any, windows: Windows) -> list[str]:
    return [tok.decode(row[1:].tolist()) for row in windows.ids]


def _hflm(model: Any, tok: Any, max_length: int, batch_size: int = 1) -> Any:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length)


def lm_eval_token_perplexity(model: Any, tok: Any, windows: Windows) -> dict[str, float]:
    """Token and word perplexity of the windows' text through lm_eval's rolling log-likelihood."""
    from lm_eval.api.instance import Instance

    docs = windows_as_documents(tok, windows)
    lm = _hflm(model, tok, max_length=windows.seq_len + 1)
    reqs = [Instance(request_type="loglikelihood_rolling", doc={"page": d}, arguments=(d,), idx=i) for i, d in enumerate(docs)]
    lls = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    n_tok = sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs)
    n_words = sum(len(d.split()) for d in docs)
    total = -float(sum(lls))
    return {"token_perplexity": math.exp(total / n_tok), "word_perplexity": math.exp(total / n_words), "tokens": n_tok}


def _write_local_task(tok: Any, windows: Windows) -> Path:
    """A lm_eval task over the windows' text (same YAML shape as lm_eval's wikitext, no hub access)."""
    from bo_search.model import cache_dir

    folder = (
        cache_dir()
        / "lm_eval_tasks"
        / f"{windows.split}-{windows.ids.shape[0]}x{windows.seq_len}-{abs(hash(windows.ids.numpy().tobytes())) % 10**12}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"page": d}) + "\n" for d in windows_as_documents(tok, windows)), encoding="utf-8")
    (folder / f"{LOCAL_TASK}.yaml").write_text(
        f"""task: {LOCAL_TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data.resolve()))}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
        encoding="utf-8",
    )
    return folder


def lm_eval_tasks(model: Any, tok: Any, tasks: Sequence[str], windows: Windows, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Run lm_eval tasks by name. ``bo_search_text`` is the local task over ``windows``; other names
    must be lm_eval tasks whose data is available locally."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    folder = _write_local_task(tok, windows)
    others = [t for t in tasks if t != LOCAL_TASK]
    tm = TaskManager(include_path=str(folder), include_defaults=bool(others))
    known = set(tm.all_tasks)
    for t in tasks:
        if t not in known:
            hint = difflib.get_close_matches(t, sorted(known), n=3)
            raise UserError(
                f"unknown lm_eval task {t!r}" + (f"; did you mean {', '.join(hint)}?" if hint else f"; the local task is {LOCAL_TASK!r}")
            )
    lm = _hflm(model, tok, max_length=windows.seq_len + 1)
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, log_samples=False, verbosity="WARNING")
    except (ConnectionError, OSError) as err:
        raise UserError(f"lm_eval task data is not available offline: {err}") from err
    results: dict[str, dict[str, float]] = {}
    for name, metrics in (out or {}).get("results", {}).items():
        results[name] = {k.split(",")[0]: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
    return results


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

DEFAULT_UNIFORM = ("fp", "8:64", "4:32", "4:64", "3:64", "2:64")


def build_parser() -> argparse.ArgumentParser:
    from bo_search import cli

    p = argparse.ArgumentParser(
        prog="python -m bo_search.evaluate",
        description="Measure the exact size and the perplexity of quantization configurations. "
        "With no --config/--uniform/--sample, evaluates full precision and uniform 8, 4, 3 and 2-bit plans.",
    )
    cli.add_model_args(p)
    cli.add_eval_args(p)
    g = p.add_argument_group("configurations (any mix; each is one row of the table)")
    g.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="PLAN.json",
        help="a plan JSON written by a search (HISTORY.best_plan.json) or by bo_search.report (HISTORY_report/export_trial_N/plan.json)",
    )
    g.add_argument(
        "--uniform",
        nargs="+",
        default=[],
        metavar="BITS:GROUPSIZE",
        help="uniform plans, e.g. 8:64 4:32 3:64; 'fp' (or 16) for full precision; groupsize -1 = per channel; add ':sym' for symmetric",
    )
    g.add_argument("--parameters_list", metavar="SPACE.json", help="parameter space used to decode --sample")
    g.add_argument(
        "--initial_samples",
        metavar="SAMPLES.json",
        help="seed-format samples file for --sample (default: the file named by the space, if any)",
    )
    g.add_argument(
        "--sample",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="evaluate initial sample N (0-based) decoded through --parameters_list",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=[],
        metavar="TASK",
        help=f"also run lm_eval tasks: {LOCAL_TASK!r} (the search windows' text, word/byte perplexity) or any task whose data is local",
    )
    p.add_argument("--output", metavar="RESULTS.json", help="write the table as JSON (keys model_size_gb, avg_bits, ppl, ppl_heldout, ...)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from bo_search import cli

    return cli.run_main(_main, build_parser(), argv)


def _main(args: argparse.Namespace) -> int:
    from bo_search import cli
    from bo_search.trial import ModelContext

    if args.output:
        cli.check_output_path(args.output)
    ctx = ModelContext.from_args(args, heldout=args.heldout_tokens > 0)
    configs = cli.collect_plans(args, ctx)
    rows = []
    print(
        f"model {ctx.ref.name}: {len(ctx.layers.linears)} quantizable linears in {ctx.layers.n_blocks} blocks; "
        f"search split {ctx.search_windows.n_tokens} tokens, held-out {ctx.heldout_windows.n_tokens if ctx.heldout_windows else 0} tokens",
        flush=True,
    )
    for label, plan in cli.progress(configs, desc="configs"):
        t0 = time.perf_counter()
        row = ctx.measure(plan, heldout=ctx.heldout_windows is not None)
        if args.tasks:
            ctx.applier.apply(plan)
            row["lm_eval"] = lm_eval_tasks(ctx.model, ctx.tok, args.tasks, ctx.search_windows)
            ctx.applier.restore()
        row = {"config": label, **row, "seconds": round(time.perf_counter() - t0, 2)}
        rows.append(row)
    print(cli.table(rows, ["config", "model_size_gb", "avg_bits", "ppl", "ppl_heldout", "seconds"]))
    for row in rows:
        for task, metrics in row.get("lm_eval", {}).items():
            print(f"  {row['config']}  lm_eval {task}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    if args.output:
        out = {"checkpoint": ctx.ref.name, "eval": ctx.eval_description(), "results": rows}
        cli.write_json(args.output, out)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
