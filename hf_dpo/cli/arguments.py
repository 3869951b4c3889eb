"""The command's arguments: the script's own, the model's, and every DPOConfig / TrainingArguments field.

Precedence: flags > config file (YAML/JSON) > the script's defaults (the demo's without
``--model_name_or_path``) > the fields' defaults. TRL's names are translated by
:mod:`hf_dpo.training.trl_names`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import HfArgumentParser

from ..common.flags import parse_bool
from ..training.config import DPOConfig
from ..training.trl_names import help_epilog, translate_argv, translate_mapping

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
# The demo's answers are a few tokens long: 32 new tokens bound the generations of the untrained model (docs/metrics.md).
DEMO_EVAL_DEFAULTS: dict[str, Any] = {
    "eval_strategy": "steps",
    "eval_steps": 8,
    "eval_generations": 4,
    "eval_generation_max_new_tokens": 32,
}
# The script's own defaults for TrainingArguments fields, demo or not: the held-out numbers
# before training come from an evaluation inside train(), after every report_to integration
# has started (an evaluate() before train() would log to trackers not yet set up).
SCRIPT_DEFAULTS: dict[str, Any] = {"eval_on_start": True}


@dataclass
class ScriptArguments:
    """Where the preference data comes from, and what the script writes besides the model."""

    dataset: Optional[str] = field(
        default=None,
        metadata={
            "help": "Training pairs: a JSONL/JSON file, a directory of them, or a hub data set name. Default: the built-in demo data."
        },
    )
    dataset_config: Optional[str] = field(
        default=None, metadata={"help": "Configuration (subset) name of a hub --dataset."}
    )
    dataset_revision: Optional[str] = field(
        default=None, metadata={"help": "Revision (branch, tag or commit) of a hub --dataset."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub --dataset to train on."})
    eval_dataset: Optional[str] = field(
        default=None,
        metadata={
            "help": "Held-out pairs (file, directory or hub name). Default: --dataset itself when --eval_dataset_split is given."
        },
    )
    eval_dataset_split: Optional[str] = field(
        default=None, metadata={"help": "Split of the hub evaluation data set, e.g. test."}
    )
    eval_split_size: float = field(
        default=0.0,
        metadata={
            "help": "Without an evaluation data set, hold this many training pairs out (a fraction if < 1, a count if >= 1)."
        },
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N training pairs (quick runs)."}
    )
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep only the first N evaluation pairs."})
    plot: bool = field(
        default=True, metadata={"help": "Write training_curves.png next to the outputs (needs matplotlib)."}
    )
    torch_num_threads: Optional[int] = field(
        default=None,
        metadata={"help": "CPU threads for torch (torch.set_num_threads). Default: torch's choice; 1 for the demo."},
    )


@dataclass
class ModelArguments:
    """The policy, the optional separate reference, and LoRA.

    ``trust_remote_code`` is a DPOConfig field (it also governs models the trainer loads by name).
    """

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Policy model: hub name or local directory. Default: the tiny demo model (and demo defaults)."
        },
    )
    model_revision: Optional[str] = field(
        default=None,
        metadata={"help": "Revision (branch, tag or commit) of the policy, its tokenizer and a hub reference."},
    )
    ref_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Separate frozen reference. Default: a frozen copy of the policy, or the adapter-disabled base with --use_peft."
        },
    )
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "dtype to load the weights in; auto keeps the checkpoint's.", "choices": list(DTYPES)},
    )
    attn_implementation: Optional[str] = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})
    use_peft: bool = field(
        default=False,
        metadata={"help": "Train a LoRA adapter only; the reference is the base model with the adapter disabled."},
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
    return bool(
        namespace.eval_dataset
        or namespace.eval_dataset_split
        or namespace.eval_split_size > 0
        or namespace.dataset is None
    )


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
            raise SystemExit(
                f"{err} (defaults of this run you did not set: {implied}; set them explicitly to change them)"
            ) from None
        raise SystemExit(str(err)) from None
    training_args.resume_from_checkpoint = resume_value(training_args.resume_from_checkpoint)
    return script_args, model_args, training_args


def resume_value(value: Optional[str]):
    """``--resume_from_checkpoint``: true -> True (newest complete checkpoint in output_dir), false -> None, else a path."""
    if value is None:
        return None
    parsed = parse_bool(value)
    if parsed is True:
        return True
    if parsed is False or str(value).strip().lower() in ("", "none"):
        return None
    if not Path(value).is_dir():
        raise SystemExit(
            f"--resume_from_checkpoint {value}: no such directory (or pass true for the newest complete checkpoint in --output_dir)"
        )
    return value
