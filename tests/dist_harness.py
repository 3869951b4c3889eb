"""NormalizedDPOTrainer under DDP, ZeRO-2, ZeRO-3 and FSDP2 on CPU: the training script of tests/test_distributed.py.

``accelerate launch --config_file CONFIG tests/dist_harness.py ENGINE FIXTURE OUT kill`` trains the engine's
kill-and-resume phase (:data:`KILL_PHASE`) until rank 1 SIGKILLs itself while saving checkpoint-4, after
checkpoint-2 is complete; the launch must end with an error, the survivor stopped.

``... ENGINE FIXTURE OUT main`` then runs, in one launch:
1. ``model``, the separate reference: 4 SGD steps (momentum 0.5: its state must survive the resume; FSDP2 cannot
   reload an empty optimizer state) (checkpoint at step 2), final save, evaluation, the reference's per-pair sums of
   every step and its per-rank parameter counts; evaluation generations (3 prompts, split 2 + 1 over the ranks)
   before training and at the final evaluation;
2. ``adapter``: the LoRA adapter-disabled reference, 4 steps, with evaluation generations before training; ``precompute`` (ZeRO-2, ZeRO-3): precompute_ref_logps;
3. ``resume_killed``: ``resume_from_checkpoint=True`` on the killed run: it must pass over the partial checkpoint-4;
4. ``nan_error`` / ``nan_skip``: rank 1's policy turns NaN from step 2 (tests/custom_models/nan_logits.py), with
   ``nonfinite_loss`` error and skip (``nonfinite_max_consecutive_skips=2``); each process catches the error;
5. ``sync`` (DDP, ZeRO-2): TR-DPO, the separate reference synced after every step (alpha 0.5), 4 steps;
6. the terminal phase (:data:`TERMINAL`): rank 1 raises in compute_loss at step 2 (``raise``), or sleeps at step 3
   while ``step_timeout`` is 3 s (``hang``); the launch ends with an error.
Rank 0 writes OUT/result.json after every phase; every process logs hf_dpo's messages to OUT/rank<r>.log. The test
imports :func:`run_phase` for the 1-process baselines.

CPU-only workarounds live here, not in hf_dpo (see docs/distributed.md): DeepSpeed needs the
accelerate state created with gloo first and its shm op JIT build disabled; accelerate enables
FSDP only on GPU-like devices, so its state is switched to FSDP by hand.
"""

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

MAX_STEPS, SAVE_STEPS, PER_RANK, WORLD = 4, 2, 2, 2
GENERATIONS = {"eval_generations": 3, "eval_generation_max_new_tokens": 8, "eval_on_start": True}
CPU_DS_CONFIG = Path(__file__).resolve().parent / "accelerate_configs" / "cpu"
NAN_FROM_STEP, KILL_STEP, RAISE_STEP, HANG_STEP, STEP_TIMEOUT = 2, 4, 2, 3, 3.0
# The reference each engine's killed run uses; the uninterrupted phase of the same name is its baseline.
KILL_PHASE = {"ddp": "adapter", "zero2": "precompute", "zero3": "model", "fsdp2": "model"}
TERMINAL = {"ddp": "raise", "zero2": "hang", "zero3": "raise", "fsdp2": "hang"}
PHASES = {"model": {}, "adapter": {"reference": "adapter"}, "precompute": {"precompute": True}}


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


class Messages(logging.Handler):
    """Collects the messages of one logger while a phase runs."""

    def __init__(self, name):
        super().__init__(logging.INFO)
        self.messages, self.logger = [], logging.getLogger(name)
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)

    def emit(self, record):
        self.messages.append(record.getMessage())

    def close(self):
        self.logger.removeHandler(self)
        super().close()


