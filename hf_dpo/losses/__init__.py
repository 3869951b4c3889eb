"""Stage 6, losses: pure functions of per-pair log-probabilities, named once in :data:`LOSS_REGISTRY`."""

from .preference import (
    LOSS_REGISTRY,
    LossSpec,
    get_loss,
    hinge_loss,
    ipo_loss,
    preference_loss,
    robust_loss,
    sft_nll,
    sigmoid_loss,
    simpo_loss,
)

__all__ = [
    "LOSS_REGISTRY",
    "LossSpec",
    "get_loss",
    "hinge_loss",
    "ipo_loss",
    "preference_loss",
    "robust_loss",
    "sft_nll",
    "sigmoid_loss",
    "simpo_loss",
]
