"""Stage 5, the reference: what the log-ratios are taken against.

``modes`` (a frozen model, the PEFT adapter-disabled policy, or none; the reference's sums
for a batch), ``engines`` (the reference prepared by the policy's distributed engine:
DDP, ZeRO-0..3, FSDP2), ``cache`` (reference log-probs computed once, cached on disk).
"""

from .engines import EngineError, engine_of, prepare_reference
from .modes import adapter_disabled, build_reference_model, reference_logp_sums, resolve_reference_mode

__all__ = [
    "EngineError",
    "adapter_disabled",
    "build_reference_model",
    "engine_of",
    "prepare_reference",
    "reference_logp_sums",
    "resolve_reference_mode",
]
