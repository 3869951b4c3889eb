"""Per-sequence quantities beyond the log-prob sum, computed only when a loss asks for them.

* ``log_sum_sq``: the sum over a sequence's scored tokens of ``log sum_v p(v)^2`` of the next-token
  distribution at each position (WPO's weights), computed from the same logits chunks as the log-probs,
  without gradient (:func:`hf_dpo.scoring.logprobs.log_sum_sq_probs`, and inside the projection kernel).
* ``prefix_sums``: the sum of the log-probs of a sequence's first ``k`` scored tokens, ``k`` given per
  sequence (LD-DPO splits each response at the shorter response's length).

Tokens arrive as flat ``(M,)`` lists with the sequence of each (``sequences``); within a sequence they
are in response order in every layout (padded: row-major; packed and shared prompt: the collator
lists each sequence's scored tokens in order), which is all the rank computation assumes.
"""

from __future__ import annotations

import torch

from .logprobs import per_sequence_sums

Tensor = torch.Tensor


def token_ranks(sequences: Tensor, n_sequences: int) -> Tensor:
    """``(M,)``: the 0-based position of each token among its own sequence's tokens, in list order."""
    order = torch.argsort(sequences, stable=True)  # groups the tokens by sequence, keeping their order
    counts = torch.bincount(sequences, minlength=n_sequences)
    starts = torch.cumsum(counts, 0) - counts  # (n_sequences,) index of each sequence's first token in `order`
    ranks = torch.empty_like(sequences)
    ranks[order] = torch.arange(sequences.shape[0], device=sequences.device) - starts[sequences[order]]
    return ranks


def prefix_sums(token_logps: Tensor, sequences: Tensor, n_sequences: int, prefix_lengths: Tensor) -> Tensor:
    """``(n_sequences,)`` sums of ``token_logps`` ``(M,)`` over each sequence's first ``prefix_lengths[s]`` tokens."""
    inside = token_ranks(sequences, n_sequences) < prefix_lengths.to(sequences.device)[sequences]  # (M,)
    return per_sequence_sums(token_logps * inside, sequences, n_sequences)
