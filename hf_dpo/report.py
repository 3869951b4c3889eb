"""The one-screen data report: what the data layer did with every row, logged when training starts.

The counts come from the :class:`hf_dpo.data.DataReport` that loading and
tokenization fill in (``trainer.data_reports`` holds one per split); the token
length statistics come from the tokenized data set's ``prompt_tokens``,
``chosen_tokens`` and ``rejected_tokens`` columns (lengths before truncation).
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

from transformers import TrainerCallback

from .data import DataReport

logger = logging.getLogger(__name__)

LENGTH_COLUMNS = ("prompt_tokens", "chosen_tokens", "rejected_tokens")
STAT_NAMES = ("min", "mean", "p50", "p95", "max")


def _cell(value, stat: str) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if stat == "mean" else str(value)


def length_stats(values: Sequence[int]) -> dict[str, float]:
    """``min``, ``mean``, ``p50``, ``p95``, ``max`` of ``values``; percentiles by nearest rank (``ceil(q n)``-th smallest)."""
    ordered = sorted(values)
    n = len(ordered)

    def nearest_rank(q: float) -> int:
        return ordered[max(1, math.ceil(round(q * n, 9))) - 1]

    return {"min": ordered[0], "mean": sum(ordered) / n, "p50": nearest_rank(0.5), "p95": nearest_rank(0.95), "max": ordered[-1]}


def _lengths_from_counters(report: DataReport, column: str) -> Optional[dict[str, float]]:
    keys = {"min": f"{column}_min", "p50": f"{column}_median", "max": f"{column}_max"}
    if not all(k in report.counters for k in keys.values()):
        return None
    return {stat: report.counters[key] for stat, key in keys.items()}


def format_data_report(report: DataReport, name: str = "train", dataset=None) -> str:
    """Render ``report`` (and, if given, the length columns of the tokenized ``dataset``) in at most ~20 lines."""
    counters = report.counters
    pairs = counters.get("pairs_tokenized", report.rows_kept)
    lines = [f"data report ({name}): {', '.join(report.sources) or 'in-memory rows'}"]
    lines.append(
        f"  rows        {report.rows_read} read, {pairs} kept, {report.rows_skipped} skipped"
    )
    if report.skipped:
        width = max(len(code) for code in report.skipped)
        for code, count in sorted(report.skipped.items(), key=lambda item: (-item[1], item[0])):
            examples = ", ".join(report.skip_examples.get(code, []))
            lines.append(f"  skipped     {code:<{width}} {count:>6}  e.g. {examples}")
    else:
        lines.append("  skipped     none")
    lines.append(
        f"  truncated   prompts {counters.get('prompts_truncated', 0)} (oldest tokens dropped), "
        f"responses {counters.get('responses_truncated', 0)} (cut from the right)"
    )
    lines.append(f"  merges      {counters.get('boundary_merges', 0)} prompt/response token-boundary merge(s), response tokenized apart")
    if counters.get("template_rewrites"):
        kinds = sorted((k.split(".", 1)[1], v) for k, v in counters.items() if k.startswith("template_rewrites.") and v)
        lines.append(f"  rewrites    {counters['template_rewrites']} pair(s) built as answer + end-of-turn, the template rendered otherwise: "
                     + ", ".join(f"{k} {v}" for k, v in kinds))
    for key, label, text in (
        ("special_token_text", "special", "row(s) spell a special token in their text, kept"),
        ("ignored_message_keys", "ignored", "row(s) have message keys other than role/content, not rendered"),
    ):
        if counters.get(key):
            examples = report.counter_examples.get(key)
            lines.append(f"  {label:<12}{counters[key]} {text}" + (f" (e.g. {', '.join(examples)})" if examples else ""))
    rows = []
    for column in LENGTH_COLUMNS:
        if dataset is not None and column in getattr(dataset, "column_names", ()) and len(dataset):
            stats = length_stats(dataset[column])
        else:
            stats = _lengths_from_counters(report, column)
        if stats is not None:
            rows.append((column.replace("_tokens", ""), stats))
    if rows:
        lines.append("  tokens      " + "".join(f"{h:>8}" for h in STAT_NAMES) + "  (before truncation)")
        for label, stats in rows:
            lines.append(f"  {label:<12}" + "".join(f"{_cell(stats.get(h), h):>8}" for h in STAT_NAMES))
    return "\n".join(lines)


def log_data_reports(trainer) -> None:
    """Log one report per split the trainer prepared; WARNING when rows were skipped, INFO otherwise."""
    for name, report in getattr(trainer, "data_reports", {}).items():
        dataset = _split_dataset(trainer, name)
        level = logging.WARNING if report.rows_skipped else logging.INFO
        logger.log(level, "\n%s", format_data_report(report, name, dataset))


def _split_dataset(trainer, name: str):
    if name == "train":
        return trainer.train_dataset
    evals = trainer.eval_dataset
    return evals.get(name[len("eval_") :]) if isinstance(evals, dict) else evals


class DataReportCallback(TrainerCallback):
    """Logs the data reports once, on the main process, when training begins."""

    def __init__(self, trainer):
        self.trainer = trainer
        self._done = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not self._done and state.is_world_process_zero:
            log_data_reports(self.trainer)
        self._done = True
