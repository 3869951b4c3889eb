"""hf_dpo: length-normalized DPO as a drop-in HuggingFace Trainer."""

from .checkpoints import latest_complete_checkpoint
from .collator import DPOCollator
from .config import DPOConfig
from .data import DataError, DataReport, load_preference_dataset
from .guards import NonFiniteLossError
from .losses import LOSS_REGISTRY, hinge_loss, ipo_loss, preference_loss, robust_loss, sft_nll, sigmoid_loss, simpo_loss
from .logprobs import response_logp_sums, sequence_logps
from .tokenization import tokenize_dataset
from .trainer import NormalizedDPOTrainer

__version__ = "0.1.0"

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
