"""``hf-dpo --help`` and ``--help-all``, built from the argument dataclasses.

``--help`` must answer at once, but the dataclasses sit on ``TrainingArguments``, whose import
pulls in torch and transformers (seconds). So its text is generated from them here and checked
in as :mod:`hf_dpo.cli.help_text`; ``tests/test_cli.py`` rebuilds it and fails when the two
differ. Regenerate after changing a field:

    python -m hf_dpo.cli.help_build

``--help-all`` is built at run time (it imports transformers anyway): the same text, then
every other ``TrainingArguments`` option with its full help.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import textwrap
from pathlib import Path

from transformers import TrainingArguments

from ..training.config import DPOConfig
from ..training.trl_names import help_epilog
from .arguments import ModelArguments, ScriptArguments, make_parser

WIDTH = 100
OPTION_COLUMN = 34
GROUP_TITLES = {
    "model": "model: the policy, its tokenizer and LoRA",
    "data": "data: the training pairs and how they become tokens",
    "DPO": "DPO: the loss",
    "training": "training: steps, batches and the optimizer",
    "reference": "reference: what the log-ratios compare against",
    "speed": "speed: precision, memory and the fast layouts",
    "evaluation": "evaluation: held-out pairs and when they are scored",
    "output": "output: where results go, resuming, logging",
}
MORE_TITLE = "more options of hf_dpo (hf-dpo --help-all shows their help)"
# The options --help shows with their help, in order. A field of our own that no group names is listed by name
# under MORE_TITLE (its help in --help-all), so a new field shows up when the text is regenerated.
GROUPS: dict[str, tuple[str, ...]] = {
    "model": (
        "model_name_or_path",
        "tokenizer_name_or_path",
        "torch_dtype",
        "attn_implementation",
        "trust_remote_code",
        "use_peft",
        "lora_r",
        "lora_alpha",
        "lora_dropout",
        "lora_target_modules",
    ),
    "data": (
        "dataset",
        "dataset_split",
        "max_train_samples",
        "on_bad_row",
        "max_length",
        "max_prompt_length",
        "completion_turns",
        "chat_template_kwargs",
        "dataset_columns",
    ),
    "DPO": ("loss_type", "loss_weights", "beta", "length_normalize", "label_smoothing", "simpo_gamma", "sft_weight"),
    "training": (
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "lr_scheduler_type",
        "warmup_steps",
        "seed",
        "disable_dropout",
        "nonfinite_loss",
        "router_aux_loss_coef",
    ),
    "reference": (
        "ref_model_name_or_path",
        "reference",
        "ref_adapter",
        "policy_adapter",
        "precompute_ref_logps",
        "sync_ref_model",
    ),
    "speed": (
        "bf16",
        "gradient_checkpointing",
        "padding_free",
        "share_prompt",
        "response_only_logits",
        "torch_num_threads",
    ),
    "evaluation": (
        "eval_dataset",
        "eval_dataset_split",
        "eval_split_size",
        "max_eval_samples",
        "per_device_eval_batch_size",
        "eval_strategy",
        "eval_steps",
        "eval_on_start",
        "eval_generations",
    ),
    "output": (
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "save_strategy",
        "save_steps",
        "logging_steps",
        "report_to",
        "plot",
        "push_to_hub",
        "hub_model_id",
    ),
}
# TrainingArguments' own help texts run to paragraphs: the short help says it in one line (and ours below).
TRAINER_HELP = {
    "num_train_epochs": "Passes over the training pairs.",
    "max_steps": "Optimizer steps to train; overrides --num_train_epochs when positive.",
    "per_device_train_batch_size": "Pairs per process and step (before accumulation).",
    "gradient_accumulation_steps": "Batches summed into one optimizer step.",
    "learning_rate": "Peak learning rate (5e-7 to 1e-6 for full fine-tuning, 1e-5 to 1e-4 for LoRA).",
    "lr_scheduler_type": "Learning-rate schedule after warm-up.",
    "warmup_steps": "Warm-up steps (a fraction of the run when below 1).",
    "seed": "Seed of the data order, the eval split and initialisation.",
    "bf16": "Compute in bfloat16 mixed precision (keep the weights in float32 for full fine-tuning).",
    "gradient_checkpointing": "Recompute activations in backward to save memory.",
    "per_device_eval_batch_size": "Pairs per process in evaluation.",
    "eval_strategy": "When to evaluate during training.",
    "eval_steps": "Evaluate every N steps (with --eval_strategy steps).",
    "eval_on_start": "Evaluate before the first step: the 'before' numbers of the closing screen.",
    "output_dir": "Where the model, checkpoints, metrics, curves and the run record go.",
    "resume_from_checkpoint": "true: continue from the newest complete checkpoint in --output_dir, which must "
    "belong to this configuration; PATH: from that checkpoint.",
    "save_strategy": "When to write checkpoint-<step> folders.",
    "save_steps": "Checkpoint every N steps (with --save_strategy steps).",
    "logging_steps": "Log the training metrics every N steps.",
    "report_to": "Trackers to log to: none, all, tensorboard, wandb, mlflow, ...",
    "push_to_hub": "Upload the model, tokenizer and model card at the end.",
    "hub_model_id": "Repository to push to, e.g. org/name.",
    # Ours, where the first sentence of the field's help is too long for one entry.
    "ref_adapter": "An SFT LoRA adapter of the base model: the reference is the base with it, frozen.",
    "policy_adapter": "With --ref_adapter: the policy trains a copy of it, or a new adapter on top of it.",
    "sync_ref_model": "TR-DPO: mix the policy into the reference every --ref_model_sync_steps steps.",
}
# Defaults that TrainingArguments or the script decide later than the field's default value.
DEFAULT_TEXT = {
    "beta": "2 (0.1 with --length_normalize false)",
    "max_prompt_length": "max_length // 2",
    "router_aux_loss_coef": "the model config's, if it outputs router logits",
    "output_dir": "trainer_output; outputs/demo for the demo",
    "gradient_checkpointing": "false",
    "eval_on_start": "true with evaluation pairs",
    "eval_steps": "--logging_steps",
    "ref_logps_cache_dir": "~/.cache/hf_dpo/ref_logps",
}
HEADER = """\
usage: hf-dpo [CONFIG.yaml|CONFIG.json] [--option VALUE ...]

