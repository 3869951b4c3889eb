"""Every loss named once: :data:`LOSS_REGISTRY`. The config's choices, help text and validation, the model card
and the error messages are built from it (docs/loss.md has the table with the formulas).

Each loss is a pure function ``fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
ref_rejected_logps, beta, ..., chosen_lengths=None, rejected_lengths=None, **params)`` of ``(B,)``
tensors returning per-pair ``(losses, chosen_rewards, rejected_rewards)``. The names are TRL 1.16's
``loss_type`` names, plus ``simpo``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from .aot import aot_loss, aot_unpaired_loss
from .margin import (
    discopop_loss,
    exo_pair_loss,
    hinge_loss,
    ipo_loss,
    robust_loss,
    sigmoid_loss,
    sigmoid_norm_loss,
    simpo_loss,
)
from .per_side import apo_down_loss, apo_zero_loss, bco_pair_loss, nca_pair_loss, sppo_hard_loss
from .sft import sft_loss

Tensor = torch.Tensor

# How length_normalize applies to a loss.
BY_FLAG = "flag"  # length_normalize chooses: summed log-ratios, or per token (divided by the response length)
ALWAYS = "always"  # per token whatever the flag says (its name says so: sigmoid_norm)
TOKEN_MEAN = "token_mean"  # its own token mean over the batch; length_normalize does not apply (sft)


@dataclass(frozen=True)
class LossSpec:
    """One registered loss.

    Attributes:
        fn: the pure function.
        needs_reference: whether it compares against reference log-probs.
        description: its formula in one line, for ``--help`` and the model card.
        params: the config parameters it reads besides ``beta`` (a parameter no loss of the run reads is refused).
        normalization: :data:`BY_FLAG`, :data:`ALWAYS` or :data:`TOKEN_MEAN`.
        f_divergence: whether it may run with an ``f_divergence_type`` other than ``reverse_kl`` (``sft`` may: it
            does not read the log-ratios).
        batch_coupled: whether its per-pair values depend on the other pairs of the micro-batch.
        typical_beta: a starting point for beta, summed / per-token log-ratios.
        source: the paper.
    """

    fn: Callable[..., tuple[Tensor, Tensor, Tensor]]
    needs_reference: bool
    description: str
    params: tuple[str, ...] = ()
    normalization: str = BY_FLAG
    f_divergence: bool = False
    batch_coupled: bool = False
    typical_beta: str = "0.1 / 2-10"
    source: str = ""

    @property
    def uses_label_smoothing(self) -> bool:
        return "label_smoothing" in self.params


_F = ("f_divergence_type", "f_alpha_divergence_coef")

LOSS_REGISTRY: dict[str, LossSpec] = {
    "sigmoid": LossSpec(
        sigmoid_loss, True, "DPO -logsigmoid(beta*m); cDPO when label_smoothing > 0",
        ("label_smoothing", *_F), f_divergence=True, source="Rafailov et al. 2023; cDPO, Mitchell 2023",
    ),
    "hinge": LossSpec(
        hinge_loss, True, "SLiC hinge relu(1 - beta*m)", _F, f_divergence=True, source="Zhao et al. 2023"
    ),
    "ipo": LossSpec(
        ipo_loss, True, "IPO (m - 1/(2*beta))^2", _F, f_divergence=True, typical_beta="0.1 / 0.5-2",
        source="Azar et al. 2023",
    ),
    "exo_pair": LossSpec(
        exo_pair_loss, True, "EXO KL(q || (1-eps, eps)) of the pair's preference, eps = label_smoothing > 0",
        ("label_smoothing", *_F), f_divergence=True, source="Ji et al. 2024",
    ),
    "nca_pair": LossSpec(
        nca_pair_loss, True, "NCA -logsigmoid(r_w) - logsigmoid(-r_w)/2 - logsigmoid(-r_l)/2",
        source="Chen et al. 2024",
    ),
    "robust": LossSpec(
        robust_loss, True, "robust DPO, unbiased under label noise label_smoothing",
        ("label_smoothing", *_F), f_divergence=True, source="Chowdhury et al. 2024",
    ),
    "bco_pair": LossSpec(
        bco_pair_loss, True, "BCO -logsigmoid(r_w) - logsigmoid(-r_l)", source="Jung et al. 2024"
    ),
    "sppo_hard": LossSpec(
        sppo_hard_loss, True, "SPPO (lr_w - 1/(2*beta))^2 + (lr_l + 1/(2*beta))^2", typical_beta="0.1 / 1-2",
        source="Wu et al. 2024",
    ),
    "aot": LossSpec(
        aot_loss, True, "AOT paired: sorted policy margins vs sorted reference margins",
        ("label_smoothing",), batch_coupled=True, source="Melnyk et al. 2024",
    ),
    "aot_unpaired": LossSpec(
        aot_unpaired_loss, True, "AOT unpaired: sorted chosen vs sorted rejected log-ratios",
        ("label_smoothing",), batch_coupled=True, source="Melnyk et al. 2024",
    ),
    "apo_zero": LossSpec(
        apo_zero_loss, True, "APO-zero 1 - sigmoid(r_w) + sigmoid(r_l)", source="D'Oosterlinck et al. 2024"
    ),
    "apo_down": LossSpec(
        apo_down_loss, True, "APO-down sigmoid(r_w) + 1 - sigmoid(r_w - r_l)", source="D'Oosterlinck et al. 2024"
    ),
    "discopop": LossSpec(
        discopop_loss, True, "DiscoPOP logistic/exponential mix, modulated by sigmoid(beta*m/discopop_tau)",
        ("discopop_tau", *_F), f_divergence=True, typical_beta="0.05-0.1 / 1-2", source="Chan et al. 2024",
    ),
    "sft": LossSpec(
        sft_loss, False, "NLL of the chosen answers, one token mean over the micro-batch", (),
        normalization=TOKEN_MEAN, f_divergence=True, batch_coupled=True, typical_beta="unused",
        source="RPO, Pang et al. 2024",
    ),
    "sigmoid_norm": LossSpec(
        sigmoid_norm_loss, True, "DPO on per-token log-ratios -logsigmoid(beta*(lr_w/n_w - lr_l/n_l))", _F,
        normalization=ALWAYS, f_divergence=True, typical_beta="2-10", source="TRL; as SimPO's length normalization",
    ),
    "simpo": LossSpec(
        simpo_loss, False, "SimPO, reference-free, margin simpo_gamma", ("simpo_gamma", "label_smoothing"),
        typical_beta="- / 2-2.5", source="Meng et al. 2024",
    ),
}  # fmt: skip


def get_loss(name: str) -> LossSpec:
    """Look a loss up by name, with an error that lists the valid names."""
    try:
        return LOSS_REGISTRY[name]
    except KeyError:
        raise ValueError(f"--loss_type: unknown loss {name!r}; choose one of {sorted(LOSS_REGISTRY)}") from None


def loss_type_help() -> str:
    """The ``--loss_type`` help text: every registered loss with its formula."""
    return (
        "Preference loss, or several (a weighted sum, see loss_weights). "
        + "; ".join(f"{name}: {spec.description}" for name, spec in LOSS_REGISTRY.items())
        + ". Choices: "
        + ", ".join(LOSS_REGISTRY)
        + "."
    )


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Optional[Tensor],
    ref_rejected_logps: Optional[Tensor],
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: Optional[float] = None,
    simpo_gamma: float = 0.5,
    **params,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dispatch to the registered loss ``loss_type``; all tensors ``(B,)``.

    ``label_smoothing=None`` is the loss's own default (1e-3 for ``exo_pair``, 0 otherwise). ``params``:
    ``discopop_tau``, ``f_divergence_type``, ``f_alpha_divergence_coef``, and the tensors some losses need:
    ``chosen_lengths``/``rejected_lengths`` (the normalized form; required by ``sigmoid_norm``),
    ``chosen_token_counts`` (``sft``). Returns per-pair ``(losses, chosen_rewards, rejected_rewards)``.
    """
    spec = get_loss(loss_type)
    if spec.needs_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"loss_type={loss_type!r} needs reference log-probs, but none were given")
    if label_smoothing is not None:
        params["label_smoothing"] = label_smoothing
    return spec.fn(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        simpo_gamma=simpo_gamma,
        **params,
    )
