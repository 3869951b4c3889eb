"""hf_dpo: length-normalized DPO as a drop-in HuggingFace Trainer.

The package is laid out by pipeline stage (docs/architecture.md): ``data`` -> ``tokenization``
-> ``layouts`` -> ``scoring`` -> ``reference`` -> ``losses`` -> ``training`` -> ``cli``.
The names below are the public API.
"""

from .common.version import __version__  # noqa: F401  (hf_dpo.__version__, as every package has)
from .data import DataError, DataReport, load_preference_dataset
from .layouts import DPOCollator
from .losses import LOSS_REGISTRY, hinge_loss, ipo_loss, preference_loss, robust_loss, sft_nll, sigmoid_loss, simpo_loss
from .scoring import response_logp_sums, sequence_logps
from .tokenization import tokenize_dataset
from .training import DPOConfig, NonFiniteLossError, NormalizedDPOTrainer, latest_complete_checkpoint

__all__ = [
    "DPOCollator",
    "DPOConfig",
    "DataError",
    "DataReport",
    "LOSS_REGISTRY",
    "NonFiniteLossError",
    "NormalizedDPOTrainer",
    "hinge_loss",
    "ipo_loss",
    "latest_complete_checkpoint",
    "load_preference_dataset",
    "preference_loss",
    "response_logp_sums",
    "robust_loss",
    "sequence_logps",
    "sft_nll",
    "sigmoid_loss",
    "simpo_loss",
    "tokenize_dataset",
]
