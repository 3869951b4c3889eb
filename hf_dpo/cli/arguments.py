"""The command's arguments: the script's own, the model's, and every DPOConfig / TrainingArguments field.

Precedence: flags > config file (YAML/JSON) > the script's defaults (the demo's without
``--model_name_or_path``) > the fields' defaults. TRL's names are translated by
:mod:`hf_dpo.training.trl_names`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import HfArgumentParser

from ..common.flags import parse_bool
from ..training.config import DPOConfig
from ..training.trl_names import ALIASES, REFUSED, translate_argv, translate_mapping
from .errors import UsageError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The word that asks for the built-in demo's model or data (docs/usage.md); a local folder of that name wins.
DEMO = "demo"

# Defaults for the demo model (no --model_name_or_path, or "demo"), sized so that the
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
# Pinned memory only speeds up copies to an accelerator; without one, torch warns at every data loader.
NO_ACCELERATOR_DEFAULTS: dict[str, Any] = {"dataloader_pin_memory": False}
# What --help says of TrainingArguments' resume_from_checkpoint, whose own text does not mention "true".
RESUME_HELP = (
    "true: continue from the newest complete checkpoint in --output_dir, which must belong to this configuration "
    "(same data, model and loss settings); false: start over; PATH: continue from that checkpoint."
)


@dataclass
class ScriptArguments:
    """Where the preference data comes from, and what the script writes besides the model."""

    dataset: Optional[str] = field(
        default=None,
        metadata={
            "help": "Training pairs: a JSONL/JSON file or folder, a hub data set, or demo (the demo's pairs). "
            "Default: the demo's, without --model_name_or_path."
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
        metadata={"help": "Hold this many training pairs out for evaluation: a fraction if < 1, a count if >= 1."},
    )
    max_train_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep only the first N training pairs (quick runs)."}
    )
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Keep only the first N evaluation pairs."})
    plot: bool = field(
        default=True, metadata={"help": "Write training_curves.png next to the outputs (needs matplotlib)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Remove another run's checkpoints from --output_dir before a new run starts there; without it "
            "such a run stops (or pass --resume_from_checkpoint true to continue that run)."
        },
    )
    torch_num_threads: Optional[int] = field(
        default=None,
        metadata={"help": "CPU threads for torch (torch.set_num_threads). Default: torch's; 1 for the demo model."},
    )


@dataclass
class ModelArguments:
    """The policy, the optional separate reference, and LoRA.

    ``trust_remote_code`` is a DPOConfig field (it also governs models the trainer loads by name).
    """

    model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "Policy model: a hub name, a local folder, or demo (the tiny demo model, with its defaults). "
            "Default: the demo model, without --dataset."
        },
    )
    model_revision: Optional[str] = field(
        default=None,
        metadata={"help": "Revision (branch, tag or commit) of the policy, its tokenizer and a hub reference."},
    )
    ref_model_name_or_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "A separate frozen reference model. Default: a frozen copy of the policy (the adapter-disabled "
            "base with --use_peft)."
        },
    )
    tokenizer_name_or_path: Optional[str] = field(default=None, metadata={"help": "Tokenizer, if not the model's own."})
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "dtype to load the weights in; auto keeps the checkpoint's.", "choices": list(DTYPES)},
    )
    attn_implementation: Optional[str] = field(
        default=None, metadata={"help": "Attention kernel, e.g. sdpa, eager or flash_attention_2."}
    )
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
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: cannot read the config file ({err})") from None
    kind = "JSON" if path.endswith(".json") else "YAML"
    try:
        values = json.loads(text) if kind == "JSON" else _load_yaml(text)
    except ValueError as err:
        raise UsageError(f"{path}: not valid {kind}: {' '.join(str(err).split())}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of argument names to values, got {type(values).__name__}")
    try:
        return translate_mapping(values)
    except ValueError as err:
        raise UsageError(f"{path}: {err}") from None


def _load_yaml(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:  # not a ValueError
        raise ValueError(str(err)) from None


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser whose errors are one line naming the flag (argparse prints its whole usage first)."""

    def error(self, message: str):
        raise UsageError(f"{message} (hf-dpo --help lists the options)")


def make_parser() -> ArgumentParser:
    parser = ArgumentParser((ScriptArguments, ModelArguments, DPOConfig), prog="hf-dpo", add_help=False)
    for action in parser._actions:
        positive = action.option_strings[0]
        if positive.startswith("--no_") and action.const is False:
            # HfArgumentParser copies the help of --X onto --no_X, which then says the opposite of what it does.
            action.help = f"Same as --{action.dest} false."
        elif action.dest == "resume_from_checkpoint":
            action.help = RESUME_HELP
    return parser


def option_names(parser: argparse.ArgumentParser) -> list[str]:
    """Every flag the command knows: ours, TrainingArguments', and TRL's accepted names."""
    names = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    return names + [f"--{name}" for name in (*ALIASES, *REFUSED)]


