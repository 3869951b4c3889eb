"""The ``hf-dpo`` run: train a causal LM with length-normalized DPO.

With no arguments it runs the built-in offline demo: a tiny random-init model, a
tokenizer and a preference data set built locally (hf_dpo.cli.demo), trained for about
15 seconds on CPU, with a summary, metrics, a model card and a PNG of the curves in
outputs/demo.

    hf-dpo                                     # the demo
    hf-dpo config.yaml [--flag value ...]      # a YAML/JSON config; flags override it
    hf-dpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset trl-lib/ultrafeedback_binarized --eval_dataset_split test --output_dir outputs/qwen
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml -m hf_dpo ...

The order is the user's: every flag and path is checked first (:mod:`hf_dpo.cli.checks`,
:mod:`hf_dpo.cli.run_record`), then the data is read and checked, then the models load;
nothing is written before the inputs passed their checks. See docs/usage.md.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: the summary reports what the user waited

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import datasets
import torch
import transformers

from ..common.flags import parse_bool
from ..training.config import DPOConfig
from .arguments import ModelArguments, ScriptArguments, has_accelerator, parse_args, uses_demo_model
from .checks import check_arguments
from .loading import build_trainer, load_data
from .run_record import (
    RunRecordCallback,
    check_output_dir,
    finish_record,
    new_record,
    remove_old_checkpoints,
    resume_checkpoint,
    run_identity,
    write_record,
)
from .summary import evaluation_at, generation_change, held_out_numbers, print_summary, write_plot

logger = logging.getLogger("hf_dpo.cli")


def use_gloo_without_gpus() -> None:
    """Launched as several processes on a machine without GPUs: run DDP over gloo on CPU.

    Otherwise TrainingArguments finds no GPU and no ``--use_cpu``, sets up no process
    group, and every process silently trains its own copy on the full data.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


@contextlib.contextmanager
def deepspeed_unimported(training_args: DPOConfig):
    """No DeepSpeed import in a run that does not use DeepSpeed (restored afterwards, for callers in one process).

    accelerate's ``extract_model_from_parallel`` (reached from transformers' ``save_pretrained``
    and every ``unwrap_model``) imports deepspeed whenever it is installed, only to test
    ``isinstance(model, DeepSpeedEngine)``; the import costs seconds and prints "Setting
    accelerator to CPU" on machines without a GPU. Without DeepSpeed asked for (``--deepspeed``
    or an accelerate DeepSpeed config) no model is a DeepSpeedEngine, so that test is answered
    False without the import: the unwrapped model is the same.
    """
    if training_args.deepspeed or parse_bool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        yield
        return
    import accelerate.utils.other

    original = accelerate.utils.other.is_deepspeed_available
    accelerate.utils.other.is_deepspeed_available = lambda: False
    try:
        yield
    finally:
        accelerate.utils.other.is_deepspeed_available = original


def setup_logging(training_args: DPOConfig) -> None:
    """transformers and datasets follow --log_level (WARNING by default, as in HF examples); this
    script and hf_dpo also say what they do (data report, reference, self-check) on the main process."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    ours = min(log_level, logging.INFO) if training_args.should_log else log_level
    logging.getLogger("hf_dpo").setLevel(ours)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the command; returns the summary written to ``<output_dir>/summary.json``."""
    use_gloo_without_gpus()
    script_args, model_args, training_args = parse_args(argv)
    check_arguments(script_args, model_args, training_args)  # flags and paths: nothing loaded or written yet
    check_output_dir(training_args, script_args.overwrite_output_dir)
    setup_logging(training_args)
    if script_args.torch_num_threads:
        torch.set_num_threads(script_args.torch_num_threads)
    with deepspeed_unimported(training_args):
        return run(script_args, model_args, training_args)


def run(script_args: ScriptArguments, model_args: ModelArguments, training_args: DPOConfig) -> dict[str, Any]:
    """The run after its arguments passed their checks: data, resume check, models, training, outputs."""
    output_dir = Path(training_args.output_dir)
    train_dataset, eval_dataset = load_data(script_args, model_args, training_args)  # the user's rows, checked
    identity = run_identity(script_args, model_args, training_args, train_dataset, eval_dataset)
    resume_from, resumed = resume_checkpoint(training_args, identity)
    if script_args.overwrite_output_dir and training_args.process_index == 0:
        remove_old_checkpoints(output_dir)
    trainer = build_trainer(script_args, model_args, training_args, train_dataset, eval_dataset)
    record = new_record(script_args, model_args, training_args, identity, resumed, resume_from)
    if trainer.is_world_process_zero():
        write_record(output_dir, record)
    trainer.add_callback(RunRecordCallback(record))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    logger.info("reference: %s; trainable parameters: %d of %d", trainer.reference_mode, trainable, total)

    has_eval = trainer.eval_dataset is not None
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    step = trainer.state.global_step
    after = None
    if has_eval:
        # Trainer evaluates at the last step itself when eval_strategy is "steps" or "epoch": reuse that evaluation.
        after = evaluation_at(trainer.state.log_history, step)
        if after is None:
            trainer.evaluate()  # logged into the state, where the model card reads it too
            after = evaluation_at(trainer.state.log_history, step)
        trainer.log_metrics("eval", after)
        trainer.save_metrics("eval", after)
    before = evaluation_at(trainer.state.log_history, 0) if has_eval else None

    summary: dict[str, Any] = {
        "demo": uses_demo_model(model_args.model_name_or_path, script_args.dataset),
        "use_peft": model_args.use_peft or bool(training_args.ref_adapter),  # the output is an adapter
        "reference": trainer.reference_mode,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "world_size": training_args.world_size,
        "global_steps": step,
        "held_out": {
            "pairs": len(trainer.eval_dataset) if has_eval else 0,
            # "before" is the evaluation at step 0 or nothing (--eval_on_start false): never a later one.
            "before": held_out_numbers(before),
            "after": held_out_numbers(after),
            "after_step": step if after else None,
        },
        "generations": generation_change(output_dir, trainer.state.log_history),
        "outputs": {"output_dir": str(output_dir)},
    }
    if trainer.is_world_process_zero() and script_args.plot:
        # Drawn before saving, so that the model card shows it.
        plot = write_plot(trainer.state.log_history, output_dir)
        summary["outputs"]["plot"] = str(plot) if plot else None
    # The adapter alone for a PEFT model; the tokenizer and the model card with it. push_to_hub saves first.
    if training_args.push_to_hub:
        trainer.push_to_hub()
    else:
        trainer.save_model()
    trainer.save_state()
    if trainer.is_world_process_zero():
        finish_record(output_dir, record, step)
        summary["time_s"] = time.perf_counter() - START
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary)
    return summary
