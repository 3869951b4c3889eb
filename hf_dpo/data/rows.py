"""One raw preference row -> the canonical layout, or a :class:`DataError` saying why not.

Pure functions of a single row (no files, no tokenizer): the column mapping
(:mod:`~hf_dpo.data.columns`), layout detection (:data:`LAYOUTS`, :func:`detect_layout`),
message checks (:mod:`~hf_dpo.data.messages`), LLaMA-Factory's layouts
(:mod:`~hf_dpo.data.llamafactory`), and the split into prompt / chosen answer / rejected
answer described in docs/data.md. Errors carry a ``field`` and a ``code``; the reader adds
the file and line.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from .columns import FLAG, apply_columns
from .errors import DataError
from .llamafactory import alpaca_messages, sharegpt_messages
from .messages import ROLES, check_messages, check_text, type_name

# Every layout read, detected per row, with the shape the unknown-layout error shows; "string" is the
# only one concatenated without a chat template.
LAYOUTS = {
    "minimind": "chosen, rejected: two message lists identical up to the final assistant answer",
    "conversational": "prompt, chosen, rejected: message lists, one assistant message per answer",
    "string": "prompt, chosen, rejected: strings, concatenated without a chat template",
    "prompt_and_conversations": "prompt: a string; chosen, rejected: full conversations (UltraFeedback-binarized)",
    "sharegpt": "conversations: {from, value} messages; chosen, rejected: one {from: gpt, value} each (LLaMA-Factory)",
    "alpaca": "instruction, optional input, system, history; chosen, rejected: strings (LLaMA-Factory)",
}
MESSAGE_LAYOUTS = tuple(name for name in LAYOUTS if name != "string")

__all__ = ["LAYOUTS", "MESSAGE_LAYOUTS", "ROLES", "canonicalise", "detect_layout", "validate_row"]


def _keys(row: dict) -> str:
    # repr() keeps the message printable even for keys with lone surrogates.
    return ", ".join(repr(k) for k in sorted(row)[:8]) + (", ..." if len(row) > 8 else "") or "none"


def _unknown_layout(row: dict) -> DataError:
    layouts = "; ".join(f"{name} ({shape})" for name, shape in LAYOUTS.items())
    return DataError(
        f"no preference layout matches this row (keys present: {_keys(row)}). hf_dpo reads: {layouts}. "
        f"For other column names pass a mapping, e.g. {FLAG} "
        '\'{"prompt": "question", "chosen": "response_j", "rejected": "response_k"}\' '
        "(DPOConfig.dataset_columns, load_preference_dataset(columns=...))",
        code="unknown_layout",
    )


def _present(row: dict, key: str) -> bool:
    return row.get(key) is not None


def detect_layout(row: Any) -> str:
    """Name the layout of one raw row (already mapped), or raise :class:`DataError` saying why it is none."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type_name(row)}", code="not_an_object")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if len(missing) == 2:
        raise _unknown_layout(row)
    if missing:
        raise DataError(f"is missing (keys present: {_keys(row)})", field=missing[0], code="missing_field")
    chosen, rejected = row["chosen"], row["rejected"]
    lists = isinstance(chosen, list) or isinstance(rejected, list)
    if _present(row, "conversations"):
        return "sharegpt"
    if _present(row, "prompt"):
        if not isinstance(row["prompt"], str):
            return "conversational"
        return "prompt_and_conversations" if lists else "string"
    if _present(row, "instruction"):
        return "alpaca"
    if lists:
        return "minimind"
    raise _unknown_layout(row)


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


def _split_minimind(row: dict[str, Any], notes: set) -> dict[str, Any]:
    chosen = check_messages(row["chosen"], "chosen", notes)
    rejected = check_messages(row["rejected"], "rejected", notes)
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


def _split_conversational(row: dict[str, Any], notes: set) -> dict[str, Any]:
    prompt = check_messages(row["prompt"], "prompt", notes)
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
        answer = check_messages(value[offset:] if offset else value, side, notes, first_role="assistant")
        _check_ends_with_answer(answer, side)
        if len(answer) > 1:
            raise DataError(
                f"expected one assistant turn, got {len(answer)} turns", field=side, code="multi_turn_answer"
            )
        sides[side] = answer
    return {"prompt": prompt, **sides}