def unknown_arguments_message(unknown: list[str], known: list[str]) -> str:
    """``unknown argument --betta (did you mean --beta?)`` for every unknown flag in ``unknown``."""
    parts = []
    for token in unknown:
        if not token.startswith("-"):
            if not parts:  # a value after an unknown flag belongs to it; a bare word is a stray argument
                parts.append(f"unexpected argument {token!r} (a config file must come first and end in .yaml/.json)")
            continue
        name = token.split("=")[0]
        close = difflib.get_close_matches("--" + name.lstrip("-").replace("-", "_"), known, n=1, cutoff=0.75)
        parts.append(f"unknown argument {name}" + (f" (did you mean {close[0]}?)" if close else ""))
    return "; ".join(parts) + "; hf-dpo --help lists the options"


def will_have_eval_data(namespace: argparse.Namespace) -> bool:
    """Whether :func:`load_data` will return evaluation pairs for these arguments."""
    return bool(
        namespace.eval_dataset
        or namespace.eval_dataset_split
        or namespace.eval_split_size > 0
        or uses_demo_data(namespace.model_name_or_path, namespace.dataset)
    )


def is_demo(name: Optional[str]) -> bool:
    """Whether ``--model_name_or_path`` / ``--dataset`` asks for the built-in demo's (``demo``, with no such folder)."""
    return name == DEMO and not Path(name).exists()


def uses_demo_model(model_name_or_path: Optional[str], dataset: Optional[str]) -> bool:
    """The demo model: asked for by name, or the demo as a whole (no model, and no data or the demo's)."""
    return is_demo(model_name_or_path) or (model_name_or_path is None and (dataset is None or is_demo(dataset)))


def uses_demo_data(model_name_or_path: Optional[str], dataset: Optional[str]) -> bool:
    """The demo's pairs: asked for by name, or the demo as a whole (no data, and no model or the demo's)."""
    return is_demo(dataset) or (dataset is None and (model_name_or_path is None or is_demo(model_name_or_path)))


def has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6 knows every device type
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def defaults_in_force(namespace: argparse.Namespace) -> dict[str, Any]:
    """The script's defaults for a run, before the config file and the flags: the demo's for the demo model."""
    has_eval = will_have_eval_data(namespace)
    defaults = dict(SCRIPT_DEFAULTS) if has_eval else {}
    if not has_accelerator() or getattr(namespace, "use_cpu", False):
        defaults.update(NO_ACCELERATOR_DEFAULTS)
    if uses_demo_model(namespace.model_name_or_path, namespace.dataset):
        defaults.update(DEMO_DEFAULTS)
        if has_eval:
            defaults.update(DEMO_EVAL_DEFAULTS)
    return defaults


def parse_args(argv: Optional[list[str]] = None) -> tuple[ScriptArguments, ModelArguments, DPOConfig]:
    """Parse ``[config file] [--flag value ...]``; precedence: flags > config file > script (demo) defaults > field defaults.

    The arguments are read once without building DPOConfig, to learn which defaults
    are in force (the demo's only for the demo model; the demo's evaluation schedule only
    with evaluation data); DPOConfig's checks then see those defaults. Every mistake is a
    :class:`UsageError` naming the flag.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    file_values: dict[str, Any] = {}
    if argv and not argv[0].startswith("-") and argv[0].endswith(CONFIG_SUFFIXES):
        file_values = read_config_file(argv.pop(0))
    try:
        argv = translate_argv(argv)
    except ValueError as err:
        raise UsageError(str(err)) from None

    parser = make_parser()
    known = option_names(parser)
    unknown = sorted(set(file_values) - {action.dest for action in parser._actions})
    if unknown:
        raise UsageError("config file: " + unknown_arguments_message([f"--{k}" for k in unknown], known))
    # A string default goes through the argument's type like a flag would (YAML reads 1e-3 as a string).
    parser.set_defaults(**file_values)
    first_look, leftover = parser.parse_known_args(argv)
    if leftover:
        raise UsageError(unknown_arguments_message(leftover, known))
    script_defaults = defaults_in_force(first_look)

    parser = make_parser()
    parser.set_defaults(**{**script_defaults, **file_values})
    try:
        script_args, model_args, training_args = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as err:
        given = set(file_values) | {a.lstrip("-").split("=")[0] for a in argv if a.startswith("--")}
        implied = {k: v for k, v in script_defaults.items() if k not in given and k in str(err)}
        if implied:
            raise UsageError(
                f"{err} (defaults of this run you did not set: {implied}; set them explicitly to change them)"
            ) from None
        raise UsageError(str(err)) from None
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
        raise UsageError(
            f"--resume_from_checkpoint {value}: no such directory (or pass true for the newest complete checkpoint "
            "in --output_dir)"
        )
    return value
