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
listed in :mod:`hf_dpo.trl_compat`. See docs/usage.md.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: the summary reports what the user waited

import argparse
import inspect
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from .config import DPOConfig
from .data import load_preference_dataset
from .demo import build_demo
from .trainer import NormalizedDPOTrainer
from .trl_compat import help_epilog, translate_argv, translate_mapping

logger = logging.getLogger("hf_dpo.cli")

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Defaults for the demo (no --model_name_or_path), sized so that the
# tiny model learns the task in well under a minute on 2 CPU cores. A config file or a
# flag still overrides each of them.
DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/demo",
    "num_train_epochs": 1,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 5,
    "logging_steps": 2,
    "save_strategy": "no",
    "report_to": "none",
    "dataloader_pin_memory": False,  # CPU-sized batches; avoids torch's warning on machines without a GPU
    "ddp_find_unused_parameters": False,  # every parameter takes part in the forward pass
    "max_length": 128,
    "max_prompt_length": 96,
    # 64-wide matrices are too small to split across threads: on 2 cores one thread runs
    # several times faster than two, and far faster when other processes share the CPU.
    "torch_num_threads": 1,
}
# Only when there is evaluation data: Trainer refuses eval_strategy="steps" without it.
DEMO_EVAL_DEFAULTS: dict[str, Any] = {"eval_strategy": "steps", "eval_steps": 8}
# The script's own defaults for TrainingArguments fields, demo or not: the held-out numbers
# before training come from an evaluation inside train(), after every report_to integration
# has started (an evaluate() before train() would log to trackers not yet set up).
SCRIPT_DEFAULTS: dict[str, Any] = {"eval_on_start": True}


@dataclass
class ScriptArguments:
    """Where the preference data comes from, and what the script writes besides the model."""

    dataset: Optional[str] = field(
        default=None,
        metadata={"help": "Training pairs: a JSONL/JSON file, a directory of them, or a hub data set name. Default: the built-in demo data."},
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Configuration (subset) name of a hub --dataset."})
    dataset_revision: Optional[str] = field(default=None, metadata={"help": "Revision (branch, tag or commit) of a hub --dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub --dataset to train on."})
    eval_dataset: Optional[str] = field(
        default=None,
        metadata={"help": "Held-out pairs (file, directory or hub name). Default: --dataset itself when --eval_dataset_split is given."},
    )
    eval_dataset_split: Optional[str] = field(
        default=None, metadata={"help": "Split of the hub evaluation data set, e.g. test."}
    )
    eval_split_size: float = field(
        default=0.0,
        metadata={"help": "Without an evaluation data set, hold this many training pairs out (a fraction if < 1, a count if >= 1)."},
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Keep only the first N training pairs (quick runs)."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep only the first N evaluation pairs."})
    plot: bool = field(default=True, metadata={"help": "Write training_curves.png next to the outputs (needs matplotlib)."})
    torch_num_threads: Optional[int] = field(
        default=None, metadata={"help": "CPU threads for torch (torch.set_num_threads). Default: torch's choice; 1 for the demo."}
    )