Train a causal LM with length-normalized DPO. Without --model_name_or_path and --dataset: the offline
demo (a tiny model and data built locally, seconds on a CPU, with demo defaults: docs/usage.md).
A YAML/JSON config file may come first; flags override it. A true/false option also takes the
flag alone (true) or --no_NAME (false).

  -h, --help                      This text: hf_dpo's options and the common Trainer ones.
  --help-all                      Also every other TrainingArguments option, with its full help.
  --version                       The version of hf-dpo.
  --debug                         Show the Python traceback of an error (or set HF_DPO_DEBUG=1)."""


def _fields() -> dict[str, dataclasses.Field]:
    found: dict[str, dataclasses.Field] = {}
    for cls in (ScriptArguments, ModelArguments, DPOConfig):
        for f in dataclasses.fields(cls):
            if f.init:
                found.setdefault(f.name, f)
    return found


def own_names() -> list[str]:
    """The fields hf_dpo adds: the script's, the model's, and DPOConfig's beyond TrainingArguments."""
    trainer = {f.name for f in dataclasses.fields(TrainingArguments)}
    return [name for name in _fields() if name not in trainer]


def grouped_names() -> dict[str, list[str]]:
    """:data:`GROUPS`: the options --help shows with their help and default."""
    return {name: list(members) for name, members in GROUPS.items()}


def more_names() -> list[str]:
    """Every field of our own that no group names: --help lists them by name, --help-all with their help."""
    listed = {member for members in GROUPS.values() for member in members}
    return [name for name in own_names() if name not in listed and name != "remove_unused_columns"]


def first_clause(text: str) -> str:
    """The help text up to its first full stop or semicolon outside parentheses (not "e.g."): the short help."""
    depth = 0
    text = " ".join(text.split())
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        ends = char in ".;" and depth == 0 and text[i + 1 : i + 2] in (" ", "")
        if ends and not text[: i + 1].endswith(("e.g.", "i.e.")):
            return text[:i] + "."
    return text


def _default_sentence(text: str) -> tuple[str, str]:
    """``(text without it, X)`` for a help text holding ``Default: X.``; ``(text, "")`` otherwise."""
    match = re.search(r"\s*Default:\s*(.+?)\.(\s|$)", text)
    if not match:
        return text, ""
    return (text[: match.start()] + " " + text[match.end() :]).strip(), match.group(1)


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    if isinstance(value, float):
        return f"{value:g}"
    if value is None or value == "":
        return "unset"
    return str(getattr(value, "value", value))


