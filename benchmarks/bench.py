"""hf_dpo against TRL's DPOTrainer and a plain MiniMind-recipe loop: throughput, step time, peak memory, MFU, loss.

One command builds a random-init model from a config (Llama, or Qwen2 for the GPU sizes), a synthetic
preference set with a long-tailed length mix, and trains each implementation in its own process (so that peak
memory and import state do not leak between runs), with the same model weights, data in the same order, beta,
batch size, max_length, dtype, gradient checkpointing setting and optimizer. Runs alternate (A, B, B, A ...) and
the report takes medians over the repeats, so a noisy shared machine biases no side.

    python benchmarks/bench.py --threads 1              # the CPU suite of docs/performance.md
    bash benchmarks/gpu.sh                              # = bench.py --preset gpu: Qwen2.5-0.5B shape, bf16, one table
    python benchmarks/bench.py --size tiny --steps 2 --warmup 1 --repeats 1   # smoke test

Implementations (``--impls``):
  ``trl``       TRL's DPOTrainer with its defaults (sigmoid loss); ``trl+ref``: precompute_ref_log_probs.
  ``hf_dpo``    NormalizedDPOTrainer with the library's defaults: no layout flag is passed, so it measures
                whatever the defaults are. Variants name the layout explicitly (padding_free and share_prompt
                each on exactly when named): ``+padded`` (both off, the plain path), ``+pf`` (padding_free, one
                row), ``+pfr`` (padding_free in rows no longer than the batch's longest sequence), ``+sp``
                (share_prompt), combinable (``+pf+sp``); and ``+full`` (full logits instead of the
                response-only projection), ``+ref`` (precompute_ref_logps). hf_dpo runs with
                ``length_normalize=False`` and beta 0.1, so that it optimizes TRL's loss and final losses compare.
  ``minimind``  our own plain PyTorch loop following MiniMind's DPO recipe: [chosen; rejected] padded to
                max_length as its dataset does, full logits, log_softmax, gather, response mask, per-sequence
                mean, sigmoid loss with beta 0.1 on the means, AdamW, clip 1.0, bf16 autocast. ``minimind+dyn``
                pads per batch instead. Its loss is length-normalized, so its final loss is not TRL's.

Measured per run (after ``--warmup`` steps): tokens/s over the timed steps (tokens = prompt + response of both
sides, the prompt counted twice, whatever the layout computes), median step time (wall clock between
consecutive optimizer steps, data collation included), peak RSS during the timed steps and its rise over the
RSS at the start of training (CPU), ``torch.cuda.max_memory_allocated`` (GPU), the last logged loss, and MFU:
``6 N`` FLOPs per computed (non-padding) token for the policy plus ``2 N`` for the reference forward when it
runs (8N in all), N = parameters without the input embedding (attention's ``T^2`` FLOPs not counted), against
a dense matmul peak measured in the same process, before and after training.
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
    # name: model config, max_length; arch "llama" unless given.
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=192, vocab=512, max_length=128),
    # MiniMind2-small shape (26M parameters).
    "small": dict(hidden=512, layers=8, heads=8, kv_heads=2, intermediate=1408, vocab=6400, max_length=512),
    # Little compute, large vocabulary: the projection and logits dominate.
    "large_vocab": dict(hidden=128, layers=2, heads=4, kv_heads=4, intermediate=384, vocab=32000, max_length=1024),
    # Qwen2.5-0.5B shape (494M parameters, 151,936-token vocabulary, tied embeddings, q/k/v biases).
    "gpu": dict(
        arch="qwen2",
        hidden=896,
        layers=24,
        heads=14,
        kv_heads=2,
        intermediate=4864,
        vocab=151936,
        max_length=2048,
        tied=True,
    ),
    # The same architecture at a size the CPU dry run of the GPU benchmark trains in seconds.
    "gpu_tiny": dict(
        arch="qwen2", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192, vocab=1024, max_length=128, tied=True
    ),
}
# One command per preset; any option given explicitly overrides the preset's value.
PRESETS = {
    # benchmarks/gpu.sh: one table, within 8 minutes on one H200 (the deadline stops launching new runs).
    "gpu": dict(
        size="gpu",
        data="standard",
        impls="trl,hf_dpo,hf_dpo+padded,minimind,minimind+dyn",
        steps=8,
        warmup=2,
        repeats=2,
        deadline=420,
        timeout=180,
    ),
}
# The CPU suite of docs/performance.md. Per-configuration steps and repeats keep it under 10 minutes on 2 cores:
# TRL's large-vocabulary step takes ~28 s on CPU and varies little, so it runs once, one timed step.
SUITE = [
    dict(size="small", data="standard", impls=["trl", "hf_dpo", "hf_dpo+padded"]),
    dict(size="large_vocab", data="standard", impls=["trl", "hf_dpo", "hf_dpo+padded"], steps=1, repeats={"trl": 1}),
    dict(size="small", data="multiturn", impls=["hf_dpo", "hf_dpo+padded"], steps=1, baseline="hf_dpo+padded"),
]
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
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[size.get("arch", "llama")]
    config = config_class(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=max(4096, size["max_length"]),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
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
        rows.append(
            {
                "prompt": words(n_prompt),
                "chosen": " " + words(draw(response_frac, 1, budget)),
                "rejected": " " + words(draw(response_frac, 1, budget)),
            }
        )
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
    """Measured dense matmul FLOP/s on ``device`` in ``dtype`` (the MFU denominator), on random data."""
    import torch

    # 8192 on CUDA: large enough to fill an H100/H200 (docs of the device tool measured ~790 TFLOP/s there).
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    # A fixed count on CUDA; on CPU as many as fit in a quarter second (bf16 matmuls are slow on many CPUs).
    repeats, start = 0, time.perf_counter()
    while (repeats < 20) if device == "cuda" else (repeats < 2 or time.perf_counter() - start < 0.25):
        a @ b
        repeats += 1
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


LAYOUT_OPTIONS = {"pf", "pfr", "sp", "padded"}


def hf_dpo_options(options: list[str]) -> dict:
    """DPOConfig fields for an ``hf_dpo+...`` name. Plain ``hf_dpo`` passes none: it measures the library's defaults.

    Naming any layout option (``pf``, ``pfr``, ``sp``, ``padded``) makes the whole layout explicit: padding_free
    and share_prompt are each on exactly when named, so ``+padded`` is the plain padded path whatever the defaults.
    """
    unknown = set(options) - LAYOUT_OPTIONS - {"full", "ref"}
    if unknown:
        raise ValueError(f"unknown hf_dpo option(s) {sorted(unknown)}; known: pf, pfr, sp, padded, full, ref")
    fields = {}
    if LAYOUT_OPTIONS & set(options):
        fields.update(padding_free="pf" in options or "pfr" in options, share_prompt="sp" in options)
    if "pfr" in options:
        fields["padding_free_max_row_tokens"] = 1
    if "full" in options:
        fields["response_only_logits"] = False
    if "ref" in options:
        fields["precompute_ref_logps"] = True
    return fields


def minimind_pairs(rows: list[dict], tokenizer) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen ids, rejected ids) per row, EOS after each response, as TRL and hf_dpo tokenize them."""
    eos = tokenizer.eos_token_id
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [(encode(r["prompt"]), encode(r["chosen"]) + [eos], encode(r["rejected"]) + [eos]) for r in rows]


