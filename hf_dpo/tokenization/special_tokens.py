"""Special tokens as text: which strings a tokenizer turns into special tokens, and rows that spell them."""

from __future__ import annotations

import logging
import re

import datasets

from ..data.report import EXAMPLE_LINES, DataReport

logger = logging.getLogger(__name__)


def special_token_strings(tokenizer) -> list[str]:
    """The texts the tokenizer turns into special tokens (``<|im_end|>``, ``</s>``, ...), longest first."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            texts.add(str(token))
    return sorted((t for t in texts if t), key=len, reverse=True)


def count_special_token_text(dataset: datasets.Dataset, tokenizer, report: DataReport) -> int:
    """Count the rows whose content spells a special token, e.g. a literal ``<|im_end|>`` in an answer.

    Policy (docs/data.md): such rows are kept. The tokenizer turns the text into
    the special token, exactly as it does at inference when a chat template
    renders the conversation, and the response mask is positional (every token
    after the prompt's tokens), so a marker inside an answer stays inside the
    scored span. The count goes to ``report.counters["special_token_text"]``,
    up to three example locations to ``report.counter_examples``, and one warning
    is logged. Returns the count.
    """
    specials = special_token_strings(tokenizer)
    if not specials:
        return 0
    # One alternation, longest first, searched once per row: C speed on large data sets.
    pattern = re.compile("|".join(map(re.escape, specials)))
    found, examples = 0, []
    columns = [
        c
        for c in ("prompt", "chosen", "rejected", "prompt_text", "chosen_text", "rejected_text")
        if c in dataset.column_names
    ]
    for batch in dataset.select_columns(["row_id", *columns]).iter(batch_size=1024):
        for i, row_id in enumerate(batch["row_id"]):
            texts = [batch[c][i] or "" for c in columns if c.endswith("_text")]
            texts += [m["content"] or "" for c in columns if not c.endswith("_text") for m in batch[c][i] or []]
            hit = pattern.search("\n".join(texts))
            if hit is None:
                continue
            found += 1
            if len(examples) < EXAMPLE_LINES:
                examples.append(f"{report.where(row_id)} {hit.group()}")
    if found:
        report.counters["special_token_text"] += found
        report.counter_examples["special_token_text"] = examples
        logger.warning(
            "%d rows contain the text of a special token (e.g. %s); it is tokenized as that token and, inside an "
            "answer, scored as part of the answer (docs/data.md)",
            found,
            ", ".join(examples),
        )
    return found
