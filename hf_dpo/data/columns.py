"""The column mapping: rows whose columns have other names, e.g. ``{"prompt": "question", "chosen": "response_j"}``.

Each key is a column hf_dpo reads (:data:`READ_COLUMNS`), each value the row's own column
holding it. A mapped row is the row with each named column renamed to hf_dpo's name; a
column of the row that already has one of the mapped names is replaced (the mapping says
which column is meant) and the renamed column is gone. Layout detection then runs on the mapped row, so a mapping can
complete any layout, e.g. ``{"conversations": "messages"}`` for a LLaMA-Factory sharegpt
file whose dataset_info names its message column ``messages``.

Given as ``--dataset_columns`` (JSON), ``DPOConfig(dataset_columns=...)`` or
``load_preference_dataset(columns=...)``.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from .errors import DataError

# Every column some layout reads (docs/data.md, "Row layouts").
READ_COLUMNS = (
    "prompt",
    "chosen",
    "rejected",
    "conversations",
    "instruction",
    "input",
    "system",
    "history",
    "chat_template_kwargs",
)
FLAG = "--dataset_columns"


def parse_columns(value: Union[None, str, dict]) -> Optional[dict[str, str]]:
    """A mapping from a dict or a JSON object string; None or ``""`` for none. Raises ``ValueError`` naming the flag."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{FLAG}: not valid JSON ({err}): {value!r}") from None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f'{FLAG}: expected a JSON object such as {{"prompt": "question"}}, got {type(value).__name__}')
    unknown = [key for key in value if key not in READ_COLUMNS]
    if unknown:
        raise ValueError(
            f"{FLAG}: {', '.join(map(repr, unknown))} is not a column hf_dpo reads; the keys are hf_dpo's names "
            f"({', '.join(READ_COLUMNS)}), the values your data's column names"
        )
    bad = {key: column for key, column in value.items() if not isinstance(column, str) or not column}
    if bad:
        raise ValueError(f"{FLAG}: the values must be your data's column names (non-empty strings), got {bad}")
    return dict(value) or None


def apply_columns(row: Any, columns: Optional[dict[str, str]]) -> Any:
    """``row`` with the mapped columns renamed to hf_dpo's names; a row without a mapped column is a ``DataError``."""
    if not columns or not isinstance(row, dict):
        return row
    missing = [f"{theirs!r} (for {ours!r})" for ours, theirs in columns.items() if theirs not in row]
    if missing:
        keys = ", ".join(repr(k) for k in sorted(row)[:8]) or "none"
        raise DataError(
            f"{FLAG} names {', '.join(missing)}, which this row does not have (keys present: {keys})",
            code="missing_field",
        )
    renamed = set(columns) | set(columns.values())
    mapped = {key: value for key, value in row.items() if key not in renamed}
    mapped.update({ours: row[theirs] for ours, theirs in columns.items()})
    return mapped