@dataclass
class ModelArguments:
    """The policy, the optional separate reference, and LoRA.

    ``trust_remote_code`` is a DPOConfig field (it also governs models the trainer loads by name).
    """

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Policy model: hub name or local directory. Default: the tiny demo model (and demo defaults)."}
    )
    model_revision: Optional[str] = field(
        default=None, metadata={"help": "Revision (branch, tag or commit) of the policy, its tokenizer and a hub reference."}
    )
    ref_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Separate frozen reference. Default: a frozen copy of the policy, or the adapter-disabled base with --use_peft."},
    )
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "dtype to load the weights in; auto keeps the checkpoint's.", "choices": list(DTYPES)},
    )
    attn_implementation: Optional[str] = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})
    use_peft: bool = field(
        default=False, metadata={"help": "Train a LoRA adapter only; the reference is the base model with the adapter disabled."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout; --disable_dropout (on by default) sets it to 0 anyway."}
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt, or all-linear (every linear layer except the output head)."},
    )


# ---------------------------------------------------------------------------- arguments


def read_config_file(path: str) -> dict[str, Any]:
    """Key/value pairs of a YAML or JSON config file; keys are argument names without ``--``."""
    text = Path(path).read_text(encoding="utf-8")
    if path.endswith(".json"):
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise SystemExit(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}")
    try:
        return translate_mapping(values)
    except ValueError as err:
        raise SystemExit(f"{path}: {err}") from None


def make_parser() -> HfArgumentParser:
    return HfArgumentParser(
        (ScriptArguments, ModelArguments, DPOConfig),
        prog="hf-dpo",
        description="Train a causal LM with length-normalized DPO. No arguments: the offline demo. "
        "A YAML/JSON config file may come first; flags override it.",
        epilog=help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def will_have_eval_data(namespace: argparse.Namespace) -> bool:
    """Whether :func:`load_data` will return evaluation pairs for these arguments."""
    return bool(namespace.eval_dataset or namespace.eval_dataset_split or namespace.eval_split_size > 0 or namespace.dataset is None)


def defaults_in_force(namespace: argparse.Namespace) -> dict[str, Any]:
    """The script's defaults for a run, before the config file and the flags: the demo's for the demo model."""
    has_eval = will_have_eval_data(namespace)
    defaults = dict(SCRIPT_DEFAULTS) if has_eval else {}
    if namespace.model_name_or_path is None:
        defaults.update(DEMO_DEFAULTS)
        if has_eval:
            defaults.update(DEMO_EVAL_DEFAULTS)
    return defaults


def parse_args(argv: Optional[list[str]] = None) -> tuple[ScriptArguments, ModelArguments, DPOConfig]:
    """Parse ``[config file] [--flag value ...]``; precedence: flags > config file > script (demo) defaults > field defaults.

    The arguments are read once without building DPOConfig, to learn which defaults
    are in force (the demo's only without ``model_name_or_path``; the demo's evaluation
    schedule only with evaluation data); DPOConfig's checks then see those defaults.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    file_values: dict[str, Any] = {}
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        file_values = read_config_file(argv.pop(0))
    try:
        argv = translate_argv(argv)
    except ValueError as err:
        raise SystemExit(str(err)) from None

    parser = make_parser()
    unknown = sorted(set(file_values) - {action.dest for action in parser._actions})
    if unknown:
        raise SystemExit(f"config file: unknown argument(s) {', '.join(unknown)}; see --help for the names")
    # A string default goes through the argument's type like a flag would (YAML reads 1e-3 as a string).
    parser.set_defaults(**file_values)
    first_look, _ = parser.parse_known_args(argv)  # --help prints and exits here
    script_defaults = defaults_in_force(first_look)

    parser = make_parser()
    parser.set_defaults(**{**script_defaults, **file_values})
    try:
        script_args, model_args, training_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as err:
        given = set(file_values) | {a.lstrip("-").split("=")[0] for a in argv if a.startswith("--")}
        implied = {k: v for k, v in script_defaults.items() if k not in given and k in str(err)}
        if implied:
            raise SystemExit(f"{err} (defaults of this run you did not set: {implied}; set them explicitly to change them)") from None
        raise SystemExit(str(err)) from None
    training_args.resume_from_checkpoint = resume_value(training_args.resume_from_checkpoint)
    return script_args, model_args, training_args


def resume_value(value: Optional[str]):
    """``--resume_from_checkpoint``: true -> True (newest complete checkpoint in output_dir), false -> None, else a path."""
    if value is None:
        return None
    lowered = str(value).strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    if lowered in ("false", "no", "0", "", "none"):
        return None
    if not Path(value).is_dir():
        raise SystemExit(f"--resume_from_checkpoint {value}: no such directory (or pass true for the newest complete checkpoint in --output_dir)")
    return value


# ---------------------------------------------------------------------------- data and models


def demo_assets(directory: Path, training_args: DPOConfig) -> dict[str, Path]:
    """Build the demo's tokenizer, model and data once (main process), and return their paths."""
    directory = directory.resolve()
    paths = {"tokenizer": directory / "tokenizer", "model": directory / "model", "train": directory / "train.jsonl", "eval": directory / "eval.jsonl"}
    with training_args.main_process_first(local=False, desc="building the demo assets"):
        if training_args.process_index == 0:
            built = {key: Path(value).resolve() for key, value in build_demo(directory).items()}
            if built != paths:  # the other ranks rely on this layout without building
                raise RuntimeError(f"hf_dpo.demo.build_demo wrote {built}, expected {paths}")
    return paths


# Hub options of --dataset, passed to load_preference_dataset only under the keyword it accepts.
HUB_OPTIONS = {"dataset_config": ("name", "config_name", "dataset_config"), "dataset_revision": ("revision", "dataset_revision")}


def hub_kwargs(script_args: ScriptArguments) -> dict[str, Any]:
    """Keyword arguments for ``load_preference_dataset`` from ``--dataset_config`` / ``--dataset_revision``.

    Refuses (rather than ignores) an option the installed ``load_preference_dataset`` cannot take.
    """
    accepted = inspect.signature(load_preference_dataset).parameters
    kwargs = {}
    for flag, keywords in HUB_OPTIONS.items():
        value = getattr(script_args, flag)
        if value is None:
            continue
        keyword = next((k for k in keywords if k in accepted), None)
        if keyword is None:
            raise SystemExit(f"--{flag} {value}: this hf_dpo's load_preference_dataset has no such option")
        kwargs[keyword] = value
    return kwargs


def load_data(script_args: ScriptArguments, training_args: DPOConfig, demo: Optional[dict[str, Path]]):
    """The canonical training and evaluation data sets (evaluation may be None)."""
    source = script_args.dataset or (demo and demo["train"])
    if source is None:
        raise SystemExit("--dataset is required with --model_name_or_path")
    on_bad_row = training_args.on_bad_row
    extra = hub_kwargs(script_args)
    train = load_preference_dataset(source, split=script_args.dataset_split, on_bad_row=on_bad_row, **extra)
    evaluation = None
    if script_args.eval_dataset or script_args.eval_dataset_split:
        eval_source = script_args.eval_dataset or script_args.dataset
        if eval_source is None:
            raise SystemExit("--eval_dataset_split needs --eval_dataset or --dataset to take the split from")
        if script_args.eval_dataset is None and os.path.exists(eval_source):
            # A local file has no splits: the "test split" would be the training pairs themselves.
            raise SystemExit(
                f"--eval_dataset_split {script_args.eval_dataset_split}: {eval_source} is a local path, which has no splits; "
                "pass --eval_dataset FILE or --eval_split_size instead"
            )
        evaluation = load_preference_dataset(
            eval_source, split=script_args.eval_dataset_split, on_bad_row=on_bad_row, **(extra if not script_args.eval_dataset else {})
        )
    elif script_args.eval_split_size > 0:
        size = script_args.eval_split_size
        split = train.train_test_split(test_size=int(size) if size >= 1 else size, seed=training_args.seed)
        train, evaluation = split["train"], split["test"]
    elif script_args.dataset is None and demo is not None:
        evaluation = load_preference_dataset(demo["eval"], on_bad_row=on_bad_row)
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if evaluation is not None and script_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(script_args.max_eval_samples, len(evaluation))))
    return train, evaluation


