"""The attention rule of every layout, in one place: which token may attend to which, and what the forward gets.

A padded batch needs only its 2D ``attention_mask``. A packed or shared-prompt batch
(:mod:`hf_dpo.layouts.packed`) describes attention with ``segment_ids`` ``(R, L)`` (one
id per attention group, -1 on padding) and ``branch_ids`` ``(R, L)`` (:data:`PROMPT_BRANCH`:
visible to the whole group; :data:`CHOSEN_BRANCH` / :data:`REJECTED_BRANCH`: visible only to
the same branch). :func:`model_inputs` turns either into the forward's keyword arguments
for the model's attention implementation: a dense ``(R, 1, L, L)`` mask for SDPA (bool) and
eager (additive), a FlexAttention ``BlockMask``, or, for flash attention's variable-length
kernel, position ids alone.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..common.models import causal_lm

Tensor = torch.Tensor

PROMPT_BRANCH, CHOSEN_BRANCH, REJECTED_BRANCH = 0, 1, 2
# Attention implementations that take our (R, 1, L, L) mask as given.
MASK_4D_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


def is_packed(batch: dict[str, Tensor]) -> bool:
    """Whether ``batch`` is in a packed or shared-prompt layout (it lists its scored tokens) rather than padded."""
    return "logp_positions" in batch


def attention_implementation(model: nn.Module) -> str:
    """The attention implementation ``model`` runs (``sdpa``, ``eager``, ``flash_attention_2``...)."""
    return getattr(causal_lm(model).config, "_attn_implementation", None) or "eager"


def require_4d_mask_attention(model: nn.Module) -> None:
    """Raise when ``model``'s attention cannot take the shared-prompt layout's custom 4D mask."""
    implementation = attention_implementation(model)
    if implementation not in MASK_4D_IMPLEMENTATIONS:
        raise ValueError(
            f"--share_prompt needs attention that takes a custom 4D mask ({' or '.join(MASK_4D_IMPLEMENTATIONS)}), "
            f"but the model uses attn_implementation={implementation!r}; load it with attn_implementation='sdpa'"
        )


def attention_mask_4d(segment_ids: Tensor, branch_ids: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``(R, 1, L, L)`` mask: query q sees key k iff same segment, k is not later, and k is shared or on q's branch.

    Returns a bool mask (True = attend) when ``dtype`` is None, as SDPA takes it, else an
    additive mask of ``dtype`` (0 or the dtype's minimum), as eager attention adds it.
    Padding (segment -1) attends to earlier padding only, so no softmax row is empty.
    """
    width = segment_ids.shape[1]
    index = torch.arange(width, device=segment_ids.device)
    causal = index[:, None] >= index[None, :]  # (L, L)
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # (R, L, L)
    key_branch = branch_ids[:, None, :]
    visible = (key_branch == PROMPT_BRANCH) | (key_branch == branch_ids[:, :, None])  # (R, L, L)
    allowed = (same_segment & visible & causal)[:, None]  # (R, 1, L, L)
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def flex_block_mask(segment_ids: Tensor, branch_ids: Tensor):
    """FlexAttention ``BlockMask`` of the same rule as :func:`attention_mask_4d`, without a dense (L x L) mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q, k):
        same_branch = (branch_ids[b, k] == PROMPT_BRANCH) | (branch_ids[b, k] == branch_ids[b, q])
        return (segment_ids[b, q] == segment_ids[b, k]) & (q >= k) & same_branch

    rows, width = segment_ids.shape
    return create_block_mask(visible, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=segment_ids.device)


def model_inputs(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The forward's keyword arguments for the batch's layout and the model's attention implementation."""
    if not is_packed(batch):
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
    elif bool((batch["branch_ids"] != PROMPT_BRANCH).any()):
        require_4d_mask_attention(model)
    # Otherwise (flash attention, padding-free only): transformers finds the sequences
    # from position_ids restarting at 0 when no attention_mask is given.
    return inputs
