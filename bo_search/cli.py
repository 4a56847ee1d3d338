"""Shared command-line plumbing: common flags, one-line errors, tables, progress bars."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bo_search.space import load_initial_samples, load_space
from bo_search.types import FULL_PRECISION, GGML_TYPES, LayerQuant, QuantPlan, UserError, read_text_utf8

if TYPE_CHECKING:
    from bo_search.trial import ModelContext

T = TypeVar("T")
log = logging.getLogger(__name__)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--checkpoint",
        default=None,
        help="local Hugging Face checkpoint directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda:0 when a GPU is visible, else cpu)")
    g.add_argument(
        "--include_lm_head",
        action="store_true",
        help="also quantize lm_head (untied from the embeddings if tied) in evaluate --uniform plans; searches refuse it, as their spaces set decoder blocks only. By default lm_head and embeddings stay unquantized",
    )
    g.add_argument(
        "--scale_dtype",
        default="float16",
        choices=["float16", "bfloat16", "float32"],
        help="dtype of the per-group scales, in the model and in the size (default float16)",
    )
    g.add_argument(
        "--zero_bits", type=int, default=16, choices=[8, 16, 32], help="bits counted per zero point of asymmetric groups (default 16)"
    )
    g.add_argument(
        "--mse_clip", action="store_true", help="choose each group's clip ratio to minimise ||W - Q(W)||^2 instead of plain min/max"
    )
    g.add_argument(
        "--quantizer",
        default="rtn",
        help="how the affine codes are chosen, in the same storage format: rtn (plain min/max rounding, default) or gptq (GPTQ "
        "error compensation, act-order, from calibration-split Hessians, its damping chosen per model on the validation split; "
        "computed once per model and text, about 5 minutes for the embedded model on 2 CPU cores, then cached; docs/quantizers.md)",
    )
    g.add_argument("--gptq_tokens", type=int, default=8192, help="calibration tokens of GPTQ's Hessians (default 8192)")
    g.add_argument(
        "--fp_dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="storage dtype counted for unquantized tensors (default: what the checkpoint stores: the safetensors headers of a "
        "Hugging Face directory, else its config.json dtype; 16-bit float16 for a GGUF source)",
    )


def add_eval_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation text")
    g.add_argument(
        "--eval_text",
        default=None,
        metavar="PATH",
        help='local .txt (documents separated by blank lines) or .jsonl ({"text": ...} per line); default: the embedded Wikipedia extract',
    )
    g.add_argument("--eval_tokens", type=int, default=2048, help="tokens of the search split scored per evaluation (default 2048)")
    g.add_argument(
        "--heldout_tokens", type=int, default=4096, help="tokens of the held-out test split for final numbers (default 4096; 0 = skip)"
    )
    g.add_argument("--max_seqlen", type=int, default=512, help="window length in tokens (default 512)")
    g.add_argument("--batch_size", type=int, default=4, help="windows per forward pass (default 4)")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device != "cpu":
        raise UserError(f"--device {device!r}: use cpu, cuda, cuda:N or auto")
    return device


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torchao", "torch._dynamo", "lm_eval", "datasets", "transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    logging.getLogger("bo_search").setLevel(logging.INFO if verbose else logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", module="torchao")
    warnings.filterwarnings("ignore", message=".*register_constant.*")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_main(fn: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, run, and turn a UserError into one line on stderr with exit status 2."""
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        check_finite(args)
        if hasattr(args, "device"):
            args.device = resolve_device(args.device)
        return fn(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def check_finite(args: argparse.Namespace) -> None:
    """Every number flag must be finite: ``nan`` passes every range check (all comparisons are
    false), ``inf`` is no limit or timeout anyone means."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{name} {value}: expected a finite number")


def check_output_path(path: str | Path) -> Path:
    """Create the parent directory of an output path (a user names new folders freely); a one-line
    error when it cannot be created. Returns the parent."""
    parent = Path(path).expanduser().resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write {path}: cannot create directory {parent} ({err.strerror or err})") from None
    return parent


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    p = Path(path)
    check_output_path(p)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable) + "\n", encoding="utf-8")
    os.replace(tmp, p)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "to_json"):
        return o.to_json()
    return str(o)


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, disable=None, dynamic_ncols=True, file=sys.stderr)


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.1f}"
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    cells = [[c for c in cols]] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |", "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |")
    return "\n".join(lines)


DEFAULT_UNIFORM = ("fp", "8:64", "4:32", "4:64", "3:64", "2:64")


def parse_uniform(spec: str) -> Any:
    """'4:64', '4:64:sym', 'fp' or '16' -> LayerQuant."""

    s = spec.strip().lower()
    if s in ("fp", "16", "full"):
        return FULL_PRECISION
    if s.upper() in GGML_TYPES:  # a llama.cpp tensor type, e.g. Q4_K
        return LayerQuant.of_ggml(s.upper())
    parts = s.split(":")
    try:
        bits = int(parts[0])
        gs = int(parts[1]) if len(parts) > 1 else -1
    except ValueError:
        raise UserError(f"--uniform {spec!r}: expected BITS:GROUPSIZE such as 4:64 (or 'fp')") from None
    sym = len(parts) > 2 and parts[2] == "sym"
    if len(parts) > 2 and parts[2] not in ("sym", "asym"):
        raise UserError(f"--uniform {spec!r}: the third field may only be 'sym' or 'asym'")
    return LayerQuant(bits, gs, sym)


def load_plan_file(path: str | Path) -> QuantPlan:
    """A plan JSON (``--config``): a one-line UserError when it is missing, not UTF-8 or not a plan."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config file not found: {p}")
    return QuantPlan.loads(read_text_utf8(p, "--config"))


def collect_plans(args: argparse.Namespace, ctx: ModelContext) -> list[tuple[str, Any]]:
    """The (label, plan) pairs named by --config / --uniform / --sample (default: the standard table)."""
    from bo_search.quant import uniform_plan

    plans: list[tuple[str, Any]] = []
    for path in args.config:
        plan = load_plan_file(path)
        ctx.applier.check(plan)
        plans.append((Path(path).name, plan))
    if args.sample:
        if not args.parameters_list:
            raise UserError("--sample needs --parameters_list SPACE.json")
        space = load_space(args.parameters_list, ctx.layers)
        samples_path = args.initial_samples or space.spec.get("initial_samples")
        if not samples_path:
            raise UserError("--sample needs --initial_samples SAMPLES.json")
        samples = load_initial_samples(samples_path, space)
        for n in args.sample:
            if not 0 <= n < len(samples):
                raise UserError(f"--sample {n}: {samples_path} holds samples 0..{len(samples) - 1}")
            plans.append((f"sample {n}", space.decode(samples[n])))
    specs = args.uniform or ([] if plans else list(DEFAULT_UNIFORM))
    for spec in specs:
        lq = parse_uniform(spec)
        plan = uniform_plan(ctx.layers, lq)
        ctx.applier.check(plan)
        plans.append(("full precision" if not lq.is_quantized else f"uniform {lq.label()}", plan))
    return plans
