"""The one-screen data report: what the data layer did with every row, logged when training starts.

The counts come from the :class:`hf_dpo.data.DataReport` that loading and
tokenization fill in (``trainer.data_reports`` holds one per split); the token
length statistics come from the tokenized data set's ``prompt_tokens``,
``chosen_tokens`` and ``rejected_tokens`` columns (lengths before truncation).
"""

from __future__ import annotations

import logging
import math
import sys
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
    layouts = {key[len("layout_"):]: n for key, n in counters.items() if key.startswith("layout_") and n}
    if len(layouts) > 1:
        # String rows are concatenated raw, message rows go through the chat template: say that both kinds are here.
        lines.append("  layouts     " + ", ".join(f"{name} {n}" for name, n in sorted(layouts.items())) + " (detected per row)")
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


# Counters that mean the data was changed or dropped on the way to the loss: the report is then a WARNING.
ANOMALY_COUNTERS = ("prompts_truncated", "responses_truncated", "boundary_merges", "special_token_text")
# More than this share of pairs truncated gets its own WARNING (the report alone is easy to scroll past).
TRUNCATION_WARNING_FRACTION = 0.05


def is_anomalous(report: DataReport) -> bool:
    """Whether rows were skipped or changed: skips, truncation, boundary merges, special-token text, template rewrites."""
    counters = report.counters
    return bool(report.rows_skipped) or any(counters.get(key) for key in ANOMALY_COUNTERS) or any(
        n for key, n in counters.items() if key.startswith("template_rewrite")
    )


def truncated_pairs(report: DataReport, dataset=None) -> tuple[int, int]:
    """``(pairs truncated, pairs)`` of the kept pairs.

    Exact from the tokenized ``dataset`` (a pair is truncated when a side is shorter than
    its prompt + response before truncation); without it, a lower bound from the counters.
    """
    columns = ("chosen_input_ids", "rejected_input_ids", *LENGTH_COLUMNS)
    if dataset is not None and set(columns) <= set(getattr(dataset, "column_names", ())) and len(dataset):
        import pyarrow.compute as pc

        truncated = 0
        for table in dataset.select_columns(list(columns)).with_format("arrow").iter(batch_size=8192):
            prompt = table["prompt_tokens"]
            cut = pc.or_(
                pc.less(pc.list_value_length(table["chosen_input_ids"]), pc.add(prompt, table["chosen_tokens"])),
                pc.less(pc.list_value_length(table["rejected_input_ids"]), pc.add(prompt, table["rejected_tokens"])),
            )
            truncated += pc.sum(cut.cast("int64")).as_py() or 0
        return truncated, len(dataset)
    counters = report.counters
    pairs = counters.get("pairs_tokenized", report.rows_kept)
    return min(pairs, max(counters.get("prompts_truncated", 0), -(-counters.get("responses_truncated", 0) // 2))), pairs


def _stderr_handler() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)  # sys.stderr as it is now (pytest's capture, a redirected stream)
    handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
    return handler


def emit(level: int, message: str, *args) -> None:
    """Log ``message`` on ``hf_dpo.report``; with no logging configured anywhere, write it to stderr instead.

    Python drops INFO records (and formats WARNINGs bare) when no handler is configured, so the
    report would be invisible to a user who never called ``logging.basicConfig``. When any
    handler is configured (the user's, Trainer's, pytest's) the record goes through it
    alone, at its level, so it is never printed twice.
    """
    if logger.hasHandlers():
        logger.log(level, message, *args)
        return
    record = logger.makeRecord(logger.name, level, __file__, 0, message, args, None)
    _stderr_handler().handle(record)


def log_data_reports(trainer) -> None:
    """Log one report per split the trainer prepared (WARNING when anything was skipped or changed, INFO otherwise),
    and a separate WARNING when truncation touched more than a few percent of the pairs."""
    args = getattr(trainer, "args", None)
    for name, report in getattr(trainer, "data_reports", {}).items():
        dataset = _split_dataset(trainer, name)
        emit(logging.WARNING if is_anomalous(report) else logging.INFO, "\n%s", format_data_report(report, name, dataset))
        truncated, pairs = truncated_pairs(report, dataset)
        if pairs and truncated / pairs > TRUNCATION_WARNING_FRACTION:
            emit(
                logging.WARNING,
                "%s data: truncation touched %s of %d pairs (%.0f%%) at max_length=%s, max_prompt_length=%s; the loss "
                "sees cut prompts and answers: raise the limits if this is not intended",
                name, "all" if truncated == pairs else truncated, pairs, 100 * truncated / pairs,
                getattr(args, "max_length", None), getattr(args, "max_prompt_length", None),
            )


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
