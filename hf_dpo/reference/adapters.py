"""A reference from an SFT LoRA adapter: the base with that adapter, frozen, and the policy's adapter on the same base.

``ref_adapter`` (a peft LoRA adapter: a directory or a hub id) is loaded into the policy's
``PeftModel`` as a second, frozen adapter named :data:`REF_ADAPTER`, so one base model is in
memory. The policy's adapter is peft's ``default`` adapter:

* ``policy_adapter="copy"``: the SFT adapter loaded a second time, trainable. The policy is
  base + ``default``; at step 0 ``default`` equals ``ref_adapter``.
* ``policy_adapter="new"``: a new adapter from ``peft_config``, trained on top of the SFT
  adapter: the policy is base + ``ref_adapter`` + ``default`` (both active, only ``default``
  trainable); at step 0 ``default``'s B is zero.

The reference forward (:func:`reference_adapter_active`) activates ``ref_adapter`` alone, in
eval mode and without gradients, then restores the policy's active adapters and every
``requires_grad`` flag as they were: peft's ``set_adapter`` marks the adapters it activates
as trainable, which must never reach the optimizer's view of the model.

Nothing is merged into the base weights, so the reference computes exactly what
``PeftModel.from_pretrained(base, ref_adapter)`` computes, in any dtype.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

from torch import nn

from ..common.models import is_peft_model, unwrap

logger = logging.getLogger(__name__)

REF_ADAPTER = "ref_adapter"
POLICY_ADAPTER = "default"  # peft's name for the adapter save_pretrained writes at the top level
POLICY_ADAPTER_CHOICES = ("copy", "new")

# LoRA settings that the saved policy of policy_adapter="new" (one adapter: the two concatenated) cannot carry.
_NOT_CONCATENABLE = {
    "use_dora": "a DoRA magnitude vector",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "trainable_token_indices": "trained token embeddings (trainable_token_indices)",
    "lora_bias": "a trained LoRA bias",
    "target_parameters": "adapted parameters (target_parameters)",
}


def has_reference_adapter(model: nn.Module) -> bool:
    """Whether ``model`` (possibly wrapped) carries the frozen reference adapter of ``ref_adapter``."""
    return REF_ADAPTER in (getattr(unwrap(model), "peft_config", None) or {})


def policy_adapters(policy_adapter: str) -> list[str]:
    """The adapters active in the policy's forward: ``default``, plus the SFT adapter under it for ``new``."""
    return [POLICY_ADAPTER, REF_ADAPTER] if policy_adapter == "new" else [POLICY_ADAPTER]


def concatenation_problems(config) -> list[str]:
    """What in a LoRA ``config`` keeps it from being concatenated with another into one adapter (empty: nothing)."""
    return [
        text for name, text in _NOT_CONCATENABLE.items() if getattr(config, name, None) not in (None, False, {}, [], ())
    ]


def check_adapter_settings(args) -> None:
    """Raise ``ValueError`` for ``ref_adapter`` / ``policy_adapter`` settings that contradict each other (``DPOConfig``)."""
    if args.policy_adapter not in POLICY_ADAPTER_CHOICES:
        raise ValueError(
            f"--policy_adapter: got {args.policy_adapter!r}; choose one of {', '.join(POLICY_ADAPTER_CHOICES)}"
        )
    if args.ref_adapter and args.reference in ("model", "none"):
        raise ValueError(
            f"--ref_adapter makes the reference the base model with that adapter, which contradicts --reference "
            f"{args.reference}: leave --reference at auto (or adapter)"
        )
    if args.policy_adapter != "copy" and not args.ref_adapter:
        raise ValueError(f"--policy_adapter {args.policy_adapter} has no effect without --ref_adapter")


def _check_lora(config, what: str) -> None:
    kind = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None)))
    if kind != "LORA":
        raise ValueError(f"{what} must be a LoRA adapter, but it is {kind}")


