"""What a chat template does to a conversation: the prompt, the answer span, and rewrites.

The scoring rule (docs/data.md): the unscored part of a sequence is the inference-time
prompt, ``apply_chat_template(prompt, add_generation_prompt=True)``; the scored part is
the answer as written plus the template's end-of-turn text, nothing after it.

The end-of-turn text is discovered from the template itself by rendering probe
conversations whose answer is a sentinel: the text after an answer that ends the
conversation and the text after an answer followed by another user turn share the
end-of-turn marker and differ where the next turn (or a trailing extra such as
Phi-3.5's ``<|endoftext|>`` or Llama-3's appended assistant header) begins. The marker
is kept up to and including its first special token and the whitespace right after it
(ChatML's ``<|im_end|>\\n``), which is exactly what the finished conversation renders
after an answer on the plain templates, so those keep the token-prefix method.

Where the full render is not ``prompt + answer + end-of-turn`` (the generation prompt is
not a prefix, the template moved text of the prompt, or it rewrote the answer), the
response is built as ``answer + end-of-turn`` after the inference prompt and the pair is
counted under ``template_rewrites`` by kind (:data:`REWRITE_KINDS`).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from ..data.errors import DataError
from .special_tokens import special_token_strings

# Sentinels differ in their first and last characters, so the common prefix and suffix
# of two renders stop exactly at the answer's edges.
_SENTINELS = ("Qsentinelq", "Zsentinelz")

REWRITE_KINDS = {
    "generation_prompt_not_prefix": "the generation prompt is not a prefix of the finished conversation (e.g. it ends with <think>)",
    "prompt_rendered_differently": "the prompt renders differently once the answer follows (e.g. the system text moves)",
    "trailing_text_dropped": "the template appends text after the end-of-turn marker (not scored)",
    "answer_trimmed": "the template strips whitespace around the answer (the answer is scored as written)",
    "text_inserted_before_answer": "the template inserts text before the answer (e.g. an empty think block); not scored",
    "reasoning_removed": "the template drops the answer's reasoning; the answer is scored with it, as written",
}


def render(tokenizer, messages: list[dict], add_generation_prompt: bool, kwargs: Optional[dict] = None) -> str:
    """``apply_chat_template`` as text; template failures become a :class:`DataError` (``template_error``)."""
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **(kwargs or {})
        )
    except Exception as err:  # Jinja raises many types; the row and the reason matter, not the type.
        raise DataError(f"the chat template failed: {type(err).__name__}: {err}", code="template_error") from None


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


_EOT_CACHE: dict[tuple, tuple[str, str]] = {}


def _turn_edges(tokenizer, kwargs: Optional[dict]) -> tuple[str, str]:
    key = (tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, json.dumps(kwargs or {}, sort_keys=True))
    if key in _EOT_CACHE:
        return _EOT_CACHE[key]
    user = {"role": "user", "content": "Hello there"}
    finals, middles = [], []
    for s in _SENTINELS:
        answer = {"role": "assistant", "content": s}
        finals.append(render(tokenizer, [user, answer], False, kwargs))
        middles.append(render(tokenizer, [user, answer, {"role": "user", "content": "And then"}], False, kwargs))
    if not all(s in text for s, text in zip(_SENTINELS, finals)) or _SENTINELS[0] not in middles[0]:
        raise DataError(
            f"the chat template does not render an assistant answer as written (the probe answer {_SENTINELS[0]!r} "
            f"became {finals[0][-80:]!r}), so the answer and its end of turn cannot be located",
            code="template_mismatch",
        )
    generation = render(tokenizer, [user], True, kwargs)
    between = finals[0][len(generation) : finals[0].index(_SENTINELS[0])] if finals[0].startswith(generation) else ""
    lead = between if not between.strip() else ""
    tail_final = finals[0][len(finals[0]) - _common_suffix(*finals) :]
    tail_mid = middles[0][middles[0].index(_SENTINELS[0]) + len(_SENTINELS[0]) :]
    shared = tail_final[: _common_prefix(tail_final, tail_mid)]
    hits = [
        (shared.find(special), -len(special), special)
        for special in special_token_strings(tokenizer)
        if special in shared
    ]
    eot = shared
    if hits:
        at, _, special = min(hits)
        eot = shared[: at + len(special)]
        rest = shared[len(eot) :]
        eot += rest[: len(rest) - len(rest.lstrip())]
    if not eot:
        raise DataError(
            "the chat template writes nothing after an assistant answer, so the end of a turn cannot be scored",
            code="template_mismatch",
        )
    _EOT_CACHE[key] = (lead, eot)
    return lead, eot


def end_of_turn_text(tokenizer, kwargs: Optional[dict] = None) -> str:
    """What the template writes right after an assistant answer (ChatML: ``<|im_end|>\\n``), found by probing.

    Raises :class:`DataError` (``template_mismatch``) for a template that does not render a probe answer as written.
    """
    return _turn_edges(tokenizer, kwargs)[1]


def _classify(answer: str, prompt_text: str, full_text: str, eot: str) -> str:
    tail = full_text[len(prompt_text) :]
    if tail.startswith(answer + eot):
        return "trailing_text_dropped"
    if tail.startswith(answer.strip() + eot) or tail.strip() == (answer.strip() + eot).strip():
        return "answer_trimmed"
    if (
        "</think>" in answer
        and answer.split("</think>")[-1].strip() in tail
        and answer.split("</think>")[0] not in tail
    ):
        return "reasoning_removed"
    if answer.strip() in tail:
        return "text_inserted_before_answer"
    raise DataError(
        f"the chat template rewrote the answer beyond recognition: it rendered {tail[:80]!r} after the prompt "
        f"for the answer {answer[:60]!r}",
        code="template_mismatch",
    )


def final_response_text(
    tokenizer, prompt: list[dict], answer: str, prompt_text: str, kwargs: Optional[dict] = None
) -> tuple[str, str]:
    """``(response_text, rewrite_kind)``: the text scored after ``prompt_text``; kind ``""`` when the template's own render gives it."""
    lead, eot = _turn_edges(tokenizer, kwargs)
    full_text = render(tokenizer, prompt + [{"role": "assistant", "content": answer}], False, kwargs)
    answer = lead + answer
    if full_text.startswith(prompt_text) and full_text[len(prompt_text) :] == answer + eot:
        return answer + eot, ""
    if full_text.startswith(prompt_text):
        return answer + eot, _classify(answer, prompt_text, full_text, eot)
    bare = render(tokenizer, prompt, False, kwargs)
    if full_text.startswith(bare) and prompt_text.startswith(bare):
        # The generation prompt may already hold the answer's opening (R1-Distill's "<think>\n"):
        # the model generates only what follows it, so that overlap is not scored twice.
        opening = prompt_text[len(bare) :]
        overlap = max((n for n in range(len(opening) + 1) if answer.startswith(opening[len(opening) - n :])), default=0)
        return answer[overlap:] + eot, "generation_prompt_not_prefix"
    return answer + eot, "prompt_rendered_differently"


