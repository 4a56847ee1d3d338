"""Every search flag checked before anything expensive starts (the model, FIT, Ray): a mistake is one
line and exit status 2 within a second, not after a minute of sensitivity or a Ray start."""

from __future__ import annotations

import argparse
from pathlib import Path

from bo_search.search.strategies import DEFAULT_STRATEGY, DriverConfig, check_strategy
from bo_search.types import UserError


def check_search_flags(args: argparse.Namespace) -> None:
    """The worker, strategy and timeout flags of the three searches (the budget flags are checked
    where the limit is computed, right after the structure is read; finite numbers by the CLI;
    ``--gpu_list`` by ``runner.parse_gpus``)."""
    from bo_search.search.workers import _check_address_reachable, parse_cluster_gpus

    if getattr(args, "num_workers", 1) < 1:
        raise UserError(f"--num_workers must be at least 1, got {args.num_workers}")
    threads = getattr(args, "threads_per_worker", None)
    if threads is not None and threads < 1:
        raise UserError(f"--threads_per_worker must be at least 1, got {threads}")
    timeout = getattr(args, "trial_timeout", None)
    if timeout is not None and timeout <= 0:
        raise UserError(f"--trial_timeout must be positive (seconds), got {timeout:g}; leave it out for the automatic one")
    cluster_gpus = parse_cluster_gpus(getattr(args, "gpus", None), getattr(args, "gpu_list", None))
    address = getattr(args, "ray_address", None)
    if cluster_gpus is not None and not address:
        _check_local_gpus(cluster_gpus)
    if address:
        _check_address_reachable(address)
    strategy = check_strategy(getattr(args, "strategy", DEFAULT_STRATEGY))
    if hasattr(args, "encoding"):
        DriverConfig(args.encoding, args.num_restarts, args.raw_samples, args.n_sobol, args.seed, strategy)
    if strategy == "thompson":
        from bo_search.search.thompson import ThompsonConfig

        ThompsonConfig(rel_sd=args.ts_prior_sd, temper=args.ts_temper)
        prior = getattr(args, "prior", "auto")
        if prior not in ("auto", "none") and not Path(prior).expanduser().is_file():
            raise UserError(f"--prior file not found: {prior} (give a sensitivity JSON, 'auto' or 'none')")


def _check_local_gpus(cluster_gpus: int | str) -> None:
    """``--gpus`` without ``--ray_address`` starts a local Ray, which counts this machine's GPUs."""
    import torch

    have = torch.cuda.device_count()
    if have == 0:
        raise UserError(
            f"--gpus {cluster_gpus}: the Ray cluster has no GPU (a local one, on this machine without a CUDA GPU); "
            "join a cluster with GPU nodes (--ray_address) or use --num_workers"
        )
    if cluster_gpus != "all" and int(cluster_gpus) > have:
        raise UserError(f"--gpus {cluster_gpus}: this machine has {have} GPU(s); ask for at most --gpus {have}, or --gpus all")
