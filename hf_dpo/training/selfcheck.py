"""Start-of-training self-checks for :class:`hf_dpo.NormalizedDPOTrainer`.

* At the first training step the policy equals its reference, so the loss must
  equal the loss at zero log-ratio (ln 2 for the sigmoid loss). If it does not,
  a loud warning names the likely causes found by inspecting the models
  (:class:`~hf_dpo.training.guards.TrainingGuards` runs the check).
* With length normalization, a beta below 1 that the user did not choose is
  almost always a summed-log-prob default carried over; warn once. So is a full fine-tune
  of a pretrained model at a learning rate made for supervised fine-tuning.

Rules and messages are documented in docs/reliability.md.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch
from torch import nn

from ..common.columns import REF_LOGP_COLUMNS
from ..common.models import dropout_rates, float_dtype, unwrap
from ..losses import LossObjective, as_loss_types

logger = logging.getLogger(__name__)

LN2 = math.log(2.0)
# Policy and reference run the same weights on the same batch at step 0, so the
# loss is exact up to kernel noise; a wrong reference moves it by far more.
FIRST_STEP_RTOL = 1e-3


# --------------------------------------------------------------------------- first-step self-check


def initial_loss(args) -> Optional[float]:
    """The loss of a policy equal to its reference (all log-ratios zero), or None when it cannot be predicted.

    ln 2 for ``sigmoid``, ``robust``, ``aot`` (any label smoothing), 1 for ``hinge`` and the APO losses,
    ``(1 / (2 beta))^2`` for ``ipo``, ... and the weighted sum for a list
    (:meth:`hf_dpo.losses.LossObjective.loss_at_zero`). None for reference-free losses, with WPO weights
    and when an SFT term (which depends on the data) is part of the loss.
    """
    return LossObjective.from_config(args).loss_at_zero()[0]


def active_dropout(model: nn.Module) -> list[str]:
    """Names of dropout that is live in ``model`` (module in train mode and probability above 0)."""
    return [
        f"{name or 'model'} (p={value})" if attribute == "p" else f"{name or 'model'}.{attribute}={value}"
        for name, module, attribute, value in dropout_rates(model)
        if module.training and value > 0
    ]


def _differing_tensors(policy: nn.Module, reference: nn.Module) -> Optional[tuple[int, int, str]]:
    """``(differing, total, first name)`` over the parameters both models share, or None if they cannot be compared."""
    ref_params = dict(reference.named_parameters())
    pairs = [(n, p, ref_params.get(n)) for n, p in policy.named_parameters()]
    pairs = [(n, p, r) for n, p, r in pairs if r is not None and r.shape == p.shape]
    if not pairs:
        return None
    with torch.no_grad():
        differing = [n for n, p, r in pairs if not torch.equal(p.detach().to(r.device, r.dtype), r.detach())]
    return len(differing), len(pairs), (differing[0] if differing else "")


def likely_causes(policy: nn.Module, reference: Optional[nn.Module], mode: str, batch: dict[str, Any]) -> list[str]:
    """The reasons found by inspection, most specific first, then the causes that cannot be seen from here."""
    policy, reference = unwrap(policy), None if reference is None else unwrap(reference)
    causes = []
    dropout = active_dropout(policy)
    if dropout:
        shown = ", ".join(dropout[:3]) + (f" and {len(dropout) - 3} more" if len(dropout) > 3 else "")
        causes.append(
            f"dropout is on in the policy ({shown}) but not in the reference: set disable_dropout=True, "
            "or zero the dropout fields of the model config"
        )
    if REF_LOGP_COLUMNS[0] in batch:
        causes.append(
            "the cached reference log-probs (ref_chosen_logp_sums/ref_rejected_logp_sums) were computed with another "
            "model, tokenizer, max_length, chat template or precision"
        )
    elif mode == "model" and reference is not None:
        policy_dtype, ref_dtype = float_dtype(policy), float_dtype(reference)
        if policy_dtype != ref_dtype:
            causes.append(
                f"the policy runs in {policy_dtype} but the reference in {ref_dtype}: load both in the same dtype"
            )
        compared = _differing_tensors(policy, reference)
        if compared is not None and compared[0]:
            differing, total, first = compared
            causes.append(
                f"the reference's weights differ from the policy's in {differing} of {total} tensors (e.g. {first}): "
                "ref_model is not the model that training starts from"
            )
    elif mode == "adapter":
        causes.append(
            "the adapter is not a no-op at the start (a pre-trained adapter was loaded, or LoRA B is not zero)"
        )
    causes.append("the policy was changed after the trainer was built (the frozen reference is taken in __init__)")
    return causes


def first_step_message(loss: float, expected: float, loss_type, causes: list[str]) -> str:
    """The warning text for a first-step loss that is not the loss at zero log-ratio."""
    target = f"ln 2 = {LN2:.4f}" if math.isclose(expected, LN2, rel_tol=1e-9) else f"{expected:.4f}"
    listed = " ".join(f"({i}) {cause};" for i, cause in enumerate(causes, start=1))
    return (
        f"SELF-CHECK FAILED at the first training step: the loss is {loss:.4f}, but a policy identical to its "
        f"reference gives {target} ({' + '.join(as_loss_types(loss_type))} loss, tolerance "
        f"{FIRST_STEP_RTOL:.1%}). The policy and the "
        f"reference differ at the start, so every reward is measured from a wrong baseline. Likely causes: {listed}"
    )


# --------------------------------------------------------------------------- beta


def beta_warning(args) -> Optional[tuple[int, str]]:
    """``(log level, message)`` when length normalization meets a beta below 1, else None.

    A beta the user did not choose (``beta_is_default``) is a WARNING: it is a
    summed-log-prob default (0.1) carried over. A beta set explicitly is
    respected and only noted at INFO.
    """
    if not args.length_normalize or args.beta >= 1:
        return None
    explicit = not getattr(args, "beta_is_default", False)
    message = (
        f"beta={args.beta} with length_normalize=True: per-token log-ratios are about |y| times smaller than "
        "summed ones, so a beta below 1 leaves the sigmoid nearly flat and the policy barely moves; practitioners "
        "use beta of about 2 to 10 with length normalization"
    )
    if explicit:
        return logging.INFO, message + " (beta was set explicitly, so it is kept)"
    return logging.WARNING, message + "; set beta explicitly (e.g. beta=2.0) to choose it"


# --------------------------------------------------------------------------- learning rate

# Above this, a full fine-tune of a pretrained model is past the usual DPO range (1e-7 to 5e-6).
HIGH_FULL_FINETUNE_LR = 2e-5
# Below this many parameters a model is a toy (the demo's has ~0.1M): random-init models train at far higher rates.
PRETRAINED_SIZE = 10_000_000


def learning_rate_warning(learning_rate: float, adapter_only: bool, n_parameters: int) -> Optional[str]:
    """The warning for a full fine-tune of a real model at a learning rate far above DPO's usual range, else None."""
    if adapter_only or n_parameters < PRETRAINED_SIZE or learning_rate <= HIGH_FULL_FINETUNE_LR:
        return None
    return (
        f"learning_rate={learning_rate:g} for a full fine-tune of a {n_parameters / 1e6:.0f}M-parameter model: DPO's "
        f"usual range is 1e-7 to 5e-6 (the default is 1e-6); rates made for supervised fine-tuning (5e-5) move a "
        "pretrained model far from its reference within a few steps. Set --learning_rate explicitly if this is intended"
    )


def warn_about_settings(args, model: nn.Module) -> None:
    """Log :func:`beta_warning` and :func:`learning_rate_warning` once, when they apply to ``args`` and ``model``."""
    warning = beta_warning(args)
    if warning is not None:
        logger.log(*warning)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    adapter_only = trainable < 0.5 * total  # LoRA and other adapters train a small share
    message = learning_rate_warning(args.learning_rate, adapter_only, total)
    if message is not None:
        logger.warning(message)