def minimind_batch(pairs, pad_id: int, pad_to: int | None):
    """The MiniMind recipe's batch: [chosen; rejected] stacked, inputs and labels shifted by one, a response mask.

    Returns ``x``, ``y``, ``mask`` and ``attention_mask``, each ``(2B, T-1)``, and the number of real tokens.
    ``T`` is ``pad_to`` (the recipe pads every sequence to max_length in its dataset) or, with ``pad_to=None``,
    the batch's longest sequence. The masks come from the lengths, never from comparing ids with the pad id.
    """
    import torch

    sequences = [(p + c, [0] * len(p) + [1] * len(c)) for p, c, _ in pairs]
    sequences += [(p + r, [0] * len(p) + [1] * len(r)) for p, _, r in pairs]
    width = pad_to or max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (2B, T)
    scored = torch.zeros((len(sequences), width), dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, response) in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        scored[row, : len(seq)] = torch.tensor(response)
        attention[row, : len(seq)] = 1
    # Position t predicts token t+1; the mask follows the label (a response token is scored where it is predicted).
    return ids[:, :-1], ids[:, 1:], scored[:, 1:], attention[:, :-1], int(attention.sum())


def minimind_sequence_logps(logits, labels, mask):
    """Per-sequence mean log-prob the recipe's way: full-vocabulary log_softmax, gather, mask, mean. ``(2B,)``."""
    import torch

    logps = torch.log_softmax(logits, dim=-1)  # (2B, T-1, V), fp32 under autocast: the tensor hf_dpo never builds
    token_logps = torch.gather(logps, 2, labels.unsqueeze(2)).squeeze(2)  # (2B, T-1)
    return (token_logps * mask).sum(1) / mask.sum(1).clamp_min(1)


