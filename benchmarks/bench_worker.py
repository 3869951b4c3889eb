"""One contestant of ``benchmarks/bench.py`` in its own process: build the model and data, train, measure.

``python benchmarks/bench.py`` launches ``bench.py --worker CASE`` once per run; this module does that run. It
builds the model (random init from a size's config, or the real SmolLM2-135M-Instruct, ``bench_real.py``), the
pairs, the trainer (TRL's ``DPOTrainer``, hf_dpo's ``NormalizedDPOTrainer``, or the plain loop of
``bench_minimind.py``), trains ``warmup + steps`` optimizer steps and returns what it measured: step times, the
tokens and FLOPs of every batch (``bench_flops.py``), peak RSS and RSS at the stages of set-up, the losses, and
a digest of the token ids trained on, which the parent compares across contestants.
"""

from __future__ import annotations

import copy
import math
import os
import resource
import statistics
import tempfile
import threading
import time

from bench_flops import batch_work, matmul_peak_flops, model_shape, step_flops
from bench_minimind import train_minimind
from bench_real import load_real_model, load_real_tokenizer, pair_tokens, real_rows, sharegpt_to_trl, tokens_digest

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
    # SmolLM2-135M-Instruct's architecture (Llama, 30 layers, hidden 576, 9 heads, 3 key-value heads, MLP 1536,
    # vocabulary 49,152, tied embeddings), random init: the real model's shape where its weights cannot be carried.
    "smollm2_shape": dict(
        hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, max_length=2048, tied=True
    ),
    # The real model: SmolLM2-135M-Instruct's converted weights and tokenizer on the real pairs (bench_real.py).
    "real": dict(real=True, max_length=512),
    # The same architecture at a size the CPU dry run of the GPU benchmark trains in seconds.
    "gpu_tiny": dict(
        arch="qwen2", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192, vocab=1024, max_length=128, tied=True
    ),
}
DATA_MIXES = {
    # Long-tailed (log-normal) lengths as fractions of max_length: (prompt median, response median, sigma).
    "standard": (0.08, 0.12, 0.9),
    # Prompt-heavy multi-turn: a long conversation so far, a short answer.
    "multiturn": (0.55, 0.06, 0.5),
}
PAD, EOS = "<pad>", "<eos>"


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer: word ``t<i>`` is token i, so any text of such words tokenizes one word per token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, model_max_length=1 << 20)


def build_model(size: dict, seed: int):
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


LAYOUT_OPTIONS = {"pf", "pfr", "sp", "padded"}


def hf_dpo_options(options: list[str]) -> dict:
    """DPOConfig fields for an ``hf_dpo+...`` name. Plain ``hf_dpo`` passes none: it measures the library's defaults.

    Naming any layout option (``pf``, ``pfr``, ``sp``, ``padded``) makes the whole layout explicit: padding_free
    and share_prompt are each on exactly when named, so ``+padded`` is the plain padded path whatever the defaults.
    ``gc`` (gradient checkpointing) is read by the worker for every contestant, not here.
    """
    unknown = set(options) - LAYOUT_OPTIONS - {"full", "ref", "gc"}
    if unknown:
        raise ValueError(f"unknown hf_dpo option(s) {sorted(unknown)}; known: pf, pfr, sp, padded, full, ref, gc")
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


def count_tokens(features: list[dict], batch: dict) -> tuple[int, int]:
    """(logical tokens: prompt + response of both sides as trained on; tokens the layout computes, padding excluded).

    TRL truncates in its collator, so its logical tokens are read from the batch (no shared prompt there: every
    non-padding position is a logical token); hf_dpo's features are already truncated.
    """
    if "segment_ids" in batch:
        computed = int((batch["segment_ids"] >= 0).sum())
    else:
        computed = int(batch["attention_mask"].sum())
    if "prompt_ids" in features[0]:  # TRL
        return computed, computed
    return sum(len(f["chosen_input_ids"]) + len(f["rejected_input_ids"]) for f in features), computed


