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
:mod:`hf_dpo.layouts.check`; an automatic layout that fails it is turned off for that
model with one WARNING (the batch is scored in the padded layout instead).
Explicit ``True``/``False`` keep their meaning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from torch import nn

from ..common.flags import AUTO
from .attention import MASK_4D_IMPLEMENTATIONS, attention_implementation
from .packed import PackedDPOCollator
from .padded import DPOCollator

logger = logging.getLogger(__name__)

# A layout must save at least this share of the computed tokens to be chosen.
MIN_SAVING = 0.1
# Rows of the train set looked at to estimate the savings.
SAMPLE_ROWS = 2048


@dataclass
class LayoutChoice:
    """The layouts a trainer uses, after ``"auto"`` was resolved.

    ``explicit``: the user asked for the active layouts (a failed first-batch check then stops
    the run); ``auto``: the options that were ``"auto"``; ``reason``: why auto chose what it did.
    """

    padding_free: bool
    share_prompt: bool
    pad_to_multiple_of: Optional[int]
    padding_free_max_row_tokens: Optional[int]
    explicit: bool
    reason: str = ""
    auto: tuple[str, ...] = field(default=())

    @property
    def name(self) -> Optional[str]:
        """``"padding_free"``, ``"share_prompt"``, ``"padding_free+share_prompt"`` (with the row bound), or None when padded."""
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


def choose_layouts(
    model: nn.Module,
    dataset,
    *,
    padding_free: Union[bool, str],
    share_prompt: Union[bool, str],
    batch_size: int,
    max_row_tokens: Optional[int] = None,
    pad_to_multiple_of: Optional[int] = None,
    packed_refusal: Optional[str] = None,
) -> LayoutChoice:
    """Resolve ``padding_free`` / ``share_prompt`` (True, False or "auto") for ``model`` and the tokenized train set.

    ``batch_size``: pairs per device batch, for the padding estimate. ``packed_refusal``: why this
    run cannot use a packed or shared-prompt layout (then "auto" means off).
    """
    auto = tuple(n for n, v in (("padding_free", padding_free), ("share_prompt", share_prompt)) if v == AUTO)
    reasons = []
    if auto and packed_refusal:
        padding_free = False if padding_free == AUTO else padding_free
        share_prompt = False if share_prompt == AUTO else share_prompt
        reasons.append(packed_refusal)
    elif auto:
        can_share = dataset is not None and "prompt_length" in dataset.column_names
        implementation = attention_implementation(model)
        prompt_share = padding_share = 0.0
        if dataset is not None:
            prompt_share, _ = token_savings(dataset, batch_size, False)
        if share_prompt == AUTO:
            share_prompt = can_share and implementation in MASK_4D_IMPLEMENTATIONS and prompt_share >= MIN_SAVING
            reasons.append(f"prompts are {prompt_share:.0%} of the tokens")
        if padding_free == AUTO:
            if dataset is not None:
                _, padding_share = token_savings(dataset, batch_size, share_prompt)
            padding_free = padding_share >= MIN_SAVING
            reasons.append(f"padding is {padding_share:.0%} of the padded batch")
            if padding_free and max_row_tokens is None and implementation in MASK_4D_IMPLEMENTATIONS:
                max_row_tokens = 1  # rows bounded by the longest sequence: the dense mask stays below the padded cost
    explicit = (padding_free is True and "padding_free" not in auto) or (
        share_prompt is True and "share_prompt" not in auto
    )
    return LayoutChoice(
        padding_free=bool(padding_free),
        share_prompt=bool(share_prompt),
        pad_to_multiple_of=pad_to_multiple_of,
        padding_free_max_row_tokens=max_row_tokens if padding_free else None,
        explicit=explicit,
        reason="; ".join(reasons),
        auto=auto,
    )


def log_choice(choice: LayoutChoice) -> None:
    """Say once which layouts the run uses, and why when they were chosen automatically."""
    logger.info(
        "batch layout: padding_free=%s (rows of at most %s), share_prompt=%s%s",
        choice.padding_free,
        "the longest sequence"
        if choice.padding_free_max_row_tokens == 1
        else choice.padding_free_max_row_tokens or "the batch",
        choice.share_prompt,
        f" (auto for {', '.join(choice.auto)}: {choice.reason}; threshold {MIN_SAVING:.0%} fewer tokens)"
        if choice.auto
        else "",
    )


@dataclass
class LayoutCollator:
    """The collator of a packed or shared-prompt :class:`LayoutChoice` that can fall back to the padded layout.

    When a layout chosen automatically fails its first-batch check on the model
    (:mod:`hf_dpo.layouts.check`), :meth:`use_padded` turns it off: later batches are
    collated padded instead of packed and then unpacked. (Data loader worker processes
    hold copies of the collator; a packed batch they still send is converted by the check.)
    """

    packed: PackedDPOCollator
    padded: DPOCollator
    fell_back: bool = False

    def use_padded(self) -> None:
        self.fell_back = True

    def __call__(self, features: list[dict[str, Any]]):
        return (self.padded if self.fell_back else self.packed)(features)


def build_collator(pad_token_id: int, choice: LayoutChoice) -> Union[DPOCollator, LayoutCollator]:
    """The collator for ``choice``: the plain :class:`DPOCollator` unless a packed or shared-prompt layout is on."""
    padded = DPOCollator(pad_token_id=pad_token_id, pad_to_multiple_of=choice.pad_to_multiple_of)
    if not (choice.padding_free or choice.share_prompt):
        return padded
    packed = PackedDPOCollator(
        pad_token_id=pad_token_id,
        padding_free=choice.padding_free,
        share_prompt=choice.share_prompt,
        pad_to_multiple_of=choice.pad_to_multiple_of,
        max_row_tokens=choice.padding_free_max_row_tokens,
    )
    return LayoutCollator(packed=packed, padded=padded)