def load_tokenizer(name: str, training_args: DPOConfig, revision: Optional[str] = None):
    kwargs: dict[str, Any] = {"trust_remote_code": training_args.trust_remote_code}
    if revision:
        kwargs["revision"] = revision
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    if tokenizer.pad_token is None:
        # Safe: masks come from the collator's response_mask, never from input_ids != pad_token_id.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, model_args: ModelArguments, training_args: DPOConfig, revision: Optional[str] = None):
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[model_args.torch_dtype],
        "trust_remote_code": training_args.trust_remote_code,
    }
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if revision:
        kwargs["revision"] = revision
    return AutoModelForCausalLM.from_pretrained(name, **kwargs)


def lora_config(model_args: ModelArguments):
    from peft import LoraConfig

    targets = model_args.lora_target_modules
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )


# ---------------------------------------------------------------------------- reporting


def held_out_numbers(metrics: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
    if not metrics:
        return None
    keys = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected")
    return {key[len("eval_") :]: metrics[key] for key in keys if key in metrics}


def first_evaluation(log_history: list[dict]) -> Optional[dict[str, float]]:
    """The evaluation logged at the start of training (``eval_on_start``), kept across resumes in the state."""
    return next((entry for entry in log_history if "eval_loss" in entry), None)


def write_plot(log_history: list[dict], output_dir: Path) -> Optional[Path]:
    try:
        from .plotting import plot_training_curves

        return plot_training_curves(log_history, output_dir / "training_curves.png", title=str(output_dir))
    except ImportError as err:
        print(f"Skipping the training-curve plot: {err}")  # one line on stdout beside the closing screen
        return None


def print_summary(summary: dict[str, Any]) -> None:
    """The run's closing screen on stdout: the command's result, so a print, not a log record."""
    before, after = summary["held_out"]["before"], summary["held_out"]["after"]
    lines = [f"\n==== hf_dpo: finished in {summary['time_s']:.1f} s ===="]
    if before and after:
        lines += [
            f"held-out pairs:   {summary['held_out']['pairs']}",
            f"reward accuracy:  {before['rewards/accuracies']:.3f} -> {after['rewards/accuracies']:.3f}"
            "   (exact ties count 1/2, so no preference = 0.5)",
            f"reward margin:    {before['rewards/margins']:+.4f} -> {after['rewards/margins']:+.4f}",
            f"loss:             {before['loss']:.4f} -> {after['loss']:.4f}",
        ]
    else:
        lines.append("no evaluation data: pass --eval_dataset or --eval_split_size for held-out numbers")
    outputs = summary["outputs"]
    lines += [
        f"outputs in {outputs['output_dir']}:",
        f"  {'adapter' if summary['use_peft'] else 'model'} + tokenizer, README.md (model card), all_results.json, summary.json",
    ]
    if outputs.get("plot"):
        lines.append(f"  curves: {outputs['plot']}")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------- main


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


def dataset_names(script_args: ScriptArguments, demo: Optional[dict[str, Path]]) -> list[str]:
    """The data sets named on the command line (or the demo's files), for the model card."""
    names = [script_args.dataset or (demo and str(demo["train"]))]
    names.append(script_args.eval_dataset or (demo and script_args.dataset is None and str(demo["eval"])) or None)
    return list(dict.fromkeys(str(n) for n in names if n))


def build_trainer(script_args: ScriptArguments, model_args: ModelArguments, training_args: DPOConfig) -> NormalizedDPOTrainer:
    """Models, tokenizer and data loaded with the usual from_pretrained / file / hub calls (the demo's from disk)."""
    demo = None
    if model_args.model_name_or_path is None or script_args.dataset is None:
        demo = demo_assets(Path(training_args.output_dir) / "demo_assets", training_args)
        logger.info("built-in demo: assets in %s", demo["model"].parent)
    model_name = model_args.model_name_or_path or str(demo["model"])
    tokenizer_name = model_args.tokenizer_name_or_path or (model_args.model_name_or_path or str(demo["tokenizer"]))
    revision = model_args.model_revision
    train_dataset, eval_dataset = load_data(script_args, training_args, demo)
    trainer = NormalizedDPOTrainer(
        model=load_model(model_name, model_args, training_args, revision),
        ref_model=load_model(model_args.ref_model_name_or_path, model_args, training_args) if model_args.ref_model_name_or_path else None,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=load_tokenizer(tokenizer_name, training_args, revision if not model_args.tokenizer_name_or_path else None),
        peft_config=lora_config(model_args) if model_args.use_peft else None,
    )
    trainer.model_card_datasets = dataset_names(script_args, demo)
    return trainer


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
