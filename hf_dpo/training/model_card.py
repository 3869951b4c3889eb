"""The model card (README.md) written next to the weights by every ``save_model()`` and ``push_to_hub()``.

HF's model-card format: a YAML header (``library_name``, ``base_model``,
``datasets``, ``tags``, read by the Hub to link and filter models), then Markdown:
what was trained from what, on which data, with which DPO settings, the final
train and eval metrics from ``trainer.state.log_history``, the curves PNG when the
output directory has one, and the framework versions. A LoRA adapter gets the same
card with ``library_name: peft`` and the adapter's settings, so that the Hub offers
to load it with peft.

``base_model`` and ``datasets`` in the header only hold hub ids: a local path is
named in the text but would be an invalid link on the Hub.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

from huggingface_hub import ModelCardData

from ..losses import LOSS_REGISTRY
from .generation_records import card_lines as generation_card_lines

CARD_NAME = "README.md"
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


def base_model_name(model) -> Optional[str]:
    """What the trained model started from: the PEFT base, else the config's ``_name_or_path``."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        config = next(iter(peft_config.values()))
        if getattr(config, "base_model_name_or_path", None):
            return config.base_model_name_or_path
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def final_metrics(log_history: list[dict]) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """The last training log, the train() summary and the last evaluation in ``log_history``."""
    summary = next((e for e in reversed(log_history) if "train_loss" in e), {})
    # With fewer steps than logging_steps, the DPO metrics arrive only with train()'s summary.
    train = next((e for e in reversed(log_history) if "loss" in e and "eval_loss" not in e), summary)
    evaluation = next((e for e in reversed(log_history) if "eval_loss" in e), {})
    return train, summary, evaluation


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
    spec = LOSS_REGISTRY[args.loss_type]
    rows = [
        ("loss_type", f"{args.loss_type}: {spec.description}"),
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
    ]
    if args.label_smoothing:
        rows.append(("label_smoothing", args.label_smoothing))
    if args.loss_type == "simpo":
        rows.append(("simpo_gamma", args.simpo_gamma))
    if args.sft_weight:
        rows.append(("sft_weight", args.sft_weight))
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
    base = finetuned_from or base_model_name(model)
    if dataset is None:
        dataset = getattr(trainer, "model_card_datasets", None) or []
    data_names = [dataset] if isinstance(dataset, str) else list(dataset)
    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    card_tags = list(dict.fromkeys(TAGS + (["lora", "peft"] if is_adapter else []) + extra_tags))
    data = ModelCardData(
        library_name="peft" if is_adapter else "transformers",
        base_model=base if _is_hub_id(base) else None,
        datasets=[d for d in data_names if _is_hub_id(d)] or None,
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
        targets = config.target_modules
        targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        lines += [
            "",
            *_table(
                [("r", config.r), ("lora_alpha", config.lora_alpha), ("target_modules", targets)], ("LoRA", "value")
            ),
            "",
            f'Load it with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "<this directory>")`.',
        ]
    train, summary, evaluation = final_metrics(trainer.state.log_history)
    lines += ["", "## Results", ""]
    rows = [(f"train {k}", train[k]) for k in METRIC_KEYS if k in train]
    rows += [(f"train {k}", summary[k]) for k in ("train_loss", "train_runtime") if k in summary]
    rows += [(f"eval {k}", evaluation[f"eval_{k}"]) for k in METRIC_KEYS if f"eval_{k}" in evaluation]
    if rows:
        step = max(e.get("step", 0) for e in (train, summary, evaluation) if e)
        lines += [
            f"Final metrics (step {step} of {trainer.state.global_step}; see docs/metrics.md):",
            "",
            *_table(rows, ("metric", "value")),
        ]
    else:
        lines.append("No training or evaluation logged yet.")
    if (Path(output_dir) / CURVES_NAME).is_file():
        lines += ["", f"![training curves]({CURVES_NAME})"]
    lines += generation_card_lines(args.output_dir)  # --eval_generations: one prompt before and after training
    lines += ["", "## Framework versions", "", *(f"- {k}: {v}" for k, v in framework_versions().items())]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def write_model_card(trainer, output_dir: Union[str, os.PathLike], **kwargs: Any) -> Path:
    """Write :func:`build_model_card` to ``output_dir/README.md`` (replacing peft's or Trainer's draft)."""
    path = Path(output_dir) / CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_model_card(trainer, output_dir, **kwargs), encoding="utf-8")
    return path
