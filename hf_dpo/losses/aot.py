"""AOT, alignment via optimal transport (Melnyk et al. 2024): distributional preference by sorting.

Both losses sort a quantity across the micro-batch and compare the sorted lists rank by rank, so
**they couple the pairs of a batch**: element ``k`` of the returned losses belongs to rank ``k``,
not to pair ``k``; only their mean is meaningful, and it depends on which pairs share a batch
(per device, ``per_device_train_batch_size``). WPO's per-pair weights would be misaligned with
ranks, so WPO is refused with them (as in TRL). Rewards are still per pair. With one pair per
batch both reduce to the smoothed logistic loss of the DPO margin.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .ratios import implicit_rewards, per_token

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]


def _smoothed_logistic_of(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def aot_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    *,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """AOT paired: sort the policy's ``l_w - l_l`` and the reference's ``l_w - l_l`` across the batch separately,
    then the smoothed logistic loss of the sorted difference (``l`` per token when lengths are given)."""
    pc, pr = per_token(policy_chosen_logps, chosen_lengths), per_token(policy_rejected_logps, rejected_lengths)
    rc, rr = per_token(ref_chosen_logps, chosen_lengths), per_token(ref_rejected_logps, rejected_lengths)
    policy_sorted, _ = torch.sort(pc - pr, dim=0)
    ref_sorted, _ = torch.sort(rc - rr, dim=0)
    losses = _smoothed_logistic_of(policy_sorted - ref_sorted, beta, label_smoothing)
    rewards = implicit_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        chosen_lengths,
        rejected_lengths,
    )
    return losses, *rewards


def aot_unpaired_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    *,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """AOT unpaired: sort the chosen log-ratios and the rejected log-ratios across the batch separately, then the
    smoothed logistic loss of the sorted difference."""
    chosen = per_token(policy_chosen_logps - ref_chosen_logps, chosen_lengths)
    rejected = per_token(policy_rejected_logps - ref_rejected_logps, rejected_lengths)
    chosen_sorted, _ = torch.sort(chosen, dim=0)
    rejected_sorted, _ = torch.sort(rejected, dim=0)
    losses = _smoothed_logistic_of(chosen_sorted - rejected_sorted, beta, label_smoothing)
    rewards = implicit_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        chosen_lengths,
        rejected_lengths,
    )
    return losses, *rewards
