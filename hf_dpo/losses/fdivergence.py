"""f-DPO (Wang et al. 2023, "Beyond Reverse KL"): the log-ratio replaced by ``f'(u)``, ``u = pi / pi_ref``.

DPO's margin ``log u_w - log u_l`` is ``f'(u_w) - f'(u_l)`` for the reverse KL ``f(u) = u log u``; another
f-divergence regularizer gives another score ``psi = f'``. TRL 1.16's names and parameterization:

================== ==================================== ==============================================
``reverse_kl``     ``log u``                            standard DPO (the default)
``forward_kl``     ``1 - 1/u``                          ``1 - exp(-r)``, ``r = log u``
``js_divergence``  ``log(2u / (1 + u))``                ``log 2 + logsigmoid(r)``
``alpha_divergence`` ``(u^(a-1) - 1) / (a - 1)``        ``a = f_alpha_divergence_coef``; ``log u`` at a = 1
================== ==================================== ==============================================

The alpha parameterization is TRL 1.16's (the exponent of ``u`` is ``a - 1``); the f-DPO paper and
TRL < 1.0 use ``(1 - u^-a) / a``, i.e. ``a_paper = 1 - a`` (the same at the default 0.5).

Overflow: the exponent of ``exp`` is clamped at 80 for ``alpha_divergence`` (as TRL does) and also for
``forward_kl``, which TRL 1.16 leaves unclamped (a summed log-ratio below about -88.7 then gives an
infinite score and NaN gradients in float32). Where ``r > -80`` both agree; below, the score stays
finite here and that side's gradient is zero.

The length-normalized score is ``psi(r) / n``: the score of the sequence divided by its token count,
as TRL computes it for ``ipo`` and ``sigmoid_norm``; for the reverse KL that is the per-token mean.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .ratios import per_token

Tensor = torch.Tensor

F_DIVERGENCES = {
    "reverse_kl": "log u: standard DPO",
    "forward_kl": "1 - 1/u",
    "js_divergence": "log(2u / (1 + u)), Jensen-Shannon",
    "alpha_divergence": "(u^(a-1) - 1) / (a - 1) with a = f_alpha_divergence_coef (TRL 1.16's parameterization)",
}
DEFAULT_F_DIVERGENCE = "reverse_kl"
DEFAULT_F_ALPHA = 0.5
# exp(80) is about 5.5e34, far inside float32; TRL clamps alpha_divergence here (11 in float16).
_MAX_EXPONENT = {torch.float16: 11.0}
_DEFAULT_MAX_EXPONENT = 80.0


def _clamped_exp(exponent: Tensor) -> Tensor:
    return torch.exp(exponent.clamp(max=_MAX_EXPONENT.get(exponent.dtype, _DEFAULT_MAX_EXPONENT)))


def f_divergence_score(
    log_ratio: Tensor, f_divergence_type: str = DEFAULT_F_DIVERGENCE, f_alpha_divergence_coef: float = DEFAULT_F_ALPHA
) -> Tensor:
    """``f'(u)`` at ``u = exp(log_ratio)``, elementwise; ``(B,)`` -> ``(B,)``."""
    if f_divergence_type == "reverse_kl":
        return log_ratio
    if f_divergence_type == "forward_kl":
        return 1 - _clamped_exp(-log_ratio)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if f_divergence_type == "alpha_divergence":
        alpha = f_alpha_divergence_coef
        if abs(alpha - 1.0) < 1e-6:  # the limit a -> 1 is log u
            return log_ratio
        return (_clamped_exp((alpha - 1.0) * log_ratio) - 1.0) / (alpha - 1.0)
    raise ValueError(f"--f_divergence_type: got {f_divergence_type!r}; choose one of {', '.join(F_DIVERGENCES)}")


def scores(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    f_divergence_type: str = DEFAULT_F_DIVERGENCE,
    f_alpha_divergence_coef: float = DEFAULT_F_ALPHA,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``(psi(r_w) / n_w, psi(r_l) / n_l)`` ``(B,)`` each: the scores whose difference margin-based losses use.

    ``r`` is the log-ratio of the given log-probs; without lengths there is no division.
    """
    chosen = f_divergence_score(policy_chosen_logps - ref_chosen_logps, f_divergence_type, f_alpha_divergence_coef)
    rejected = f_divergence_score(
        policy_rejected_logps - ref_rejected_logps, f_divergence_type, f_alpha_divergence_coef
    )
    return per_token(chosen, chosen_lengths), per_token(rejected, rejected_lengths)
