"""Log-ratios and implicit rewards: the per-side quantities every reference-based loss is built from.

A loss receives per-pair sequence log-probs ``(B,)``: summed over the response tokens (or
LD-DPO-weighted sums). With ``chosen_lengths``/``rejected_lengths`` given, the log-ratio of each
side is divided by its response's token count: the length-normalized form (docs/loss.md), which
for the plain log-ratio is the difference of the per-token means. Without lengths the inputs are
used as they are, so callers may also pass per-token means directly.
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def per_token(values: Tensor, lengths: Optional[Tensor]) -> Tensor:
    """``values / lengths`` ``(B,)``, or ``values`` unchanged when ``lengths`` is None (the summed form)."""
    if lengths is None:
        return values
    if bool((lengths <= 0).any()):
        empty = (lengths <= 0).nonzero().flatten().tolist()
        raise ValueError(f"pairs {empty} have a response with no token; cannot take a per-token mean")
    return values / lengths.to(values.dtype)


def log_ratios(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``(chosen, rejected)`` log-ratios ``log pi/pi_ref`` per side, ``(B,)`` each, per token when lengths are given.

    Reference-free (both reference tensors None): the policy's own log-probs.
    """
    if ref_chosen_logps is None or ref_rejected_logps is None:
        return per_token(policy_chosen_logps, chosen_lengths), per_token(policy_rejected_logps, rejected_lengths)
    return (
        per_token(policy_chosen_logps - ref_chosen_logps, chosen_lengths),
        per_token(policy_rejected_logps - ref_rejected_logps, rejected_lengths),
    )


def implicit_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    beta: float,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``beta * log-ratio`` per side, detached (for logging): ``(chosen_rewards, rejected_rewards)``, ``(B,)`` each.

    Built from the quantity the loss compares (summed or per token, LD-weighted or not), before any
    f-divergence transform, so ``rewards/margins`` reads on the scale the loss's beta applies to.
    """
    chosen, rejected = log_ratios(
        policy_chosen_logps.detach(),
        policy_rejected_logps.detach(),
        None if ref_chosen_logps is None else ref_chosen_logps.detach(),
        None if ref_rejected_logps is None else ref_rejected_logps.detach(),
        chosen_lengths,
        rejected_lengths,
    )
    return beta * chosen, beta * rejected
