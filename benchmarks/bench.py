"""hf_dpo against TRL's DPOTrainer and a plain MiniMind-recipe loop: throughput, step time, memory, FLOP/s, loss.

Each implementation trains in its own process (so that peak memory and import state do not leak between runs),
with the same model weights, the same pairs in the same batches, beta, batch size, max_length, dtype, gradient
checkpointing setting and optimizer. Runs alternate (A, B, B, A ...) and the report takes medians over the
repeats, so a noisy shared machine biases no side. Two kinds of model and data:

* random-init models built from a config (Llama, or Qwen2 for the GPU sizes) on synthetic pairs with a
  long-tailed length mix (``bench_worker.SIZES``: tiny, small, large_vocab, gpu, smollm2_shape, gpu_tiny);
* the real model (``--size real``, ``--preset real``): SmolLM2-135M-Instruct as ``hf-dpo fetch-model`` converts it,
  on LLaMA-Factory's real DPO pairs (``bench_real.py``); hf_dpo reads the sharegpt rows as they are, TRL gets
  them converted to its conversational layout, and the bench refuses a table whose contestants did not train
  on the same token ids (a digest per run, compared here).

    python benchmarks/bench.py --preset real            # the real model: hf_dpo defaults vs TRL vs hf_dpo padded
    python benchmarks/bench.py --preset real-lowmem     # its low-memory setting against TRL's default checkpointing
    python benchmarks/bench.py --threads 1              # the CPU suite of random-init configurations
    bash benchmarks/gpu.sh                              # = --preset gpu: Qwen2.5-0.5B and SmolLM2 shapes, bf16
    python benchmarks/bench.py --size tiny --steps 2 --warmup 1 --repeats 1   # smoke test

Implementations (``--impls``):
  ``trl``       TRL's DPOTrainer with its defaults (sigmoid loss) but gradient checkpointing off unless asked
                (``+gc``); ``trl+ref``: precompute_ref_log_probs.
  ``hf_dpo``    NormalizedDPOTrainer with the library's defaults: no layout flag is passed, so it measures
                whatever the defaults are. Variants name the layout explicitly (padding_free and share_prompt
                each on exactly when named): ``+padded`` (both off, the plain path), ``+pf`` (padding_free, one
                row), ``+pfr`` (padding_free in rows no longer than the batch's longest sequence), ``+sp``
                (share_prompt), combinable (``+pf+sp``); and ``+full`` (full logits instead of the
                response-only projection), ``+ref`` (precompute_ref_logps), ``+gc`` (gradient checkpointing).
                hf_dpo runs with ``length_normalize=False`` and beta 0.1, so that it optimizes TRL's loss and
                final losses compare.
  ``minimind``  our own plain PyTorch loop following MiniMind's DPO recipe (``bench_minimind.py``), random-init
                sizes only; ``minimind+dyn`` pads per batch. Its loss is length-normalized, so its final loss is
                not TRL's.

Measured per run (after ``--warmup`` steps): tokens/s over the timed steps (tokens = prompt + response of both
sides as trained on, after truncation, the prompt counted twice, padding never, whatever the layout computes),
median step time (wall clock between consecutive optimizer steps, data collation included), peak RSS during the
timed steps, its rise over the RSS at the start of training and the RSS at each stage of set-up (CPU),
``torch.cuda.max_memory_allocated`` (GPU), the last logged loss, and the achieved FLOP/s as a fraction of the
best dense matmul measured in the same process on the same threads: FLOPs counted from the batches each run
computed, attention included (``bench_flops.py`` says exactly what is counted).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench_* modules next to this file

from bench_worker import DATA_MIXES, SIZES, run_worker  # noqa: E402

# One command per preset; any option given explicitly overrides the preset's value.
PRESETS = {
    # benchmarks/gpu.sh: within 8 minutes on one H100/H200 (the deadline stops launching new runs). The
    # Qwen2.5-0.5B shape with every contestant, then the real model's architecture (SmolLM2-135M's config,
    # random init: its weights do not fit what a device run may carry) at the same max_length.
    "gpu": dict(
        suite=[
            dict(size="gpu", data="standard", impls=["trl", "hf_dpo", "hf_dpo+padded", "minimind", "minimind+dyn"]),
            dict(size="smollm2_shape", data="standard", impls=["trl", "hf_dpo", "hf_dpo+padded"]),
        ],
        steps=8,
        warmup=2,
        repeats=2,
        deadline=420,
        timeout=180,
    ),
    # The real model, docs/performance.md: 4 pairs per step at max_length 512, fp32, on all of torch's threads.
    # One timed step per run (a step takes tens of seconds on 2 cores), two alternating repeats: about 15 minutes.
    "real": dict(
        suite=[dict(size="real", data="real", impls=["trl", "hf_dpo", "hf_dpo+padded"])],
        steps=1,
        warmup=1,
        repeats=2,
    ),
    # The documented low-memory settings (gradient checkpointing; and the reference's log-probs precomputed, the
    # reference model released) against TRL with gradient checkpointing. Peak memory varies little: one repeat.
    "real-lowmem": dict(
        suite=[dict(size="real", data="real", impls=["trl+gc", "hf_dpo+gc", "hf_dpo+gc+ref"])],
        steps=1,
        warmup=1,
        repeats=1,
    ),
}
# The CPU suite of random-init configurations. Per-configuration steps and repeats keep it under 10 minutes on
# 2 cores: TRL's large-vocabulary step takes ~28 s on CPU and varies little, so it runs once, one timed step.
SUITE = [
    dict(size="small", data="standard", impls=["trl", "hf_dpo", "hf_dpo+padded"]),
    dict(size="large_vocab", data="standard", impls=["trl", "hf_dpo", "hf_dpo+padded"], steps=1, repeats={"trl": 1}),
    dict(size="small", data="multiturn", impls=["hf_dpo", "hf_dpo+padded"], steps=1, baseline="hf_dpo+padded"),
]


# --------------------------------------------------------------------------- orchestration and report


def launch(case: dict, timeout: float, same_process: bool = False) -> dict:
    """Run one case in a fresh interpreter (its last stdout line is the JSON result), or here with ``same_process``."""
    if same_process:
        return json.loads(json.dumps(run_worker(case)))
    command = [sys.executable, __file__, "--worker", json.dumps(case)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{case['impl']} on {case['size']}/{case['data']} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


SUMMARY_KEYS = (
    "tokens_per_s",
    "tokens_per_cpu_s",
    "median_step_s",
    "median_step_cpu_s",
    "peak_rss_mb",
    "rss_rise_mb",
    "cuda_peak_mb",
    "final_loss",
    "mfu",
    "achieved_tflops",
    "matmul_peak_tflops",
    "attention_flops_fraction",
    "setup_s",
    "computed_fraction",
    "logical_per_step",
    "computed_per_step",
    "padding_per_step",
    "head_positions_per_step",
)
RATIO_KEYS = ("tokens_per_s", "tokens_per_cpu_s", "median_step_s", "peak_rss_mb", "rss_rise_mb", "cuda_peak_mb", "mfu")


def summarize(results: list[dict], baseline: str) -> list[dict]:
    """One row per (size, data, impl): medians over repeats and ratios to ``baseline`` on the same configuration."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["size"], r["data"], r["impl"]), []).append(r)
    rows = []
    for (size, data, impl), runs in groups.items():
        row = {"size": size, "data": data, "impl": impl, "repeats": len(runs)}
        row.update({k: median_of(runs, k) for k in SUMMARY_KEYS})
        stages = {stage for r in runs for stage in r.get("rss_marks_mb", {})}
        row["rss_marks_mb"] = {
            s: statistics.median(r["rss_marks_mb"][s] for r in runs if s in r["rss_marks_mb"]) for s in stages
        }
        rows.append(row)
    for row in rows:
        base = next(
            (r for r in rows if (r["size"], r["data"], r["impl"]) == (row["size"], row["data"], baseline)), None
        )
        for key in RATIO_KEYS:
            value, reference = row.get(key), base.get(key) if base else None
            row[f"{key}_ratio"] = value / reference if value is not None and reference else None
    return rows


