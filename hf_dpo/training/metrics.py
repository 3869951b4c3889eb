"""The DPO metrics of a logging interval: every pair weighs the same, across steps and processes.

``compute_loss`` and ``prediction_step`` add each batch's metric means with the batch's
pair count; :meth:`PairMetrics.drain` turns what a split gathered since the last log into
pair-weighted means, so a partial last batch does not count as much as a full one (as
Trainer does for ``eval_loss``).
"""

from __future__ import annotations

from collections import defaultdict

import torch

SPLITS = ("train", "eval")


class PairMetrics:
    """Per split, metric -> [(sum over the step's pairs, pair count)], summed over processes when added."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.records: dict[str, defaultdict[str, list[tuple[float, float]]]] = {
            split: defaultdict(list) for split in SPLITS
        }

    def add(self, metrics: dict[str, torch.Tensor], split: str, n_pairs: int) -> None:
        """Record one batch's metric means (scalars) over its ``n_pairs`` pairs; one collective per call."""
        means = torch.stack([value.detach().float() for value in metrics.values()])  # (K,)
        weighted = torch.cat([means * n_pairs, means.new_tensor([n_pairs])])  # (K + 1,)
        *sums, count = self.accelerator.gather_for_metrics(weighted[None]).sum(0).tolist()
        for key, value in zip(metrics, sums):
            self.records[split][key].append((value, count))

    def drain(self, split: str) -> dict[str, float]:
        """The pair-weighted mean of every metric recorded for ``split`` since the last drain; forgets them."""
        means = {
            key: sum(value for value, _ in records) / sum(count for _, count in records)
            for key, records in self.records[split].items()
            if records
        }
        self.records[split].clear()
        return means

    def clear(self, split: str) -> None:
        self.records[split].clear()