def _split_prompt_and_conversations(row: dict[str, Any], notes: set) -> dict[str, Any]:
    """A string prompt beside full conversations: the conversations win, the string must repeat a user turn."""
    prompt_text = check_text(row["prompt"], "prompt")
    for side in ("chosen", "rejected"):
        value = row[side]
        if not isinstance(value, list):
            raise DataError(
                f"expected a full conversation, as the other side is, got {type_name(value)}",
                field=side,
                code="mixed_layouts",
            )
        if not any(isinstance(m, dict) and m.get("role") == "user" for m in value):
            raise DataError(
                "is a list of messages without a user turn but 'prompt' is a string; use one layout for all three "
                "fields (strings, or lists of messages), or give chosen and rejected as full conversations",
                field=side,
                code="mixed_layouts",
            )
    split = _split_minimind(row, notes)
    users = [m["content"].strip() for m in split["prompt"] if m["role"] == "user"]
    if prompt_text.strip() not in users:
        raise DataError(
            f"the string {prompt_text[:50]!r} is none of the user turns of chosen and rejected (the last one is "
            f"{users[-1][:50]!r}); the conversations are the prompt, so the string must repeat one of their user turns",
            field="prompt",
            code="prompt_mismatch",
        )
    return split


def _split_strings(row: dict[str, Any], notes: set) -> dict[str, Any]:
    return {
        "prompt_text": check_text(row["prompt"], "prompt"),
        "chosen_text": check_text(row["chosen"], "chosen"),
        "rejected_text": check_text(row["rejected"], "rejected"),
    }


def _split_llamafactory(reader):
    def split(row: dict[str, Any], notes: set) -> dict[str, Any]:
        prompt, chosen, rejected = reader(row, notes)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

    return split


_SPLITS = {
    "minimind": _split_minimind,
    "conversational": _split_conversational,
    "string": _split_strings,
    "prompt_and_conversations": _split_prompt_and_conversations,
    "sharegpt": _split_llamafactory(sharegpt_messages),
    "alpaca": _split_llamafactory(alpaca_messages),
}


def canonicalise(row: Any, columns: Optional[dict[str, str]] = None) -> tuple[dict[str, Any], set]:
    """``(canonical row, notes)``: ``notes`` names what the row needed (``content_parts_joined``,
    ``ignored_message_keys``), for the report. Raises :class:`DataError` (without a location) for a bad row."""
    row = apply_columns(row, columns)
    layout = detect_layout(row)
    notes: set = set()
    canonical = {
        "layout": layout,
        "prompt": [],
        "chosen": [],
        "rejected": [],
        "prompt_text": "",
        "chosen_text": "",
        "rejected_text": "",
    }
    canonical.update(_SPLITS[layout](row, notes))
    if row.get("chat_template_kwargs") is not None:
        canonical["chat_template_kwargs"] = _check_template_kwargs(row["chat_template_kwargs"])
    if _answer_text(canonical, "chosen") == _answer_text(canonical, "rejected"):
        raise DataError("chosen and rejected answers are identical", field="rejected", code="identical_responses")
    return canonical, notes


def validate_row(row: Any, columns: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Turn one raw row into the canonical layout; raise :class:`DataError` (without a location) if it is bad."""
    return canonicalise(row, columns)[0]


def _check_template_kwargs(value: Any) -> str:
    """A row's own ``chat_template_kwargs`` (an object, as TRL allows), carried as JSON text."""
    if not isinstance(value, dict):
        raise DataError(f"expected an object, got {type_name(value)}", field="chat_template_kwargs", code="bad_type")
    return json.dumps(value, sort_keys=True)


def _answer_text(canonical: dict[str, Any], side: str) -> str:
    return canonical[f"{side}_text"] if canonical["layout"] == "string" else canonical[side][0]["content"]
