"""Which reference the log-ratios are taken against, and how to score a batch with it.

Modes:
    ``model``: a separate frozen model (eval mode, no grad, dropout off).
    ``adapter``: the PEFT policy itself with its adapter disabled, or with the frozen SFT adapter of
        ``ref_adapter`` active in its place (:mod:`hf_dpo.reference.adapters`); no second copy in memory.
    ``none``: reference-free losses (SimPO).
Cached reference log-prob sums in the batch (``ref_chosen_logp_sums``,
``ref_rejected_logp_sums``) take precedence over any mode.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from ..common.columns import REF_LOGP_COLUMNS
from ..common.models import disable_dropout, is_peft_model, unwrap
from .adapters import has_reference_adapter, reference_adapter_active
from .engines import refuse_partitioned_copy

logger = logging.getLogger(__name__)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients, dropout off; returns the model."""
    model.eval()
    model.requires_grad_(False)
    disable_dropout(model)
    return model


def resolve_reference_mode(
    model: nn.Module, ref_model: Optional[nn.Module], reference: str, needs_reference: bool
) -> str:
    """Turn ``reference`` (``auto|model|adapter|none``) into the concrete mode, or raise a clear error.

    ``needs_reference``: whether the loss compares against a reference (False for SimPO).
    """
    peft = is_peft_model(model)
    if reference == "auto":
        if not needs_reference:
            return "none"
        if ref_model is not None:
            return "model"
        return "adapter" if peft else "model"
    if reference == "adapter":
        if not peft:
            raise ValueError(
                "reference='adapter' needs a PEFT model (pass peft_config= or a PeftModel), but the policy has no adapter"
            )
        if ref_model is not None:
            raise ValueError(
                "reference='adapter' uses the policy with its adapter disabled; do not also pass ref_model"
            )
    if reference == "none" and needs_reference:
        raise ValueError("reference='none' cannot be used with a loss that needs a reference")
    return reference


def build_reference_model(model: nn.Module, ref_model: Optional[nn.Module], mode: str) -> Optional[nn.Module]:
    """The frozen reference for ``mode == "model"``: ``ref_model``, else a copy of the initial policy."""
    if mode != "model":
        return None
    if ref_model is None:
        refuse_partitioned_copy(model)
        logger.info("no ref_model given: using a frozen copy of the initial policy as the reference")
        ref_model = copy.deepcopy(model)
    return freeze(ref_model)


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """Context in which a (possibly wrapped) PEFT model runs as its base model."""
    inner = unwrap(model)  # DDP / DeepSpeed wrappers; the PeftModel inside is kept
    # The reference runs in eval mode even when the policy keeps its dropout (disable_dropout=False).
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with inner.disable_adapter():
            yield
    finally:
        for module, training in modes:
            module.training = training


def reference_logp_sums(
    mode: str,
    policy: nn.Module,
    ref_model: Optional[nn.Module],
    batch: dict[str, torch.Tensor],
    score: Callable[[nn.Module, dict], tuple[torch.Tensor, torch.Tensor]],
) -> Optional[torch.Tensor]:
    """Reference log-prob sums ``(2B,)`` for ``batch``, or None for reference-free training.

    ``score(model, batch)`` returns ``(sums, counts)`` of the batch's response
    tokens; it is the same function that scores the policy, so both sides see
    exactly the same tokens and masks.
    """
    if all(key in batch for key in REF_LOGP_COLUMNS):
        return torch.cat([batch[REF_LOGP_COLUMNS[0]], batch[REF_LOGP_COLUMNS[1]]])
    if mode == "none":
        return None
    if mode == "model" and ref_model is None:
        raise ValueError(
            "the batch has no cached reference sums (ref_chosen_logp_sums, ref_rejected_logp_sums) and the reference "
            "model was released after --precompute_ref_logps; pass data sets to the trainer's constructor so that "
            "their reference log-probs are precomputed too"
        )
    with torch.no_grad():
        if mode == "adapter":
            as_reference = reference_adapter_active if has_reference_adapter(policy) else adapter_disabled
            with as_reference(policy):
                sums, _ = score(policy, batch)
        else:
            sums, _ = score(ref_model, batch)
    return sums.detach()