def run_phase(
    engine,
    fixture,
    out,
    reference="model",
    precompute=False,
    resume=None,
    extra=None,
    fault=None,
    sync=False,
    generations=False,
):
    """Train one phase; returns a dict of numbers (meaningful on every rank).

    ``fault``: ``nan`` (rank 1's policy NaN from step 2), ``kill`` (rank 1 SIGKILLs itself while saving
    checkpoint-4), ``raise`` or ``hang`` (rank 1 raises at step 2, sleeps at step 3). ``sync``: TR-DPO, the
    separate reference synced after every step (alpha 0.5).
    """
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
    rank = int(os.environ.get("RANK", "0"))
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
        sync_ref_model=sync,
        ref_model_mixup_alpha=0.5,
        ref_model_sync_steps=1,
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
        """Records every training batch: its reference sums ``(B, 3)`` rows of (row_id, chosen, rejected), and
        ``(1, 2 + B)`` rows of (step, the batch's loss, row ids) computed here, apart from the guards."""

        records, batches = [], []

        def pair_losses(self, model, batch):
            result = super().pair_losses(model, batch)
            if model.training:
                sums = reference_logp_sums(self.reference_mode, model, self.ref_model, batch, self.score)  # (2B,)
                n = sums.shape[0] // 2
                self.records.append(torch.stack([batch["row_ids"].double(), sums[:n].double(), sums[n:].double()], 1))
                step = torch.tensor(
                    [self.state.global_step + 1.0, float(result[0].detach().mean())], dtype=torch.float64
                )
                self.batches.append(torch.cat([step, batch["row_ids"].double()])[None])
            return result

        def compute_loss(self, model, inputs, *rest, **kwargs):
            loss = super().compute_loss(model, inputs, *rest, **kwargs)
            step = self.state.global_step + 1
            if rank == 1 and model.training and fault == "raise" and step == RAISE_STEP:
                (Path(out).parent / "failed_at").write_text(str(time.time()))
                raise ValueError(f"injected failure in compute_loss on rank {rank}")
            if rank == 1 and model.training and fault == "hang" and step == HANG_STEP:
                (Path(out).parent / "hung_at").write_text(str(time.time()))
                time.sleep(120)
            return loss

        def _save_rng_state(self, output_dir):
            if fault == "kill" and rank == 1 and self.state.global_step == KILL_STEP:
                os.makedirs(output_dir, exist_ok=True)  # what Trainer does first here: the checkpoint exists, partial
                (Path(out).parent / "killed_at").write_text(str(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            return super()._save_rng_state(output_dir)

    guards, checkpoints = Messages("hf_dpo.training.guards"), Messages("hf_dpo.training.checkpoints")
    error, result = None, {"engine": engine}
    trainer = Recorder(
        model=model,
        args=args,
        train_dataset=str(fixture / "train.jsonl"),
        eval_dataset=str(fixture / "eval.jsonl"),
        processing_class=tokenizer,
        **kwargs,
    )
    if fault == "nan":
        sys.path.insert(0, str(Path(__file__).resolve().parent / "custom_models"))
        from nan_logits import poison_hidden_states

        poison_hidden_states(trainer.model, lambda: rank == 1 and trainer.state.global_step + 1 >= NAN_FROM_STEP)
    if trainer.ref_model is not None:
        counts = torch.tensor(local_numel(trainer.ref_model), dtype=torch.long)[None]  # (1, 2)
        result["ref_numel"] = trainer.accelerator.gather(counts).tolist()  # per rank: [local, full]
        result["ref_shapes"] = [
            list(getattr(p, "ds_shape", p.shape)) for p in unwrap_engine(trainer.ref_model).parameters()
        ]
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Exception as caught:  # noqa: BLE001 - the NaN phases expect an error on every process and record it
        if fault != "nan":
            raise
        error = [type(caught).__name__, str(caught), time.time()]
    finally:
        guards.close()
        checkpoints.close()
    from accelerate.utils import gather_object

    result["log"] = {str(e["step"]): e for e in trainer.state.log_history if "loss" in e}
    result["losses"] = {step: entry["loss"] for step, entry in result["log"].items()}
    # The first-step guard ran under this engine and found ln 2 (a resumed run has no first step).
    result["self_check_passed"] = any(m.startswith("self-check passed") for m in guards.messages)
    result["guard_messages"] = gather_object([guards.messages])
    result["checkpoint_messages"] = checkpoints.messages
    result["errors"] = gather_object([error])
    result["skipped_steps"] = gather_object([trainer.guards.skipped_step_numbers])
    batches = torch.cat(Recorder.batches)
    rank_column = torch.full((batches.shape[0], 1), float(rank), dtype=torch.float64)
    result["batches"] = trainer.accelerator.gather(torch.cat([rank_column, batches], 1)).tolist()
    result["ref_rows"] = trainer.accelerator.gather(torch.cat(Recorder.records)).tolist()
    if trainer.ref_model is not None:
        ref = unwrap_engine(trainer.ref_model)
        result["ref_resident"] = sum(p.data.numel() for p in ref.parameters() if not hasattr(p, "to_local"))
        result["ref_plain_tensors"] = sum(not hasattr(p, "to_local") for p in ref.parameters())
    if resume is None and reference == "model" and not precompute and fault is None and not sync:
        trainer.save_model(str(Path(out) / "final"))
        result["eval"] = trainer.evaluate()
    return result


def log_to_file(out: Path) -> None:
    """Every process writes hf_dpo's messages to OUT/rank<r>.log: the test compares what each process said."""
    handler = logging.FileHandler(out / f"rank{os.environ.get('RANK', '0')}.log")
    handler.setFormatter(logging.Formatter("%(created).3f %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("hf_dpo")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)


def main(engine, fixture, out, mode):
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    extra = cpu_workarounds(engine)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log_to_file(out)
    kill = KILL_PHASE[engine]
    if mode == "kill":
        run_phase(engine, fixture, out / kill, extra=extra, fault="kill", **PHASES[kill])
        raise AssertionError("rank 1 was to be killed while saving checkpoint-4")
    phases = {
        "model": {**PHASES["model"], "generations": True},
        "adapter": {**PHASES["adapter"], "generations": True},
        **({"precompute": PHASES["precompute"]} if engine.startswith("zero") else {}),
        "resume_killed": {**PHASES[kill], "resume": True, "out": out.parent / "kill" / kill},
        "nan_error": {"fault": "nan"},
        "nan_skip": {"fault": "nan", "extra": {"nonfinite_loss": "skip", "nonfinite_max_consecutive_skips": 2}},
        **({"sync": {"sync": True}} if engine in ("ddp", "zero2") else {}),
    }
    result = {}
    for name, options in phases.items():
        # A new Trainer builds a new Accelerator; accelerate refuses a second DeepSpeed plugin on a live state.
        AcceleratorState._reset_state()
        options = dict(options)
        phase_extra = {**extra, **options.pop("extra", {})}
        started = time.time()
        try:
            result[name] = run_phase(engine, fixture, options.pop("out", out / name), extra=phase_extra, **options)
        except Exception as error:  # noqa: BLE001 - DeepSpeed refuses nonfinite_loss=skip at construction
            if name != "nan_skip" or not engine.startswith("zero"):
                raise
            result[name] = {"refused": [type(error).__name__, str(error)]}
        result[name]["seconds"] = time.time() - started
        if int(os.environ.get("RANK", "0")) == 0:
            (out / "result.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
    AcceleratorState._reset_state()
    terminal = TERMINAL[engine]
    run_phase(engine, fixture, out / terminal, extra={**extra, "step_timeout": STEP_TIMEOUT}, fault=terminal)
    raise AssertionError(f"the {terminal} phase was to stop every process")


if __name__ == "__main__":
    main(*sys.argv[1:5])