def train_minimind(case, model, ref_model, rows, tokenizer, device, on_step_end):
    """A plain PyTorch loop following MiniMind's DPO recipe (policy and frozen reference on [chosen; rejected],
    length-normalized sigmoid loss, AdamW, clip 1.0, bf16 autocast). Returns (per-step losses, per-step tokens)."""
    import torch
    import torch.nn.functional as F

    batch_size, beta = case["batch"], 0.1
    pad_to = None if "dyn" in case["impl"].split("+") else SIZES[case["size"]]["max_length"]
    pairs = minimind_pairs(rows, tokenizer)
    model.to(device).train()
    ref_model.to(device).eval().requires_grad_(False)
    if case["gc"]:
        model.gradient_checkpointing_enable()
    # Trainer's defaults on the other side: AdamW, no weight decay, max_grad_norm 1.0; a constant rate here.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=case["dtype"] == "bf16")
    losses, tokens = [], []
    on_step_end(None)  # the start mark
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        *tensors, real_tokens = minimind_batch(chunk, tokenizer.pad_token_id, pad_to)
        x, y, mask, attention = (t.to(device) for t in tensors)
        tokens.append((sum(2 * len(p) + len(c) + len(r) for p, c, r in chunk), real_tokens))
        with autocast:
            with torch.no_grad():
                ref_logps = minimind_sequence_logps(ref_model(input_ids=x, attention_mask=attention).logits, y, mask)
            policy_logps = minimind_sequence_logps(model(input_ids=x, attention_mask=attention).logits, y, mask)
        half = len(chunk)
        logits = (policy_logps[:half] - policy_logps[half:]) - (ref_logps[:half] - ref_logps[half:])  # (B,)
        loss = -F.logsigmoid(beta * logits).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        on_step_end(len(losses))
    return losses, tokens


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
    impl, *options = case["impl"].split("+")
    sampler, marks = RssSampler(), {}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def on_step_end(step):
        """``None`` marks the start of training; otherwise ``step`` optimizer steps are done."""
        sync()
        if step is None:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            marks["rss_start"], marks["ends"], marks["cpu"] = (
                sampler.rss(),
                [time.perf_counter()],
                [time.process_time()],
            )
            return
        marks["ends"].append(time.perf_counter())
        marks["cpu"].append(time.process_time())
        if step == warmup:
            sampler.start()  # peak over the timed steps (the optimizer state exists by now)

    matmul_dtype = torch.bfloat16 if bf16 else torch.float32
    setup_start = time.perf_counter()
    if impl == "minimind":
        if set(options) - {"dyn"}:
            raise ValueError(f"unknown minimind option(s) {options}; known: dyn (pad per batch, not to max_length)")
        setup_s = time.perf_counter() - setup_start
        marks["peak_before"] = matmul_peak_flops(device, matmul_dtype)
        losses, tokens = train_minimind(case, model, ref_model, rows, tokenizer, device, on_step_end)
    else:
        train = datasets.Dataset.from_list(rows)
        common = dict(
            output_dir=tempfile.mkdtemp(prefix="hf_dpo_bench_"),
            per_device_train_batch_size=batch_size,
            max_steps=steps + warmup,
            learning_rate=1e-5,
            warmup_steps=0,  # the same schedule for every contestant (hf_dpo's DPO default warms up 10%)
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=case["seed"],
            bf16=bf16,
            gradient_checkpointing=case["gc"],
            dataloader_num_workers=0,
            disable_tqdm=True,
            use_cpu=device == "cpu",
            max_length=max_length,
            beta=0.1,
            precompute_ref_batch_size=batch_size,
            # Rows in file order for every contestant, the plain loop included: the same pairs in the same batches.
            train_sampling_strategy="sequential",
        )
        if impl == "trl":
            from trl import DPOConfig, DPOTrainer

            args = DPOConfig(**common, loss_type=["sigmoid"], precompute_ref_log_probs="ref" in options)
            trainer = DPOTrainer(model, ref_model, args=args, train_dataset=train, processing_class=tokenizer)
        elif impl == "hf_dpo":
            from hf_dpo import DPOConfig, NormalizedDPOTrainer

            # length_normalize=False and sigmoid: TRL's loss, so final losses compare; no layout flag unless named.
            args = DPOConfig(
                **common,
                max_prompt_length=max_length - 1,
                length_normalize=False,
                loss_type="sigmoid",
                ref_logps_cache_dir="",
                **hf_dpo_options(options),
            )
            trainer = NormalizedDPOTrainer(model, ref_model, args=args, train_dataset=train, processing_class=tokenizer)
        else:
            raise ValueError(f"unknown implementation {case['impl']!r}; known: trl, hf_dpo, minimind (+options)")
        setup_s = time.perf_counter() - setup_start

        tokens: list[tuple[int, int]] = []
        collate = trainer.data_collator

        def counting_collator(features):
            batch = collate(features)
            tokens.append(count_tokens(features, batch))
            return batch

        trainer.data_collator = counting_collator

        class Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **k):
                on_step_end(None)

            def on_step_end(self, args, state, control, **k):
                on_step_end(state.global_step)

        trainer.add_callback(Timer())
        marks["peak_before"] = matmul_peak_flops(device, matmul_dtype)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    peak_rss = sampler.stop()

    ends = marks["ends"]
    step_times = [b - a for a, b in zip(ends[:-1], ends[1:])][warmup:]
    cpu_times = [b - a for a, b in zip(marks["cpu"][:-1], marks["cpu"][1:])][warmup:]
    timed_tokens = tokens[warmup : warmup + len(step_times)]
    n_params = sum(p.numel() for p in model.parameters())
    non_embedding = n_params - model.get_input_embeddings().weight.numel()
    if size.get("tied"):
        non_embedding += model.get_input_embeddings().weight.numel()  # the head's matmul still runs
    ref_per_step = "ref" not in options
    computed = sum(c for _, c in timed_tokens)
    # 6N per computed token for the policy (forward + backward), 2N for the reference forward: 8N in all.
    flops_per_token = (6 + (2 if ref_per_step else 0)) * non_embedding
    # The machine's capability: the better of two measurements, before and after training.
    peak = max(marks["peak_before"], matmul_peak_flops(device, matmul_dtype))
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
        "computed_tokens": computed,
        "peak_rss_mb": peak_rss / 2**20,
        "rss_rise_mb": (peak_rss - marks["rss_start"]) / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "params": n_params,
        "params_no_input_embedding": non_embedding,
        "flops_per_token": flops_per_token,
        "mfu": flops_per_token * computed / sum(step_times) / peak,
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
    keys = (
        "tokens_per_s",
        "tokens_per_cpu_s",
        "median_step_s",
        "median_step_cpu_s",
        "peak_rss_mb",
        "rss_rise_mb",
        "cuda_peak_mb",
        "final_loss",
        "mfu",
        "setup_s",
        "computed_fraction",
    )
    rows = []
    for (size, data, impl), runs in groups.items():
        row = {"size": size, "data": data, "impl": impl, "repeats": len(runs), **{k: median_of(runs, k) for k in keys}}
        rows.append(row)
    for row in rows:
        base = next(
            (r for r in rows if (r["size"], r["data"], r["impl"]) == (row["size"], row["data"], baseline)), None
        )
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


