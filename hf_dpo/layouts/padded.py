"""The plain layout: :class:`DPOCollator` pads a batch of tokenized pairs and stacks it as ``[chosen_1..B, rejected_1..B]``."""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..common.columns import REF_LOGP_COLUMNS

logger = logging.getLogger(__name__)


def pair_columns(features: list[dict[str, Any]], passthrough_columns: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The per-pair extras of a batch, whatever its layout: ``row_ids`` ``(B,)`` and the passthrough sums ``(B,)``."""
    extras = {}
    if "row_id" in features[0]:
        extras["row_ids"] = torch.tensor([f["row_id"] for f in features], dtype=torch.long)
    for name in passthrough_columns:
        if name in features[0]:
            # float64: cached reference sums keep the precision score() accumulated them in.
            extras[name] = torch.tensor([f[name] for f in features], dtype=torch.float64)
    return extras


def check_pad_token_id(pad_token_id: Any, collator: str) -> None:
    """Refuse a missing pad id when the collator is built, not at the first batch (``torch.full`` would fail there)."""
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral):
        raise ValueError(
            f"{collator}(pad_token_id={pad_token_id!r}): expected an integer token id. The tokenizer has no pad token "
            f"(common for Llama and Mistral base tokenizers): pass pad_token_id=tokenizer.eos_token_id (padding is never "
            f"scored: masks come from the attention and response masks, not from pad ids), or set tokenizer.pad_token"
        )


def default_pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id (logged) when it has no pad token; padding positions are never scored."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError(
            "the tokenizer has neither a pad token nor an EOS token: set tokenizer.pad_token, or pass a data_collator"
        )
    logger.warning(
        "the tokenizer has no pad token: padding with its EOS token (id %d); padding is never scored",
        tokenizer.eos_token_id,
    )
    return tokenizer.eos_token_id


def round_up(length: int, multiple: Optional[int]) -> int:
    if not multiple:
        return length
    return -(-length // multiple) * multiple


@dataclass
class DPOCollator:
    """Right-pad each batch to its own longest sequence and concatenate both sides.

    Each feature is one tokenized pair with ``chosen_input_ids``,
    ``chosen_response_mask``, ``rejected_input_ids``, ``rejected_response_mask``
    (lists of equal length per side; the mask marks response tokens), and
    optionally ``row_id`` and cached reference sums.

    Returns a dict:
        ``input_ids`` ``(2B, T)``: chosen rows first, then rejected rows, right-padded with ``pad_token_id``.
        ``attention_mask`` ``(2B, T)``: 1 on real tokens.
        ``response_mask`` ``(2B, T)``: aligned for next-token prediction,
            ``response_mask[i, t] = 1`` iff ``input_ids[i, t + 1]`` is a response token.
        ``chosen_lengths``, ``rejected_lengths`` ``(B,)``: response token counts.
        ``row_ids`` ``(B,)`` when the features carry ``row_id``.

    There is deliberately no ``labels`` key: Trainer treats a batch with labels
    as token-normalized and would change how it scales accumulated losses.

    ``pad_token_id`` must be an integer; ``None`` (a tokenizer without a pad token)
    raises ``ValueError`` here, naming the fix (use ``tokenizer.eos_token_id``).
    """

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None
    passthrough_columns: tuple[str, ...] = field(default=REF_LOGP_COLUMNS)

    def __post_init__(self):
        check_pad_token_id(self.pad_token_id, type(self).__name__)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        token_masks = [f["chosen_response_mask"] for f in features] + [f["rejected_response_mask"] for f in features]
        width = round_up(max(len(s) for s in sequences), self.pad_to_multiple_of)

        rows = len(sequences)
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.long)  # (2B, T)
        attention_mask = torch.zeros((rows, width), dtype=torch.long)  # (2B, T)
        response_mask = torch.zeros((rows, width), dtype=torch.bool)  # (2B, T)
        for i, (ids, mask) in enumerate(zip(sequences, token_masks)):
            if len(ids) != len(mask):
                raise ValueError(f"row {i}: input_ids has {len(ids)} tokens but its response mask has {len(mask)}")
            input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
            # Shift left by one: the logits at t-1 predict the response token at t.
            response_mask[i, : len(ids) - 1] = torch.as_tensor(mask[1:], dtype=torch.bool)

        n_pairs = len(features)
        counts = response_mask.sum(-1)  # (2B,)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "chosen_lengths": counts[:n_pairs],
            "rejected_lengths": counts[n_pairs:],
        }
        batch.update(pair_columns(features, self.passthrough_columns))
        return batch
