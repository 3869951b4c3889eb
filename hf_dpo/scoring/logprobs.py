"""Log-probabilities of the response tokens, without a full-vocabulary log-softmax.

The collator's ``response_mask`` is already aligned for next-token prediction:
``response_mask[i, t]`` is 1 when the logits at position ``t`` predict a
response token, i.e. ``input_ids[i, t + 1]`` belongs to the response. So the
target of position ``t`` is ``input_ids[i, t + 1]`` and no shift is needed
later.

Only the masked positions are gathered, then processed in chunks with an fp32
log-sum-exp, so the largest temporary is ``(chunk_size, V)`` in fp32 rather
than a ``(2B, T, V)`` log-softmax.
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

DEFAULT_CHUNK_SIZE = 1024


def next_token_targets(input_ids: Tensor) -> Tensor:
    """``(N, T)`` targets: position ``t`` predicts ``input_ids[:, t + 1]``; the last column is 0 (never masked in)."""
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    return targets


def token_logps_from_logits(logits: Tensor, targets: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Log-probability of each target under ``logits``, in fp32.

    Args:
        logits: ``(M, V)`` logits of any float dtype.
        targets: ``(M,)`` token ids.
        chunk_size: rows per fp32 log-sum-exp; bounds the temporary at ``(chunk_size, V)``.

    Returns:
        ``(M,)`` fp32 log-probs ``logits[m, targets[m]] - logsumexp(logits[m])``.
    """
    return token_logps_and_log_sum_sq(logits, targets, chunk_size, with_log_sum_sq=False)[0]


def log_sum_sq_probs(logits: Tensor, log_normalizer: Tensor) -> Tensor:
    """``log sum_v softmax(logits)_v^2`` per row (WPO's weights), from ``(c, V)`` fp32 logits and their ``(c,)``
    logsumexp: ``logsumexp(2 z) - 2 logsumexp(z)``."""
    return torch.logsumexp(2 * logits, dim=-1) - 2 * log_normalizer


def token_logps_and_log_sum_sq(
    logits: Tensor, targets: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE, with_log_sum_sq: bool = True
) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`token_logps_from_logits`, and from the same chunks ``(M,)`` ``log sum_v p_v^2`` without gradient
    (None unless ``with_log_sum_sq``)."""
    pieces, squares = [], []
    for start in range(0, logits.shape[0], chunk_size):
        chunk = logits[start : start + chunk_size].float()  # (c, V)
        target_logits = chunk.gather(-1, targets[start : start + chunk_size, None]).squeeze(-1)  # (c,)
        log_normalizer = torch.logsumexp(chunk, dim=-1)  # (c,)
        pieces.append(target_logits - log_normalizer)
        if with_log_sum_sq:
            with torch.no_grad():
                squares.append(log_sum_sq_probs(chunk.detach(), log_normalizer.detach()))
    if not pieces:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_log_sum_sq else None)
    return torch.cat(pieces), (torch.cat(squares) if with_log_sum_sq else None)


def response_logp_sums(
    logits: Tensor, input_ids: Tensor, response_mask: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[Tensor, Tensor]:
    """Per-sequence sum of response-token log-probs and the number of response tokens.

    Args:
        logits: ``(N, T, V)`` model output.
        input_ids: ``(N, T)``.
        response_mask: ``(N, T)`` bool/int, aligned for next-token prediction (see module docstring).

    Returns:
        ``(sums, counts)``: ``(N,)`` float64 sums of log-probs over response tokens (see
        :func:`per_sequence_sums`), and ``(N,)`` int64 counts.
    """
    mask = response_mask.bool()
    targets = next_token_targets(input_ids)
    token_logps = token_logps_from_logits(logits[mask], targets[mask], chunk_size)  # (M,)
    row_of_token = mask.nonzero(as_tuple=True)[0]  # (M,)
    return per_sequence_sums(token_logps, row_of_token, input_ids.shape[0]), mask.sum(-1)


def per_sequence_sums(token_logps: Tensor, sequences: Tensor, n_sequences: int) -> Tensor:
    """``(n_sequences,)`` sums of ``token_logps`` ``(M,)`` grouped by ``sequences`` ``(M,)``.

    Accumulated in float64 (fp32 where the device has no float64, e.g. MPS): a
    sum of hundreds of log-probs near -60 has an fp32 step of about 4e-6, which
    would otherwise dominate the error of the per-token mean. The tensors are
    ``(2B,)``, so the cost is nil.
    """
    dtype = torch.float32 if token_logps.device.type == "mps" else torch.float64
    sums = torch.zeros(n_sequences, dtype=dtype, device=token_logps.device)
    return sums.index_add(0, sequences, token_logps.to(dtype))


def sequence_logps(sums: Tensor, counts: Tensor, length_normalize: bool) -> Tensor:
    """The quantity the loss compares: the sum, or the per-token mean when ``length_normalize``.

    Raises on a zero count: a response with no token has no mean (0/0), and the
    data layer is supposed to have skipped it already.
    """
    if not length_normalize:
        return sums
    if bool((counts <= 0).any()):
        empty = (counts <= 0).nonzero().flatten().tolist()
        raise ValueError(f"sequences {empty} of the batch have no response token; cannot take a per-token mean")
    return sums / counts.to(sums.dtype)
