"""Stage 4, scoring: a collated batch -> per-sequence response log-prob sums and token counts.

``batch`` (:func:`score_batch`, any layout), ``logprobs`` (log-probs from logits, sums in
float64, the per-token mean), ``projection`` (the response-only projection that never stores
logits), ``head`` (whether a model's logit head is a plain projection) and ``extras`` (per-sequence
quantities some losses ask for: WPO's ``log sum p^2``, LD-DPO's prefix sums).
"""

from .batch import score_batch
from .logprobs import per_sequence_sums, response_logp_sums, sequence_logps, token_logps_from_logits

__all__ = ["per_sequence_sums", "response_logp_sums", "score_batch", "sequence_logps", "token_logps_from_logits"]
