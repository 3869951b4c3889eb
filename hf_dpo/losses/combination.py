"""The weighted list of losses, evaluated on one batch: per-pair losses, rewards and the metrics to log.

``loss = sum_k w_k * mean_i(wpo_i * loss_k,i)`` (TRL 1.16's ``loss_type`` list with ``loss_weights``);
the per-pair values returned are ``sum_k w_k * wpo_i * loss_k,i``, whose mean is that loss. Each term's
mean is logged as ``loss/<name>`` when there is more than one term. With WPO the product is out of place,
so ``sft`` and ``hinge`` train with it (TRL 1.16 crashes on both: docs/loss.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import torch

from .objective import LossObjective
from .ratios import implicit_rewards, per_token
from .sft import sft_nll
from .weighting import wpo_pair_weights

Tensor = torch.Tensor


@dataclass
class PairLosses:
    """One batch's losses: ``losses`` ``(B,)`` (their mean is the loss), rewards ``(B,)``, metrics (scalars)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor]


def objective_losses(
    objective: LossObjective,
    policy_sums: Tensor,
    counts: Tensor,
    ref_logps: Optional[Tensor] = None,
    extras: Optional[Mapping[str, Tensor]] = None,
) -> PairLosses:
    """Evaluate ``objective`` on one batch of pairs.

    Args:
        policy_sums: ``(2B,)`` summed response log-probs of the policy, ``[chosen_1..B, rejected_1..B]``.
        counts: ``(2B,)`` scored token counts of the same sequences.
        ref_logps: ``(2B,)`` the reference's sequence log-probs as the losses compare them (the sums,
            LD-weighted with ``ld_alpha``: :meth:`LossObjective.sequence_logps`), or None (reference-free).
        extras: what ``score_batch`` returned for :meth:`LossObjective.score_extras`: ``log_sum_sq`` (WPO)
            and ``prefix_sums`` (LD-DPO), each ``(2B,)``.
    """
    n_pairs = counts.shape[0] // 2
    chosen_counts, rejected_counts = counts[:n_pairs], counts[n_pairs:]
    policy = objective.sequence_logps(policy_sums, extras)  # (2B,)
    pc, pr = policy[:n_pairs], policy[n_pairs:]
    rc, rr = (None, None) if ref_logps is None else (ref_logps[:n_pairs], ref_logps[n_pairs:])
    pair_weights = None
    if objective.use_weighting:
        if not extras or "log_sum_sq" not in extras:
            raise ValueError("--use_weighting needs the log_sum_sq sums that score_batch returns when asked")
        pair_weights = wpo_pair_weights(policy_sums, extras["log_sum_sq"], counts)  # (B,)

    terms: dict[str, Tensor] = {}
    total: Optional[Tensor] = None
    params = objective.params()
    for name, spec, weight in zip(objective.loss_types, objective.specs, objective.weights):
        lengths = {"chosen_lengths": chosen_counts, "rejected_lengths": rejected_counts}
        if not objective.normalizes(spec):
            lengths = {}
        # The NLL is of the answer as written: plain sums, never LD-weighted (as in TRL).
        chosen = policy_sums[:n_pairs] if name == "sft" else pc
        losses, _, _ = spec.fn(
            chosen, pr, rc, rr, beta=objective.beta, chosen_token_counts=chosen_counts, **params, **lengths
        )
        terms[name] = losses
        total = weight * losses if total is None else total + weight * losses
    if objective.sft_weight:
        terms["sft_nll"] = sft_nll(policy_sums[:n_pairs], chosen_counts)
        total = total + objective.sft_weight * terms["sft_nll"]
    if pair_weights is not None:
        total = total * pair_weights
        terms = {name: losses * pair_weights for name, losses in terms.items()}

    chosen_lengths, rejected_lengths = (chosen_counts, rejected_counts) if objective.per_token else (None, None)
    chosen_rewards, rejected_rewards = implicit_rewards(
        pc, pr, rc, rr, objective.beta, chosen_lengths, rejected_lengths
    )
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        # Exact ties (policy == reference at step 0) count half: no preference scores chance, 0.5, not 0.
        "rewards/accuracies": (
            (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
        ).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": per_token(pc.detach(), chosen_lengths).mean(),
        "logps/rejected": per_token(pr.detach(), rejected_lengths).mean(),
        "lengths/chosen": chosen_counts.float().mean(),
        "lengths/rejected": rejected_counts.float().mean(),
    }
    if len(terms) > 1:
        metrics.update({f"loss/{name}": losses.detach().mean() for name, losses in terms.items()})
    return PairLosses(total, chosen_rewards, rejected_rewards, metrics)
