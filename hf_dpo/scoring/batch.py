"""Turn a collated batch into per-sequence response log-prob sums and token counts.

This is what :meth:`hf_dpo.NormalizedDPOTrainer.score` calls. It accepts every
layout: the plain padded one of :class:`~hf_dpo.layouts.padded.DPOCollator`
(``response_mask``) and the packed / shared-prompt one of
:class:`~hf_dpo.layouts.packed.PackedDPOCollator` (``logp_positions``...). Independently
of the layout, the log-probs come either from the model's full logits, or
(``response_only=True``) from the last hidden states at the scored positions only,
through :mod:`hf_dpo.scoring.projection`.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..layouts.attention import is_packed, model_inputs
from .extras import prefix_sums
from .head import (
    captured_last_hidden,
    output_projection,
    plain_projection_problem,
    projection_matches_logits,
    projection_verdict,
    set_projection_verdict,
)
from .logprobs import next_token_targets, per_sequence_sums, response_logp_sums, token_logps_and_log_sum_sq
from .projection import linear_token_logps_and_log_sum_sq

Tensor = torch.Tensor


def logp_plan(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(positions, targets, sequences, n_sequences)`` of the scored tokens, for either layout.

    ``positions`` ``(M,)`` index ``input_ids.view(-1)`` at the position whose logits
    predict ``targets`` ``(M,)``; ``sequences`` ``(M,)`` is the sequence in ``[0, 2B)``.
    """
    if is_packed(batch):
        n_sequences = 2 * batch["chosen_lengths"].shape[0]
        return batch["logp_positions"], batch["logp_targets"], batch["logp_sequences"], n_sequences
    mask = batch["response_mask"].bool()  # (2B, T)
    positions = mask.flatten().nonzero().squeeze(1)  # (M,)
    targets = next_token_targets(batch["input_ids"]).flatten()[positions]
    return positions, targets, positions // mask.shape[1], mask.shape[0]


def _response_only_logps(
    model: nn.Module, inputs: dict, positions: Tensor, targets: Tensor, chunk_size: int, with_log_sum_sq: bool
) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """Log-probs ``(M,)`` (and ``log sum_v p_v^2`` when asked) from the captured last hidden states, or None when
    the model's logits are not a plain projection."""
    verdict = projection_verdict(model)
    # Until checked, keep the logits of position 0 to compare them with the projection of the same hidden state.
    keep = torch.zeros(1 if verdict is None else 0, dtype=torch.long, device=inputs["input_ids"].device)
    with captured_last_hidden(model) as captured:
        outputs = model(**inputs, use_cache=False, logits_to_keep=keep)
    if len(captured) != 1 or captured[0].shape[:2] != inputs["input_ids"].shape:
        set_projection_verdict(model, False, "the decoder's hidden states do not line up with input_ids")
        return None
    hidden = captured[0]  # (R, L, H)
    if verdict is None:
        if not projection_matches_logits(model, outputs.logits[:, 0], hidden[:, 0].detach()):
            set_projection_verdict(
                model, False, "its logits differ from the output embedding applied to the last hidden state"
            )
            return None
        set_projection_verdict(model, True)
    head = output_projection(model)
    hidden = hidden.reshape(-1, hidden.shape[-1])[positions]  # (M, H)
    return linear_token_logps_and_log_sum_sq(hidden, head.weight, head.bias, targets, chunk_size, with_log_sum_sq)


def response_only_available(model: nn.Module) -> bool:
    """Whether the response-only projection may be tried on ``model`` (structural checks, then the cached verdict)."""
    if projection_verdict(model) is False:
        return False
    problem = plain_projection_problem(model)
    if problem is not None:
        set_projection_verdict(model, False, problem)
        return False
    return True


def score_batch(
    model: nn.Module,
    batch: dict[str, Tensor],
    chunk_size: int = 1024,
    response_only: bool = False,
    *,
    log_sum_sq: bool = False,
    prefix_lengths: Optional[Tensor] = None,
) -> Union[tuple[Tensor, Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]:
    """Response log-prob sums ``(2B,)`` float64 and token counts ``(2B,)`` int64 of ``batch`` under ``model``.

    With ``response_only`` the logits are never formed for unscored positions (nor kept
    for backward); models whose logits are not a plain projection of the last hidden
    state fall back to their full logits, detected once per model.

    Extras, computed only when asked (:mod:`hf_dpo.scoring.extras`), come back as a third element, a dict:
    ``log_sum_sq=True`` adds ``"log_sum_sq"`` ``(2B,)``, the sum over each sequence's scored tokens of
    ``log sum_v p_v^2`` (no gradient; WPO); ``prefix_lengths`` ``(2B,)`` adds ``"prefix_sums"`` ``(2B,)``, the
    sum of the log-probs of each sequence's first ``prefix_lengths[s]`` scored tokens (LD-DPO).
    """
    wants_extras = log_sum_sq or prefix_lengths is not None
    inputs = model_inputs(model, batch)
    if not response_only and not is_packed(batch) and not wants_extras:
        outputs = model(**inputs, use_cache=False)
        return response_logp_sums(outputs.logits, batch["input_ids"], batch["response_mask"], chunk_size)

    positions, targets, sequences, n_sequences = logp_plan(batch)
    scored = None
    if response_only and response_only_available(model):
        scored = _response_only_logps(model, inputs, positions, targets, chunk_size, log_sum_sq)
    if scored is None:
        logits = model(**inputs, use_cache=False).logits  # (R, L, V)
        flat = logits.reshape(-1, logits.shape[-1])[positions]  # (M, V)
        scored = token_logps_and_log_sum_sq(flat, targets, chunk_size, with_log_sum_sq=log_sum_sq)
    logps, squares = scored  # (M,), (M,) or None
    sums = per_sequence_sums(logps, sequences, n_sequences)
    counts = torch.bincount(sequences, minlength=n_sequences)
    if not wants_extras:
        return sums, counts
    extras = {}
    if log_sum_sq:
        extras["log_sum_sq"] = per_sequence_sums(squares, sequences, n_sequences)
    if prefix_lengths is not None:
        extras["prefix_sums"] = prefix_sums(logps, sequences, n_sequences, prefix_lengths)
    return sums, counts, extras
