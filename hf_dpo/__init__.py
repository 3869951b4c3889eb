"""hf_dpo: length-normalized DPO as a drop-in HuggingFace Trainer.

The package is laid out by pipeline stage (docs/architecture.md): ``data`` -> ``tokenization``
-> ``layouts`` -> ``scoring`` -> ``reference`` -> ``losses`` -> ``training`` -> ``cli``.
The names below are the public API.

They are imported on first use (PEP 562), so that ``import hf_dpo`` and ``hf-dpo --help``
do not pay for torch and transformers (seconds) before anything needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .common.version import __version__  # noqa: F401  (hf_dpo.__version__, as every package has)

# public name -> the module that defines it
_EXPORTS = {
    "DataError": ".data",
    "DataReport": ".data",
    "load_preference_dataset": ".data",
    "DPOCollator": ".layouts",
    "LOSS_REGISTRY": ".losses",
    "hinge_loss": ".losses",
    "ipo_loss": ".losses",
    "preference_loss": ".losses",
    "robust_loss": ".losses",
    "sft_nll": ".losses",
    "sigmoid_loss": ".losses",
    "simpo_loss": ".losses",
    "response_logp_sums": ".scoring",
    "sequence_logps": ".scoring",
    "tokenize_dataset": ".tokenization",
    "DPOConfig": ".training",
    "NonFiniteLossError": ".training",
    "NormalizedDPOTrainer": ".training",
    "latest_complete_checkpoint": ".training",
}

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

if TYPE_CHECKING:  # what static tools and IDEs see
    from .data import DataError, DataReport, load_preference_dataset
    from .layouts import DPOCollator
    from .losses import (
        LOSS_REGISTRY,
        hinge_loss,
        ipo_loss,
        preference_loss,
        robust_loss,
        sft_nll,
        sigmoid_loss,
        simpo_loss,
    )
    from .scoring import response_logp_sums, sequence_logps
    from .tokenization import tokenize_dataset
    from .training import DPOConfig, NonFiniteLossError, NormalizedDPOTrainer, latest_complete_checkpoint


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hf_dpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # once imported, an ordinary module attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
