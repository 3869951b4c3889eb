"""The logged numbers of an interval: means over the finite values, with the count of the others.

``compute_loss`` and ``prediction_step`` add each batch's metric means with the batch's
pair count; :meth:`PairMetrics.drain` turns what a split gathered since the last log into
pair-weighted means, so a partial last batch does not count as much as a full one (as
Trainer does for ``eval_loss``). A process's batch whose metrics are not all finite is
left out of every metric and its pairs are counted as ``nonfinite_pairs``.

:class:`LossLog` replaces Trainer's logged ``loss``: Trainer adds a rank's non-finite
step loss as that rank's running mean (0 before anything was logged) and then averages
the ranks, so with one rank of two skipping every step the logged loss halves. Here a
rank's step loss enters the mean only when finite, and ``loss_nonfinite`` counts the others.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

SPLITS = ("train", "eval")
NONFINITE_PAIRS = "nonfinite_pairs"


class PairMetrics:
    """Per split, metric -> [(sum over the step's finite pairs, pair count)], summed over processes when added."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.records: dict[str, defaultdict[str, list[tuple[float, float]]]] = {
            split: defaultdict(list) for split in SPLITS
        }

    def add(self, metrics: dict[str, torch.Tensor], split: str, n_pairs: int) -> None:
        """Record one batch's metric means (scalars) over its ``n_pairs`` pairs; one collective per call."""
        means = torch.stack([value.detach().float() for value in metrics.values()])  # (K,)
        row = torch.cat([means, means.new_tensor([n_pairs])])  # (K + 1,)
        rows = self.accelerator.gather_for_metrics(row[None]).double()  # (processes, K + 1)
        finite = torch.isfinite(rows).all(1)  # (processes,)
        kept, counts = rows[finite, :-1], rows[finite, -1:]
        sums = (kept * counts).sum(0).tolist()
        count = float(counts.sum())
        for key, value in zip(metrics, sums):
            self.records[split][key].append((value, count))
        left_out = float(rows[~finite, -1].nan_to_num(0.0).sum())
        if left_out:
            self.records[split][NONFINITE_PAIRS].append((left_out, 0.0))

    def drain(self, split: str) -> dict[str, float]:
        """The pair-weighted mean of every metric recorded for ``split`` since the last drain (NaN when no pair was
        finite), and ``nonfinite_pairs`` when some were left out; forgets them."""
        records = self.records[split]
        left_out = sum(value for value, _ in records.pop(NONFINITE_PAIRS, []))
        means = {key: _mean(sum(v for v, _ in rows), sum(c for _, c in rows)) for key, rows in records.items() if rows}
        if left_out:
            means[NONFINITE_PAIRS] = left_out
        records.clear()
        return means

    def clear(self, split: str) -> None:
        self.records[split].clear()


def _mean(total: float, count: float) -> float:
    return total / count if count else math.nan


class LossLog:
    """The training ``loss`` of a logging interval and ``train_loss`` of a run, over every rank's finite step losses.

    A rank's step loss is the mean of its micro-batch losses (what Trainer adds up), so with every value finite
    both equal Trainer's own numbers. Fed with every rank's loss of each micro-batch ``(world,)``.
    """

    def __init__(self):
        self.start()

    def start(self) -> None:
        """A new ``train()`` call: forget everything (``train_loss`` covers the steps of this call, as Trainer's)."""
        self._micro: list[torch.Tensor] = []
        self._interval = [0.0, 0, 0]  # sum of finite step losses, their count, the count of the others
        self._run = [0.0, 0, 0]

    def add(self, rank_losses: torch.Tensor) -> None:
        """One micro-batch: every rank's loss ``(world,)``."""
        self._micro.append(rank_losses.double())

    def end_step(self) -> None:
        """An optimizer step is done: each rank's step loss joins the interval when it is finite."""
        if not self._micro:
            return
        step = torch.stack(self._micro).mean(0)  # (world,)
        self._micro = []
        finite = torch.isfinite(step)
        total, n = float(step[finite].sum()), int(finite.sum())
        self._interval[0] += total
        self._interval[1] += n
        self._interval[2] += step.numel() - n
        self._run[0] += total
        self._run[1] += n
        self._run[2] += step.numel() - n

    def update(self, logs: dict[str, float]) -> None:
        """Replace Trainer's ``loss`` (adding ``loss_nonfinite`` when some step losses were not finite) and
        ``train_loss`` in ``logs``, when this log has them and losses were recorded."""
        total, n, others = self._interval
        if "loss" in logs and n + others:
            logs["loss"] = _mean(total, n)
            if others:
                logs["loss_nonfinite"] = float(others)
            self._interval = [0.0, 0, 0]
        if "train_loss" in logs and self._run[1] + self._run[2]:
            logs["train_loss"] = _mean(self._run[0], self._run[1])
