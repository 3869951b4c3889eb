"""Preference losses as pure functions of per-pair log-probabilities.

Every loss takes ``(B,)`` tensors of sequence log-probabilities (summed, or the
per-token mean when length normalization is on) and returns per-pair
``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``. The caller takes
the mean. Rewards are built from the same quantity the loss optimizes, so the
logged ``rewards/*`` describe what is actually trained.

Variants are named once, in :data:`LOSS_REGISTRY`; the config's choices, help
text and validation are derived from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return chosen_rewards, rejected_rewards


def _log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    # (pi_c - pi_r) - (ref_c - ref_r): how much more the policy prefers chosen than the reference does.
    return (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **_: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al., 2023): ``-logsigmoid(beta * margin)``.

    With ``label_smoothing = eps > 0`` this is conservative DPO (cDPO): the
    preference label is assumed flipped with probability ``eps``, giving
    ``-(1 - eps) * logsigmoid(beta * m) - eps * logsigmoid(-beta * m)``.
    Passing length-normalized log-probs gives the length-normalized DPO loss.
    """
    margin = _log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * margin
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return (
        losses,
        *_implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta),
    )


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    **_: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Robust DPO (Chowdhury et al., 2024): an unbiased loss under label noise ``eps``.

    ``((1 - eps) * -logsigmoid(beta * m) - eps * -logsigmoid(-beta * m)) / (1 - 2 eps)``.
    ``eps = label_smoothing`` must be below 0.5 (checked by the config).
    """
    margin = _log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * margin
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return (
        losses,
        *_implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta),
    )


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    **_: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al., 2023): ``(margin - 1 / (2 beta))^2``; beta is the regularization tau."""
    margin = _log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (margin - 1 / (2 * beta)) ** 2
    return (
        losses,
        *_implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta),
    )


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    **_: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """SLiC hinge (Zhao et al., 2023): ``relu(1 - beta * margin)``."""
    margin = _log_ratio_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * margin)
    return (
        losses,
        *_implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta),
    )


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    beta: float = 2.0,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    **_: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al., 2024), reference-free: ``-logsigmoid(beta * (pi_c - pi_r) - gamma)``.

    ``gamma = simpo_gamma`` is the target reward margin in reward units (the
    paper's gamma, not TRL's gamma/beta ratio). The reference log-probs are
    ignored; rewards are ``beta * pi``. Meant for length-normalized log-probs.
    """
    logits = beta * (policy_chosen_logps - policy_rejected_logps) - simpo_gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def sft_nll(chosen_logp_sums: Tensor, chosen_token_counts: Tensor) -> Tensor:
    """Per-pair negative log-likelihood per token of the chosen response, ``(B,)``.

    Added as ``sft_weight * sft_nll`` (RPO-style) to keep the chosen answer likely.
    Always the per-token mean, whatever the DPO term uses, so the weight means
    the same thing for long and short answers.
    """
    return -chosen_logp_sums / chosen_token_counts.clamp_min(1)


@dataclass(frozen=True)
class LossSpec:
    """One registered loss: the function, whether it needs reference log-probs, a one-line description,
    and whether it reads ``label_smoothing`` (the config refuses a smoothing the loss would ignore)."""

    fn: Callable[..., tuple[Tensor, Tensor, Tensor]]
    needs_reference: bool
    description: str
    uses_label_smoothing: bool = True


LOSS_REGISTRY: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, True, "DPO -logsigmoid(beta*margin); cDPO when label_smoothing > 0"),
    "robust": LossSpec(robust_loss, True, "robust DPO, unbiased under label noise label_smoothing"),
    "ipo": LossSpec(ipo_loss, True, "IPO (margin - 1/(2*beta))^2", uses_label_smoothing=False),
    "hinge": LossSpec(hinge_loss, True, "SLiC hinge relu(1 - beta*margin)", uses_label_smoothing=False),
    "simpo": LossSpec(simpo_loss, False, "SimPO, reference-free, margin simpo_gamma"),
}


def get_loss(name: str) -> LossSpec:
    """Look a loss up by name, with an error that lists the valid names."""
    try:
        return LOSS_REGISTRY[name]
    except KeyError:
        raise ValueError(f"--loss_type: unknown loss {name!r}; choose one of {sorted(LOSS_REGISTRY)}") from None


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dispatch to the registered loss ``loss_type``; all tensors ``(B,)``.

    Returns per-pair ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``.
    """
    spec = get_loss(loss_type)
    if spec.needs_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type={loss_type!r} needs reference log-probs, but none were given")
    return spec.fn(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
    )
