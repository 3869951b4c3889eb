"""DPOConfig's fields for a reference beyond a model: an SFT adapter (``ref_adapter``) and TR-DPO's syncs.

``DPOConfig`` inherits them (they are its fields: on the command line, in config files and in
Python); they live beside :mod:`hf_dpo.reference.adapters` and :mod:`hf_dpo.training.ref_sync`,
which use them, and :func:`check_reference_arguments` checks them from ``DPOConfig.__post_init__``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..reference.adapters import POLICY_ADAPTER_CHOICES, check_adapter_settings
from .ref_sync import check_sync_settings


@dataclass
class ReferenceArguments:
    """``ref_adapter`` / ``policy_adapter`` (docs/usage.md, DPO on top of an SFT adapter) and TR-DPO's
    ``sync_ref_model`` / ``ref_model_mixup_alpha`` / ``ref_model_sync_steps`` (TRL 1.16's names and defaults)."""

    ref_adapter: Optional[str] = field(
        default=None,
        metadata={
            "help": "A peft LoRA adapter (directory or hub id) of the base model, e.g. an SFT adapter: the reference "
            "becomes the base model with this adapter, frozen, and the policy trains an adapter on the same base "
            "(see policy_adapter); one base model in memory. Pass the base model as the model."
        },
    )
    policy_adapter: str = field(
        default="copy",
        metadata={
            "help": "With ref_adapter, what the policy trains: a copy of ref_adapter (its LoRA settings), or a new "
            "adapter on top of it (the LoRA settings of peft_config / the --lora_* flags; saved as one adapter, the "
            f"two concatenated). Choices: {', '.join(POLICY_ADAPTER_CHOICES)}.",
            "choices": list(POLICY_ADAPTER_CHOICES),
        },
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={
            "help": "TR-DPO: every ref_model_sync_steps optimizer steps, set each reference parameter to "
            "(1 - ref_model_mixup_alpha) * reference + ref_model_mixup_alpha * policy (TRL's rule). Needs a separate "
            "reference or ref_adapter with policy_adapter copy; checkpoints save the synced reference."
        },
    )
    ref_model_mixup_alpha: float = field(
        default=0.6,
        metadata={"help": "TR-DPO's alpha, in (0, 1]: the policy's share in each sync (1: the reference becomes it)."},
    )
    ref_model_sync_steps: int = field(
        default=512, metadata={"help": "TR-DPO's tau: sync the reference every this many optimizer steps."}
    )


def check_reference_arguments(args) -> None:
    """Raise ``ValueError`` for reference settings that contradict each other or the rest of ``args``."""
    check_adapter_settings(args)
    check_sync_settings(args)
