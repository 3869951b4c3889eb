"""Losses of the preference margin: functions of ``beta * (s_w - s_l)`` only.

``s`` is the log-ratio ``log pi/pi_ref`` of each side (its f-divergence score with
``f_divergence_type``), divided by the response's token count when ``chosen_lengths`` and
``rejected_lengths`` are given (:mod:`hf_dpo.losses.ratios`). Every function takes ``(B,)``
tensors and returns per-pair ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``;
rewards are ``beta * log-ratio`` (per token when normalized), detached. Unused keyword
arguments are accepted and ignored, so one call site serves every loss.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .fdivergence import DEFAULT_F_ALPHA, DEFAULT_F_DIVERGENCE, scores
from .ratios import implicit_rewards, per_token

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]


def _margin_and_rewards(pc, pr, rc, rr, beta, f_type, f_alpha, chosen_lengths, rejected_lengths):
    chosen, rejected = scores(pc, pr, rc, rr, f_type, f_alpha, chosen_lengths, rejected_lengths)
    return chosen - rejected, implicit_rewards(pc, pr, rc, rr, beta, chosen_lengths, rejected_lengths)


def _smoothed_logistic(logits: Tensor, label_smoothing: float) -> Tensor:
    # The label is flipped with probability eps: the expected logistic loss over both labels.
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    *,
    f_divergence_type: str = DEFAULT_F_DIVERGENCE,
    f_alpha_divergence_coef: float = DEFAULT_F_ALPHA,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """DPO (Rafailov et al. 2023): ``-logsigmoid(beta * m)``, ``m = s_w - s_l``.

    With ``label_smoothing = eps > 0`` this is conservative DPO (cDPO, Mitchell 2023):
    ``-(1 - eps) logsigmoid(beta m) - eps logsigmoid(-beta m)``. TRL 1.16's ``sigmoid`` ignores
    ``label_smoothing`` (TRL < 1.0 applied cDPO, as here); docs/loss.md.
    """
    margin, rewards = _margin_and_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        f_divergence_type,
        f_alpha_divergence_coef,
        chosen_lengths,
        rejected_lengths,
    )
    return _smoothed_logistic(beta * margin, label_smoothing), *rewards


def sigmoid_norm_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 2.0,
    *,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    f_divergence_type: str = DEFAULT_F_DIVERGENCE,
    f_alpha_divergence_coef: float = DEFAULT_F_ALPHA,
    **_,
) -> LossOutput:
    """TRL's length-normalized DPO: ``-logsigmoid(beta * (s_w / n_w - s_l / n_l))``, always per token.

    The lengths are required: this loss is :func:`sigmoid_loss` in its length-normalized form, whatever
    ``length_normalize`` says (so that it keeps TRL's meaning inside a list of summed losses).
    """
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("sigmoid_norm divides by the response lengths: pass chosen_lengths and rejected_lengths")
    return sigmoid_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        0.0,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    *,
    f_divergence_type: str = DEFAULT_F_DIVERGENCE,
    f_alpha_divergence_coef: float = DEFAULT_F_ALPHA,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """Robust DPO (Chowdhury et al. 2024): unbiased under a label-flip rate ``eps = label_smoothing < 0.5``.

    ``((1 - eps) * -logsigmoid(beta m) - eps * -logsigmoid(-beta m)) / (1 - 2 eps)``.
    """
    margin, rewards = _margin_and_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        f_divergence_type,
        f_alpha_divergence_coef,
        chosen_lengths,
        rejected_lengths,
    )
    logits, eps = beta * margin, label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)
    return losses, *rewards


def exo_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 1e-3,
    *,
    f_divergence_type: str = DEFAULT_F_DIVERGENCE,
    f_alpha_divergence_coef: float = DEFAULT_F_ALPHA,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """EXO on pairs (Ji et al. 2024, Eq. 16, K = 2): ``KL(q || p_eps)``.

    ``q = (sigmoid(z), sigmoid(-z))`` with ``z = beta m`` is the model's preference distribution,
    ``p_eps = (1 - eps, eps)`` the smoothed label; ``eps = label_smoothing`` must be in (0, 1)
    (the paper uses 1e-3, the default here; TRL requires it to be set).
    """
    if not 0 < label_smoothing < 1:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (the EXO paper uses 1e-3), got {label_smoothing}")
    margin, rewards = _margin_and_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        f_divergence_type,
        f_alpha_divergence_coef,
        chosen_lengths,
        rejected_lengths,
    )
    z = beta * margin
    eps = torch.tensor(label_smoothing, dtype=z.dtype, device=z.device)
    losses = torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - torch.log(eps)
    )
    return losses, *rewards


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    f_divergence_type: str = DEFAULT_F_DIVERGENCE,
    f_alpha_divergence_coef: float = DEFAULT_F_ALPHA,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """SLiC hinge (Zhao et al. 2023): ``max(0, 1 - beta m)``."""
    margin, rewards = _margin_and_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        f_divergence_type,
        f_alpha_divergence_coef,
        chosen_lengths,
        rejected_lengths,
    )
    return torch.relu(1 - beta * margin), *rewards


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    f_divergence_type: str = DEFAULT_F_DIVERGENCE,
    f_alpha_divergence_coef: float = DEFAULT_F_ALPHA,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """IPO (Azar et al. 2023): ``(m - 1 / (2 beta))^2``; beta plays IPO's tau.

    TRL always takes ``m`` per token (its authors' choice); that is the normalized form here.
    """
    margin, rewards = _margin_and_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        f_divergence_type,
        f_alpha_divergence_coef,
        chosen_lengths,
        rejected_lengths,
    )
    return (margin - 1 / (2 * beta)) ** 2, *rewards


def discopop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
    *,
    discopop_tau: float = 0.05,
    f_divergence_type: str = DEFAULT_F_DIVERGENCE,
    f_alpha_divergence_coef: float = DEFAULT_F_ALPHA,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """DiscoPOP, the log-ratio modulated loss (Chan et al. 2024, Eq. 5), ``z = beta m``, ``tau = discopop_tau``::

        mix = sigmoid(z / tau);  loss = -logsigmoid(z) (1 - mix) + exp(-z) mix

    ``exp(-z) * mix`` is evaluated as ``exp(logsigmoid(z / tau) - z)``: the same number, but finite for
    ``z < -88.7``, where TRL 1.16's float32 ``exp(-z)`` overflows and ``inf * 0`` gives NaN.
    """
    margin, rewards = _margin_and_rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        f_divergence_type,
        f_alpha_divergence_coef,
        chosen_lengths,
        rejected_lengths,
    )
    z = beta * margin
    mix = torch.sigmoid(z / discopop_tau)
    losses = -F.logsigmoid(z) * (1 - mix) + torch.exp(F.logsigmoid(z / discopop_tau) - z)
    return losses, *rewards


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor] = None,
    ref_rejected_logps: Optional[Tensor] = None,
    beta: float = 2.0,
    simpo_gamma: float = 0.5,
    label_smoothing: float = 0.0,
    *,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
    **_,
) -> LossOutput:
    """SimPO (Meng et al. 2024), reference-free: ``-logsigmoid(beta * (l_w - l_l) - gamma)``.

    ``l`` is the policy's log-prob (per token when lengths are given: SimPO is defined on the mean).
    ``gamma = simpo_gamma`` is the target reward margin in reward units (the paper's gamma, not TRL's
    gamma/beta ratio). The reference log-probs are ignored; rewards are ``beta * l``.
    """
    chosen = per_token(policy_chosen_logps, chosen_lengths)
    rejected = per_token(policy_rejected_logps, rejected_lengths)
    losses = _smoothed_logistic(beta * (chosen - rejected) - simpo_gamma, label_smoothing)
    return losses, beta * chosen.detach(), beta * rejected.detach()