def earlier_answer_spans(
    tokenizer, prompt: list[dict], prompt_text: str, kwargs: Optional[dict] = None
) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` in ``prompt_text`` of each earlier assistant turn, end-of-turn included.

    Each span is located by rendering the prompt with that answer replaced by two
    sentinels (what precedes and follows the answer), then verified against
    ``prompt_text``: the text between must be the answer (or the template's rendering
    of it: trimmed, reasoning removed) and be followed by the end-of-turn text.
    """
    lead, eot = _turn_edges(tokenizer, kwargs)
    spans = []
    for j, message in enumerate(prompt):
        if message["role"] != "assistant":
            continue
        probes = [
            render(tokenizer, prompt[:j] + [{"role": "assistant", "content": s}] + prompt[j + 1 :], True, kwargs)
            for s in _SENTINELS
        ]
        before, after = _common_prefix(*probes), _common_suffix(*probes)
        head, tail = probes[0][:before], probes[0][len(probes[0]) - after :]
        body = (
            prompt_text[len(head) : len(prompt_text) - len(tail)]
            if prompt_text.startswith(head) and prompt_text.endswith(tail)
            else None
        )
        content = message["content"]
        if (
            body is None
            or not tail.startswith(eot)
            or (body.strip() not in content)
            or (content.strip() and not body.strip())
        ):
            raise DataError(
                f"completion_turns='all': the chat template renders the assistant turn {j} differently depending on "
                "the rest of the conversation, so its span in the prompt cannot be verified",
                code="template_mismatch",
            )
        start = len(head) - len(lead) if lead and head.endswith(lead) else len(head)
        spans.append((start, len(head) + len(body) + len(eot)))
    return spans


def template_kwargs(config_kwargs: Optional[dict], row: dict[str, Any]) -> dict:
    """The template keyword arguments for one row: the config's, updated by the row's own ``chat_template_kwargs``."""
    merged = dict(config_kwargs or {})
    row_kwargs = row.get("chat_template_kwargs")
    if isinstance(row_kwargs, str) and row_kwargs:
        row_kwargs = json.loads(row_kwargs)
    merged.update(row_kwargs or {})
    return merged


def leading_text(tokenizer, prompt: list[dict], prompt_text: str, kwargs: Optional[dict] = None) -> str:
    """The template's text before the first message's content (BOS, headers, a default system text).

    Found by rendering the prompt with the first message's content replaced by a
    sentinel; "" when the render around the sentinel is not a prefix of ``prompt_text``.
    """
    probe = [dict(prompt[0], content=_SENTINELS[0])] + list(prompt[1:])
    text = render(tokenizer, probe, True, kwargs)
    if text.count(_SENTINELS[0]) != 1:
        return ""
    head = text[: text.index(_SENTINELS[0])]
    return head if prompt_text.startswith(head) else ""


_SYSTEM_CACHE: dict[tuple, str] = {}


def default_system_text(tokenizer, kwargs: Optional[dict] = None) -> str:
    """The text the template writes in place of a system turn when a conversation has none; "" if it writes none.

    Found by rendering a probe conversation twice, without a system turn and with one whose
    content is a sentinel: when the first render equals the second with the sentinel replaced
    by some text, the template added that text (SmolLM2's "You are a helpful AI assistant
    named SmolLM, ...", Qwen2.5's "You are Qwen, ..."). Text a template writes on every
    conversation alike (Llama 3.1's date lines) is its fixed markup and gives "".
    """
    key = (tokenizer.chat_template, json.dumps(kwargs or {}, sort_keys=True))
    if key not in _SYSTEM_CACHE:
        user = [{"role": "user", "content": "Hello there"}]
        try:
            bare = render(tokenizer, user, True, kwargs)
            system = render(tokenizer, [{"role": "system", "content": _SENTINELS[0]}, *user], True, kwargs)
        except DataError:  # a template without system turns adds none either
            bare = system = ""
        added = ""
        if system.count(_SENTINELS[0]) == 1:
            head, tail = system.split(_SENTINELS[0])
            if bare.startswith(head) and bare.endswith(tail) and len(bare) >= len(head) + len(tail):
                added = bare[len(head) : len(bare) - len(tail)]
        _SYSTEM_CACHE[key] = added if added.strip() else ""
    return _SYSTEM_CACHE[key]


def template_added_system(tokenizer, prompt: list[dict], prompt_text: str, kwargs: Optional[dict] = None) -> str:
    """The default system text the template put into this row's rendered prompt, or "" (see :func:`default_system_text`).

    Counted only where the row has no system turn, the rendered prompt holds the text and no
    message of the row does.
    """
    added = default_system_text(tokenizer, kwargs)
    if not added or any(m["role"] == "system" for m in prompt) or added not in prompt_text:
        return ""
    return "" if any(added in m["content"] for m in prompt) else added
