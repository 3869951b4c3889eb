"""LLaMA-Factory's preference rows (its data/README.md, ``ranking: true``) -> prompt messages and two answers.

- **sharegpt**: ``conversations`` (``{"from", "value"}`` messages, roles ``human``, ``gpt``,
  ``system``) is the prompt; ``chosen`` and ``rejected`` are one ``{"from": "gpt", "value"}``
  message each. A leading ``system`` turn wins over a ``system`` column, as in LLaMA-Factory's
  converter. Tool turns (``function_call``, ``observation``) and a ``tools`` column are refused:
  hf_dpo renders plain chat with the model's chat template.
- **alpaca**: ``instruction`` and the optional ``input`` make the user turn, joined with
  ``"\\n"`` and skipping an empty one (LLaMA-Factory's ``AlpacaDatasetConverter``);
  ``chosen`` and ``rejected`` are strings; the optional ``system`` string and ``history``
  (``[[user, assistant], ...]`` turns before the instruction) are read too.

These are LLaMA-Factory's default column names and role tags. Other names (its
dataset_info ``columns``) are given with the column mapping (:mod:`hf_dpo.data.columns`).
"""

from __future__ import annotations

from typing import Any

from .errors import DataError
from .messages import check_message, check_messages, check_text, refuse_multimodal, type_name

# Media columns of LLaMA-Factory's multimodal rows.
MEDIA_COLUMNS = ("images", "videos", "audios")


def _refuse_extras(row: dict[str, Any]) -> None:
    for column in MEDIA_COLUMNS:
        if row.get(column):
            raise refuse_multimodal(f"LLaMA-Factory {column!r}", column)
    if row.get("tools"):
        raise DataError(
            "tool descriptions are not supported (hf_dpo renders plain chat with the model's chat template, "
            "without tools); drop the column or the row",
            field="tools",
            code="tool_turn",
        )


def _system_column(row: dict[str, Any]) -> list[dict[str, str]]:
    value = row.get("system")
    if value is None or value == "":
        return []
    return [{"role": "system", "content": check_text(value, "system")}]


def sharegpt_messages(row: dict[str, Any], notes: set) -> tuple[list[dict], list[dict], list[dict]]:
    """``(prompt, [chosen answer], [rejected answer])`` of a sharegpt preference row."""
    _refuse_extras(row)
    prompt = check_messages(row["conversations"], "conversations", notes, sharegpt=True)
    if prompt[0]["role"] != "system":
        prompt = _system_column(row) + prompt
    if prompt[-1]["role"] != "user":
        raise DataError(
            f"the prompt must end with a human turn, got {prompt[-1]['role']!r}",
            field=f"conversations[{len(row['conversations']) - 1}]",
            code="bad_role_order",
        )
    answers = []
    for side in ("chosen", "rejected"):
        value = row[side]
        if not isinstance(value, dict):
            raise DataError(
                f"expected one message object {{'from': 'gpt', 'value': ...}} (sharegpt), got {type_name(value)}",
                field=side,
                code="bad_type",
            )
        answer = check_message(value, side, notes, sharegpt=True)
        if answer["role"] != "assistant":
            raise DataError(
                f"the answer must be the assistant's ('gpt'), got {value.get('from', value.get('role'))!r}",
                field=side,
                code="no_answer",
            )
        answers.append([answer])
    return prompt, answers[0], answers[1]


def alpaca_messages(row: dict[str, Any], notes: set) -> tuple[list[dict], list[dict], list[dict]]:
    """``(prompt, [chosen answer], [rejected answer])`` of an alpaca preference row."""
    _refuse_extras(row)
    query = [check_text(row["instruction"], "instruction", allow_empty=True)]
    if row.get("input") is not None:
        query.append(check_text(row["input"], "input", allow_empty=True))
    user = check_text("\n".join(q for q in query if q), "instruction")
    prompt = _system_column(row) + _history(row.get("history")) + [{"role": "user", "content": user}]
    answers = [[{"role": "assistant", "content": check_text(row[side], side)}] for side in ("chosen", "rejected")]
    return prompt, answers[0], answers[1]


def _history(value: Any) -> list[dict[str, str]]:
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise DataError(
            f"expected a list of [instruction, response] pairs, got {type_name(value)}",
            field="history",
            code="bad_type",
        )
    turns = []
    for i, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            raise DataError("expected an [instruction, response] pair", field=f"history[{i}]", code="bad_type")
        turns.append({"role": "user", "content": check_text(pair[0], f"history[{i}][0]")})
        turns.append({"role": "assistant", "content": check_text(pair[1], f"history[{i}][1]")})
    return turns
