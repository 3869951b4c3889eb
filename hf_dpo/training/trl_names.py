"""TRL's argument names, accepted where they mean what ours mean and refused where they do not.

One table, :data:`ALIASES` and :data:`REFUSED`, serves the command line
(:func:`translate_argv`, :func:`translate_mapping` for config files), Python
(``DPOConfig(precompute_ref_log_probs=True)`` through :func:`accept_trl_names`),
the ``--help`` epilog and docs/usage.md. The names come from TRL's ``DPOConfig``,
``ScriptArguments`` and ``ModelConfig`` (TRL 0.19 to 1.x); where TRL changed a
meaning between versions the entry says which one it follows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from ..common.flags import parse_bool


@dataclass(frozen=True)
class Alias:
    """A TRL name that means the same as ``target``; ``convert`` maps the value (default: unchanged)."""

    target: str
    note: str
    convert: Optional[Callable[[Any], Any]] = None


@dataclass(frozen=True)
class Refused:
    """A TRL name with no equivalent here. ``inert`` values (TRL's "off") are accepted and dropped."""

    advice: str
    inert: tuple = ()


def _zero_if_none(value):
    return 0.0 if value is None or str(value).lower() == "none" else value


# TRL name -> our name. Same meaning, same units.
ALIASES: dict[str, Alias] = {
    "dataset_name": Alias("dataset", "the training data: hub name, file or directory"),
    "dataset_train_split": Alias("dataset_split", "split of a hub data set to train on"),
    "dataset_test_split": Alias("eval_dataset_split", "split of the same hub data set to evaluate on"),
    "precompute_ref_log_probs": Alias(
        "precompute_ref_logps", "score the data with the reference once, before training"
    ),
    "rpo_alpha": Alias(
        "sft_weight",
        "weight of the NLL term on the chosen answer (RPO); averaged per pair, then over pairs, where TRL 0.x "
        "averages over the batch's chosen tokens: equal when chosen answers have equal lengths",
        _zero_if_none,
    ),
    "dtype": Alias("torch_dtype", "dtype the weights are loaded in (TRL >= 0.20's name)"),
}

# TRL loss names that are ours with other settings: name -> {our field: value}.
LOSS_ALIASES: dict[str, dict[str, Any]] = {
    # TRL's sigmoid_norm divides each log-ratio by its response's token count: our sigmoid with length_normalize.
    "sigmoid_norm": {"loss_type": "sigmoid", "length_normalize": True},
}

REFUSED: dict[str, Refused] = {
    "reference_free": Refused(
        "use --loss_type simpo (reference-free) instead; hf_dpo has no implicit uniform reference", (False,)
    ),
    "max_completion_length": Refused(
        "not supported: the response is cut from the right to fit --max_length after the prompt is cut to "
        "--max_prompt_length; set --max_length"
    ),
    "truncation_mode": Refused(
        "not supported: the prompt always loses its oldest tokens first, then the response is cut from the right "
        "(docs/data.md); remove the flag"
    ),
    "loss_weights": Refused(
        "not supported: one loss per run (--loss_type), plus --sft_weight for the NLL term", (None,)
    ),
    "use_weighting": Refused("not supported (WPO weighting)", (False,)),
    "ld_alpha": Refused("not supported (LD-DPO); --length_normalize true is the length correction here", (None,)),
    "f_divergence_type": Refused("not supported: only the reverse-KL (standard DPO) objective", ("reverse_kl",)),
    "f_alpha_divergence_coef": Refused("not supported (f-DPO)", (0.5,)),
    "discopop_tau": Refused("not supported (DiscoPOP)", (0.05,)),
    "sync_ref_model": Refused("not supported (TR-DPO): the reference stays frozen", (False,)),
    "ref_model_mixup_alpha": Refused("not supported (TR-DPO)", (0.6,)),
    "ref_model_sync_steps": Refused("not supported (TR-DPO)", (512,)),
    "generate_during_eval": Refused("not supported: evaluation scores pairs, it does not generate", (False,)),
    "use_logits_to_keep": Refused(
        "use --response_only_logits (on by default), which projects only the scored positions", (False,)
    ),
    "use_liger_loss": Refused("not supported; --response_only_logits bounds the logits' memory instead", (False,)),
    "padding_value": Refused("not needed: set tokenizer.pad_token; masks never depend on the pad id", (None,)),
    "label_pad_token_id": Refused("not needed: the collator emits response_mask, not labels", (-100,)),
    "pad_token": Refused("set tokenizer.pad_token (the script uses EOS when the tokenizer has none)", (None,)),
    "model_init_kwargs": Refused("use --torch_dtype, --attn_implementation, --model_revision", (None,)),
    "ref_model_init_kwargs": Refused("use --ref_model_name_or_path (loaded like the policy)", (None,)),
    "model_adapter_name": Refused("not supported: the PEFT model's active adapter trains", (None,)),
    "ref_adapter_name": Refused(
        "not supported: the reference of a PEFT model is the model with its adapter disabled", (None,)
    ),
    "force_use_ref_model": Refused("use --reference model with --ref_model_name_or_path", (False,)),
    "dataset_streaming": Refused("not supported: the data set is read and checked in full before training", (False,)),
    "gradient_checkpointing_use_reentrant": Refused(
        "use --gradient_checkpointing_kwargs '{\"use_reentrant\": false}' (TrainingArguments)"
    ),
    "ignore_bias_buffers": Refused("not needed", (False,)),
    "lora_modules_to_save": Refused("not supported by the script; build a LoraConfig in Python", (None,)),
    "lora_task_type": Refused("the script trains causal LMs only", ("CAUSAL_LM",)),
    "use_rslora": Refused("not supported by the script; build a LoraConfig in Python", (False,)),
    "use_dora": Refused("not supported by the script; build a LoraConfig in Python", (False,)),
    "load_in_8bit": Refused("not supported: quantized bases are not tested here", (False,)),
    "load_in_4bit": Refused("not supported: quantized bases are not tested here", (False,)),
}

# Flags HfArgumentParser gives TRL's fields but not ours (a bool whose default is True gets --no_<name>).
FLAG_REWRITES: dict[str, list[str]] = {
    "--no_remove_unused_columns": ["--remove_unused_columns", "false"],
}


def _parse_scalar(value: Any) -> Any:
    """A command-line string as the Python value the ``inert`` check compares with."""
    if not isinstance(value, str):
        return value
    as_bool = parse_bool(value)
    if as_bool is not None:
        return as_bool
    if value.lower() == "none":
        return None
    try:
        return float(value) if any(c in value for c in ".e") else int(value)
    except ValueError:
        return value


def _refusal(name: str, value: Any, flag: bool) -> Optional[str]:
    spec = REFUSED[name]
    if _parse_scalar(value) in spec.inert:
        return None
    shown = f"--{name} {value}" if flag else f"{name}={value!r}"
    return f"{shown} is TRL's and has no equivalent in hf_dpo: {spec.advice}"


def translate_mapping(values: dict[str, Any], flag: bool = False) -> dict[str, Any]:
    """TRL names in ``values`` (a config file, or ``DPOConfig`` keyword arguments) replaced by ours.

    Raises ``ValueError`` for a refused name with a value that would change the run,
    and for an alias given together with its target.
    """
    out: dict[str, Any] = {}
    for name, value in values.items():
        if name in REFUSED:
            problem = _refusal(name, value, flag)
            if problem:
                raise ValueError(problem)
            continue
        if name in ALIASES:
            alias = ALIASES[name]
            if alias.target in values:
                raise ValueError(f"{name} is TRL's name for {alias.target}; give only one of them")
            out[alias.target] = alias.convert(value) if alias.convert else value
        else:
            out[name] = value
    loss = out.get("loss_type")
    if loss in LOSS_ALIASES:
        for key, replacement in LOSS_ALIASES[loss].items():
            if key != "loss_type" and key in out and _parse_scalar(out[key]) != replacement:
                raise ValueError(
                    f"loss_type {loss!r} (TRL) means {LOSS_ALIASES[loss]}, which contradicts {key}={out[key]!r}"
                )
        out.update(LOSS_ALIASES[loss])
    return out


def translate_argv(argv: list[str]) -> list[str]:
    """A command line with TRL's flags rewritten to ours (``--flag value`` and ``--flag=value``).

    Raises ``ValueError`` for a refused flag whose value would change the run.
    """
    out: list[str] = []
    implied: dict[str, Any] = {}  # settings a TRL loss name implies; a contradicting flag is an error
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token in FLAG_REWRITES:
            out += FLAG_REWRITES[token]
            continue
        if not token.startswith("--"):
            out.append(token)
            continue
        name, has_inline, inline = token[2:].partition("=")
        name = name.replace("-", "_")  # HfArgumentParser accepts --dataset-name for --dataset_name too
        if name not in ALIASES and name not in REFUSED and name != "loss_type":
            out.append(token)
            continue
        values: list[str] = [inline] if has_inline else []
        while not has_inline and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        value: Any = values[0] if len(values) == 1 else (values or "true")  # a bare bool flag means true
        translated = translate_mapping({name: value}, flag=True)
        if name == "loss_type" and value in LOSS_ALIASES:
            implied = {k: v for k, v in translated.items() if k != "loss_type"}
        for key, new_value in translated.items():
            out += [f"--{key}", *([str(v) for v in new_value] if isinstance(new_value, list) else [str(new_value)])]
    for key, wanted in implied.items():
        given = [out[j + 1] for j in range(len(out) - 1) if out[j] == f"--{key}"]
        if any(_parse_scalar(v) != wanted for v in given):
            raise ValueError(
                f"TRL's --loss_type {', '.join(LOSS_ALIASES)} implies --{key} {wanted}; remove --{key} {given[0]}"
            )
    return out


def accept_trl_names(cls):
    """Class decorator: ``cls(**kwargs)`` also takes TRL's names, translated by :func:`translate_mapping`."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **translate_mapping(kwargs))

    cls.__init__ = __init__
    return cls


def help_epilog() -> str:
    """The alias table as text, for ``hf-dpo --help``."""
    lines = ["TRL names accepted (TRL name -> hf_dpo name):"]
    lines += [f"  --{name} -> --{alias.target}" for name, alias in ALIASES.items()]
    lines += [
        f"  --loss_type {name} -> " + " ".join(f"--{k} {v}" for k, v in spec.items())
        for name, spec in LOSS_ALIASES.items()
    ]
    lines += [f"  {flag} -> {' '.join(new)}" for flag, new in FLAG_REWRITES.items()]
    lines.append("TRL names refused unless off: " + ", ".join(sorted(REFUSED)) + " (see docs/usage.md).")
    return "\n".join(lines)
