"""The negative log-likelihood of the chosen responses: TRL's ``sft`` term and hf_dpo's per-pair ``sft_nll``.

They differ in how tokens are averaged when chosen answers differ in length:

* :func:`sft_loss` (``--loss_type ... sft``, TRL's): one token mean over all chosen response tokens of
  the micro-batch, ``-(sum_i S_i) / (sum_i n_i)``: a long answer weighs more. The RPO term of TRL < 1.0
  (``rpo_alpha``) was the same mean.
* :func:`sft_nll` (``--sft_weight``): each answer's per-token NLL ``-S_i / n_i``, so every pair weighs the same.
"""

from __future__ import annotations

from typing import Optional

import torch

from .ratios import implicit_rewards

Tensor = torch.Tensor


def sft_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Optional[Tensor] = None,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    beta: float = 0.1,
    *,
    chosen_token_counts: Tensor,
    **_,
) -> tuple[Tensor, Tensor, Tensor]:
    """``-(sum_i S_i) / (sum_i n_i)`` broadcast to ``(B,)``: the chosen NLL per token over the whole micro-batch.

    Args:
        policy_chosen_logps: ``(B,)`` **summed** log-probs of the chosen responses (not per-token means, not
            LD-weighted: the NLL is of the answer as written).
        chosen_token_counts: ``(B,)`` their scored token counts ``n_i``.

    Couples the pairs of a batch (a token mean, not a mean of per-pair values); under gradient
    accumulation it is taken per micro-batch. The rewards are ``beta * log-ratio`` of the summed inputs
    (``beta * S`` without a reference); the loss does not use them.
    """
    total = chosen_token_counts.sum()
    if int(total) <= 0:
        raise ValueError("the batch has no chosen response token; the sft term (a token mean) is undefined")
    losses = (-(policy_chosen_logps.sum() / total.to(policy_chosen_logps.dtype))).expand(policy_chosen_logps.shape[0])
    if policy_rejected_logps is None:
        return losses, beta * policy_chosen_logps.detach(), torch.zeros_like(policy_chosen_logps)
    rewards = implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return losses, *rewards


def sft_nll(chosen_logp_sums: Tensor, chosen_token_counts: Tensor) -> Tensor:
    """Per-pair negative log-likelihood per token of the chosen response, ``(B,)``: ``-S_i / n_i``.

    Added as ``sft_weight * sft_nll`` (``--sft_weight``) to keep the chosen answer likely. Always the
    per-token mean, whatever the DPO term uses, so the weight means the same for long and short answers.
    """
    return -chosen_logp_sums / chosen_token_counts.clamp_min(1)
