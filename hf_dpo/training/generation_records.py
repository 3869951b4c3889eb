"""``output_dir/generations.jsonl``: one record per prompt and evaluation, and the before/after view read from it.

A record: ``step``, ``eval_set`` (the metric prefix, ``eval`` for a single evaluation set),
``row_id`` and ``source`` (``file:line`` of the held-out pair), ``prompt`` (the rendered
inference prompt), ``completion`` (the generated text, the stop token left out), ``completion_ids``
(every generated token, the stop token included), ``tokens`` (their count), ``finished`` (whether
it ended with the end-of-turn token or EOS within the budget) and ``logratio`` (the completion's
mean per-token ``log pi - log pi_ref``; null when there is no reference to compare with).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, Union

RECORDS_NAME = "generations.jsonl"


def records_path(output_dir: Union[str, os.PathLike]) -> Path:
    return Path(output_dir) / RECORDS_NAME


def write_records(path: Path, records: list[dict[str, Any]], append: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def read_records(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """The records of ``path`` (a generations.jsonl), or [] when there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def keep_until(path: Path, step: int) -> list[dict[str, Any]]:
    """Drop the records after ``step`` (an interrupted run's, which a resumed run writes again); returns those kept."""
    records = [r for r in read_records(path) if r["step"] <= step]
    if path.is_file():
        write_records(path, records, append=False)
    return records


def _summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in records)
    logratios = [r["logratio"] for r in records]
    kl = None if None in logratios else sum(lr * r["tokens"] for lr, r in zip(logratios, records)) / max(tokens, 1)
    return {
        "step": records[0]["step"],
        "length_mean": tokens / len(records),
        "finished_fraction": sum(r["finished"] for r in records) / len(records),
        "kl": kl,
    }


def before_after(records: list[dict[str, Any]], eval_set: str = "eval") -> Optional[dict[str, Any]]:
    """The first and the last evaluation of ``eval_set`` in ``records``: their means and the first prompt's completions.

    Returns ``{"before": {...}, "after": {...}, "prompt", "source", "completion_before", "completion_after"}``
    (``before``/``after``: ``step``, ``length_mean``, ``finished_fraction``, ``kl`` as logged), or None when
    fewer than two evaluations were recorded.
    """
    by_step: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        if record.get("eval_set", "eval") == eval_set:
            by_step.setdefault(record["step"], []).append(record)
    if len(by_step) < 2:
        return None
    first, last = by_step[min(by_step)], by_step[max(by_step)]
    sample = first[0]
    after = next((r for r in last if r["row_id"] == sample["row_id"]), last[0])
    return {
        "before": _summary(first),
        "after": _summary(last),
        "prompt": sample["prompt"],
        "source": sample["source"],
        "completion_before": sample["completion"],
        "completion_after": after["completion"],
    }


def _fence(text: str) -> list[str]:
    fence = "````" if "```" in text else "```"
    return [f"{fence}text", text, fence]


def card_lines(output_dir: Union[str, os.PathLike], publish: Callable[[str], Optional[str]] = str) -> list[str]:
    """The model card's section on what the model writes before and after training ([] without two evaluations).

    ``publish`` turns the prompt's data file into a name fit to publish (no path of this machine).
    """
    view = before_after(read_records(records_path(output_dir)))
    if view is None:
        return []
    path, _, row = view["source"].rpartition(":")
    source = f"{publish(path) or Path(path).name}:{row}" if path else view["source"]
    before, after = view["before"], view["after"]
    kl = (
        "" if after["kl"] is None else f", per-token log-ratio to the reference {before['kl']:.4g} -> {after['kl']:.4g}"
    )
    return [
        "",
        "## Generations before and after training",
        "",
        f"Held-out prompt `{source}`, completed at step {before['step']} and step {after['step']} "
        f"(mean generated length {before['length_mean']:.1f} -> {after['length_mean']:.1f} tokens{kl}; "
        f"all records in `{RECORDS_NAME}`).",
        "",
        "Prompt:",
        "",
        *_fence(view["prompt"]),
        "",
        f"Step {before['step']}:",
        "",
        *_fence(view["completion_before"]),
        "",
        f"Step {after['step']}:",
        "",
        *_fence(view["completion_after"]),
    ]