def plan(args) -> list[dict]:
    """The configurations to run: one (``--size``, or a preset's), or the CPU suite; each with its impls,
    steps, warm-up, repeats per impl and baseline. Options given explicitly apply to every configuration."""
    if args.size is not None:
        entries = [dict(size=args.size, data=args.data, impls=args.impls.split(","))]
    else:
        entries = [dict(entry) for entry in SUITE]
        if args.impls:  # replaces the lists of the configurations that compare with TRL
            entries = [dict(e, impls=args.impls.split(",")) if "trl" in e["impls"] else e for e in entries]
    for entry in entries:
        for key, default in (("steps", 2), ("warmup", 1)):
            entry[key] = getattr(args, key) if getattr(args, key) is not None else entry.get(key, default)
        per_impl = {} if args.repeats is not None else entry.get("repeats", {})
        entry["repeats"] = {impl: per_impl.get(impl, args.repeats or 2) for impl in entry["impls"]}
        baseline = args.baseline or entry.get("baseline") or "trl"
        entry["baseline"] = baseline if baseline in entry["impls"] else entry["impls"][0]
    return entries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--preset", default=None, choices=list(PRESETS), help="a named benchmark (gpu: benchmarks/gpu.sh)"
    )
    parser.add_argument("--size", default=None, choices=list(SIZES), help="one configuration instead of the CPU suite")
    parser.add_argument("--data", default=None, choices=list(DATA_MIXES), help="data mix of --size (default standard)")
    parser.add_argument(
        "--impls",
        default=None,
        help="comma-separated implementations (see the docstring); with --size the default is trl,hf_dpo,hf_dpo+padded",
    )
    parser.add_argument("--baseline", default=None, help="the implementation the ratios divide by (default trl)")
    parser.add_argument("--batch", type=int, default=None, help="pairs per batch (default 4)")
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
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0

    for key, value in PRESETS.get(args.preset, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.data, args.batch = args.data or "standard", args.batch or 4
    args.timeout, args.deadline = args.timeout or 900, args.deadline or math.inf
    if args.size is not None and args.impls is None:
        args.impls = "trl,hf_dpo,hf_dpo+padded"

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
    )
    command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
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
                    result = launch(case, min(args.timeout, left + 60))
                except subprocess.TimeoutExpired:
                    skipped.append(f"{label} (timed out)")
                    print(f"[{time.perf_counter() - started:6.0f}s] {label}: timed out", file=sys.stderr, flush=True)
                    continue
                results.append(result)
                memory = (
                    f"CUDA peak {result['cuda_peak_mb']:.0f} MB"
                    if result["cuda_peak_mb"] is not None
                    else f"peak RSS {result['peak_rss_mb']:.0f} MB"
                )
                print(
                    f"[{time.perf_counter() - started:6.0f}s] {label}: {result['tokens_per_s']:.0f} tokens/s, "
                    f"median step {result['median_step_s']:.3f}s, {memory}, MFU {result['mfu']:.3f}, "
                    f"loss {result['final_loss']}",
                    file=sys.stderr,
                    flush=True,
                )
    rows, tables = [], []
    for entry in entries:
        subset = [r for r in results if (r["size"], r["data"]) == (entry["size"], entry["data"])]
        summary = [dict(r, baseline=entry["baseline"]) for r in summarize(subset, entry["baseline"])]
        rows += summary
        steps = f"{entry['warmup']} warm-up + {entry['steps']} timed steps"
        tables.append(
            f"**{entry['size']} / {entry['data']}** (max_length {SIZES[entry['size']]['max_length']}; {steps}; "
            f"ratios to {entry['baseline']})\n\n" + markdown(summary, entry["baseline"])
        )
    peaks = sorted({round(r["matmul_peak_tflops"], 3) for r in results})
    header = (
        f"Command: `{command}`\n\nMachine: {machine(args.threads)}\n\nDate: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"wall time {time.perf_counter() - started:.0f} s; {dtype}; gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; batch {args.batch} pairs; measured {dtype} matmul "
        f"peak {', '.join(map(str, peaks)) or '-'} TFLOP/s (MFU's denominator, per run)\n"
    )
    if skipped:
        header += f"\nNot run (deadline {args.deadline:.0f} s or timeout): {'; '.join(skipped)}\n"
    print(header + "\n" + "\n\n".join(tables))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": command,
                    "machine": machine(args.threads),
                    "runs": results,
                    "summary": rows,
                    "skipped": skipped,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
