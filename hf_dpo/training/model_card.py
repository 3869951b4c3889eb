"""The model card (README.md) written next to the weights by every ``save_model()`` and ``push_to_hub()``.

HF's model-card format: a YAML header (``library_name``, ``base_model``,
``datasets``, ``tags``, read by the Hub to link and filter models), then Markdown:
what was trained from what, on which data, with which DPO settings, the final
train and eval metrics from ``trainer.state.log_history``, the curves PNG when the
output directory has one, and the framework versions. A LoRA adapter gets the same
card with ``library_name: peft`` and the adapter's settings, so that the Hub offers
to load it with peft.

The card is written to be published: ``base_model`` and ``datasets`` in the header hold hub
ids only; a local model or data file is named relative to the output folder when it lies
inside it (the demo's ``demo_assets/model``), else by its own name, never by an absolute
path of this machine (the command's run record, ``hf_dpo_run.json``, keeps those). A model
loaded from the hub cache's snapshot folder is named by its hub id. The adapter config's
``base_model_name_or_path`` gets the same name. Metric values are the last logged ones,
each with its step; there are no links that would be dead outside this repository.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import ModelCardData

from ..losses import LossObjective
from .adapter_export import saved_lora_settings
from .generation_records import card_lines as generation_card_lines
from .ref_sync import reference_settings

CARD_NAME = "README.md"
ADAPTER_CONFIG = "adapter_config.json"
# The hub cache keeps repo "org/name" in models--org--name/snapshots/<commit>/ (huggingface_hub's layout).
HUB_CACHE_SNAPSHOT = re.compile(r"(?:^|/)(?:models|datasets)--([^/]+)/snapshots/[^/]+/?$")
CURVES_NAME = "training_curves.png"
TAGS = ["dpo", "hf_dpo"]
METRIC_KEYS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "lengths/chosen",
    "lengths/rejected",
)
FRAMEWORKS = ("hf_dpo", "hf-dpo", "transformers", "torch", "datasets", "accelerate", "peft", "tokenizers")
REFERENCE_TEXT = {
    "model": "a separate frozen model (a copy of the initial policy unless a reference model was given)",
    "adapter": "the same model with the LoRA adapter disabled",
    "none": "none (reference-free loss)",
}


def _is_hub_id(name: Optional[str]) -> bool:
    """``org/name`` or ``name`` that is not a path on this machine."""
    return bool(name) and not os.path.exists(name) and not os.path.isabs(name) and name.count("/") <= 1


def hub_id(name: Optional[str]) -> Optional[str]:
    """The hub id ``name`` stands for: itself when it is one, ``org/name`` for a hub cache snapshot folder, else None."""
    if not name:
        return None
    if _is_hub_id(name):
        return name
    cached = HUB_CACHE_SNAPSHOT.search(Path(name).expanduser().as_posix())
    return cached.group(1).replace("--", "/") if cached else None


def publishable_name(name: Optional[str], output_dir: Union[str, os.PathLike]) -> Optional[str]:
    """How a model or data set is named in published files: its hub id, else a path relative to ``output_dir``
    when it lies inside it, else its own file or folder name. Never an absolute path of this machine."""
    if not name or hub_id(name):
        return hub_id(name) or name
    path = Path(name).expanduser()
    resolved, folder = path.resolve(), Path(output_dir).resolve()
    # A checkpoint's card names the run folder's demo_assets as ../demo_assets.
    bases = [folder, folder.parent] if re.fullmatch(r"checkpoint-\d+", folder.name) else [folder]
    for base in bases:
        if resolved.is_relative_to(base):
            return os.path.relpath(resolved, folder).replace(os.sep, "/")
    if not path.is_absolute() and not name.startswith(("~", "..")):
        return path.as_posix()  # relative as the user gave it, e.g. data/pairs.jsonl
    return resolved.name


def publish_adapter_config(output_dir: Union[str, os.PathLike]) -> None:
    """``base_model_name_or_path`` of a saved adapter as :func:`publishable_name` gives it (a hub id stays as it is).

    peft only reads it in ``AutoPeftModel*.from_pretrained``; ``PeftModel.from_pretrained(base, folder)``
    takes the base model from the caller. A hub id still loads anywhere; a local base is passed by the caller
    (its path is in the command's run record).
    """
    path = Path(output_dir) / ADAPTER_CONFIG
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    published = publishable_name(base, output_dir)
    if published != base:
        config["base_model_name_or_path"] = published
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def base_model_name(model) -> Optional[str]:
    """What the trained model started from: the PEFT base, else the config's ``_name_or_path``."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        config = next(iter(peft_config.values()))
        if getattr(config, "base_model_name_or_path", None):
            return config.base_model_name_or_path
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def last_logged(log_history: list[dict]) -> tuple[dict[str, tuple[float, int]], dict[str, tuple[float, int]], dict]:
    """Per metric, its last logged ``(value, step)`` in training and in evaluation, and train()'s summary entry.

    With fewer steps than ``logging_steps`` the DPO metrics of the last steps arrive only with train()'s
    summary, at the last step, while the last ``loss`` may be older: each metric names its own step.
    """
    train: dict[str, tuple[float, int]] = {}
    evaluation: dict[str, tuple[float, int]] = {}
    summary: dict = {}
    for entry in log_history:
        step = entry.get("step", 0)
        if "train_loss" in entry:
            summary = entry
        if "eval_loss" in entry:
            evaluation.update({k: (entry[f"eval_{k}"], step) for k in METRIC_KEYS if f"eval_{k}" in entry})
        else:
            train.update({k: (entry[k], step) for k in METRIC_KEYS if k in entry})
    return train, evaluation, summary


def results_table(log_history: list[dict], global_step: int) -> list[str]:
    """The Results section's lines: one row per metric, a train and an eval column, each value with its step."""
    train, evaluation, summary = last_logged(log_history)
    if not train and not evaluation:
        return ["No training or evaluation logged yet."]
    columns = [
        (name, values, max((s for _, s in values.values()), default=0))
        for name, values in (("train", train), ("eval", evaluation))
        if values
    ]

    def cell(values, key, column_step):
        if key not in values:
            return "-"
        value, step = values[key]
        return _format(value) + ("" if step == column_step else f" (step {step})")

    lines = [
        f"Last logged values after {global_step} training steps (the metrics are defined in hf_dpo's docs/metrics.md):",
        "",
        "| metric | " + " | ".join(f"{name} (step {step})" for name, _, step in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for key in METRIC_KEYS:
        if any(key in values for _, values, _ in columns):
            lines.append(f"| {key} | " + " | ".join(cell(values, key, step) for _, values, step in columns) + " |")
    if summary:
        lines += [
            "",
            f"Training loss averaged over the run: {_format(summary['train_loss'])}"
            + (f"; training time {summary['train_runtime']:.1f} s." if "train_runtime" in summary else "."),
        ]
    return lines


def framework_versions() -> dict[str, str]:
    versions = {}
    for name in FRAMEWORKS:
        try:
            versions[name.replace("-", "_")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    if "hf_dpo" not in versions:  # run from a checkout, not installed
        from ..common.version import __version__

        versions["hf_dpo"] = __version__
    return versions


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str]) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {k} | {_format(v)} |" for k, v in rows)]


def dpo_settings(args, reference_mode: str) -> list[tuple[str, Any]]:
    """The settings that decide what DPO optimized, as (name, value) rows."""
    objective = LossObjective.from_config(args)
    loss_rows = objective.card_rows()  # loss_type (with each loss's formula from the registry) and its settings
    rows = [
        loss_rows[0],
        ("beta", args.beta),
        (
            "length_normalize",
            f"{args.length_normalize} ({'mean log-prob per response token' if args.length_normalize else 'summed log-probs'})",
        ),
        (
            "reference",
            f"{reference_mode}: {REFERENCE_TEXT.get(reference_mode, reference_mode)}"
            + (", log-probs precomputed before training" if getattr(args, "precompute_ref_logps", False) else ""),
        ),
        ("max_length", args.max_length),
        ("max_prompt_length", args.max_prompt_length),
        ("completion_turns", args.completion_turns),
        *loss_rows[1:],
    ]
    rows += reference_settings(args)
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    rows += [("learning_rate", args.learning_rate), ("global batch (pairs)", global_batch), ("seed", args.seed)]
    return rows


def build_model_card(
    trainer,
    output_dir: Union[str, os.PathLike],
    model_name: Optional[str] = None,
    dataset: Union[str, list, None] = None,
    tags: Union[str, list, None] = None,
    finetuned_from: Optional[str] = None,
    language: Union[str, list, None] = None,
    license: Optional[str] = None,
    **_trainer_only: Any,  # tasks, dataset_tags, dataset_args of Trainer.create_model_card: not used by this card
) -> str:
    """The card's text for ``trainer`` (a :class:`hf_dpo.NormalizedDPOTrainer`) saved into ``output_dir``."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    is_adapter = getattr(model, "peft_config", None) is not None
    base_given = finetuned_from or base_model_name(model)
    base = publishable_name(base_given, output_dir)
    if dataset is None:
        dataset = getattr(trainer, "model_card_datasets", None) or []
    data_given = [dataset] if isinstance(dataset, str) else list(dataset)
    data_names = [publishable_name(d, output_dir) for d in data_given]
    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    card_tags = list(dict.fromkeys(TAGS + (["lora", "peft"] if is_adapter else []) + extra_tags))
    data = ModelCardData(
        library_name="peft" if is_adapter else "transformers",
        base_model=hub_id(base_given),
        datasets=[hub_id(d) for d in data_given if hub_id(d)] or None,
        tags=card_tags,
        language=language,
        license=license,
    )
    name = model_name or Path(output_dir).resolve().name
    kind = "A LoRA adapter" if is_adapter else "A causal language model"
    lines = [
        f"# {name}",
        "",
        f"{kind} trained from `{base or 'an unnamed model'}` with Direct Preference Optimization by "
        "hf_dpo's `NormalizedDPOTrainer`"
        + (
            " (length-normalized: the loss compares mean log-probs per response token)."
            if args.length_normalize
            else "."
        ),
        "",
        "## Training data",
        "",
        *(
            [f"- `{d}`" for d in data_names]
            or ["- not recorded (set `trainer.model_card_datasets` or pass `dataset=`)"]
        ),
        "",
        "## DPO settings",
        "",
        *_table(dpo_settings(args, trainer.reference_mode), ("setting", "value")),
    ]
    if is_adapter:
        config = next(iter(model.peft_config.values()))
        # What the directory holds, when it differs from the model's adapter (policy_adapter new: the concatenation).
        r, lora_alpha, targets = saved_lora_settings(output_dir) or (config.r, config.lora_alpha, config.target_modules)
        targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        lines += [
            "",
            *_table([("r", r), ("lora_alpha", lora_alpha), ("target_modules", targets)], ("LoRA", "value")),
            "",
            "Load it with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)`, BASE "
            + (f'being "{base}".' if hub_id(base_given) else "being the base model's folder."),
        ]
    lines += ["", "## Results", "", *results_table(trainer.state.log_history, trainer.state.global_step)]
    if (Path(output_dir) / CURVES_NAME).is_file():
        lines += ["", f"![training curves]({CURVES_NAME})"]
    # --eval_generations: one prompt before and after training
    lines += generation_card_lines(args.output_dir, lambda path: publishable_name(path, output_dir))
    lines += ["", "## Framework versions", "", *(f"- {k}: {v}" for k, v in framework_versions().items())]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def write_model_card(trainer, output_dir: Union[str, os.PathLike], **kwargs: Any) -> Path:
    """Write :func:`build_model_card` to ``output_dir/README.md`` (replacing peft's or Trainer's draft), and name the
    base model of a saved adapter's config as the card does."""
    path = Path(output_dir) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_model_card(trainer, output_dir, **kwargs), encoding="utf-8")
    publish_adapter_config(output_dir)
    return path
