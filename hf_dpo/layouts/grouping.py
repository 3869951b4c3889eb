"""Length-grouped batching: pairs of similar length share a batch, so less padding is computed.

``Trainer`` already has the sampler (``--train_sampling_strategy group_by_length``,
a random permutation sorted by length inside mega-batches of 50 batches); it reads
the lengths from the column ``--length_column_name`` (default ``length``) and
otherwise fails on our pair columns, which have no ``input_ids``.
:func:`add_length_column` writes that column: the width a pair takes in the
active layout, which is what padding depends on.
"""

from __future__ import annotations

import datasets


def pair_widths(dataset: datasets.Dataset, share_prompt: bool = False) -> list[int]:
    """Tokens a pair occupies per row: ``max(|chosen|, |rejected|)``, or ``|chosen| + |rejected| - prompt`` when shared."""
    chosen = [len(ids) for ids in dataset["chosen_input_ids"]]
    rejected = [len(ids) for ids in dataset["rejected_input_ids"]]
    if share_prompt:
        return [c + r - p for c, r, p in zip(chosen, rejected, dataset["prompt_length"])]
    return [max(c, r) for c, r in zip(chosen, rejected)]


def add_length_column(dataset, column: str = "length", share_prompt: bool = False):
    """``dataset`` with ``column`` holding :func:`pair_widths` (replaced if present); other types pass through."""
    if not isinstance(dataset, datasets.Dataset):
        return dataset
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    return dataset.add_column(column, pair_widths(dataset, share_prompt))


def wants_length_grouping(args) -> bool:
    """Whether ``args`` asks Trainer for its length-grouped sampler (``train_sampling_strategy``, or the older ``group_by_length``)."""
    return getattr(args, "train_sampling_strategy", None) == "group_by_length" or bool(
        getattr(args, "group_by_length", False)
    )
