"""The data report: what the data layer did with every row, and its one-screen rendering.

:class:`DataReport` is filled in by reading (rows read, skipped by reason, layouts)
and by tokenization (truncation, merges, template rewrites); the trainer keeps one
per split and logs them when training starts (:func:`log_data_reports`). The token
length statistics come from the tokenized data set's ``prompt_tokens``,
``chosen_tokens`` and ``rejected_tokens`` columns (lengths before truncation).
"""

from __future__ import annotations

import logging
import math
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import place

logger = logging.getLogger(__name__)

EXAMPLE_LINES = 3
# The layouts hf_dpo's own docs write; any other one (another tool's rows) is named in the report even alone.
PLAIN_LAYOUTS = ("minimind", "conversational", "string")

LENGTH_COLUMNS = ("prompt_tokens", "chosen_tokens", "rejected_tokens")
STAT_NAMES = ("min", "mean", "p50", "p95", "max")


@dataclass
class DataReport:
    """What happened to every row: read, kept, and skipped by reason with example lines."""

    sources: list[str] = field(default_factory=list)
    # Row-id offset of each source (parallel to ``sources``): row_id = offset + line.
    offsets: list[int] = field(default_factory=list)
    # What a row number counts in each source (parallel to ``sources``): "line", or "item" in a JSON array.
    units: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    skip_examples: dict[str, list[str]] = field(default_factory=dict)
    counters: Counter = field(default_factory=Counter)
    # Up to three example locations for some counters (e.g. special_token_text).
    counter_examples: dict[str, list[str]] = field(default_factory=dict)
    # The column mapping the rows were read with, hf_dpo's name -> the data's (hf_dpo.data.columns).
    columns: dict[str, str] = field(default_factory=dict)
    # How these pairs were taken from the source's kept pairs (a split, a selection), one line each.
    notes: list[str] = field(default_factory=list)

    def skip(self, code: str, where: str) -> None:
        self.skipped[code] += 1
        examples = self.skip_examples.setdefault(code, [])
        if len(examples) < EXAMPLE_LINES:
            examples.append(where)

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def describe_skips(self) -> str:
        """``"code xN (e.g. file:line, ...); ..."`` for every skip reason, for messages."""
        return "; ".join(
            f"{code} x{n} (e.g. {', '.join(self.skip_examples.get(code, []))})" for code, n in self.skipped.items()
        )

    def locate(self, row_id: int) -> tuple[str, int]:
        """``(source, line)`` of a ``row_id``; ``("row", row_id)`` when the sources are unknown."""
        row_id = int(row_id)
        for source, offset in reversed(list(zip(self.sources, self.offsets))):
            if row_id > offset or (offset == 0 and row_id >= 0):
                return source, row_id - offset
        return "row", row_id

    def unit(self, row_id: int) -> str:
        """What the number :meth:`locate` gives counts: ``"line"``, or ``"item"`` in a JSON array."""
        source, _ = self.locate(row_id)
        units = dict(zip(self.sources, self.units))
        return units.get(source, "line")

    def where(self, row_id: int) -> str:
        """``"file:line"`` of a ``row_id`` (``"file:item N"`` in a JSON array), for messages."""
        source, line = self.locate(row_id)
        return f"{source}:{place(line, self.unit(row_id))}"

    def subset(self, rows: int, note: str) -> DataReport:
        """The report of ``rows`` pairs taken from these (a split, a selection): same sources and row locations,
        ``rows`` kept, and ``note`` saying how they were taken."""
        subset = DataReport.from_dict(self.to_dict())
        subset.rows_kept = rows
        subset.notes.append(note)
        return subset

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": self.sources,
            "offsets": self.offsets,
            "units": self.units,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "skipped": dict(self.skipped),
            "skip_examples": self.skip_examples,
            "counters": dict(self.counters),
            "counter_examples": self.counter_examples,
            "columns": self.columns,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataReport:
        return cls(
            sources=list(data.get("sources", [])),
            offsets=list(data.get("offsets", [])),
            units=list(data.get("units", [])),
            rows_read=data.get("rows_read", 0),
            rows_kept=data.get("rows_kept", 0),
            skipped=Counter(data.get("skipped", {})),
            skip_examples={k: list(v) for k, v in data.get("skip_examples", {}).items()},
            counters=Counter(data.get("counters", {})),
            counter_examples={k: list(v) for k, v in data.get("counter_examples", {}).items()},
            columns=dict(data.get("columns", {})),
            notes=list(data.get("notes", [])),
        )


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

    return {
        "min": ordered[0],
        "mean": sum(ordered) / n,
        "p50": nearest_rank(0.5),
        "p95": nearest_rank(0.95),
        "max": ordered[-1],
    }


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
    lines.append(f"  rows        {report.rows_read} read, {pairs} kept, {report.rows_skipped} skipped")
    lines += [f"  taken       {note}" for note in report.notes]
    if report.skipped:
        width = max(len(code) for code in report.skipped)
        for code, count in sorted(report.skipped.items(), key=lambda item: (-item[1], item[0])):
            examples = ", ".join(report.skip_examples.get(code, []))
            lines.append(f"  skipped     {code:<{width}} {count:>6}  e.g. {examples}")
    else:
        lines.append("  skipped     none")
    if report.columns:
        lines.append("  columns     " + ", ".join(f"{ours} <- {theirs}" for ours, theirs in report.columns.items()))
    layouts = {key[len("layout_") :]: n for key, n in counters.items() if key.startswith("layout_") and n}
    if len(layouts) > 1 or set(layouts) - set(PLAIN_LAYOUTS):
        # String rows are concatenated raw, message rows go through the chat template: say that both kinds are
        # here; and say which layout another tool's rows were read as.
        lines.append(
            "  layouts     " + ", ".join(f"{name} {n}" for name, n in sorted(layouts.items())) + " (detected per row)"
        )
    lines.append(
        f"  truncated   prompts {counters.get('prompts_truncated', 0)} (oldest tokens dropped), "
        f"responses {counters.get('responses_truncated', 0)} (cut from the right)"
    )
    lines.append(
        f"  merges      {counters.get('boundary_merges', 0)} prompt/response token-boundary merge(s), response tokenized apart"
    )
    if counters.get("template_rewrites"):
        kinds = sorted((k.split(".", 1)[1], v) for k, v in counters.items() if k.startswith("template_rewrites.") and v)
        lines.append(
            f"  rewrites    {counters['template_rewrites']} pair(s) built as answer + end-of-turn, the template rendered otherwise: "
            + ", ".join(f"{k} {v}" for k, v in kinds)
        )
    for key, label, text in (
        ("special_token_text", "special", "row(s) spell a special token in their text, kept"),
        ("ignored_message_keys", "ignored", "row(s) have message keys other than role/content, not rendered"),
        ("content_parts_joined", "joined", "row(s) have a message of several text parts, joined with '\\n'"),
        (
            "template_added_system",
            "template",
            "pair(s) without a system turn get the chat template's default system text, as at inference",
        ),
    ):
        if counters.get(key):
            examples = report.counter_examples.get(key)
            lines.append(
                f"  {label:<12}{counters[key]} {text}" + (f" (e.g. {', '.join(examples)})" if examples else "")
            )
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
    return (
        bool(report.rows_skipped)
        or any(counters.get(key) for key in ANOMALY_COUNTERS)
        or any(n for key, n in counters.items() if key.startswith("template_rewrite"))
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


def log_data_reports(splits: Mapping[str, tuple[DataReport, Any]], max_length=None, max_prompt_length=None) -> None:
    """Log one report per split, ``{name: (report, tokenized data set or None)}`` (WARNING when anything was
    skipped or changed, INFO otherwise), and a separate WARNING when truncation touched more than a few percent
    of the pairs at ``max_length`` / ``max_prompt_length``."""
    for name, (report, dataset) in splits.items():
        emit(
            logging.WARNING if is_anomalous(report) else logging.INFO, "\n%s", format_data_report(report, name, dataset)
        )
        truncated, pairs = truncated_pairs(report, dataset)
        if pairs and truncated / pairs > TRUNCATION_WARNING_FRACTION:
            emit(
                logging.WARNING,
                "%s data: truncation touched %s of %d pairs (%.0f%%) at max_length=%s, max_prompt_length=%s; the loss "
                "sees cut prompts and answers: raise the limits if this is not intended",
                name,
                "all" if truncated == pairs else truncated,
                pairs,
                100 * truncated / pairs,
                max_length,
                max_prompt_length,
            )