def same_tokens(results: list[dict]) -> str | None:
    """None when every run of a configuration that reports a token digest trained on the same tokens, else why not."""
    digests: dict[tuple, dict[str, set]] = {}
    for r in results:
        if r.get("tokens_digest"):
            digests.setdefault((r["size"], r["data"]), {}).setdefault(r["tokens_digest"], set()).add(r["impl"])
    for (size, data), seen in digests.items():
        if len(seen) > 1:
            groups = "; ".join(f"{', '.join(sorted(impls))}: {digest}" for digest, impls in seen.items())
            return f"{size}/{data}: the contestants trained on different token ids ({groups})"
    return None


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict], baseline: str) -> str:
    """The configuration's table: speed, memory, loss and achieved FLOP/s per implementation, ratios to baseline."""
    fmt = _fmt
    gpu = any(r["cuda_peak_mb"] for r in rows)
    memory = "CUDA peak MB" if gpu else "peak RSS MB (rise)"
    lines = [
        f"| config | data | impl | tokens/s | x {baseline} | tokens/CPU-s x {baseline} | median step s | {memory} "
        f"| x {baseline} | final loss | TFLOP/s | of peak | computed / logical | repeats |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if gpu:
            mem, ratio = fmt(r["cuda_peak_mb"], ".0f"), fmt(r["cuda_peak_mb_ratio"], ".2f")
        else:
            mem = f"{fmt(r['peak_rss_mb'], '.0f')} ({fmt(r['rss_rise_mb'], '.0f')})"
            ratio = f"{fmt(r['peak_rss_mb_ratio'], '.2f')} ({fmt(r['rss_rise_mb_ratio'], '.2f')})"
        lines.append(
            f"| {r['size']} | {r['data']} | {r['impl']} | {fmt(r['tokens_per_s'], '.0f')} "
            f"| {fmt(r['tokens_per_s_ratio'], '.2f')} | {fmt(r['tokens_per_cpu_s_ratio'], '.2f')} "
            f"| {fmt(r['median_step_s'], '.3f')} | {mem} | {ratio} | {fmt(r['final_loss'], '.4f')} "
            f"| {fmt(r['achieved_tflops'], '.3f')} | {fmt(r['mfu'], '.3f')} | {fmt(r['computed_fraction'], '.2f')} "
            f"| {r['repeats']} |"
        )
    return "\n".join(lines)


def work_markdown(rows: list[dict]) -> str:
    """Per step, what each implementation computed, and its RSS at each stage of set-up (medians)."""
    fmt = _fmt
    stages = ("imports", "model", "reference", "trainer", "train_start")
    lines = [
        "| impl | logical tokens/step | computed | padding positions | head positions | attention share of FLOPs "
        "| RSS MB: " + " / ".join(stages) + " |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        marks = " / ".join(fmt(r["rss_marks_mb"].get(s), ".0f") for s in stages)
        lines.append(
            f"| {r['impl']} | {fmt(r['logical_per_step'], '.0f')} | {fmt(r['computed_per_step'], '.0f')} "
            f"| {fmt(r['padding_per_step'], '.0f')} | {fmt(r['head_positions_per_step'], '.0f')} "
            f"| {fmt(r['attention_flops_fraction'], '.3f')} | {marks} |"
        )
    return "\n".join(lines)


def machine(threads=None) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} logical CPUs (torch threads per run: {threads or torch.get_num_threads()}){gpu}; torch {torch.__version__}"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "-"


def plan(args) -> list[dict]:
    """The configurations to run: one (``--size``), a preset's, or the CPU suite; each with its impls, steps,
    warm-up, repeats per impl and baseline. Options given explicitly apply to every configuration."""
    if args.size is not None:
        data = "real" if SIZES[args.size].get("real") else args.data
        entries = [dict(size=args.size, data=data, impls=args.impls.split(","))]
    else:
        entries = [dict(entry) for entry in (getattr(args, "suite", None) or SUITE)]
        if args.impls:  # replaces the lists of the configurations that compare with TRL
            entries = [
                dict(e, impls=args.impls.split(",")) if any(i.startswith("trl") for i in e["impls"]) else e
                for e in entries
            ]
    for entry in entries:
        for key, default in (("steps", 2), ("warmup", 1)):
            entry[key] = getattr(args, key) if getattr(args, key) is not None else entry.get(key, default)
        per_impl = {} if args.repeats is not None else entry.get("repeats", {})
        entry["repeats"] = {impl: per_impl.get(impl, args.repeats or 2) for impl in entry["impls"]}
        baseline = args.baseline or entry.get("baseline") or entry["impls"][0]
        entry["baseline"] = baseline if baseline in entry["impls"] else entry["impls"][0]
    return entries


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default=None, choices=list(PRESETS), help="a named benchmark (see the docstring)")
    parser.add_argument("--size", default=None, choices=list(SIZES), help="one configuration instead of the CPU suite")
    parser.add_argument("--data", default=None, choices=list(DATA_MIXES), help="data mix of --size (default standard)")
    parser.add_argument(
        "--impls",
        default=None,
        help="comma-separated implementations (see the docstring); with --size the default is trl,hf_dpo,hf_dpo+padded",
    )
    parser.add_argument("--baseline", default=None, help="the implementation the ratios divide by (default: the first)")
    parser.add_argument("--batch", type=int, default=None, help="pairs per batch (default 4)")
    parser.add_argument("--max-length", type=int, default=None, help="override the size's max_length")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 2, or the suite's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="alternating repeats of every run, medians reported (default 2, or the suite's per implementation)",
    )
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for every implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even if a GPU is present")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per run (default 900)")
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="launch no new run after this many seconds; the table reports the repeats done (default: none)",
    )
    parser.add_argument("--json", default=None, help="write all runs and the summary here")
    parser.add_argument(
        "--same-process",
        action="store_true",
        help="run every case in this process (the smoke tests: one interpreter start instead of one per run); "
        "peak RSS then includes what earlier runs left, so memory figures are not comparable",
    )
    args = parser.parse_args(argv)
    for key, value in PRESETS.get(args.preset, {}).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.data, args.batch = args.data or "standard", args.batch or 4
    args.timeout, args.deadline = args.timeout or 900, args.deadline or math.inf
    if args.size is not None and args.impls is None:
        args.impls = "trl,hf_dpo,hf_dpo+padded"
    return args


