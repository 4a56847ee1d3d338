"""llama.cpp on the embedded model: predicted against measured decode speed, and our searched plans
against llama.cpp's own presets at equal size. Every perplexity and tokens/s here is llama.cpp's.

    python scripts/bench_llamacpp.py speed   [--threads 1] [--out runs/llamacpp]
    python scripts/bench_llamacpp.py presets [--presets Q3_K_M,Q4_K_M,Q4_0,Q5_K_M] [--num_trials 16] [--out runs/llamacpp]
    python scripts/bench_llamacpp.py retime  [--rounds 3]    # every file of presets timed again, round-robin

``speed``: for uniform ggml types and a searched mixed plan, the decode tokens/s predicted from bytes
read per token (``throughput.BytesModel``, bandwidth measured once) against llama.cpp's measured
median (1 warm-up, 5 repeats of 64 tokens after a 64-token prompt, fixed threads).

``presets``: each preset is made from the source GGUF by ``llama_model_quantize`` (what
``llama-quantize SRC OUT PRESET`` does); then ``acc_modelsize`` searches a ggml space under that
preset's exact tensor bytes, ``report --gguf`` writes the best plan, and every file (presets, our
picks, the uniform types that fit) is measured in llama.cpp on the same held-out windows with its
decode speed. Timings are only figures on a quiet machine: run it alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bo_search import llamacpp
from bo_search.runtime import DecodeSpec, PlanWriter, measure_file, tensor_bytes
from bo_search.trial import EvalConfig, ModelContext
from bo_search.types import GGML_TYPE_NAMES, LayerQuant, QuantPlan

REPO = Path(__file__).resolve().parents[1]
NO_Q41 = REPO / "parameter_spaces" / "smollm2_135m_ggml_per_block_no_q4_1.json"
MIXED = REPO / "docs" / "bench" / "ggml_search_0093.csv"


def _ctx(eval_tokens: int, heldout_tokens: int, checkpoint: str | None = None) -> ModelContext:
    return ModelContext(EvalConfig(checkpoint=checkpoint, eval_tokens=eval_tokens, heldout_tokens=heldout_tokens, ggml_sizes=True))


def _row(label: str, m, extra: dict | None = None) -> dict:
    return {"config": label, **m.row(), **(extra or {})}


def speed(args: argparse.Namespace) -> None:
    from bo_search.throughput import BytesModel, measure_bandwidth

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _ctx(512, 0)
    bw = measure_bandwidth()
    model = BytesModel(ctx.model, ctx.size_model, bw)
    spec = DecodeSpec(prompt_tokens=64, new_tokens=64, repeats=5, warmup=1, threads=args.threads)
    plans = [(f"uniform {t}", QuantPlan.uniform(ctx.layers.fqns, LayerQuant.of_ggml(t))) for t in args.types.split(",")]
    if MIXED.is_file():
        from bo_search.search.history import read_history

        done = [r for r in read_history(MIXED).rows if r.status == "completed" and r.model_size <= 0.093]
        best = min(done, key=lambda r: r.cal_PPL)
        plans.append((f"searched mixed (docs/bench/ggml_search_0093.csv trial {best.trial_index})", best.plan))
    rows = []
    print(f"{llamacpp.check_available()}; bandwidth {bw / 1e9:.2f} GB/s (cached); {args.threads} thread(s)")
    print("| plan | bytes read per token (MB) | predicted tok/s | measured tok/s (median ± sem) | error of the prediction |")
    print("|---|---|---|---|---|")
    with PlanWriter(ctx.ref.gguf, ctx.layers) as writer:
        for label, plan in plans:
            path = writer.write(plan)
            m = measure_file(path, None, None, spec, ctx.tok, prompt=[int(t) for t in ctx.search_windows.ids[0, :64]])
            pred = model.predict(plan).tokens_per_s
            meas = m.timing.tokens_per_s
            row = _row(label, m, {"predicted_tok_s": pred, "bytes_per_token": model.bytes_per_token(plan), "error": pred / meas - 1})
            rows.append(row)
            path.unlink()
            print(
                f"| {label} | {row['bytes_per_token'] / 1e6:.1f} | {pred:.1f} | {meas:.1f} ± {m.timing.sem:.1f} | {100 * row['error']:+.0f}% |",
                flush=True,
            )
    (out / f"speed_t{args.threads}.json").write_text(json.dumps({"bandwidth": bw, "threads": args.threads, "rows": rows}, indent=1))


def presets(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _ctx(args.eval_tokens, args.heldout_tokens, args.checkpoint)
    src = ctx.ref.gguf
    model_args = ["--checkpoint", args.checkpoint] if args.checkpoint else []
    assert src is not None
    spec = DecodeSpec(prompt_tokens=64, new_tokens=64, repeats=5, warmup=1, threads=args.threads)
    results: dict = {"llama.cpp": llamacpp.check_available(), "threads": args.threads, "heldout_tokens": ctx.heldout_windows.n_tokens}
    results_path = out / "presets.json"
    if results_path.is_file():
        results = {**json.loads(results_path.read_text()), **results}

    def measure(label: str, path: Path, **extra) -> dict:
        m = measure_file(path, None, ctx.heldout_windows, spec, ctx.tok)
        row = _row(label, m, extra)
        print(
            f"  {label}: {row['file_mb']:.3f} MB, held-out {row['ppl_heldout']:.3f}, {row['tok_s']:.1f} ± {row['tok_s_sem']:.1f} tok/s",
            flush=True,
        )
        return row

    uniform = results.setdefault("uniform", {})
    with PlanWriter(src, ctx.layers) as writer:
        for t in args.uniform.split(","):
            if t not in uniform:
                path = writer.write(QuantPlan.uniform(ctx.layers.fqns, LayerQuant.of_ggml(t)))
                uniform[t] = measure(f"uniform {t}", path)
                path.unlink()
                results_path.write_text(json.dumps(results, indent=1))
    rows = results.setdefault("presets", {})
    for p in args.presets.split(","):
        if p in rows and "ours" in rows[p]:
            continue
        f = out / f"preset_{p}.gguf"
        q_s = llamacpp.quantize(src, f, p, threads=args.threads)
        budget = tensor_bytes(f)
        entry = {"preset": measure(f"llama.cpp {p}", f, quantize_s=round(q_s, 2)), "budget_bytes": budget}
        hist = out / f"search_{p}.csv"
        cmd = [sys.executable, "-m", "bo_search.acc_modelsize", *model_args, "--parameters_list", str(args.space),
               "--model_size_constraint", f"{budget / 1e9:.9f}", "--num_trials", str(args.num_trials),
               "--eval_tokens", str(args.search_tokens), "--heldout_tokens", "0", "--history_output", str(hist)]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        entry["search_s"] = round(time.perf_counter() - t0, 1)
        ours = out / f"ours_{p}.gguf"
        subprocess.run(
            [sys.executable, "-m", "bo_search.report", str(hist), *model_args, "--gguf", str(ours), "--force", "--no_llamacpp"], check=True
        )
        entry["ours"] = measure(f"ours at {p}'s size", ours)
        fits = {t: r for t, r in uniform.items() if r["model_size_gb"] * 1e9 <= budget}
        entry["uniform_fit"] = max(fits, key=lambda t: fits[t]["model_size_gb"]) if fits else None
        rows[p] = entry
        results_path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


def retime(args: argparse.Namespace) -> None:
    """Decode speed of every file of ``presets`` again, round-robin (each round times every file once,
    ``--rounds`` rounds), so that slow drifts of the shared machine hit every row alike; the median
    over rounds of each file's median is stored as ``tok_s_rr`` (with the rounds' values)."""
    import statistics

    out = Path(args.out)
    results_path = out / "presets.json"
    results = json.loads(results_path.read_text())
    ctx = _ctx(512, 0)
    prompt = [int(t) for t in ctx.search_windows.ids[0, :64]]
    spec = DecodeSpec(prompt_tokens=64, new_tokens=64, repeats=5, warmup=1, threads=args.threads)
    files: dict[str, tuple[Path, dict]] = {}
    with PlanWriter(ctx.ref.gguf, ctx.layers) as writer:
        for t, row in results["uniform"].items():
            files[f"uniform {t}"] = (writer.write(QuantPlan.uniform(ctx.layers.fqns, LayerQuant.of_ggml(t))), row)
        for p, e in results["presets"].items():
            files[f"llama.cpp {p}"] = (out / f"preset_{p}.gguf", e["preset"])
            if "ours" in e:
                files[f"ours at {p}"] = (out / f"ours_{p}.gguf", e["ours"])
        rates: dict[str, list[float]] = {k: [] for k in files}
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for k, (path, _row) in files.items():
                rates[k].append(measure_file(path, None, None, spec, ctx.tok, prompt=prompt).timing.tokens_per_s)
    for k, (_path, row) in files.items():
        row["tok_s_rr"] = statistics.median(rates[k])
        row["tok_s_rounds"] = rates[k]
        print(f"  {k}: {row['tok_s_rr']:.1f} tok/s (rounds {', '.join(f'{x:.1f}' for x in rates[k])})")
    results["retime"] = {"rounds": args.rounds, "threads": args.threads, "new_tokens": 64, "prompt_tokens": 64}
    results_path.write_text(json.dumps(results, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--types", default="F16,Q8_0,Q6_K,Q5_1,Q5_0,Q4_K,Q4_1,Q4_0,Q3_K,Q2_K")
    s.add_argument("--out", default="runs/llamacpp")
    q = sub.add_parser("presets")
    q.add_argument("--presets", default="Q3_K_M,Q4_K_M,Q4_0,Q5_K_M")
    q.add_argument("--space", default=str(NO_Q41))
    q.add_argument("--num_trials", type=int, default=16)
    q.add_argument("--search_tokens", type=int, default=1024)
    q.add_argument("--eval_tokens", type=int, default=512)
    q.add_argument("--heldout_tokens", type=int, default=4096)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--out", default="runs/llamacpp")
    q.add_argument("--checkpoint", default=None, help="a GGUF checkpoint (default: the embedded model)")
    q.add_argument("--uniform", default=",".join(GGML_TYPE_NAMES), help="uniform types to measure")
    r = sub.add_parser("retime")
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", default="runs/llamacpp")
    args = p.parse_args()
    {"speed": speed, "presets": presets, "retime": retime}[args.cmd](args)


if __name__ == "__main__":
    main()
