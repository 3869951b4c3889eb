"""Response-only log-probs straight from the last hidden states, without storing logits.

A causal LM's logits are ``hidden @ W.T (+ b)``. DPO needs the log-prob of one
label per response position, so this module projects only the hidden states of
the M positions that predict a response token, in chunks of ``chunk_size`` rows,
and keeps per row just the fp32 log-sum-exp. The backward pass recomputes each
chunk's logits instead of storing them, so the memory of this part is
``O(chunk_size * V)`` instead of ``O(2B * T * V)`` (the plain path keeps the
full logits of every position for the backward pass).

This is the ``response_only_logits`` speed path. It is only valid when the logits
really are a plain projection: :mod:`hf_dpo.scoring.head` decides that for each model.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .logprobs import log_sum_sq_probs

Tensor = torch.Tensor


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the plain head's matmul would run in: the autocast dtype when autocast is on."""
    device_type = hidden.device.type
    if hasattr(torch, "get_autocast_dtype") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


class LinearTokenLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[m, targets[m]]`` per row, chunked, recomputed in backward.

    Forward keeps only the fp32 log-sum-exp ``(M,)`` besides the inputs (and, with ``with_log_sum_sq``,
    returns WPO's ``log sum_v p_v^2`` per row from the same chunks, without gradient); backward
    recomputes each ``(chunk, V)`` block of logits, turns it into the logits'
    gradient ``grad * (onehot - softmax)`` and accumulates the weight gradient in fp32.
    The matmuls run in the autocast dtype when autocast is on (explicit casts, so
    that the recompute in backward, where autocast is off, matches the forward).
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        targets: Tensor,
        chunk_size: int,
        with_log_sum_sq: bool = False,
    ) -> tuple[Tensor, Tensor]:
        dtype = _compute_dtype(hidden)
        accumulate = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        n_rows = hidden.shape[0]
        lse = torch.empty(n_rows, dtype=accumulate, device=hidden.device)  # (M,)
        target_logits = torch.empty(n_rows, dtype=accumulate, device=hidden.device)  # (M,)
        log_sum_sq = torch.empty(n_rows if with_log_sum_sq else 0, dtype=accumulate, device=hidden.device)  # (M,)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, n_rows, chunk_size):
                rows = slice(start, start + chunk_size)
                # Like the plain head: the matmul in the model's dtype, the softmax in fp32.
                logits = nn.functional.linear(hidden[rows].to(dtype), w, b).to(accumulate)  # (c, V)
                lse[rows] = torch.logsumexp(logits, dim=-1)
                target_logits[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1)
                if with_log_sum_sq:
                    log_sum_sq[rows] = log_sum_sq_probs(logits, lse[rows])
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        ctx.mark_non_differentiable(log_sum_sq)
        return target_logits - lse, log_sum_sq

    @staticmethod
    def backward(ctx, grad_logps: Tensor, _grad_log_sum_sq: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        dtype = ctx.dtype
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # fp32 accumulators: summing low-precision chunk products would round every chunk.
        accumulate = lse.dtype
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if needs_bias else None
        grad_logps = grad_logps.to(accumulate)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                h = hidden[rows].to(dtype)  # (c, H)
                logits = nn.functional.linear(h, w, b).to(accumulate)  # (c, V)
                # d logp / d logits = onehot(target) - softmax, times the incoming gradient.
                grad_logits = torch.exp(logits - lse[rows, None]).mul_(-grad_logps[rows, None])  # (c, V)
                del logits
                grad_logits.scatter_add_(-1, targets[rows, None], grad_logps[rows, None])
                grad_logits = grad_logits.to(dtype)
                if needs_hidden:
                    grad_hidden[rows] = grad_logits @ w
                if needs_weight:
                    grad_weight.addmm_(grad_logits.t().to(accumulate), h.to(accumulate))
                if needs_bias:
                    grad_bias += grad_logits.to(accumulate).sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def linear_token_logps(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, chunk_size: int = 1024
) -> Tensor:
    """fp32 log-prob ``(M,)`` of each target under the logits ``hidden @ weight.T + bias``.

    :func:`linear_token_logps_and_log_sum_sq` also returns WPO's ``log sum_v p_v^2`` from the same chunks.

    Args:
        hidden: ``(M, H)`` last hidden states (after the final norm) at the predicting positions.
        weight: ``(V, H)`` output embedding; ``bias``: ``(V,)`` or None.
        targets: ``(M,)`` token ids.
        chunk_size: rows per projected chunk; bounds the temporaries at ``(chunk_size, V)`` fp32.
    """
    return linear_token_logps_and_log_sum_sq(hidden, weight, bias, targets, chunk_size, with_log_sum_sq=False)[0]


def linear_token_logps_and_log_sum_sq(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    chunk_size: int = 1024,
    with_log_sum_sq: bool = True,
) -> tuple[Tensor, Optional[Tensor]]:
    """:func:`linear_token_logps` and ``(M,)`` ``log sum_v p_v^2`` (no gradient; None unless ``with_log_sum_sq``)."""
    if hidden.shape[0] == 0:
        # Keep the graph connected so that backward() still reaches the parameters.
        empty = (hidden.sum() * 0).float().expand(0)
        return empty, (empty.detach() if with_log_sum_sq else None)
    logps, log_sum_sq = LinearTokenLogps.apply(hidden, weight, bias, targets, chunk_size, with_log_sum_sq)
    return logps, (log_sum_sq if with_log_sum_sq else None)
