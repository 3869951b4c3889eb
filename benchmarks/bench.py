"""hf_dpo against TRL's DPOTrainer: throughput, step time, peak memory and loss, side by side.

One command builds a random-init Llama model from a config, a synthetic preference
set with a long-tailed length mix, and trains each implementation in its own
process (so that peak memory and import state do not leak between runs), with the
same model weights, data, beta, batch size, max_length, dtype, gradient
checkpointing setting and optimizer. Runs alternate (A, B, A, B ...) and the report
takes medians over the repeats, so a noisy shared machine biases no side.

    python benchmarks/bench.py                          # the CPU suite of docs/performance.md
    python benchmarks/bench.py --size gpu --data standard --impls trl,hf_dpo+pf+sp
    python benchmarks/bench.py --size tiny --steps 2 --warmup 1 --repeats 1   # smoke test

Implementations (``--impls``): ``trl`` (TRL's DPOTrainer, sigmoid loss), ``hf_dpo``
(NormalizedDPOTrainer with its defaults: response-only projection), and variants
``+pf`` (padding_free, one row), ``+pfr`` (padding_free in rows no longer than the
batch's longest sequence), ``+sp`` (share_prompt), ``+full`` (full logits instead of the response-only
projection), ``+ref`` (precompute_ref_logps; also
``trl+ref`` for TRL's precompute_ref_log_probs). hf_dpo runs with
``length_normalize=False`` and beta 0.1, so that both optimize the same loss and the
final losses can be compared.

Measured per run (after ``--warmup`` steps): tokens/s over the timed steps (tokens =
prompt + response of both sides, the prompt counted twice, whatever the layout
computes), median step time (wall clock between consecutive optimizer steps, data
collation included), peak RSS during the timed steps and its rise over the RSS at the
start of training (CPU), ``torch.cuda.max_memory_allocated`` (GPU), the last logged
loss, and MFU: ``6 N`` FLOPs per computed token for the policy plus ``2 N`` for the
reference forward when it runs, N = parameters without the input embedding
(attention's ``T^2`` FLOPs not counted), against a measured matmul peak.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

SIZES = {
    # name: model config, max_length, default dtype
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=192, vocab=512, max_length=128),
    # MiniMind2-small shape (26M parameters).
    "small": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408, vocab=6400, max_length=512),
    # Little compute, large vocabulary: the projection and logits dominate.
    "large_vocab": dict(hidden=128, layers=2, heads=4, kv_heads=4, intermediate=384, vocab=32000, max_length=1024),
    # Qwen2.5-0.5B shape (494M parameters, 151,936-token vocabulary, tied embeddings).
    "gpu": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, max_length=2048, tied=True),
}
DATA_MIXES = {
    # Long-tailed (log-normal) lengths as fractions of max_length: (prompt median, response median, sigma).
    "standard": (0.08, 0.12, 0.9),
    # Prompt-heavy multi-turn: a long conversation so far, a short answer.
    "multiturn": (0.55, 0.06, 0.5),
}
PAD, EOS = "<pad>", "<eos>"


# --------------------------------------------------------------------------- model, tokenizer, data


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer: word ``t<i>`` is token i, so any text of such words tokenizes one word per token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, model_max_length=1 << 20)


def build_model(size: dict, seed: int, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
        max_position_embeddings=max(4096, size["max_length"]), pad_token_id=0, eos_token_id=1, bos_token_id=1,
        tie_word_embeddings=size.get("tied", False),
    )
    torch.manual_seed(seed)
    # fp32 master weights; bf16 runs use autocast (TrainingArguments.bf16), as mixed-precision training does.
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def make_rows(n: int, vocab: int, max_length: int, mix: str, seed: int) -> list[dict]:
    """``n`` string-layout pairs whose prompt and responses fit ``max_length`` (EOS included), so nobody truncates."""
    import random

    rng = random.Random(seed)
    prompt_frac, response_frac, sigma = DATA_MIXES[mix]
    max_prompt = max_length // 2 if mix == "standard" else int(max_length * 0.8)

    def draw(fraction, low, high):
        return max(low, min(high, int(rng.lognormvariate(math.log(fraction * max_length), sigma))))

    def words(k):
        return " ".join(f"t{rng.randrange(2, vocab)}" for _ in range(k))

    rows = []
    for _ in range(n):
        n_prompt = draw(prompt_frac, 4, max_prompt)
        budget = max_length - n_prompt - 1  # the EOS both libraries append
        rows.append({
            "prompt": words(n_prompt),
            "chosen": " " + words(draw(response_frac, 1, budget)),
            "rejected": " " + words(draw(response_frac, 1, budget)),
        })
    return rows


# --------------------------------------------------------------------------- measurement


class RssSampler:
    """Peak resident set size, sampled every few milliseconds on a thread (torch releases the GIL in kernels)."""

    def __init__(self, period_s: float = 0.003):
        self.period_s, self.peak, self._running = period_s, 0, False
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: the lifetime maximum is the best available
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def start(self):
        self.peak, self._running = self.rss(), True
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while self._running:
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period_s)

    def stop(self) -> int:
        self._running = False
        self.peak = max(self.peak, self.rss())
        return self.peak


def matmul_peak_flops(device: str, dtype) -> float:
    """Measured dense matmul FLOP/s on ``device`` in ``dtype`` (the MFU denominator)."""
    import torch

    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    repeats = 50 if device == "cuda" else 10
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def count_tokens(features: list[dict], batch: dict) -> tuple[int, int]:
    """(logical tokens: prompt + response of both sides; tokens the layout computes, padding excluded)."""
    if "prompt_ids" in features[0]:  # TRL
        logical = sum(2 * len(f["prompt_ids"]) + len(f["chosen_ids"]) + len(f["rejected_ids"]) for f in features)
    else:
        logical = sum(len(f["chosen_input_ids"]) + len(f["rejected_input_ids"]) for f in features)
    if "segment_ids" in batch:
        computed = int((batch["segment_ids"] >= 0).sum())
    else:
        computed = int(batch["attention_mask"].sum())
    return logical, computed


def run_worker(case: dict) -> dict:
    """Train one implementation on one configuration in this process; return the measurements."""
    import datasets
    import torch
    from transformers import TrainerCallback

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    datasets.disable_progress_bars()
    size = SIZES[case["size"]]
    device = "cuda" if torch.cuda.is_available() and not case.get("cpu") else "cpu"
    bf16 = case["dtype"] == "bf16"
    steps, warmup, batch_size = case["steps"], case["warmup"], case["batch"]
    max_length = size["max_length"]
    tokenizer = build_tokenizer(size["vocab"])
    model = build_model(size, case["seed"], case["dtype"])
    ref_model = copy.deepcopy(model)
    rows = make_rows(batch_size * (steps + warmup), size["vocab"], max_length, case["data"], case["seed"])
    train = datasets.Dataset.from_list(rows)
    impl, *options = case["impl"].split("+")
    output_dir = tempfile.mkdtemp(prefix="hf_dpo_bench_")
    common = dict(
        output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=steps + warmup, learning_rate=1e-5,
        logging_steps=1, save_strategy="no", report_to=[], seed=case["seed"], bf16=bf16, gradient_checkpointing=case["gc"],
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=device == "cpu", max_length=max_length,
        beta=0.1, precompute_ref_batch_size=batch_size,
    )

    setup_start = time.perf_counter()
    if impl == "trl":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(**common, loss_type=["sigmoid"], precompute_ref_log_probs="ref" in options)
        trainer = DPOTrainer(model, ref_model, args=args, train_dataset=train, processing_class=tokenizer)
    else:
        from hf_dpo import DPOConfig, NormalizedDPOTrainer

        args = DPOConfig(
            **common, max_prompt_length=max_length - 1, length_normalize=False, loss_type="sigmoid",
            padding_free="pf" in options or "pfr" in options, share_prompt="sp" in options,
            padding_free_max_row_tokens=1 if "pfr" in options else None, precompute_ref_logps="ref" in options,
            response_only_logits="full" not in options, ref_logps_cache_dir="",
        )
        trainer = NormalizedDPOTrainer(model, ref_model, args=args, train_dataset=train, processing_class=tokenizer)
    setup_s = time.perf_counter() - setup_start

    tokens: list[tuple[int, int]] = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        tokens.append(count_tokens(features, batch))
        return batch

    trainer.data_collator = counting_collator
    sampler, marks = RssSampler(), {}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            sync()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            marks["rss_start"] = sampler.rss()
            marks["ends"] = [time.perf_counter()]
            marks["cpu"] = [time.process_time()]

        def on_step_end(self, args, state, control, **k):
            sync()
            marks["ends"].append(time.perf_counter())
            marks["cpu"].append(time.process_time())
            if state.global_step == warmup:
                sampler.start()  # peak over the timed steps (the optimizer state exists by now)

    trainer.add_callback(Timer())
    marks["peak_before"] = matmul_peak_flops(device, torch.bfloat16 if bf16 else torch.float32)
    trainer.train()
    peak_rss = sampler.stop()

    ends = marks["ends"]
    step_times = [b - a for a, b in zip(ends[:-1], ends[1:])][warmup:]
    cpu_times = [b - a for a, b in zip(marks["cpu"][:-1], marks["cpu"][1:])][warmup:]
    timed_tokens = tokens[warmup : warmup + len(step_times)]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    n_params = sum(p.numel() for p in model.parameters())
    non_embedding = n_params - model.get_input_embeddings().weight.numel()
    if size.get("tied"):
        non_embedding += model.get_input_embeddings().weight.numel()  # the head's matmul still runs
    ref_per_step = "ref" not in options
    computed = sum(c for _, c in timed_tokens)
    flops = (6 + (2 if ref_per_step else 0)) * non_embedding * computed
    # The machine's capability: the better of two measurements, before and after training.
    peak = max(marks["peak_before"], matmul_peak_flops(device, torch.bfloat16 if bf16 else torch.float32))
    return {
        **case,
        "device": device,
        "setup_s": setup_s,
        "step_times": step_times,
        "median_step_s": statistics.median(step_times),
        "median_step_cpu_s": statistics.median(cpu_times),
        "tokens_per_cpu_s": sum(lg for lg, _ in timed_tokens) / sum(cpu_times),
        "tokens_per_s": sum(lg for lg, _ in timed_tokens) / sum(step_times),
        "computed_tokens_per_s": computed / sum(step_times),
        "computed_fraction": computed / max(1, sum(lg for lg, _ in timed_tokens)),
        "timed_tokens": sum(lg for lg, _ in timed_tokens),
        "peak_rss_mb": peak_rss / 2**20,
        "rss_rise_mb": (peak_rss - marks["rss_start"]) / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "params": n_params,
        "params_no_input_embedding": non_embedding,
        "mfu": flops / sum(step_times) / peak,
        "matmul_peak_tflops": peak / 1e12,
    }


# --------------------------------------------------------------------------- orchestration and report


def launch(case: dict, timeout: float) -> dict:
    """Run one case in a fresh interpreter; its last stdout line is the JSON result."""
    command = [sys.executable, __file__, "--worker", json.dumps(case)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{case['impl']} on {case['size']}/{case['data']} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def summarize(results: list[dict], baseline: str) -> list[dict]:
    """One row per (size, data, impl): medians over repeats and ratios to ``baseline`` on the same configuration."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["size"], r["data"], r["impl"]), []).append(r)
    keys = ("tokens_per_s", "tokens_per_cpu_s", "median_step_s", "median_step_cpu_s", "peak_rss_mb", "rss_rise_mb", "cuda_peak_mb", "final_loss", "mfu", "setup_s", "computed_fraction")
    rows = []
    for (size, data, impl), runs in groups.items():
        row = {"size": size, "data": data, "impl": impl, "repeats": len(runs), **{k: median_of(runs, k) for k in keys}}
        rows.append(row)
    for row in rows:
        base = next((r for r in rows if (r["size"], r["data"], r["impl"]) == (row["size"], row["data"], baseline)), None)
        for key in ("tokens_per_s", "tokens_per_cpu_s", "median_step_s", "peak_rss_mb", "rss_rise_mb", "cuda_peak_mb"):
            value, reference = row.get(key), base.get(key) if base else None
            row[f"{key}_ratio"] = value / reference if value is not None and reference else None
    return rows


