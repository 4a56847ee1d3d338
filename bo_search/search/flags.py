"""The flags shared by the three searches (``acc_modelsize``, ``acc_throughput``, ``pareto``)."""

from __future__ import annotations

import argparse

from bo_search import cli
from bo_search.search.finalists import DEFAULT_FINALISTS
from bo_search.search.strategies import DEFAULT_STRATEGY

#: the objective a size-limited search minimises by default (BENCHMARKS.md: the objective study)
DEFAULT_OBJECTIVE = "nll"


def add_search_args(p: argparse.ArgumentParser, default_history: str, default_seeds: str = "uniform") -> None:
    cli.add_model_args(p)
    cli.add_eval_args(p)
    g = p.add_argument_group("search")
    g.add_argument("--num_trials", type=int, default=20, help="evaluated trials in total, history included (default 20)")
    g.add_argument(
        "--parameters_list",
        default=None,
        metavar="SPACE.json",
        help="parameter space JSON (default: parameter_spaces/smollm2_135m_per_block.json for the embedded model, "
        "else one (bitwidth, groupsize) per block with bits {2,3,4,5,6,8})",
    )
    g.add_argument(
        "--initial_samples",
        default=default_seeds,
        metavar="SAMPLES.json|uniform|auto|none",
        help="seeds evaluated first: a seed-format JSON file; 'uniform': per group size, the widest uniform plan that "
        "fits and that plan with blocks upgraded (first and last first) to fill the budget; 'auto': FIT sensitivity on the "
        "calibration split (about a minute for the embedded model on 2 CPU cores, then cached), exact knapsack allocations at "
        "100/98/96%% of the budget, the greedy one, and the 2 budget-filling uniform seeds FIT predicts best; 'none': no seeds "
        f"(default {default_seeds})",
    )
    g.add_argument(
        "--history_output",
        "--output_file",
        dest="history_output",
        default=default_history,
        metavar="HISTORY.csv",
        help=f"CSV history, appended as trials end (default {default_history})",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="require an existing --history_output and continue it (an existing history is always continued)",
    )
    g.add_argument(
        "--change_limit",
        action="store_true",
        help="continue a history that was searched under another limit (each row records the limit it was written under)",
    )
    g.add_argument(
        "--change_compute_dtype",
        action="store_true",
        help="continue a history evaluated in another compute dtype (its perplexities differ slightly; each row records its "
        "dtype). Another --eval_text, --eval_tokens, --max_seqlen or --mse_clip, or other weights, is always refused",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed for Ax and the proposal strategy (default 0)")
    g.add_argument(
        "--max_failure_rate", type=float, default=0.5, help="stop when more than this fraction of evaluated trials failed (default 0.5)"
    )
    g.add_argument(
        "--best_plan_output", default=None, metavar="PLAN.json", help="where to write the best plan (default: HISTORY.best_plan.json)"
    )
    _add_worker_args(p)
    _add_strategy_args(p)


def add_selection_args(p: argparse.ArgumentParser) -> None:
    """What a size-limited search minimises, and how its final plan is chosen."""
    g = p.add_argument_group("objective and final choice")
    g.add_argument(
        "--objective",
        default=DEFAULT_OBJECTIVE,
        metavar="kl|nll",
        help="what each trial minimises on the search split (and the finalists on the validation split): nll (mean next-token "
        "NLL, i.e. log perplexity) or kl (KL divergence from the full-precision model's next-token distribution over its top "
        "256 tokens plus the rest: the damage alone). Both are recorded either way. Default nll: on the embedded model it "
        "ranked plans closer to their held-out perplexity than kl did (BENCHMARKS.md)",
    )
    g.add_argument(
        "--finalists",
        type=int,
        default=DEFAULT_FINALISTS,
        metavar="K",
        help=f"when the search ends, re-score the K best plans, the best seed and the best uniform plans on --val_tokens of the "
        "validation split and pick the best there; recorded in the history (status rescored), reused on resume. 0: pick on the "
        f"search split (default {DEFAULT_FINALISTS})",
    )
    g.add_argument(
        "--val_tokens",
        type=int,
        default=8192,
        help="validation-split tokens each finalist is re-scored on (default 8192: 16 windows of 512 spread over the split's articles)",
    )


def _add_worker_args(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workers")
    w.add_argument(
        "--gpus",
        default=None,
        metavar="all|N",
        help="one worker per GPU of the Ray cluster ('all') or N of them, wherever Ray places them; the driver needs no GPU. "
        "A worker lost with its node is replaced when the cluster has room again",
    )
    w.add_argument(
        "--gpu_list",
        "--gpu_lists",
        dest="gpu_list",
        default=None,
        metavar="0,1,...",
        help="single machine: one worker per listed local GPU index (use --gpus for a cluster)",
    )
    w.add_argument("--num_workers", type=int, default=1, help="CPU workers when no GPU is asked for (default 1)")
    w.add_argument(
        "--ray_address",
        default=None,
        metavar="HOST:PORT|auto",
        help="join an existing Ray cluster (its head's address, or 'auto' on a node of it) instead of starting a local loopback-only one",
    )
    w.add_argument(
        "--compute_dtype",
        default="auto",
        metavar="auto|float32|bfloat16|float16",
        help="dtype the workers hold and run the model in: auto (default) = bfloat16 on a GPU, float32 on CPU. "
        "Sizes never depend on it (they follow the checkpoint's storage dtype)",
    )
    w.add_argument(
        "--placement_timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="stop when no worker can be placed on the cluster for this many seconds (default 600)",
    )
    w.add_argument(
        "--trial_timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds a trial may run before it is recorded failed ('timeout') and its worker replaced (default: 10x the "
        "slowest of the first 3 trials, at least 300 s; 3600 s until they finish). Held-out evaluations get as long "
        "per held-out/search token ratio; a replacement worker that fails to start 3 times in a row stops the search",
    )
    w.add_argument(
        "--threads_per_worker",
        type=int,
        default=None,
        help="torch threads per worker (default: (cores - 1) / workers on CPU, leaving a core for Ax)",
    )


def _add_strategy_args(p: argparse.ArgumentParser) -> None:
    st = p.add_argument_group("proposal strategy")
    st.add_argument(
        "--strategy",
        default=DEFAULT_STRATEGY,
        help="thompson (default): a Bayesian per-slot loss model centred on the --prior table, corrected by every trial, "
        "sampled and solved exactly under the limit (every proposal fits; BENCHMARKS.md); gp: Ax's BoTorch GP "
        "(Sobol start, relaxed choices, over-limit proposals repaired)",
    )
    st.add_argument(
        "--prior",
        default="auto",
        metavar="auto|SENSITIVITY.json|none",
        help="the thompson prior: 'auto' (default): the table the seeds were allocated from (a seed file written by "
        "python -m bo_search.seed names it), else FIT on the calibration split (computed once, cached); a sensitivity JSON "
        "of this model and space (python -m bo_search.sensitivity); 'none': flat (learnt from trials alone)",
    )
    st.add_argument(
        "--ts_temper",
        type=float,
        default=0.25,
        help="thompson: posterior covariance multiplier of each draw, in (0, 1] (default 0.25; 1 = untempered)",
    )
    st.add_argument(
        "--ts_shared_sd",
        type=float,
        default=0.1,
        help="thompson: prior scale of the per-(bits, group) correction shared by all slots, relative to the table's "
        "(default 0.1; 1 = as before this option, 0 = no shared term). It overlaps the table term almost entirely and "
        "on per-linear spaces swamped it (BENCHMARKS.md)",
    )
    st.add_argument(
        "--ts_prior_sd",
        type=float,
        default=0.2,
        help="thompson: prior sd of a per-slot correction as a fraction of its table cost (default 0.2)",
    )
    a = p.add_argument_group("Ax / BoTorch (--strategy gp)")
    a.add_argument(
        "--encoding",
        default="relaxed",
        choices=["relaxed", "choice", "float"],
        help="relaxed (default): ordered choices optimised as a continuous relaxation, 1-3 s per proposal; choice: exact discrete "
        "local search (minutes per proposal above ~100 parameters); float: floats in [0,1] binned to choices",
    )
    a.add_argument(
        "--num_restarts", type=int, default=4, help="acquisition optimiser restarts (default 4; Ax's 20 costs minutes per proposal)"
    )
    a.add_argument("--raw_samples", type=int, default=256, help="acquisition optimiser raw samples (default 256)")
    a.add_argument("--n_sobol", type=int, default=4, help="quasi-random proposals after the seeds, before BO (default 4)")
