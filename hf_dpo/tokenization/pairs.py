"""Canonical preference rows -> token ids and a token-level response mask.

The response span is found by comparing token ids: the rendered prompt (with
the generation prompt) is tokenized, the rendered full conversation is
tokenized, and the response is whatever follows the prompt's tokens. It
therefore includes the template's end-of-turn tokens. When the prompt's tokens
are not a prefix of the full tokens (a byte-level BPE merge across the
boundary), the response text is tokenized on its own and appended to the
prompt's tokens; such pairs are counted as ``boundary_merges``. Chosen and
rejected always share the exact same prompt tokens.

Truncation treats the pair as one: the prompt loses its oldest tokens down to
``max_prompt_length`` (keeping the template's leading tokens: BOS and anything before
the first message's text, up to half the limit), then each response is cut from the right to fit
``max_length``. A pair whose response would keep no token is skipped and counted.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import datasets

from ..common.columns import TOKENIZED_COLUMNS
from ..data import DataError, DataReport, data_report
from ..data.report import EXAMPLE_LINES
from .special_tokens import count_special_token_text
from .templates import (
    earlier_answer_spans,
    final_response_text,
    leading_text,
    render,
    template_added_system,
    template_kwargs,
)

logger = logging.getLogger(__name__)

STAT_COLUMNS = (
    "skip_reason",
    "prompt_tokens",
    "chosen_tokens",
    "rejected_tokens",
    "prompt_truncated",
    "responses_truncated",
    "boundary_merges",
    "template_rewrite",
    "template_added_system",
)


def _encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    # verbose=False: no "sequence length is longer than the maximum" warning for text that truncation cuts anyway.
    return tokenizer(text, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


def _response_ids(tokenizer, prompt_text: str, prompt_ids: list[int], full_text: str) -> tuple[list[int], bool]:
    """Tokens of ``full_text`` after the prompt, and whether a boundary merge forced a separate tokenization."""
    full_ids = _encode(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids) :], False
    return _encode(tokenizer, full_text[len(prompt_text) :]), True


def _earlier_answer_mask(
    tokenizer, prompt: list[dict], prompt_text: str, prompt_ids: list[int], kwargs: dict
) -> list[int]:
    """For ``completion_turns="all"``: 1 on the tokens of every earlier assistant turn, its end-of-turn included.

    The spans come from :func:`hf_dpo.tokenization.templates.earlier_answer_spans` (verified against
    ``prompt_text``); a token is scored only if it lies wholly inside a span, so no token
    of the next turn is ever scored.
    """
    spans = earlier_answer_spans(tokenizer, prompt, prompt_text, kwargs)
    encoded = tokenizer(prompt_text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    if encoded["input_ids"] != prompt_ids:
        raise DataError(
            "the prompt tokenizes differently with offsets; cannot place earlier answers", code="template_mismatch"
        )
    mask = [0] * len(prompt_ids)
    for start, end in spans:
        for t, (a, b) in enumerate(encoded["offset_mapping"]):
            if a >= start and b <= end and b > a:
                mask[t] = 1
    return mask


def _render_pair(row: dict[str, Any], tokenizer, completion_turns: str, chat_template_kwargs: Optional[dict] = None):
    """``(prompt_ids, prompt_mask, {side: response_ids}, boundary_merges, rewrite_kind, kept_head, added_system)``
    for one canonical row.

    ``kept_head`` is the number of leading prompt tokens that prompt truncation keeps; ``added_system``
    the default system text the template wrote into the prompt ("" if none).
    """
    rewrite = added = ""
    if row["layout"] == "string":
        # Raw concatenation; the tokenizer adds BOS to the prompt if it is configured to.
        prompt_text = row["prompt_text"]
        prompt_ids = _encode(tokenizer, prompt_text, add_special_tokens=True)
        prompt_mask = [0] * len(prompt_ids)
        full_texts = {side: prompt_text + row[f"{side}_text"] for side in ("chosen", "rejected")}
        head = _leading_specials(tokenizer, prompt_ids)
    else:
        kwargs = template_kwargs(chat_template_kwargs, row)
        prompt_text = render(tokenizer, row["prompt"], True, kwargs)
        prompt_ids = _encode(tokenizer, prompt_text)
        prompt_mask = (
            _earlier_answer_mask(tokenizer, row["prompt"], prompt_text, prompt_ids, kwargs)
            if completion_turns == "all"
            else [0] * len(prompt_ids)
        )
        head = _head_tokens(tokenizer, leading_text(tokenizer, row["prompt"], prompt_text, kwargs), prompt_ids)
        added = template_added_system(tokenizer, row["prompt"], prompt_text, kwargs)
        full_texts = {}
        for side in ("chosen", "rejected"):
            response_text, kind = final_response_text(
                tokenizer, row["prompt"], row[side][0]["content"], prompt_text, kwargs
            )
            full_texts[side] = prompt_text + response_text
            rewrite = rewrite or kind  # counted per pair, by the first kind seen
    responses, merges = {}, 0
    for side, full_text in full_texts.items():
        if row["layout"] == "string":
            ids, merged = _response_ids_string(tokenizer, prompt_ids, full_text, len(prompt_text))
            ids = ids + [tokenizer.eos_token_id]
        else:
            ids, merged = _response_ids(tokenizer, prompt_text, prompt_ids, full_text)
        responses[side] = ids
        merges = max(merges, int(merged))  # counted per pair, as documented, not per side
    return prompt_ids, prompt_mask, responses, merges, rewrite, head, added


def _leading_specials(tokenizer, ids: list[int]) -> int:
    special = set(tokenizer.all_special_ids)
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def _head_tokens(tokenizer, head_text: str, prompt_ids: list[int]) -> int:
    """Tokens of the template's leading text (BOS and anything before the first message's text)."""
    head_ids = _encode(tokenizer, head_text) if head_text else []
    if head_ids and prompt_ids[: len(head_ids)] == head_ids:
        return len(head_ids)
    return _leading_specials(tokenizer, prompt_ids)


def _truncate_prompt(ids: list[int], mask: list[int], head: int, limit: int) -> tuple[list[int], list[int]]:
    """Drop the oldest prompt tokens down to ``limit``, keeping the first ``head`` (the template's leading tokens).

    When the head alone would not leave room for a newer token, only the leading special
    tokens' share of it that fits is kept (at most half the limit), so the generation
    prompt at the end always survives.
    """
    head = min(head, limit // 2)
    tail = limit - head
    return ids[:head] + ids[len(ids) - tail :], mask[:head] + mask[len(mask) - tail :]


def _response_ids_string(tokenizer, prompt_ids: list[int], full_text: str, prompt_chars: int) -> tuple[list[int], bool]:
    full_ids = _encode(tokenizer, full_text, add_special_tokens=True)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids) :], False
    return _encode(tokenizer, full_text[prompt_chars:]), True


def tokenize_row(
    row: dict[str, Any],
    tokenizer,
    max_length: Optional[int] = None,
    max_prompt_length: Optional[int] = None,
    completion_turns: str = "last",
    chat_template_kwargs: Optional[dict] = None,
) -> dict[str, Any]:
    """Tokenize one canonical pair.

    Returns the four :data:`TOKENIZED_COLUMNS` (equal-length id and 0/1 mask lists
    per side, mask 1 on scored tokens), ``prompt_length`` (shared prompt tokens
    after truncation), and the statistics in :data:`STAT_COLUMNS`;
    ``skip_reason`` is ``""`` for a usable pair.
    """
    prompt_ids, prompt_mask, responses, merges, rewrite, head, added = _render_pair(
        row, tokenizer, completion_turns, chat_template_kwargs
    )
    prompt_tokens = len(prompt_ids)
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids, prompt_mask = _truncate_prompt(prompt_ids, prompt_mask, head, max_prompt_length)
    out: dict[str, Any] = {
        "prompt_length": len(prompt_ids),
        "skip_reason": "",
        "prompt_tokens": prompt_tokens,
        "prompt_truncated": len(prompt_ids) < prompt_tokens,
        "responses_truncated": 0,
        "boundary_merges": merges,
        "template_rewrite": rewrite,
        "template_added_system": added,
    }
    budget = None if max_length is None else max_length - len(prompt_ids)
    for side, response in responses.items():
        out[f"{side}_tokens"] = len(response)
        if budget is not None and len(response) > budget:
            response = response[: max(budget, 0)]
            out["responses_truncated"] += 1
        if not response or not prompt_ids:
            # A first token at position 0 has no logits predicting it, so an empty prompt scores nothing either.
            out["skip_reason"] = "response_truncated_away" if prompt_ids else "empty_prompt"
        out[f"{side}_input_ids"] = prompt_ids + response
        out[f"{side}_response_mask"] = prompt_mask + [1] * len(response)
    if not out["skip_reason"] and out["chosen_input_ids"] == out["rejected_input_ids"]:
        # Truncation cut both answers to the same tokens: like identical answers, only ln 2 and no gradient.
        out["skip_reason"] = "identical_after_truncation"
    return out


def _failed_row(code: str) -> dict[str, Any]:
    # Placeholder ids keep the columns' types stable for datasets; the filter drops the row.
    return {
        **{column: [0] for column in TOKENIZED_COLUMNS},
        "prompt_length": 0,
        "skip_reason": code,
        "prompt_tokens": 0,
        "chosen_tokens": 0,
        "rejected_tokens": 0,
        "prompt_truncated": False,
        "responses_truncated": 0,
        "boundary_merges": 0,
        "template_rewrite": "",
        "template_added_system": "",
    }


def _summarise(stats: datasets.Dataset, report: DataReport) -> None:
    for reason, row_id in zip(stats["skip_reason"], stats["row_id"]):
        if reason:
            report.skip(reason, report.where(row_id))
    report.counters["prompts_truncated"] += sum(stats["prompt_truncated"])
    report.counters["responses_truncated"] += sum(stats["responses_truncated"])
    report.counters["boundary_merges"] += sum(stats["boundary_merges"])
    for kind in stats["template_rewrite"]:
        if kind:
            report.counters["template_rewrites"] += 1
            report.counters[f"template_rewrites.{kind}"] += 1
    # Counted per pair, like the rewrites; the distinct texts (one per template and kwargs) are the examples.
    texts = report.counter_examples.setdefault("template_added_system", [])
    for text, skipped in zip(stats["template_added_system"], stats["skip_reason"]):
        if text and not skipped:
            report.counters["template_added_system"] += 1
            if repr(text) not in texts and len(texts) < EXAMPLE_LINES:
                texts.append(repr(text))
    if not texts:
        del report.counter_examples["template_added_system"]


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    max_length: Optional[int] = None,
    max_prompt_length: Optional[int] = None,
    completion_turns: str = "last",
    num_proc: Optional[int] = None,
    report: Optional[DataReport] = None,
    on_bad_row: str = "error",
    chat_template_kwargs: Optional[dict] = None,
) -> tuple[datasets.Dataset, DataReport]:
    """Tokenize a canonical data set (from :func:`hf_dpo.load_preference_dataset`) and drop untrainable pairs.

    Returns the tokenized data set (columns :data:`TOKENIZED_COLUMNS`, ``prompt_length``,
    ``row_id``) and the :class:`DataReport` extended with tokenization counts.
    Raises :class:`DataError` naming the row when a template fails (with
    ``on_bad_row="skip"``: counts and skips it) or when nothing is left.
    """
    if completion_turns not in ("last", "all"):
        raise ValueError(f"completion_turns: expected 'last' or 'all', got {completion_turns!r}")
    if any(layout != "string" for layout in dataset.unique("layout")) and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat_template, which message rows need; set tokenizer.chat_template")
    if report is None:
        report = data_report(dataset)
        if report is None:
            report = DataReport(rows_read=len(dataset), rows_kept=len(dataset))
        elif report.rows_kept != len(dataset):
            # A selected or filtered subset keeps its parent's description: its rows are still located as
            # file:line, but its counts no longer apply.
            report = report.subset(len(dataset), f"{len(dataset)} of the {report.rows_kept} pairs read")

    def encode(row):
        try:
            return tokenize_row(row, tokenizer, max_length, max_prompt_length, completion_turns, chat_template_kwargs)
        except DataError as err:
            if on_bad_row != "skip":
                raise err.at(*report.locate(row["row_id"]), report.unit(row["row_id"])) from None
            return _failed_row(err.code)

    count_special_token_text(dataset, tokenizer, report)
    tokenized = dataset.map(
        encode,
        num_proc=num_proc,
        desc="Tokenizing pairs",
        remove_columns=[c for c in dataset.column_names if c != "row_id"],
    )
    _summarise(
        tokenized.select_columns(
            [
                "skip_reason",
                "row_id",
                "prompt_truncated",
                "responses_truncated",
                "boundary_merges",
                "template_rewrite",
                "template_added_system",
            ]
        ),
        report,
    )
    # Untrainable pairs go by index: a filter() pass would draw a progress bar for a few milliseconds' work.
    reasons = list(tokenized["skip_reason"])
    kept = tokenized.select([i for i, reason in enumerate(reasons) if not reason]) if any(reasons) else tokenized
    report.counters["pairs_tokenized"] += len(kept)
    if len(kept) == 0:
        raise DataError(
            f"no pair survived tokenization; skipped: {report.describe_skips()}",
            source=", ".join(report.sources),
            code="empty_source",
        )
    _log_lengths(kept, report)
    return kept.remove_columns(
        [c for c in STAT_COLUMNS if c not in ("prompt_tokens", "chosen_tokens", "rejected_tokens")]
    ), report


def _log_lengths(kept: datasets.Dataset, report: DataReport) -> None:
    for column in ("prompt_tokens", "chosen_tokens", "rejected_tokens"):
        values = sorted(kept[column])
        report.counters[f"{column}_min"] = values[0]
        report.counters[f"{column}_median"] = values[len(values) // 2]
        report.counters[f"{column}_max"] = values[-1]
