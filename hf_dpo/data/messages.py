"""One message list of a raw row -> ``[{"role", "content"}]`` with string contents, or a :class:`DataError`.

Two message forms are read: ``{"role", "content"}`` (OpenAI, TRL, MiniMind) and, in
LLaMA-Factory's sharegpt rows, ``{"from", "value"}`` with the roles ``human``, ``gpt``
and ``system``. A content is a string, or a list of typed parts (the HF processors' and
OpenAI's form): its ``{"type": "text", "text": ...}`` parts are joined with ``"\\n"``,
as vLLM joins them for the chat templates that expect a string (text templates render a
list content as its Python repr); any other part (image, audio) is refused, since
multimodal pairs are not supported.

What a row's messages needed besides the plain checks (several text parts joined,
message keys not rendered) goes into ``notes``, a set the reader turns into report counters.
"""

from __future__ import annotations

from typing import Any

from .errors import DataError

ROLES = ("system", "user", "assistant")
# LLaMA-Factory's default sharegpt role tags (its dataset_info "tags"), and what each becomes.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# Tool turns: LLaMA-Factory's sharegpt tags and the OpenAI role; hf_dpo renders no tools.
TOOL_ROLES = ("function_call", "observation", "tool", "function")
TEXT_PART_JOINER = "\n"
# Keys of a message that are rendered; any other key with a value is counted as not rendered.
MESSAGE_KEYS = {"role", "content", "from", "value"}


def type_name(value: Any) -> str:
    """The JSON name of a Python value's type, for messages."""
    return {
        type(None): "null",
        bool: "bool",
        int: "int",
        float: "float",
        str: "string",
        list: "list",
        dict: "object",
    }.get(type(value), type(value).__name__)


def check_text(value: Any, field_name: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type_name(value)}", field=field_name, code="bad_type")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError("contains a lone surrogate (invalid Unicode)", field=field_name, code="invalid_text") from None
    if not allow_empty and not value.strip():
        raise DataError("is empty or whitespace only", field=field_name, code="empty_content")
    return value


def refuse_multimodal(what: str, field_name: str) -> DataError:
    return DataError(
        f"{what}: multimodal pairs are not supported (hf_dpo trains text-only causal language models); "
        "keep text only or drop the row",
        field=field_name,
        code="multimodal",
    )


def check_content(value: Any, field_name: str, notes: set) -> str:
    """A message content as one string: a string as is, or the text parts of a typed-part list joined."""
    if not isinstance(value, list):
        if isinstance(value, dict):
            raise DataError("expected a string or a list of typed parts, got object", field=field_name, code="bad_type")
        return check_text(value, field_name)
    if not value:
        raise DataError("is an empty list of parts", field=field_name, code="empty_content")
    texts = []
    for i, part in enumerate(value):
        where = f"{field_name}[{i}]"
        if not isinstance(part, dict):
            raise DataError(f"expected a typed part object, got {type_name(part)}", field=where, code="bad_type")
        kind = part.get("type")
        if kind is None:
            raise DataError(
                "missing 'type' (a part is {'type': 'text', 'text': ...})", field=where, code="missing_field"
            )
        if kind != "text":
            raise refuse_multimodal(f"a {kind!r} part", f"{where}.type")
        if any(v is not None for k, v in part.items() if k not in ("type", "text")):
            notes.add("ignored_message_keys")
        texts.append(check_text(part.get("text"), f"{where}.text", allow_empty=True))
    if len(texts) > 1:
        notes.add("content_parts_joined")
    return check_text(TEXT_PART_JOINER.join(texts), field_name)


def check_message(message: Any, where: str, notes: set, sharegpt: bool = False) -> dict[str, str]:
    """One message -> ``{"role", "content"}``; ``sharegpt`` also reads ``{"from", "value"}`` and its role tags."""
    if not isinstance(message, dict):
        raise DataError(f"expected a message object, got {type_name(message)}", field=where, code="bad_type")
    role_key, content_key, names = "role", "content", {r: r for r in ROLES}
    if sharegpt and message.get("from") is not None:
        role_key, content_key, names = "from", "value", SHAREGPT_ROLES
    if role_key not in message:
        raise DataError(f"missing {role_key!r}", field=where, code="missing_field")
    if content_key not in message:
        raise DataError(f"missing {content_key!r}", field=where, code="missing_field")
    role = message[role_key]
    if isinstance(role, str) and role in TOOL_ROLES:
        raise DataError(
            f"a {role!r} turn: tool calls and tool results are not supported (hf_dpo renders plain chat with the "
            "model's chat template, without tools); drop the row or its tool turns",
            field=f"{where}.{role_key}",
            code="tool_turn",
        )
    if not isinstance(role, str) or role not in names:
        raise DataError(
            f"unsupported role {role!r}; expected one of {list(names)}", field=f"{where}.{role_key}", code="bad_role"
        )
    if any(v is not None for k, v in message.items() if k not in MESSAGE_KEYS):
        # Keys whose value is None do not count: Arrow sources give every message every key of its column.
        notes.add("ignored_message_keys")
    return {"role": names[role], "content": check_content(message[content_key], f"{where}.{content_key}", notes)}


def check_messages(
    value: Any, field_name: str, notes: set, first_role: str = "user", sharegpt: bool = False
) -> list[dict[str, str]]:
    """A list of messages, role order checked (:func:`check_role_order`)."""
    if not isinstance(value, list):
        raise DataError(f"expected a list of messages, got {type_name(value)}", field=field_name, code="bad_type")
    if not value:
        raise DataError("is an empty list", field=field_name, code="empty_content")
    messages = [check_message(m, f"{field_name}[{i}]", notes, sharegpt) for i, m in enumerate(value)]
    check_role_order(messages, field_name, first_role)
    return messages


def check_role_order(messages: list[dict[str, str]], field_name: str, first_role: str) -> None:
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
