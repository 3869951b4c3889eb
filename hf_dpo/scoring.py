"""Turn a collated batch into per-sequence response log-prob sums and token counts.

This is what :meth:`hf_dpo.NormalizedDPOTrainer.score` calls. It accepts either
layout: the plain padded one of :class:`~hf_dpo.DPOCollator` (``response_mask``)
and the packed / shared-prompt one of :class:`~hf_dpo.packing.PackedDPOCollator`
(``logp_positions``...). Independently of the layout, the log-probs come either
from the model's full logits, or (``response_only=True``) from the last hidden
states at the scored positions only, through :mod:`hf_dpo.fused_logprobs`.
"""

from __future__ import annotations

import torch
from torch import nn

from .fused_logprobs import (
    causal_lm,
    captured_last_hidden,
    linear_token_logps,
    output_projection,
    plain_projection_problem,
    projection_matches_logits,
    projection_verdict,
    set_projection_verdict,
)
from .logprobs import next_token_targets, per_sequence_sums, response_logp_sums, token_logps_from_logits
from .packing import attention_mask_4d

Tensor = torch.Tensor

# Attention implementations that take our (R, 1, L, L) mask as given.
MASK_4D_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def attention_implementation(model: nn.Module) -> str:
    return getattr(causal_lm(model).config, "_attn_implementation", None) or "eager"


def check_layout_support(model: nn.Module, share_prompt: bool) -> None:
    """Raise when ``model``'s attention cannot express the shared-prompt mask (it needs a custom 4D mask)."""
    implementation = attention_implementation(model)
    if share_prompt and implementation not in MASK_4D_IMPLEMENTATIONS:
        raise ValueError(
            f"--share_prompt needs attention that takes a custom 4D mask ({' or '.join(MASK_4D_IMPLEMENTATIONS)}), "
            f"but the model uses attn_implementation={implementation!r}; load it with attn_implementation='sdpa'"
        )


def flex_block_mask(segment_ids: Tensor, branch_ids: Tensor):
    """FlexAttention ``BlockMask`` of the same rule as :func:`~hf_dpo.packing.attention_mask_4d`, without a dense (L x L) mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q, k):
        same_branch = (branch_ids[b, k] == 0) | (branch_ids[b, k] == branch_ids[b, q])
        return (segment_ids[b, q] == segment_ids[b, k]) & (q >= k) & same_branch

    rows, width = segment_ids.shape
    return create_block_mask(visible, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=segment_ids.device)


def logp_plan(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(positions, targets, sequences, n_sequences)`` of the scored tokens, for either layout.

    ``positions`` ``(M,)`` index ``input_ids.view(-1)`` at the position whose logits
    predict ``targets`` ``(M,)``; ``sequences`` ``(M,)`` is the sequence in ``[0, 2B)``.
    """
    if "logp_positions" in batch:
        n_sequences = 2 * batch["chosen_lengths"].shape[0]
        return batch["logp_positions"], batch["logp_targets"], batch["logp_sequences"], n_sequences
    mask = batch["response_mask"].bool()  # (2B, T)
    positions = mask.flatten().nonzero().squeeze(1)  # (M,)
    targets = next_token_targets(batch["input_ids"]).flatten()[positions]
    return positions, targets, positions // mask.shape[1], mask.shape[0]


def model_inputs(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The forward's keyword arguments for the batch's layout."""
    if "logp_positions" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    implementation = attention_implementation(model)
    if implementation == "sdpa":
        inputs["attention_mask"] = attention_mask_4d(batch["segment_ids"], batch["branch_ids"])
    elif implementation == "eager":
        dtype = causal_lm(model).get_input_embeddings().weight.dtype
        inputs["attention_mask"] = attention_mask_4d(batch["segment_ids"], batch["branch_ids"], dtype)
    elif implementation == "flex_attention":
        inputs["attention_mask"] = flex_block_mask(batch["segment_ids"], batch["branch_ids"])
    elif bool((batch["branch_ids"] != 0).any()):
        check_layout_support(model, share_prompt=True)
    # Otherwise (flash / flex attention, padding-free only): transformers finds the sequences
    # from position_ids restarting at 0 when no attention_mask is given.
    return inputs


def _response_only_logps(model: nn.Module, inputs: dict, positions: Tensor, targets: Tensor, chunk_size: int):
    """Log-probs ``(M,)`` from the captured last hidden states, or None when the model's logits are not a plain projection."""
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
            set_projection_verdict(model, False, "its logits differ from the output embedding applied to the last hidden state")
            return None
        set_projection_verdict(model, True)
    head = output_projection(model)
    hidden = hidden.reshape(-1, hidden.shape[-1])[positions]  # (M, H)
    return linear_token_logps(hidden, head.weight, head.bias, targets, chunk_size)


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
    model: nn.Module, batch: dict[str, Tensor], chunk_size: int = 1024, response_only: bool = False
) -> tuple[Tensor, Tensor]:
    """Response log-prob sums ``(2B,)`` float64 and token counts ``(2B,)`` int64 of ``batch`` under ``model``.

    With ``response_only`` the logits are never formed for unscored positions (nor kept
    for backward); models whose logits are not a plain projection of the last hidden
    state fall back to their full logits, detected once per model.
    """
    inputs = model_inputs(model, batch)
    if not response_only and "logp_positions" not in batch:
        outputs = model(**inputs, use_cache=False)
        return response_logp_sums(outputs.logits, batch["input_ids"], batch["response_mask"], chunk_size)

    positions, targets, sequences, n_sequences = logp_plan(batch)
    logps = None
    if response_only and response_only_available(model):
        logps = _response_only_logps(model, inputs, positions, targets, chunk_size)
    if logps is None:
        logits = model(**inputs, use_cache=False).logits  # (R, L, V)
        logps = token_logps_from_logits(logits.reshape(-1, logits.shape[-1])[positions], targets, chunk_size)
    sums = per_sequence_sums(logps, sequences, n_sequences)
    counts = torch.bincount(sequences, minlength=n_sequences)
    return sums, counts
