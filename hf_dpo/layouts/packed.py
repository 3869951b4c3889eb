"""Batch layouts that compute fewer tokens: padding-free rows and the shared-prompt forward.

The plain :class:`~hf_dpo.layouts.padded.DPOCollator` pads 2B sequences to the longest
one and computes every prompt twice. :class:`PackedDPOCollator` lays the same
pairs out differently:

``padding_free``
    All sequences of the batch in one row, positions restarting at 0 for each
    sequence; attention never crosses a sequence boundary. No pad token is computed
    (except up to ``pad_to_multiple_of - 1`` at the row's end). With
    ``max_row_tokens``, sequences are packed first-fit-decreasing into rows of at
    most that many tokens instead (a longer sequence gets a row of its own): SDPA and
    eager attention compute the full row-by-row mask, so one long row costs
    ``(sum of lengths)^2`` attention where bounded rows cost about ``rows * bound^2``;
    flash attention's variable-length kernel has no such cost and prefers one row.
``share_prompt``
    One unit per pair, ``[prompt | chosen response | rejected response]``: the
    rejected tokens attend to the prompt but not to the chosen tokens, and their
    positions continue from the prompt's end, so each side sees exactly the context
    it would see alone while the prompt is computed once. Units are padded to one row
    each, or packed into a single row with ``padding_free``.

Because a position's logits may predict tokens of both sides (the prompt's last
token predicts the first token of each response), the layout does not use a
shifted ``response_mask``. It lists every scored token instead:

    ``logp_positions`` ``(M,)``: flat index into ``input_ids.view(-1)`` of the position whose logits predict it,
    ``logp_targets`` ``(M,)``: the token id, ``logp_sequences`` ``(M,)``: its sequence in ``[chosen_1..B, rejected_1..B]``.

Attention is described by ``segment_ids`` ``(R, L)`` (one id per attention group,
-1 on padding) and ``branch_ids`` ``(R, L)`` (0: visible to the whole group; 1/2:
chosen/rejected, visible only to the same branch); :func:`~hf_dpo.layouts.attention.attention_mask_4d`
turns them into the ``(R, 1, L, L)`` mask the model gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..common.columns import REF_LOGP_COLUMNS
from .attention import CHOSEN_BRANCH, PROMPT_BRANCH, REJECTED_BRANCH
from .padded import check_pad_token_id, pair_columns, round_up

Tensor = torch.Tensor


def _scored_tokens(ids: Tensor, mask: Tensor) -> Tensor:
    """Indices ``t >= 1`` of the scored tokens (token 0 has no position predicting it)."""
    return mask[1:].nonzero().squeeze(1) + 1


@dataclass
class _Unit:
    """Tokens that go into a row together, with where each of their scored tokens is predicted from."""

    ids: Tensor  # (n,)
    positions: Tensor  # (n,)
    branches: Tensor  # (n,)
    predictors: list[Tensor]  # per sequence: (m,) unit-local index of the predicting position
    targets: list[Tensor]  # per sequence: (m,) token ids
    sequences: list[int]  # per sequence: index in [chosen_1..B, rejected_1..B]


def _sequence_unit(ids: list[int], mask: list[int], sequence: int) -> _Unit:
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    scored = _scored_tokens(ids_t, torch.as_tensor(mask, dtype=torch.bool))
    return _Unit(
        ids=ids_t,
        positions=torch.arange(len(ids)),
        branches=torch.full((len(ids),), PROMPT_BRANCH, dtype=torch.long),
        predictors=[scored - 1],
        targets=[ids_t[scored]],
        sequences=[sequence],
    )


def _pair_unit(feature: dict[str, Any], pair: int, n_pairs: int) -> _Unit:
    """``[prompt | chosen response | rejected response]`` for one pair."""
    chosen, rejected = feature["chosen_input_ids"], feature["rejected_input_ids"]
    chosen_mask, rejected_mask = feature["chosen_response_mask"], feature["rejected_response_mask"]
    n_prompt = feature["prompt_length"]
    if not 0 < n_prompt < min(len(chosen), len(rejected)):
        raise ValueError(f"pair {pair}: prompt_length {n_prompt} leaves no response token on one side")
    if chosen[:n_prompt] != rejected[:n_prompt] or chosen_mask[:n_prompt] != rejected_mask[:n_prompt]:
        raise ValueError(f"pair {pair}: chosen and rejected differ inside the first prompt_length={n_prompt} tokens")
    n_chosen = len(chosen) - n_prompt
    n_rejected = len(rejected) - n_prompt
    ids = torch.as_tensor(chosen + rejected[n_prompt:], dtype=torch.long)
    positions = torch.cat([torch.arange(n_prompt + n_chosen), torch.arange(n_prompt, n_prompt + n_rejected)])
    branches = torch.cat(
        [
            torch.full((n_prompt,), PROMPT_BRANCH),
            torch.full((n_chosen,), CHOSEN_BRANCH),
            torch.full((n_rejected,), REJECTED_BRANCH),
        ]
    ).long()

    chosen_t = torch.as_tensor(chosen, dtype=torch.long)
    rejected_t = torch.as_tensor(rejected, dtype=torch.long)
    chosen_scored = _scored_tokens(chosen_t, torch.as_tensor(chosen_mask, dtype=torch.bool))
    rejected_scored = _scored_tokens(rejected_t, torch.as_tensor(rejected_mask, dtype=torch.bool))
    # Rejected token t sits at t inside the prompt and at t + n_chosen after it. Prompt tokens
    # scored under completion_turns="all" are predicted by the same shared positions on both sides.
    rejected_predictors = rejected_scored - 1
    rejected_predictors = torch.where(
        rejected_predictors < n_prompt, rejected_predictors, rejected_predictors + n_chosen
    )
    return _Unit(
        ids=ids,
        positions=positions,
        branches=branches,
        predictors=[chosen_scored - 1, rejected_predictors],
        targets=[chosen_t[chosen_scored], rejected_t[rejected_scored]],
        sequences=[pair, n_pairs + pair],
    )


def _pack(lengths: list[int], max_row_tokens: Optional[int]) -> tuple[list[int], list[int], list[int]]:
    """``(row, column)`` of each sequence and each row's fill: one row, or first-fit decreasing into bounded rows."""
    if max_row_tokens is None:
        columns = [sum(lengths[:i]) for i in range(len(lengths))]
        return [0] * len(lengths), columns, [sum(lengths)]
    capacity = max(max_row_tokens, max(lengths))
    rows, columns, fills = [0] * len(lengths), [0] * len(lengths), []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, fill in enumerate(fills) if fill + lengths[i] <= capacity), len(fills))
        if row == len(fills):
            fills.append(0)
        rows[i], columns[i] = row, fills[row]
        fills[row] += lengths[i]
    return rows, columns, fills


