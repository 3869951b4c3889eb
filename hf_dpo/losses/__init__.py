"""Stage 6, losses: pure functions of per-pair log-probabilities, named once in :data:`LOSS_REGISTRY`.

``margin`` (losses of the chosen-rejected margin), ``per_side`` (of each side's reward), ``aot`` (sorting the
batch), ``sft`` (the chosen NLL), ``ratios`` (log-ratios, rewards, the per-token form), ``fdivergence`` (f-DPO
scores), ``weighting`` (WPO weights, LD-DPO log-probs), ``registry`` (the names), ``objective`` (a run's
weighted list and its checks) and ``combination`` (the list evaluated on a batch).
"""

from .aot import aot_loss, aot_unpaired_loss
from .combination import PairLosses, objective_losses
from .fdivergence import F_DIVERGENCES, f_divergence_score
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
from .objective import LossObjective, as_loss_types
from .per_side import apo_down_loss, apo_zero_loss, bco_pair_loss, nca_pair_loss, sppo_hard_loss
from .ratios import implicit_rewards, log_ratios
from .registry import LOSS_REGISTRY, LossSpec, get_loss, loss_type_help, preference_loss
from .sft import sft_loss, sft_nll
from .weighting import ld_logps, ld_prefix_lengths, wpo_pair_weights

__all__ = [
    "F_DIVERGENCES",
    "LOSS_REGISTRY",
    "LossObjective",
    "LossSpec",
    "PairLosses",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "as_loss_types",
    "bco_pair_loss",
    "discopop_loss",
    "exo_pair_loss",
    "f_divergence_score",
    "get_loss",
    "hinge_loss",
    "implicit_rewards",
    "ipo_loss",
    "ld_logps",
    "ld_prefix_lengths",
    "log_ratios",
    "loss_type_help",
    "nca_pair_loss",
    "objective_losses",
    "preference_loss",
    "robust_loss",
    "sft_loss",
    "sft_nll",
    "sigmoid_loss",
    "sigmoid_norm_loss",
    "simpo_loss",
    "sppo_hard_loss",
    "wpo_pair_weights",
]
