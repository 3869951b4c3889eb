"""The ``hf-dpo`` command: train a causal LM with length-normalized DPO.

With no arguments it runs the built-in offline demo: a tiny random-init model, a
tokenizer and a preference data set built locally (hf_dpo.demo), trained for about
15 seconds on CPU, with a summary, metrics, a model card and a PNG of the curves in
outputs/demo.

    hf-dpo                                     # the demo
    hf-dpo config.yaml [--flag value ...]      # a YAML/JSON config; flags override it
    hf-dpo --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset trl-lib/ultrafeedback_binarized --eval_dataset_split test --output_dir outputs/qwen
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml -m hf_dpo ...

Arguments: :class:`ScriptArguments`, :class:`ModelArguments` and every DPOConfig /
TrainingArguments field (``--help`` lists them all); TRL's names are accepted as
listed in :mod:`hf_dpo.training.trl_names`. See docs/usage.md.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: the summary reports what the user waited

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import datasets
import torch
import transformers

from ..training.config import DPOConfig
from .arguments import parse_args
from .loading import build_trainer
from .summary import first_evaluation, generation_change, held_out_numbers, print_summary, write_plot

logger = logging.getLogger("hf_dpo.cli")


def use_gloo_without_gpus() -> None:
    """Launched as several processes on a machine without GPUs: run DDP over gloo on CPU.

    Otherwise TrainingArguments finds no GPU and no ``--use_cpu``, sets up no process
    group, and every process silently trains its own copy on the full data.
    """
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6 knows every device type
    has_device = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_device:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


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
    setup_logging(training_args)
    if script_args.torch_num_threads:
        torch.set_num_threads(script_args.torch_num_threads)

    trainer = build_trainer(script_args, model_args, training_args)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    logger.info("reference: %s; trainable parameters: %d of %d", trainer.reference_mode, trainable, total)

    has_eval = trainer.eval_dataset is not None
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    after = None
    if has_eval:
        # Trainer evaluates at the last step itself when eval_strategy is "steps" or "epoch": reuse that evaluation.
        last = trainer.state.log_history[-2:] if trainer.state.log_history else []
        logged = next((e for e in last if "eval_loss" in e and e.get("step") == trainer.state.global_step), None)
        after = {k: v for k, v in logged.items() if k != "step"} if logged else trainer.evaluate()
    if after is not None:
        trainer.log_metrics("eval", after)
        trainer.save_metrics("eval", after)
    before = first_evaluation(trainer.state.log_history) if has_eval else None

    output_dir = Path(training_args.output_dir)
    summary: dict[str, Any] = {
        "demo": model_args.model_name_or_path is None,
        "use_peft": model_args.use_peft,
        "reference": trainer.reference_mode,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "world_size": training_args.world_size,
        "global_steps": trainer.state.global_step,
        "held_out": {
            "pairs": len(trainer.eval_dataset) if has_eval else 0,
            "before": held_out_numbers(before),
            "after": held_out_numbers(after),
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
        summary["time_s"] = time.perf_counter() - START
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary)
    return summary


def command() -> None:
    """The console-script entry point: :func:`main` with no return value (a returned dict would be an exit status)."""
    main()