@dataclass
class PackedDPOCollator:
    """Collate tokenized pairs into a padding-free and/or shared-prompt layout (see the module docstring).

    Returns a dict:
        ``input_ids``, ``position_ids``, ``segment_ids``, ``branch_ids`` ``(R, L)``: R = 1 with
            ``padding_free`` (a few with ``max_row_tokens``), else 2B rows (B with ``share_prompt``);
            right-padded with ``pad_token_id``.
        ``logp_positions``, ``logp_targets``, ``logp_sequences`` ``(M,)``: the scored tokens.
        ``chosen_lengths``, ``rejected_lengths`` ``(B,)``: scored token counts, as the plain collator's.
        ``row_ids`` ``(B,)`` and the cached reference sums, when the features carry them.
    """

    pad_token_id: int
    padding_free: bool = False
    share_prompt: bool = False
    pad_to_multiple_of: Optional[int] = None
    max_row_tokens: Optional[int] = None
    passthrough_columns: tuple[str, ...] = field(default=REF_LOGP_COLUMNS)

    def __post_init__(self):
        check_pad_token_id(self.pad_token_id, type(self).__name__)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Tensor]:
        n_pairs = len(features)
        if self.share_prompt:
            if "prompt_length" not in features[0]:
                raise ValueError("share_prompt needs the prompt_length column that hf_dpo.tokenize_dataset writes")
            units = [_pair_unit(f, i, n_pairs) for i, f in enumerate(features)]
        else:
            units = [
                _sequence_unit(f["chosen_input_ids"], f["chosen_response_mask"], i) for i, f in enumerate(features)
            ]
            units += [
                _sequence_unit(f["rejected_input_ids"], f["rejected_response_mask"], n_pairs + i)
                for i, f in enumerate(features)
            ]

        if self.padding_free:
            rows, columns, fills = _pack([len(u.ids) for u in units], self.max_row_tokens)
        else:
            rows, columns, fills = list(range(len(units))), [0] * len(units), [len(u.ids) for u in units]
        width = round_up(max(fills), self.pad_to_multiple_of)
        n_rows = len(fills)

        input_ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)  # (R, L)
        position_ids = torch.zeros((n_rows, width), dtype=torch.long)  # (R, L)
        segment_ids = torch.full((n_rows, width), -1, dtype=torch.long)  # (R, L)
        branch_ids = torch.zeros((n_rows, width), dtype=torch.long)  # (R, L)
        positions, targets, sequences = [], [], []
        for unit_index, (unit, row, column) in enumerate(zip(units, rows, columns)):
            span = slice(column, column + len(unit.ids))
            input_ids[row, span] = unit.ids
            position_ids[row, span] = unit.positions
            segment_ids[row, span] = unit_index
            branch_ids[row, span] = unit.branches
            for predictors, unit_targets, sequence in zip(unit.predictors, unit.targets, unit.sequences):
                positions.append(row * width + column + predictors)
                targets.append(unit_targets)
                sequences.append(torch.full_like(unit_targets, sequence))
        if self.padding_free:
            # A row's tail padding is a sequence of its own (positions restart at 0), also for
            # attention implementations that find sequence boundaries from position_ids.
            for row, fill in enumerate(fills):
                position_ids[row, fill:] = torch.arange(width - fill)

        logp_sequences = torch.cat(sequences)
        counts = torch.bincount(logp_sequences, minlength=2 * n_pairs)  # (2B,)
        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "segment_ids": segment_ids,
            "branch_ids": branch_ids,
            "logp_positions": torch.cat(positions),
            "logp_targets": torch.cat(targets),
            "logp_sequences": logp_sequences,
            "chosen_lengths": counts[:n_pairs],
            "rejected_lengths": counts[n_pairs:],
        }
        batch.update(pair_columns(features, self.passthrough_columns))
        return batch
