"""Every flag and path a run depends on, checked before any model or data is loaded and before anything is written.

A batch size of 0 used to surface after model loading and tokenization as ``range() arg 3
must not be zero``, an accumulation of 0 as a bare ``ZeroDivisionError``, a missing model
folder as a hub repo-id error 46 lines long. Each check here raises one
:class:`~hf_dpo.cli.errors.UsageError` naming the flag, the value and the fix.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ..data.sources import HUB_ID, PATH_PREFIXES, source_kind
from ..training.config import DPOConfig
from .arguments import ModelArguments, ScriptArguments, is_demo
from .errors import UsageError

# flag -> (smallest allowed value, what the value counts); None values mean "unset" and pass.
AT_LEAST_ONE = {
    "per_device_train_batch_size": "pairs per device per step",
    "per_device_eval_batch_size": "pairs per device in evaluation",
    "gradient_accumulation_steps": "batches per optimizer step",
    "max_train_samples": "training pairs to keep",
    "max_eval_samples": "evaluation pairs to keep",
    "torch_num_threads": "CPU threads",
    "dataset_num_proc": "tokenizing processes",
    "lora_r": "the LoRA rank",
    "lora_alpha": "the LoRA scaling numerator",
}
POSITIVE = ("logging_steps", "eval_steps", "save_steps")
NOT_NEGATIVE = ("learning_rate", "warmup_steps", "eval_split_size", "weight_decay")


def _value(name: str, *groups):
    for group in groups:
        if hasattr(group, name):
            return getattr(group, name)
    raise AttributeError(name)


def check_numbers(script_args: ScriptArguments, model_args: ModelArguments, args: DPOConfig) -> None:
    """Batch sizes, accumulation, sample counts, steps and rates: each in its range, named by its flag."""
    groups = (script_args, model_args, args)
    for name, counts in AT_LEAST_ONE.items():
        value = _value(name, *groups)
        if value is not None and value < 1:
            raise UsageError(f"--{name} {value}: must be at least 1 ({counts})")
    for name in POSITIVE:
        value = _value(name, *groups)
        if value is not None and not value > 0:
            raise UsageError(f"--{name} {value}: must be positive")
    for name in NOT_NEGATIVE:
        value = _value(name, *groups)
        if value is not None and value < 0:
            raise UsageError(f"--{name} {value}: must not be negative")
    if not 0 <= model_args.lora_dropout < 1:
        raise UsageError(f"--lora_dropout {model_args.lora_dropout}: must be in [0, 1)")
    size = script_args.eval_split_size
    if size >= 1 and size != int(size):
        raise UsageError(f"--eval_split_size {size}: a count of pairs must be whole (or a fraction below 1)")
    if args.max_steps == 0 or (args.max_steps < 0 and not args.num_train_epochs > 0):
        raise UsageError(
            f"--max_steps {args.max_steps} with --num_train_epochs {args.num_train_epochs:g} trains nothing; "
            "give a positive --max_steps or --num_train_epochs"
        )


def looks_like_a_path(name: str) -> bool:
    """A name that can only mean a local path (``./x``, ``/x``, ``~/x``, ``a/b/c``): never a hub id."""
    return name.startswith(PATH_PREFIXES) or not HUB_ID.match(name)


def check_model_path(flag: str, name: Optional[str]) -> None:
    """A local model or tokenizer folder must exist; a hub name (``name`` or ``org/name``) is left to the hub."""
    if name is None or is_demo(name):
        return
    path = Path(name).expanduser()
    if path.is_file():
        raise UsageError(f"{flag} {name}: is a file; give the model's folder (with config.json) or a hub name")
    if not path.exists() and looks_like_a_path(name):
        raise UsageError(
            f"{flag} {name}: no such folder (a hub model is named 'name' or 'org/name', e.g. Qwen/Qwen2.5-0.5B-Instruct)"
        )


def check_data_path(flag: str, name: Optional[str], demo_allowed: bool = False) -> None:
    """A local data file or folder must exist (hub names are checked when they are downloaded)."""
    if name is None or (demo_allowed and is_demo(name)):
        return
    try:
        source_kind(name)
    except FileNotFoundError as err:
        raise UsageError(f"{flag}: {err}") from None


def check_sources(script_args: ScriptArguments, model_args: ModelArguments) -> None:
    """A model needs data and data a model: the demo's pieces are used only when asked for (``demo``)."""
    model, dataset = model_args.model_name_or_path, script_args.dataset
    if model is not None and dataset is None and not is_demo(model):
        raise UsageError(
            f"--model_name_or_path {model} needs --dataset (your pairs, or demo for the demo's pairs as a quick check)"
        )
    if dataset is not None and model is None and not is_demo(dataset):
        raise UsageError(
            f"--dataset {dataset} needs --model_name_or_path (your model, or demo for the tiny demo model)"
        )
    for flag in ("model_name_or_path", "ref_model_name_or_path", "tokenizer_name_or_path"):
        check_model_path(f"--{flag}", getattr(model_args, flag))
    check_data_path("--dataset", dataset, demo_allowed=True)
    check_data_path("--eval_dataset", script_args.eval_dataset)
    if script_args.eval_dataset_split and not script_args.eval_dataset:
        if dataset is None or is_demo(dataset):
            raise UsageError(
                f"--eval_dataset_split {script_args.eval_dataset_split} needs a hub --dataset to take the split from "
                "(or pass --eval_dataset FILE or --eval_split_size)"
            )
        if Path(dataset).expanduser().exists():
            # A local file has no splits: the "test split" would be the training pairs themselves.
            raise UsageError(
                f"--eval_dataset_split {script_args.eval_dataset_split}: {dataset} is a local path, which has no "
                "splits; pass --eval_dataset FILE or --eval_split_size instead"
            )


def check_arguments(script_args: ScriptArguments, model_args: ModelArguments, args: DPOConfig) -> None:
    """All the checks that need no model and no data; raises :class:`UsageError` at the first failure."""
    check_numbers(script_args, model_args, args)
    check_sources(script_args, model_args)


def eval_split_count(size: float, n_rows: int) -> int:
    """How many of ``n_rows`` training pairs ``--eval_split_size`` holds out; refuses a split that leaves none on a side.

    A fraction rounds up, as ``datasets.Dataset.train_test_split`` does.
    """
    held_out = int(size) if size >= 1 else math.ceil(size * n_rows)
    if held_out >= n_rows or held_out < 1:
        kind = "pairs" if size >= 1 else f"of {n_rows} pairs ({held_out} pairs)"
        raise UsageError(
            f"--eval_split_size {size:g}: the training data has {n_rows} pairs, so holding out {size:g} {kind} leaves "
            f"{'no pair to train on' if held_out >= n_rows else 'no pair to evaluate on'}; give a count below "
            f"{n_rows} or a fraction below 1"
        )
    return held_out