def attach_adapters(model: nn.Module, peft_config, ref_model: Optional[nn.Module], args) -> nn.Module:
    """The policy to train: ``model`` wrapped with ``peft_config`` and/or the adapters of ``args.ref_adapter``.

    Without ``ref_adapter``: ``model`` with a new adapter from ``peft_config`` (when given and ``model`` has
    none yet), else ``model`` unchanged. With it: see the module docstring. ``args``: the trainer's
    ``DPOConfig`` (``ref_adapter``, ``policy_adapter``, ``gradient_checkpointing``). Raises ``ValueError``
    naming the setting that cannot work together with ``ref_adapter``.
    """
    if args.ref_adapter is not None:
        model = _with_reference_adapter(model, peft_config, ref_model, args.ref_adapter, args.policy_adapter)
    elif peft_config is not None and not is_peft_model(model):
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    else:
        return model
    if args.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def _with_reference_adapter(
    model: nn.Module, peft_config, ref_model: Optional[nn.Module], ref_adapter: str, policy_adapter: str
) -> nn.Module:
    from peft import PeftConfig, PeftModel, get_peft_model

    if is_peft_model(model):
        raise ValueError(
            f"ref_adapter={ref_adapter!r} loads the SFT adapter onto the base model, but the model passed already has "
            "adapters: pass the base model (without adapters)"
        )
    if ref_model is not None:
        raise ValueError("ref_adapter makes the reference the base model with that adapter: do not also pass ref_model")
    sft_config = PeftConfig.from_pretrained(ref_adapter)
    _check_lora(sft_config, f"--ref_adapter {ref_adapter}")
    if policy_adapter == "copy":
        if peft_config is not None:
            raise ValueError(
                "--policy_adapter copy trains the SFT adapter itself, with the LoRA settings it was saved with, so "
                "peft_config (--use_peft and the --lora_* flags) would be ignored: drop it, or use --policy_adapter new"
            )
        model = PeftModel.from_pretrained(model, ref_adapter, adapter_name=POLICY_ADAPTER, is_trainable=True)
    else:
        if peft_config is None:
            raise ValueError(
                "--policy_adapter new trains a new adapter on top of the SFT adapter and needs its LoRA settings: "
                "pass peft_config= (the command line builds it from its --lora_* flags)"
            )
        _check_lora(peft_config, "peft_config with --policy_adapter new")
        for config, what in ((sft_config, f"--ref_adapter {ref_adapter}"), (peft_config, "the new adapter")):
            problems = concatenation_problems(config)
            if problems:
                raise ValueError(
                    f"--policy_adapter new saves the policy as one LoRA adapter (the SFT adapter and the new one "
                    f"concatenated), which cannot hold {', '.join(problems)} of {what}: use --policy_adapter copy"
                )
        model = get_peft_model(model, peft_config)
    model.load_adapter(ref_adapter, adapter_name=REF_ADAPTER, is_trainable=False)
    activate_policy(model, policy_adapter)
    logger.info(
        "reference: the base model with the frozen adapter %s; policy: %s",
        ref_adapter,
        "a trainable copy of it" if policy_adapter == "copy" else "a new adapter on top of it",
    )
    return model


def activate_policy(model: nn.Module, policy_adapter: str) -> None:
    """Make the policy's adapters the active ones, only ``default`` trainable and ``ref_adapter`` frozen.

    Also the repair after ``Trainer`` resumes a checkpoint: it reloads the adapters and activates ``default`` alone.
    """
    peft_model = unwrap(model)
    peft_model.base_model.set_adapter(policy_adapters(policy_adapter))  # marks both trainable
    for name, param in peft_model.named_parameters():
        if f".{REF_ADAPTER}." in name:
            param.requires_grad_(False)


@contextlib.contextmanager
def reference_adapter_active(model: nn.Module):
    """Context in which a (possibly wrapped) policy with a reference adapter runs as the reference: that adapter
    alone, in eval mode; the active adapters, ``requires_grad`` flags and train/eval modes are restored after."""
    peft_model = unwrap(model)
    tuner = peft_model.base_model
    active = list(tuner.active_adapters)
    flags = [(param, param.requires_grad) for param in peft_model.parameters()]
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    tuner.set_adapter(REF_ADAPTER)
    try:
        yield
    finally:
        tuner.set_adapter(active)
        for param, flag in flags:
            if param.requires_grad != flag:
                param.requires_grad_(flag)
        for module, training in modes:
            module.training = training
