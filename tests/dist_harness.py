"""NormalizedDPOTrainer under DDP, ZeRO-2, ZeRO-3 and FSDP2 on CPU: the training script of tests/test_distributed.py.

``accelerate launch --config_file CONFIG tests/dist_harness.py ENGINE FIXTURE OUT`` runs, in one launch:
1. the separate reference: 4 SGD steps (momentum 0.5: its state must survive the resume; FSDP2 cannot reload an empty optimizer state) (checkpoint at step 2), final save, evaluation, the
   reference's per-pair sums of every step and its per-rank parameter counts; evaluation generations (3 prompts,
   split 2 + 1 over the ranks) before training and at the final evaluation;
2. resume from checkpoint-2 in a fresh trainer (steps 3-4);
3. the LoRA adapter-disabled reference: 4 steps, with evaluation generations before training;
4. (ZeRO-3) precompute_ref_logps: 4 steps.
Rank 0 writes OUT/result.json. The test imports :func:`run_phase` for the 1-process baselines.

CPU-only workarounds live here, not in hf_dpo (see docs/distributed.md): DeepSpeed needs the
accelerate state created with gloo first and its shm op JIT build disabled; accelerate enables
FSDP only on GPU-like devices, so its state is switched to FSDP by hand.
"""

import json
import logging
import os
import sys
from pathlib import Path

MAX_STEPS, SAVE_STEPS, PER_RANK, WORLD = 4, 2, 2, 2
GENERATIONS = {"eval_generations": 3, "eval_generation_max_new_tokens": 8, "eval_on_start": True}
CPU_DS_CONFIG = Path(__file__).resolve().parent / "accelerate_configs" / "cpu"


def cpu_workarounds(engine: str) -> dict:
    """Make ``engine`` run on CPU over gloo; returns extra DPOConfig arguments."""
    if engine.startswith("zero"):
        import deepspeed.ops
        from accelerate import PartialState

        # The shm all-reduce op is JIT-compiled on first start (45-115 s); plain gloo collectives are used instead.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        # Without a backend accelerate sees 1 process on each rank and DeepSpeed asserts on the batch size.
        PartialState(backend="gloo")
        return {
            "accelerator_config": {"use_configured_state": True},
            "deepspeed": str(CPU_DS_CONFIG / f"ds_{engine}.json"),
        }
    if engine == "fsdp2":
        import accelerate.state as st
        from accelerate.utils import DistributedType

        original = st.AcceleratorState.__init__

        def init(self, *args, fsdp_plugin=None, **kwargs):
            original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if fsdp_plugin is not None and self.distributed_type != DistributedType.FSDP:
                self.distributed_type = DistributedType.FSDP
                self.fsdp_plugin = fsdp_plugin
                st.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

        st.AcceleratorState.__init__ = init
        return {"ddp_backend": "gloo"}  # without it accelerate sets up one process per rank (hf_dpo refuses that)
    return {"use_cpu": True}


