"""One raw preference row -> the canonical layout, or a :class:`DataError` saying why not.

Pure functions of a single row (no files, no tokenizer): layout detection, type and
role checks, and the split into prompt / chosen answer / rejected answer described
in :mod:`hf_dpo.data` and docs/data.md. Errors carry a ``field`` and a ``code``;
the reader adds the file and line.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import DataError

ROLES = ("system", "user", "assistant")
MESSAGE_LAYOUTS = ("minimind", "conversational")


def _check_text(value: Any, field_name: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {_type_name(value)}", field=field_name, code="bad_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError("contains a lone surrogate (invalid Unicode)", field=field_name, code="invalid_text") from None
    if not allow_empty and not value.strip():
        raise DataError("is empty or whitespace only", field=field_name, code="empty_content")
    return value


def _type_name(value: Any) -> str:
    return {
        type(None): "null",
        bool: "bool",
        int: "int",
        float: "float",
        str: "string",
        list: "list",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _check_messages(value: Any, field_name: str, first_role: str = "user") -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise DataError(f"expected a list of messages, got {_type_name(value)}", field=field_name, code="bad_type")
    if not value:
        raise DataError("is an empty list", field=field_name, code="empty_content")
    messages = []
    for i, message in enumerate(value):
        where = f"{field_name}[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"expected a message object, got {_type_name(message)}", field=where, code="bad_type")
        if "role" not in message:
            raise DataError("missing 'role'", field=where, code="missing_field")
        if "content" not in message:
            raise DataError("missing 'content'", field=where, code="missing_field")
        role = message["role"]
        if role not in ROLES:
            raise DataError(
                f"unsupported role {role!r}; expected one of {list(ROLES)}", field=f"{where}.role", code="bad_role"
            )
        content = _check_text(message["content"], f"{where}.content")
        messages.append({"role": role, "content": content})
    _check_role_order(messages, field_name, first_role)
    return messages


def _check_role_order(messages: list[dict[str, str]], field_name: str, first_role: str) -> None:
    """An optional leading system turn, then user and assistant alternating, starting with ``first_role``."""
    expected = first_role
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i == 0 and first_role == "user":
            continue
        if role != expected:
            raise DataError(
                f"expected {expected!r}, got {role!r}", field=f"{field_name}[{i}].role", code="bad_role_order"
            )
        expected = "assistant" if role == "user" else "user"


def _common_prefix_length(a: list[dict], b: list[dict]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _check_ends_with_answer(messages: list[dict[str, str]], field_name: str) -> None:
    last = len(messages) - 1
    if messages[last]["role"] != "assistant":
        raise DataError(
            f"the last turn must be the assistant's answer, got {messages[last]['role']!r}",
            field=f"{field_name}[{last}].role",
            code="no_answer",
        )


def _split_minimind(row: dict[str, Any]) -> dict[str, Any]:
    chosen = _check_messages(row["chosen"], "chosen")
    rejected = _check_messages(row["rejected"], "rejected")
    _check_ends_with_answer(chosen, "chosen")
    _check_ends_with_answer(rejected, "rejected")
    if chosen == rejected:
        raise DataError("chosen and rejected are identical", field="chosen", code="identical_responses")
    # Only the final assistant turn may differ: everything before it is the shared prompt.
    prompt, other = chosen[:-1], rejected[:-1]
    if prompt != other:
        first = _common_prefix_length(prompt, other)
        if first < min(len(prompt), len(other)):
            field_name, detail = f"chosen[{first}]", f"differs from rejected[{first}]"
        else:
            field_name, detail = "chosen", f"has {len(prompt)} turns before its answer, rejected has {len(other)}"
        raise DataError(
            f"{detail}; only the final assistant turn may differ between chosen and rejected",
            field=field_name,
            code="prompt_mismatch",
        )
    if not prompt:
        raise DataError("no turn before the answer", field="chosen", code="no_prompt")
    return {"prompt": prompt, "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _split_conversational(row: dict[str, Any]) -> dict[str, Any]:
    prompt = _check_messages(row["prompt"], "prompt")
    if prompt[-1]["role"] != "user":
        raise DataError(
            f"the prompt must end with a user turn, got {prompt[-1]['role']!r}",
            field=f"prompt[{len(prompt) - 1}].role",
            code="bad_role_order",
        )
    sides = {}
    for side in ("chosen", "rejected"):
        value = row[side]
        # Some exports repeat the prompt inside chosen/rejected; accept it when it matches exactly.
        offset = len(prompt) if isinstance(value, list) and value[: len(prompt)] == prompt else 0
        answer = _check_messages(value[offset:] if offset else value, side, first_role="assistant")
        _check_ends_with_answer(answer, side)
        if len(answer) > 1:
            raise DataError(
                f"expected one assistant turn, got {len(answer)} turns", field=side, code="multi_turn_answer"
            )
        sides[side] = answer
    return {"prompt": prompt, **sides}


def _split_strings(row: dict[str, Any]) -> dict[str, Any]:
    for side in ("chosen", "rejected"):
        if isinstance(row[side], list):
            raise DataError(
                "is a list of messages but 'prompt' is a string; use one layout for all three fields "
                "(strings, or lists of messages)",
                field=side,
                code="mixed_layouts",
            )
    return {
        "prompt_text": _check_text(row["prompt"], "prompt"),
        "chosen_text": _check_text(row["chosen"], "chosen"),
        "rejected_text": _check_text(row["rejected"], "rejected"),
    }


def detect_layout(row: Any) -> str:
    """Name the layout of one raw row, or raise :class:`DataError` saying why it is none."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {_type_name(row)}", code="not_an_object")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        # repr() keeps the message printable even for keys with lone surrogates.
        keys = ", ".join(repr(k) for k in sorted(row)[:8]) or "none"
        if len(missing) == 2:
            raise DataError(
                f"not a preference row: no 'chosen' and no 'rejected' (keys present: {keys})", code="missing_field"
            )
        raise DataError(f"is missing (keys present: {keys})", field=missing[0], code="missing_field")
    if "prompt" not in row or row["prompt"] is None:
        return "minimind"
    if isinstance(row["prompt"], str):
        return "string"
    return "conversational"


def validate_row(row: Any) -> dict[str, Any]:
    """Turn one raw row into the canonical layout; raise :class:`DataError` (without a location) if it is bad."""
    layout = detect_layout(row)
    canonical = {
        "layout": layout,
        "prompt": [],
        "chosen": [],
        "rejected": [],
        "prompt_text": "",
        "chosen_text": "",
        "rejected_text": "",
    }
    if layout == "minimind":
        canonical.update(_split_minimind(row))
    elif layout == "conversational":
        canonical.update(_split_conversational(row))
    else:
        canonical.update(_split_strings(row))
    if row.get("chat_template_kwargs") is not None:
        canonical["chat_template_kwargs"] = _check_template_kwargs(row["chat_template_kwargs"])
    if _answer_text(canonical, "chosen") == _answer_text(canonical, "rejected"):
        raise DataError("chosen and rejected answers are identical", field="rejected", code="identical_responses")
    return canonical


def _check_template_kwargs(value: Any) -> str:
    """A row's own ``chat_template_kwargs`` (an object, as TRL allows), carried as JSON text."""
    if not isinstance(value, dict):
        raise DataError(f"expected an object, got {_type_name(value)}", field="chat_template_kwargs", code="bad_type")
    return json.dumps(value, sort_keys=True)


def _answer_text(canonical: dict[str, Any], side: str) -> str:
    return canonical[f"{side}_text"] if canonical["layout"] == "string" else canonical[side][0]["content"]