def _trainer_args(case: dict, device: str, max_length: int, gc: bool) -> dict:
    """The TrainingArguments every trainer contestant shares."""
    return dict(
        output_dir=tempfile.mkdtemp(prefix="hf_dpo_bench_"),
        per_device_train_batch_size=case["batch"],
        max_steps=case["steps"] + case["warmup"],
        learning_rate=1e-5,
        warmup_steps=0,  # the same schedule for every contestant (hf_dpo's DPO default warms up 10%)
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=case["seed"],
        bf16=case["dtype"] == "bf16",
        gradient_checkpointing=gc,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=device == "cpu",
        max_length=max_length,
        beta=0.1,
        precompute_ref_batch_size=case["batch"],
        # Rows in file order for every contestant, the plain loop included: the same pairs in the same batches.
        train_sampling_strategy="sequential",
    )


def build_trainer(case, model, ref_model, rows, tokenizer, device, max_length, real: bool):
    """TRL's DPOTrainer or hf_dpo's NormalizedDPOTrainer for ``case["impl"]``, on the same weights and rows."""
    import datasets

    impl, *options = case["impl"].split("+")
    gc = case["gc"] or "gc" in options
    common = _trainer_args(case, device, max_length, gc)
    if impl == "trl":
        from trl import DPOConfig, DPOTrainer

        if set(options) - {"ref", "gc"}:
            raise ValueError(f"unknown trl option(s) {options}; known: ref, gc")
        train = datasets.Dataset.from_list([sharegpt_to_trl(row) for row in rows] if real else rows)
        args = DPOConfig(**common, loss_type=["sigmoid"], precompute_ref_log_probs="ref" in options)
        return DPOTrainer(model, ref_model, args=args, train_dataset=train, processing_class=tokenizer)
    if impl == "hf_dpo":
        from hf_dpo import DPOConfig, NormalizedDPOTrainer

        # length_normalize=False and sigmoid: TRL's loss, so final losses compare; no layout flag unless named.
        # The synthetic mixes have prompts up to 0.8 max_length, which no library truncates; the real pairs keep
        # hf_dpo's default max_prompt_length (bench_real.real_rows picks prompts that fit it).
        args = DPOConfig(
            **common,
            **({} if real else {"max_prompt_length": max_length - 1}),
            length_normalize=False,
            loss_type="sigmoid",
            ref_logps_cache_dir="",
            **hf_dpo_options(options),
        )
        train = datasets.Dataset.from_list(rows)
        return NormalizedDPOTrainer(model, ref_model, args=args, train_dataset=train, processing_class=tokenizer)
    raise ValueError(f"unknown implementation {case['impl']!r}; known: trl, hf_dpo, minimind (+options)")


