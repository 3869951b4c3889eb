"""Losses of each side's implicit reward ``r = beta * log pi/pi_ref`` on its own, not only of the margin.

They push the chosen reward up and the rejected one down in absolute terms, so they have no
f-divergence form (the f-DPO derivation leaves a ``beta log Z(x)`` term that cancels only in the
difference; TRL refuses the combination too). With ``chosen_lengths``/``rejected_lengths`` the
log-ratios are per token (the length-normalized form). Each takes ``(B,)`` tensors and returns
per-pair ``(losses, chosen_rewards, rejected_rewards)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .ratios import implicit_rewards, log_ratios

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]


def _ratios_and_rewards(pc, pr, rc, rr, beta, chosen_lengths, rejected_lengths):
    chosen, rejected = log_ratios(pc, pr, rc, rr, chosen_lengths, rejected_lengths)
    return chosen, rejected, implicit_rewards(pc, pr, rc, rr, beta, chosen_lengths, rejected_lengths)


def nca_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """NCA on pairs (Chen et al. 2024, "Noise Contrastive Alignment"):
    ``-logsigmoid(r_w) - logsigmoid(-r_w) / 2 - logsigmoid(-r_l) / 2``."""
    chosen, rejected, rewards = _ratios_and_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        chosen_lengths,
        rejected_lengths,
    )
    r_w, r_l = beta * chosen, beta * rejected
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l), *rewards


def bco_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """BCO on pairs (Jung et al. 2024): a binary classifier of the rewards, ``-logsigmoid(r_w) - logsigmoid(-r_l)``.

    As in TRL 1.16, the decision boundary is 0: the BCO paper (and TRL < 1.0) shifted both rewards by a
    running mean of past rewards, which TRL 1.16 dropped; hf_dpo follows 1.16, so there is no state.
    """
    chosen, rejected, rewards = _ratios_and_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        chosen_lengths,
        rejected_lengths,
    )
    return -F.logsigmoid(beta * chosen) - F.logsigmoid(-beta * rejected), *rewards


def sppo_hard_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024): ``(log-ratio_w - 1/(2 beta))^2 + (log-ratio_l + 1/(2 beta))^2``.

    The winner's log-ratio is pulled to ``+1/(2 beta)`` and the loser's to ``-1/(2 beta)`` (``beta = 1/eta``
    of the paper); in the normalized form these targets are per token, as IPO's margin is in TRL.
    """
    chosen, rejected, rewards = _ratios_and_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        chosen_lengths,
        rejected_lengths,
    )
    return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2, *rewards


def apo_zero_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): ``1 - sigmoid(r_w) + sigmoid(r_l)``; for chosen answers
    better than the model's own outputs: raise the chosen likelihood, lower the rejected one."""
    chosen, rejected, rewards = _ratios_and_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        chosen_lengths,
        rejected_lengths,
    )
    return (1 - torch.sigmoid(beta * chosen)) + torch.sigmoid(beta * rejected), *rewards


def apo_down_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """APO-down (Eq. 8): ``sigmoid(r_w) + 1 - sigmoid(r_w - r_l)``; for chosen answers worse than the model's
    own: lower both likelihoods, the rejected one more."""
    chosen, rejected, rewards = _ratios_and_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        chosen_lengths,
        rejected_lengths,
    )
    return torch.sigmoid(beta * chosen) + (1 - torch.sigmoid(beta * (chosen - rejected))), *rewards