def build_fixture(directory: Path) -> None:
    """Tiny tied-free Llama + tokenizer in ``directory/init``, 16 train and 8 eval pairs."""
    from hf_dpo.cli.demo import build_model, build_tokenizer, make_preference_rows

    tokenizer = build_tokenizer("chatml")
    model = build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0)
    model.save_pretrained(directory / "init")
    tokenizer.save_pretrained(directory / "init")
    for name, n, seed in (("train", 16, 0), ("eval", 8, 1)):
        rows = make_preference_rows(n, seed=seed)
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def run_phase(engine, fixture, out, reference="model", precompute=False, resume=None, extra=None, generations=False):
    """Train one phase; returns a dict of numbers (meaningful on every rank)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_dpo import DPOConfig, NormalizedDPOTrainer
    from hf_dpo.common.models import unwrap as unwrap_engine
    from hf_dpo.reference.engines import local_numel
    from hf_dpo.reference.modes import reference_logp_sums

    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    fixture = Path(fixture)
    per_device = PER_RANK if engine != "single" else PER_RANK * WORLD
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        max_steps=MAX_STEPS,
        learning_rate=0.5,
        optim="sgd",
        optim_args="momentum=0.5",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        beta=2.0,
        max_length=64,
        max_prompt_length=48,
        precompute_ref_logps=precompute,
        ref_logps_cache_dir="",
        **(GENERATIONS if generations else {}),
        **(extra or {}),
    )
    # Loaded after DPOConfig, so that ZeRO-3 partitions both models as they load.
    tokenizer = AutoTokenizer.from_pretrained(fixture / "init")
    model = AutoModelForCausalLM.from_pretrained(fixture / "init", dtype=torch.float32)
    kwargs = {}
    if reference == "adapter":
        from peft import LoraConfig

        torch.manual_seed(0)  # the same LoRA A on every rank and in the baseline
        kwargs["peft_config"] = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    else:
        kwargs["ref_model"] = AutoModelForCausalLM.from_pretrained(fixture / "init", dtype=torch.float32)

    class Recorder(NormalizedDPOTrainer):
        """Records the reference sums of every training batch: ``(B, 3)`` rows of (row_id, chosen, rejected)."""

        records = []

        def pair_losses(self, model, batch):
            result = super().pair_losses(model, batch)
            if model.training:
                sums = reference_logp_sums(self.reference_mode, model, self.ref_model, batch, self.score)  # (2B,)
                n = sums.shape[0] // 2
                self.records.append(torch.stack([batch["row_ids"].double(), sums[:n].double(), sums[n:].double()], 1))
            return result

    class Messages(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    messages = []
    guards_logger = logging.getLogger("hf_dpo.training.guards")
    guards_logger.setLevel(logging.INFO)
    handler = Messages()
    guards_logger.addHandler(handler)
    trainer = Recorder(
        model=model,
        args=args,
        train_dataset=str(fixture / "train.jsonl"),
        eval_dataset=str(fixture / "eval.jsonl"),
        processing_class=tokenizer,
        **kwargs,
    )
    result = {"engine": engine}
    if trainer.ref_model is not None:
        counts = torch.tensor(local_numel(trainer.ref_model), dtype=torch.long)[None]  # (1, 2)
        result["ref_numel"] = trainer.accelerator.gather(counts).tolist()  # per rank: [local, full]
        result["ref_shapes"] = [
            list(getattr(p, "ds_shape", p.shape)) for p in unwrap_engine(trainer.ref_model).parameters()
        ]
    trainer.train(resume_from_checkpoint=resume)
    guards_logger.removeHandler(handler)
    # The first-step guard ran under this engine and found ln 2 (a resumed run has no first step).
    result["self_check_passed"] = any(m.startswith("self-check passed") for m in messages)
    result["losses"] = {str(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e}
    rows = torch.cat(Recorder.records)
    result["ref_rows"] = trainer.accelerator.gather(rows).tolist()
    if trainer.ref_model is not None:
        ref = unwrap_engine(trainer.ref_model)
        result["ref_resident"] = sum(p.data.numel() for p in ref.parameters() if not hasattr(p, "to_local"))
        result["ref_plain_tensors"] = sum(not hasattr(p, "to_local") for p in ref.parameters())
    if resume is None and reference == "model" and not precompute:
        trainer.save_model(str(Path(out) / "final"))
        result["eval"] = trainer.evaluate()
    return result


def main(engine, fixture, out):
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    extra = cpu_workarounds(engine)
    out = Path(out)
    phases = {
        "model": {"generations": True},
        "resume": {"resume": str(out / "model" / "checkpoint-2")},
        "adapter": {"reference": "adapter", "generations": True},
        **({"precompute": {"precompute": True}} if engine == "zero3" else {}),
    }
    result = {}
    for name, options in phases.items():
        # A new Trainer builds a new Accelerator; accelerate refuses a second DeepSpeed plugin on a live state.
        AcceleratorState._reset_state()
        result[name] = run_phase(engine, fixture, out / name, extra=extra, **options)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "result.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