def _choices(action: argparse.Action) -> str:
    """`` One of a, b, c.`` for an option with choices (the first few of a long list), else ``""``."""
    if not action.choices:
        return ""
    choices = [str(c) for c in action.choices]
    shown = ", ".join(choices if len(choices) <= 6 else [*choices[:4], "..."])
    return f" One of {shown}."


def _metavar(action: argparse.Action) -> str:
    """For --help-all: argparse's usual placeholder."""
    if action.choices:
        return "{" + ",".join(map(str, action.choices)) + "}"
    if action.nargs == "?" and action.const is True:
        return "[BOOL]"
    name = getattr(action.type, "__name__", "")
    metavar = {"int": "N", "float": "X"}.get(name, "VALUE")
    return f"{metavar} [...]" if action.nargs == "+" else metavar


def _option_lines(option: str, body: str) -> str:
    """``option`` and its ``body`` wrapped in the text column (the body on the next line for a long option)."""
    indent = " " * OPTION_COLUMN
    wrap = {"width": WIDTH, "subsequent_indent": indent, "break_on_hyphens": False, "break_long_words": False}
    if len(option) < OPTION_COLUMN - 1:
        return textwrap.fill(body, initial_indent=option.ljust(OPTION_COLUMN), **wrap)
    return option + "\n" + textwrap.fill(body, initial_indent=indent, **wrap)


def _entry(action: argparse.Action, field: dataclasses.Field) -> str:
    help_text = field.metadata.get("help", "")
    rest, default = _default_sentence(help_text)
    text = TRAINER_HELP.get(field.name) or first_clause(rest)
    if field.name in DEFAULT_TEXT:
        default = DEFAULT_TEXT[field.name]
    elif not default:
        value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        default = _show(value)
    return _option_lines(f"  --{field.name}", f"{text}{_choices(action)} [default: {default}]")


def _actions() -> dict[str, argparse.Action]:
    return {action.dest: action for action in make_parser()._actions if action.option_strings[0] == f"--{action.dest}"}


def build_help() -> str:
    """The text of ``hf-dpo --help``: our options first, grouped, each with its default."""
    fields, actions = _fields(), _actions()
    lines = [HEADER]
    for group, names in grouped_names().items():
        lines += ["", GROUP_TITLES[group] + ":"]
        lines += [_entry(actions[name], fields[name]) for name in names]
    more = " ".join(f"--{name}" for name in more_names())
    wrap = {"width": WIDTH, "initial_indent": "  ", "subsequent_indent": "  ", "break_on_hyphens": False}
    lines += ["", MORE_TITLE + ":", textwrap.fill(more, **wrap)]
    lines += [
        "",
        "Every TrainingArguments option is accepted too, and TRL's names where they mean the same",
        "(--dataset_name, --rpo_alpha, --precompute_ref_log_probs, ...): hf-dpo --help-all lists them all.",
    ]
    return "\n".join(lines)


def build_help_all() -> str:
    """``--help`` followed by every other option (TrainingArguments') with its full help text."""
    shown = {name for names in grouped_names().values() for name in names}
    fields, actions = _fields(), _actions()
    epilog = [textwrap.fill(line, WIDTH, subsequent_indent="  ") for line in help_epilog().splitlines()]
    lines = [build_help(), "", *epilog, "", "the options listed by name above, and every TrainingArguments option:"]
    for name, action in actions.items():
        if name in shown or name not in fields or action.help == argparse.SUPPRESS:
            continue
        field = fields[name]
        value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        body = f"{' '.join(field.metadata.get('help', '').split())} [default: {_show(value)}]"
        lines.append(_option_lines(f"  --{name} {_metavar(action)}", body))
    return "\n".join(lines)


MODULE = '''\
"""The text of ``hf-dpo --help``. Generated by ``python -m hf_dpo.cli.help_build`` from the argument
dataclasses; do not edit (tests/test_cli.py fails when it drifts from them)."""

HELP = """\\
{text}
"""
'''


def module_text() -> str:
    text = build_help().replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return MODULE.format(text=text)


def main() -> None:
    path = Path(__file__).with_name("help_text.py")
    path.write_text(module_text(), encoding="utf-8")
    print(f"wrote {path} ({build_help().count(chr(10)) + 1} lines of help)")


if __name__ == "__main__":
    main()
