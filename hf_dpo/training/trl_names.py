"""TRL's argument names, accepted where they mean what ours mean and refused where they do not.

One table, :data:`ALIASES` and :data:`REFUSED`, serves the command line
(:func:`translate_argv`, :func:`translate_mapping` for config files), Python
(``DPOConfig(precompute_ref_log_probs=True)`` through :func:`accept_trl_names`),
the ``--help`` epilog and docs/usage.md. The names come from TRL's ``DPOConfig``,
``ScriptArguments`` and ``ModelConfig`` (TRL 0.19 to 1.x); where TRL changed a
meaning between versions the entry says which one it follows.

A name that is translated is logged once, saying what it became (a WARNING where the meaning
shifts, as ``rpo_alpha``, INFO for a plain rename); a refused name raises with the reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from ..common.flags import parse_bool

logger = logging.getLogger(__name__)
_logged: set[str] = set()


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


# TRL name -> our name. Same meaning, same units.
ALIASES: dict[str, Alias] = {
    "dataset_name": Alias("dataset", "the training data: hub name, file or directory"),
    "dataset_train_split": Alias("dataset_split", "split of a hub data set to train on"),
    "dataset_test_split": Alias("eval_dataset_split", "split of the same hub data set to evaluate on"),
    "precompute_ref_log_probs": Alias(
        "precompute_ref_logps", "score the data with the reference once, before training"
    ),
    "dtype": Alias("torch_dtype", "dtype the weights are loaded in (TRL >= 0.20's name)"),
}

# TRL < 1.0's RPO weight: the chosen NLL added to the loss, now TRL 1.16's (and our) "sft" entry of a loss list.
RPO_ALPHA = "rpo_alpha"
RPO_NOTE = (
    "TRL < 1.0's RPO term is the chosen NLL averaged over the batch's chosen tokens, exactly TRL 1.16's and "
    "hf_dpo's sft loss (not --sft_weight, which averages per pair)"
)
# Flags whose values the rpo_alpha rewrite reads and replaces; several values each.
_LOSS_LIST_FLAGS = ("loss_type", "loss_weights", RPO_ALPHA)

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
        "not supported: the reference of a PEFT model is the model with its adapter disabled, or with the adapter "
        "of --ref_adapter PATH (e.g. an SFT adapter; --policy_adapter copy|new)",
        (None,),
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
    "bnb_4bit_quant_type": Refused("not supported: quantized bases are not tested here", ("nf4",)),
    "use_bnb_nested_quant": Refused("not supported: quantized bases are not tested here", (False,)),
    "bnb_4bit_quant_storage": Refused("not supported: quantized bases are not tested here", (None,)),
    "lora_target_parameters": Refused("not supported by the script; build a LoraConfig in Python", (None,)),
    "activation_offloading": Refused(
        "not supported; use --gradient_checkpointing true (TrainingArguments) to save activation memory", (False,)
    ),
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


def _log_once(level: int, message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return str(value).replace(",", " ").split() if isinstance(value, str) else [value]


def _number(value: Any) -> str:
    return f"{float(value):g}"


def _rpo_as_loss_list(values: dict[str, Any], flag: bool) -> dict[str, Any]:
    """``rpo_alpha`` in ``values`` rewritten as the ``sft`` entry of the loss list (TRL 1.16's form of RPO)."""
    alpha = _parse_scalar(values.get(RPO_ALPHA))
    out = {key: value for key, value in values.items() if key != RPO_ALPHA}
    if alpha is None or alpha == 0:  # TRL's "off"
        return out
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{RPO_ALPHA}: expected a number, got {values.get(RPO_ALPHA)!r}")
    loss_types = _as_list(values.get("loss_type")) or ["sigmoid"]
    if "sft" in loss_types:
        raise ValueError(f"{RPO_ALPHA} adds an sft term, but loss_type already has sft; set its weight in loss_weights")
    try:
        weights = [float(w) for w in _as_list(values.get("loss_weights"))] or [1.0] * len(loss_types)
    except ValueError:
        raise ValueError(f"loss_weights: expected numbers, got {values.get('loss_weights')!r}") from None
    if len(weights) != len(loss_types):
        raise ValueError(f"loss_weights {weights} must have one weight per loss_type {loss_types}")
    out["loss_type"], out["loss_weights"] = [*loss_types, "sft"], [*weights, float(alpha)]
    given = f"--{RPO_ALPHA} {_number(alpha)}" if flag else f"{RPO_ALPHA}={_number(alpha)}"
    _log_once(
        logging.WARNING,
        f"{given} (TRL < 1.0) -> --loss_type {' '.join(out['loss_type'])} --loss_weights "
        f"{' '.join(_number(w) for w in out['loss_weights'])}: {RPO_NOTE}",
    )
    return out


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
            _log_once(logging.INFO, f"TRL's {name} is read as {alias.target} ({alias.note})")
        else:
            out[name] = value
    return _rpo_as_loss_list(out, flag) if RPO_ALPHA in out else out


def translate_argv(argv: list[str]) -> list[str]:
    """A command line with TRL's flags rewritten to ours (``--flag value`` and ``--flag=value``).

    ``--rpo_alpha A`` becomes ``A``'s ``sft`` entry in ``--loss_type``/``--loss_weights``, which are then
    emitted last. Raises ``ValueError`` for a refused flag whose value would change the run.
    """
    out: list[str] = []
    loss_list: dict[str, list[str]] = {}  # --loss_type, --loss_weights, --rpo_alpha: rewritten together
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
        if name not in ALIASES and name not in REFUSED and name not in _LOSS_LIST_FLAGS:
            out.append(token)
            continue
        values: list[str] = [inline] if has_inline else []
        while not has_inline and i < len(argv) and not argv[i].startswith("--"):
            values.append(argv[i])
            i += 1
        if name in _LOSS_LIST_FLAGS:
            loss_list[name] = values
            continue
        value: Any = values[0] if len(values) == 1 else (values or "true")  # a bare bool flag means true
        for key, new_value in translate_mapping({name: value}, flag=True).items():
            out += [f"--{key}", *([str(v) for v in new_value] if isinstance(new_value, list) else [str(new_value)])]
    if RPO_ALPHA in loss_list:
        rpo = " ".join(loss_list.pop(RPO_ALPHA))
        rewritten = _rpo_as_loss_list({**loss_list, RPO_ALPHA: rpo}, flag=True)
        loss_list = {key: [str(v) for v in _as_list(value)] for key, value in rewritten.items()}
    for key, values in loss_list.items():
        out += [f"--{key}", *values]
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
    lines.append(f"  --{RPO_ALPHA} A -> --loss_type <given, or sigmoid> sft --loss_weights <given, or 1 each> A")
    lines += [f"  {flag} -> {' '.join(new)}" for flag, new in FLAG_REWRITES.items()]
    lines.append("TRL names refused unless off: " + ", ".join(sorted(REFUSED)) + " (see docs/usage.md).")
    return "\n".join(lines)