def run_worker(case: dict) -> dict:
    """Train one implementation on one configuration in this process; return the measurements."""
    import datasets
    import torch
    from transformers import TrainerCallback

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    datasets.disable_progress_bars()
    sampler, marks = RssSampler(), {"rss": {"imports": RssSampler().rss()}}
    size = SIZES[case["size"]]
    real = bool(size.get("real"))
    device = "cuda" if torch.cuda.is_available() and not case.get("cpu") else "cpu"
    steps, warmup, batch_size = case["steps"], case["warmup"], case["batch"]
    max_length = case.get("max_length") or size["max_length"]
    impl, *options = case["impl"].split("+")
    if real:
        if impl == "minimind":
            raise ValueError("the minimind loop takes the synthetic string rows; run it on the random-init sizes")
        tokenizer, model = load_real_tokenizer(), load_real_model()
        rows = real_rows(tokenizer, max_length, batch_size * (steps + warmup))
    else:
        tokenizer = build_tokenizer(size["vocab"])
        model = build_model(size, case["seed"])
        rows = make_rows(batch_size * (steps + warmup), size["vocab"], max_length, case["data"], case["seed"])
    marks["rss"]["model"] = sampler.rss()
    ref_model = copy.deepcopy(model)
    marks["rss"]["reference"] = sampler.rss()
    shape = model_shape(model)
    n_params = sum(p.numel() for p in model.parameters())

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def on_step_end(step):
        """``None`` marks the start of training; otherwise ``step`` optimizer steps are done."""
        sync()
        if step is None:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            marks["rss"]["train_start"] = sampler.rss()
            marks["ends"], marks["cpu"], marks["rss_after_step"] = [time.perf_counter()], [time.process_time()], []
            if warmup == 0:
                sampler.start()
            return
        marks["ends"].append(time.perf_counter())
        marks["cpu"].append(time.process_time())
        marks["rss_after_step"].append(sampler.rss())
        if step == warmup:
            sampler.start()  # peak over the timed steps (the optimizer state exists by now)

    matmul_dtype = torch.bfloat16 if case["dtype"] == "bf16" else torch.float32
    setup_start = time.perf_counter()
    batches: list[dict] = []
    if impl == "minimind":
        if set(options) - {"dyn"}:
            raise ValueError(f"unknown minimind option(s) {options}; known: dyn (pad per batch, not to max_length)")
        setup_s = time.perf_counter() - setup_start
        marks["peak_before"] = matmul_peak_flops(device, matmul_dtype, shape)
        losses, batches = train_minimind(
            dict(case, max_length=max_length), model, ref_model, rows, tokenizer, device, on_step_end
        )
    else:
        trainer = build_trainer(case, model, ref_model, rows, tokenizer, device, max_length, real)
        ref_model = None  # the trainer's own reference now: precompute_ref_logps (+ref) can release it
        setup_s = time.perf_counter() - setup_start
        marks["rss"]["trainer"] = sampler.rss()
        collate = trainer.data_collator
        full_logits = impl == "trl" or "full" in options

        def counting_collator(features):
            batch = collate(features)
            logical, computed = count_tokens(features, batch)
            work = batch_work(batch, full_logits)
            batches.append(
                {"logical": logical, "computed": computed, "work": work, "pairs": pair_tokens(features, batch)}
            )
            return batch

        trainer.data_collator = counting_collator

        class Timer(TrainerCallback):
            def on_train_begin(self, args, state, control, **k):
                on_step_end(None)

            def on_step_end(self, args, state, control, **k):
                on_step_end(state.global_step)

        trainer.add_callback(Timer())
        marks["peak_before"] = matmul_peak_flops(device, matmul_dtype, shape)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    peak_rss = sampler.stop()

    ends = marks["ends"]
    step_times = [b - a for a, b in zip(ends[:-1], ends[1:])][warmup:]
    cpu_times = [b - a for a, b in zip(marks["cpu"][:-1], marks["cpu"][1:])][warmup:]
    timed = batches[warmup : warmup + len(step_times)]
    logical = sum(b["logical"] for b in timed)
    computed = sum(b["computed"] for b in timed)
    reference_every_step = "ref" not in options
    flops = [step_flops(shape, b["work"], reference_every_step) for b in timed]
    total_flops = sum(f["total"] for f in flops)
    # The machine's capability: the better of two measurements, before and after training.
    peak = max(marks["peak_before"], matmul_peak_flops(device, matmul_dtype, shape))
    per_step = lambda key: statistics.mean(b["work"][key] for b in timed)  # noqa: E731
    return {
        **case,
        "max_length": max_length,
        "device": device,
        "setup_s": setup_s,
        "step_times": step_times,
        "median_step_s": statistics.median(step_times),
        "median_step_cpu_s": statistics.median(cpu_times),
        "tokens_per_cpu_s": logical / sum(cpu_times),
        "tokens_per_s": logical / sum(step_times),
        "computed_tokens_per_s": computed / sum(step_times),
        "computed_fraction": computed / max(1, logical),
        "timed_tokens": logical,
        "computed_tokens": computed,
        "logical_per_step": logical / len(timed),
        "computed_per_step": per_step("computed"),
        "padding_per_step": per_step("padding"),
        "head_positions_per_step": per_step("head"),
        "scored_per_step": per_step("scored"),
        "tokens_digest": tokens_digest([pair for b in batches for pair in b.get("pairs", [])])
        if batches[0].get("pairs")
        else None,
        "peak_rss_mb": peak_rss / 2**20,
        "rss_rise_mb": (peak_rss - marks["rss"]["train_start"]) / 2**20,
        "rss_marks_mb": {k: v / 2**20 for k, v in marks["rss"].items()},
        "rss_after_step_mb": [v / 2**20 for v in marks["rss_after_step"]],
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
        "params": n_params,
        "shape": shape,
        "step_flops": [f["total"] for f in flops],
        "attention_flops_fraction": sum(f["attention"] for f in flops) / total_flops,
        "achieved_tflops": total_flops / sum(step_times) / 1e12,
        "mfu": total_flops / sum(step_times) / peak,
        "matmul_peak_tflops": peak / 1e12,
    }