def markdown(rows: list[dict], baseline: str) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    gpu = any(r["cuda_peak_mb"] for r in rows)
    memory = "CUDA peak MB" if gpu else "peak RSS MB (rise)"
    lines = [
        f"| config | data | impl | tokens/s | x {baseline} | tokens/CPU-s x {baseline} | median step s | {memory} | x {baseline} "
        "| final loss | MFU | repeats |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if gpu:
            mem, ratio = fmt(r["cuda_peak_mb"], ".0f"), fmt(r["cuda_peak_mb_ratio"], ".2f")
        else:
            mem = f"{fmt(r['peak_rss_mb'], '.0f')} ({fmt(r['rss_rise_mb'], '.0f')})"
            ratio = f"{fmt(r['peak_rss_mb_ratio'], '.2f')} ({fmt(r['rss_rise_mb_ratio'], '.2f')})"
        lines.append(
            f"| {r['size']} | {r['data']} | {r['impl']} | {fmt(r['tokens_per_s'], '.0f')} | {fmt(r['tokens_per_s_ratio'], '.2f')} "
            f"| {fmt(r['tokens_per_cpu_s_ratio'], '.2f')} "
            f"| {fmt(r['median_step_s'], '.3f')} | {mem} | {ratio} | {fmt(r['final_loss'], '.4f')} | {fmt(r['mfu'], '.3f')} | {r['repeats']} |"
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", default=None, choices=list(SIZES), help="one configuration instead of the CPU suite")
    parser.add_argument("--data", default="standard", choices=list(DATA_MIXES))
    parser.add_argument("--impls", default="trl,hf_dpo,hf_dpo+pf+sp", help="comma-separated implementations (see the docstring)")
    parser.add_argument("--baseline", default="trl", help="the implementation the ratios divide by")
    parser.add_argument("--batch", type=int, default=4, help="pairs per batch")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats of every run (medians reported)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for both implementations")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: torch's)")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even if a GPU is present")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--json", default=None, help="write all runs and the summary here")
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    import torch

    on_gpu = torch.cuda.is_available() and not args.cpu
    dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    impls = args.impls.split(",")
    if args.size is not None:
        configs = [(args.size, args.data, impls)]
    else:  # the CPU suite: both sizes on standard data, and the shared-prompt gain on prompt-heavy data
        configs = [
            ("small", "standard", impls),
            ("large_vocab", "standard", impls),
            ("small", "multiturn", ["hf_dpo", "hf_dpo+sp"]),
        ]
    base_case = dict(batch=args.batch, steps=args.steps, warmup=args.warmup, dtype=dtype, gc=args.gradient_checkpointing,
                     threads=args.threads, cpu=args.cpu, seed=args.seed)
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    results = []
    for repeat in range(args.repeats):
        for size, data, names in configs:
            # Alternate the order on every repeat: A, B, B, A ... keeps drift in the machine's load even.
            for impl in names if repeat % 2 == 0 else names[::-1]:
                case = dict(base_case, size=size, data=data, impl=impl, repeat=repeat)
                result = launch(case, args.timeout)
                results.append(result)
                print(f"[{time.perf_counter() - started:6.0f}s] {size}/{data} {impl} repeat {repeat}: "
                      f"{result['tokens_per_s']:.0f} tokens/s, median step {result['median_step_s']:.3f}s, "
                      f"peak RSS {result['peak_rss_mb']:.0f} MB, loss {result['final_loss']}", file=sys.stderr, flush=True)
    rows = []
    for size, data, names in configs:
        baseline = args.baseline if args.baseline in names else names[0]
        rows += [dict(r, baseline=baseline) for r in summarize([r for r in results if (r["size"], r["data"]) == (size, data)], baseline)]
    header = (f"Command: `{command}`\n\nMachine: {machine(args.threads)}\n\nDate: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
              f"wall time {time.perf_counter() - started:.0f} s; {dtype}; gradient checkpointing "
              f"{'on' if args.gradient_checkpointing else 'off'}; batch {args.batch} pairs; {args.warmup} warm-up + {args.steps} timed steps\n")
    tables = []
    for size, data, names in configs:
        subset = [r for r in rows if (r["size"], r["data"]) == (size, data)]
        tables.append(f"**{size} / {data}** (max_length {SIZES[size]['max_length']}; ratios to {subset[0]['baseline']})\n\n"
                      + markdown(subset, subset[0]["baseline"]))
    print(header + "\n" + "\n\n".join(tables))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "machine": machine(args.threads), "runs": results, "summary": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
