"""Stage 7, training: the thin Trainer subclass and what it needs around the loop.

``config`` (:class:`DPOConfig`) and ``trl_names`` (TRL's argument names), ``trainer``
(:class:`NormalizedDPOTrainer`), ``guards`` (non-finite losses and gradients, agreed by all
processes), ``selfcheck`` (the step-0 self-check, the beta warning), ``faults`` (one process's
exception stops every process; collective timeouts per step), ``launch`` (runs that would not
get the engine they ask for), ``moe`` (the router load-balancing loss), ``metrics`` (means over
finite values: pair-weighted metrics, the logged loss), ``splits`` (the train and eval sets),
``checkpoints`` (resuming from complete checkpoints only), ``model_card``, and the evaluation
generations: ``generations`` (prompts, stops, the batched decode), ``generation_engines`` (full
parameters under ZeRO-3 / FSDP2), ``generation_kl``, ``generation_records`` (generations.jsonl),
``generation_tables`` (tracker tables) and ``generation_eval`` (the callback).
"""

from .checkpoints import latest_complete_checkpoint
from .config import DPOConfig
from .guards import NonFiniteLossError
from .trainer import NormalizedDPOTrainer

__all__ = ["DPOConfig", "NonFiniteLossError", "NormalizedDPOTrainer", "latest_complete_checkpoint"]