def run_all(args, entries: list[dict], base_case: dict, started: float) -> tuple[list[dict], list[str]]:
    """Every run of every configuration, alternating the order on every repeat; (results, runs not done)."""
    results, skipped = [], []
    for repeat in range(max(n for e in entries for n in e["repeats"].values())):
        for entry in entries:
            names = [impl for impl in entry["impls"] if entry["repeats"][impl] > repeat]
            # Alternate the order on every repeat: A, B, B, A ... keeps drift in the machine's load even.
            for impl in names if repeat % 2 == 0 else names[::-1]:
                label = f"{entry['size']}/{entry['data']} {impl} repeat {repeat}"
                left = args.deadline - (time.perf_counter() - started)
                if left <= 0:
                    skipped.append(label)
                    continue
                case = dict(
                    base_case,
                    size=entry["size"],
                    data=entry["data"],
                    impl=impl,
                    repeat=repeat,
                    steps=entry["steps"],
                    warmup=entry["warmup"],
                )
                try:
                    result = launch(case, min(args.timeout, left + 60), args.same_process)
                except subprocess.TimeoutExpired:
                    skipped.append(f"{label} (timed out)")
                    print(f"[{time.perf_counter() - started:6.0f}s] {label}: timed out", file=sys.stderr, flush=True)
                    continue
                result["load_after"] = load_average()
                results.append(result)
                memory = (
                    f"CUDA peak {result['cuda_peak_mb']:.0f} MB"
                    if result["cuda_peak_mb"] is not None
                    else f"peak RSS {result['peak_rss_mb']:.0f} MB"
                )
                print(
                    f"[{time.perf_counter() - started:6.0f}s] {label}: {result['tokens_per_s']:.0f} tokens/s, "
                    f"median step {result['median_step_s']:.3f}s, {memory}, {result['mfu']:.3f} of the matmul peak, "
                    f"loss {result['final_loss']}, load {result['load_after']}",
                    file=sys.stderr,
                    flush=True,
                )
    return results, skipped


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    import torch

    on_gpu = torch.cuda.is_available() and not args.cpu
    dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    entries = plan(args)
    base_case = dict(
        batch=args.batch,
        dtype=dtype,
        gc=args.gradient_checkpointing,
        threads=args.threads,
        cpu=args.cpu,
        seed=args.seed,
        max_length=args.max_length,
    )
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    started, load_before = time.perf_counter(), load_average()
    results, skipped = run_all(args, entries, base_case, started)
    rows, tables = [], []
    for entry in entries:
        subset = [r for r in results if (r["size"], r["data"]) == (entry["size"], entry["data"])]
        summary = [dict(r, baseline=entry["baseline"]) for r in summarize(subset, entry["baseline"])]
        rows += summary
        steps = f"{entry['warmup']} warm-up + {entry['steps']} timed steps"
        max_length = args.max_length or SIZES[entry["size"]]["max_length"]
        tables.append(
            f"**{entry['size']} / {entry['data']}** (max_length {max_length}; {steps}; ratios to {entry['baseline']})"
            f"\n\n{markdown(summary, entry['baseline'])}\n\nPer step and memory by stage:\n\n{work_markdown(summary)}"
        )
    peaks = sorted({round(r["matmul_peak_tflops"], 3) for r in results})
    mismatch = same_tokens(results)
    header = (
        f"Command: `{command}`\n\nMachine: {machine(args.threads)}\n\nDate: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"wall time {time.perf_counter() - started:.0f} s; load average (1/5/15 min) {load_before} before, "
        f"{load_average()} after; {dtype}; gradient checkpointing {'on' if args.gradient_checkpointing else 'as named'}; "
        f"batch {args.batch} pairs; measured {dtype} matmul peak {', '.join(map(str, peaks)) or '-'} TFLOP/s "
        f"(the FLOP fraction's denominator, per run); same token ids across contestants: "
        f"{'no' if mismatch else 'yes'}\n"
    )
    if skipped:
        header += f"\nNot run (deadline {args.deadline:.0f} s or timeout): {'; '.join(skipped)}\n"
    print(header + "\n" + "\n\n".join(tables))
    if args.json:
        report = {"command": command, "machine": machine(args.threads), "runs": results, "summary": rows}
        Path(args.json).write_text(json.dumps(dict(report, skipped=skipped, token_mismatch=mismatch), indent=1))
    if mismatch:
        print(f"bench.py: {mismatch}; the comparison is void", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
