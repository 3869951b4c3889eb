"""``padding_free="auto"`` and ``share_prompt="auto"``: choose the layouts that compute fewer tokens.

A layout set to ``"auto"`` (the default) is turned on when the training data make it
compute meaningfully fewer tokens than the padded batch, estimated from the tokenized
train set at the configured batch size:

* ``share_prompt``: when the prompts are at least :data:`MIN_SAVING` of the tokens (each
  pair's prompt is then computed once instead of twice);
* ``padding_free``: when padding is at least :data:`MIN_SAVING` of the padded batch. On
  SDPA/eager attention the rows are bounded by the batch's longest sequence
  (``padding_free_max_row_tokens=1``), so the dense mask never costs more than the padded one.

Either is kept only where the model passes the first-batch check of
:mod:`hf_dpo.layout_check`; an automatic layout that fails it is turned off for that
model with one WARNING (the batch is scored in the padded layout instead).
Explicit ``True``/``False`` keep their meaning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

from .scoring import MASK_4D_IMPLEMENTATIONS, attention_implementation

logger = logging.getLogger(__name__)

AUTO = "auto"
# A layout must save at least this share of the computed tokens to be chosen.
MIN_SAVING = 0.1
# Rows of the train set looked at to estimate the savings.
SAMPLE_ROWS = 2048


def parse_auto_bool(name: str, value: Union[str, bool, None]) -> Union[str, bool]:
    """``True``/``False``/``"auto"`` from a bool or a command-line string (true/false/auto, yes/no, 1/0)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text == AUTO:
        return AUTO
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ValueError(f"--{name}: got {value!r}; choose auto, true or false")


@dataclass
class LayoutChoice:
    """The layouts a trainer uses, after ``"auto"`` was resolved; ``explicit`` when the user asked for the active ones."""

    padding_free: bool
    share_prompt: bool
    pad_to_multiple_of: Optional[int]
    padding_free_max_row_tokens: Optional[int]
    explicit: bool
    reason: str = ""

    @property
    def name(self) -> Optional[str]:
        parts = [n for n in ("padding_free", "share_prompt") if getattr(self, n)]
        if parts == ["padding_free"] and self.padding_free_max_row_tokens:
            return f"padding_free (padding_free_max_row_tokens={self.padding_free_max_row_tokens})"
        return "+".join(parts) or None


def token_savings(dataset, batch_size: int, share_prompt: bool) -> tuple[float, float]:
    """``(prompt share, padding share)`` of the computed tokens over the first :data:`SAMPLE_ROWS` pairs.

    The prompt share is ``sum(prompt) / sum(|chosen| + |rejected|)``; the padding share is
    ``1 - real / padded`` over consecutive batches of ``batch_size`` pairs, of the units the
    layout pads (sequences, or ``[prompt | chosen | rejected]`` with ``share_prompt``).
    """
    n = min(len(dataset), SAMPLE_ROWS)
    if n == 0:
        return 0.0, 0.0
    sample = dataset.select(range(n))
    chosen = [len(x) for x in sample["chosen_input_ids"]]
    rejected = [len(x) for x in sample["rejected_input_ids"]]
    prompts = sample["prompt_length"] if "prompt_length" in sample.column_names else [0] * n
    total = sum(chosen) + sum(rejected)
    prompt_share = sum(prompts) / total if total else 0.0
    real = padded = 0
    for start in range(0, n, batch_size):
        span = slice(start, start + batch_size)
        if share_prompt:
            units = [c + r - p for c, r, p in zip(chosen[span], rejected[span], prompts[span])]
        else:
            units = chosen[span] + rejected[span]
        real += sum(units)
        padded += len(units) * max(units)
    return prompt_share, (1 - real / padded if padded else 0.0)


def choose_layouts(args, model, dataset, packed_refusal: Optional[str] = None) -> LayoutChoice:
    """Resolve ``args.padding_free`` / ``args.share_prompt`` (True, False or "auto") for ``model`` and the train set.

    ``packed_refusal``: why this run cannot use a packed or shared-prompt layout (then "auto" means off).
    """
    padding_free, share_prompt = args.padding_free, args.share_prompt
    max_row_tokens = args.padding_free_max_row_tokens
    auto = [n for n, v in (("padding_free", padding_free), ("share_prompt", share_prompt)) if v == AUTO]
    reasons = []
    if auto and packed_refusal:
        padding_free = False if padding_free == AUTO else padding_free
        share_prompt = False if share_prompt == AUTO else share_prompt
        reasons.append(packed_refusal)
    elif auto:
        can_share = dataset is not None and "prompt_length" in dataset.column_names
        implementation = attention_implementation(model)
        prompt_share, padding_share = (0.0, 0.0)
        if dataset is not None:
            prompt_share, _ = token_savings(dataset, args.per_device_train_batch_size, False)
        if share_prompt == AUTO:
            share_prompt = can_share and implementation in MASK_4D_IMPLEMENTATIONS and prompt_share >= MIN_SAVING
            reasons.append(f"prompts are {prompt_share:.0%} of the tokens")
        if padding_free == AUTO:
            if dataset is not None:
                _, padding_share = token_savings(dataset, args.per_device_train_batch_size, share_prompt)
            padding_free = padding_share >= MIN_SAVING
            reasons.append(f"padding is {padding_share:.0%} of the padded batch")
            if padding_free and max_row_tokens is None and implementation in MASK_4D_IMPLEMENTATIONS:
                max_row_tokens = 1  # rows bounded by the longest sequence: the dense mask stays below the padded cost
    explicit = padding_free is True and "padding_free" not in auto or share_prompt is True and "share_prompt" not in auto
    return LayoutChoice(
        padding_free=bool(padding_free),
        share_prompt=bool(share_prompt),
        pad_to_multiple_of=args.pad_to_multiple_of,
        padding_free_max_row_tokens=max_row_tokens if padding_free else None,
        explicit=explicit,
        reason="; ".join(reasons),
    )


def log_choice(choice: LayoutChoice, args) -> None:
    """Say once which layouts the run uses, and why when they were chosen automatically."""
    auto = [n for n in ("padding_free", "share_prompt") if getattr(args, n) == AUTO]
    logger.info(
        "batch layout: padding_free=%s (rows of at most %s), share_prompt=%s%s",
        choice.padding_free,
        "the longest sequence" if choice.padding_free_max_row_tokens == 1 else choice.padding_free_max_row_tokens or "the batch",
        choice.share_prompt,
        f" (auto for {', '.join(auto)}: {choice.reason}; threshold {MIN_SAVING:.0%} fewer tokens)" if auto else "",
    )
