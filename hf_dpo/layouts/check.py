"""First-batch self-check of the padding-free and shared-prompt layouts.

A packed or shared-prompt batch gives the plain padded path's numbers only if the
model's attention honours the 4D mask and the position ids the layout passes. The
trainer cannot know that from the config: a custom-code model reports
``_attn_implementation="eager"`` and may ignore both. So before the first
optimizer step the layout's per-sequence log-prob sums are compared, under
``no_grad`` and with dropout off, with the padded path's sums of the same pairs,
for the policy and for a separate reference model. A layout that differs beyond
the tolerance, or whose inputs the forward rejects, stops the run with
:class:`LayoutMismatchError` naming the model class, the layout and the measured
difference. The verdict is cached on the model, one per layout.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Optional

import torch
from torch import nn

from ..common.models import causal_lm, float_dtype
from .attention import CHOSEN_BRANCH, PROMPT_BRANCH, REJECTED_BRANCH, is_packed

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

_VERDICT_ATTRIBUTE = "_hf_dpo_layout_verdicts"
# Per-token log-prob tolerance: layouts reorder reductions, so fp32 agrees to ~1e-6;
# a model that ignores the mask is off by far more than this (~1e-1 per token).
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class LayoutMismatchError(RuntimeError):
    """A padding-free or shared-prompt layout does not give the padded path's log-probs on this model."""


def padded_equivalent(batch: dict[str, Tensor], pad_token_id: int = 0) -> dict[str, Tensor]:
    """The plain :class:`~hf_dpo.layouts.padded.DPOCollator` batch of the same pairs as the packed ``batch``.

    Each sequence is read back from ``segment_ids``/``branch_ids`` (R, L); its scored
    positions from ``logp_positions``. Returns ``input_ids``, ``attention_mask``,
    ``response_mask`` ``(2B, T)`` and the lengths, as the plain collator does.
    """
    n_pairs = batch["chosen_lengths"].shape[0]
    flat_ids = batch["input_ids"].reshape(-1).cpu()
    segments = batch["segment_ids"].reshape(-1).cpu()
    branches = batch["branch_ids"].reshape(-1).cpu()
    shared = bool((branches != PROMPT_BRANCH).any())
    positions, sequences = batch["logp_positions"].cpu(), batch["logp_sequences"].cpu()
    rows, masks = [], []
    for sequence in range(2 * n_pairs):
        if shared:
            side = CHOSEN_BRANCH if sequence < n_pairs else REJECTED_BRANCH
            members = (segments == sequence % n_pairs) & ((branches == PROMPT_BRANCH) | (branches == side))
        else:
            members = segments == sequence
        flat = members.nonzero().squeeze(1)  # (n,) flat indices, in sequence order
        local = torch.searchsorted(flat, positions[sequences == sequence])  # scored predictors -> sequence index
        mask = torch.zeros(len(flat), dtype=torch.bool)
        mask[local] = True
        rows.append(flat_ids[flat])
        masks.append(mask)
    width = max(len(r) for r in rows)
    input_ids = torch.full((2 * n_pairs, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((2 * n_pairs, width), dtype=torch.long)
    response_mask = torch.zeros((2 * n_pairs, width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(zip(rows, masks)):
        input_ids[i, : len(ids)], attention_mask[i, : len(ids)], response_mask[i, : len(ids)] = ids, 1, mask
    device = batch["input_ids"].device
    counts = response_mask.sum(-1)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "response_mask": response_mask.to(device),
        "chosen_lengths": counts[:n_pairs].to(device),
        "rejected_lengths": counts[n_pairs:].to(device),
    }


def layout_verdict(model: nn.Module, layout: str) -> Optional[tuple[bool, str]]:
    """The cached ``(ok, detail)`` of ``layout`` on ``model``, or None when not checked yet."""
    return getattr(causal_lm(model), _VERDICT_ATTRIBUTE, {}).get(layout)


def _set_verdict(model: nn.Module, layout: str, verdict: tuple[bool, str]) -> None:
    target = causal_lm(model)
    verdicts = dict(getattr(target, _VERDICT_ATTRIBUTE, {}))
    verdicts[layout] = verdict
    setattr(target, _VERDICT_ATTRIBUTE, verdicts)


def compare_layout(
    model: nn.Module, batch: dict[str, Tensor], padded: dict[str, Tensor], score: Callable
) -> tuple[bool, str]:
    """``(ok, detail)``: whether ``score(model, batch)`` equals ``score(model, padded)`` per token within tolerance."""
    was_training = model.training
    model.eval()  # dropout would make the two forwards differ for no fault of the layout
    try:
        with torch.no_grad():
            want, counts = score(model, padded)
            try:
                got, got_counts = score(model, batch)
            except Exception as error:  # any rejection of the layout's inputs is the verdict
                return False, f"the forward rejects the layout's inputs ({type(error).__name__}: {error})"
    finally:
        model.train(was_training)
    if not torch.equal(got_counts.cpu(), counts.cpu()):
        return False, "the layout scores other tokens than the padded path"
    per_token = ((got - want).abs() / counts.clamp(min=1)).max().item()
    dtype = float_dtype(model) or torch.float32
    tolerance = TOLERANCE.get(dtype, 1e-2)
    detail = f"max per-token log-prob difference {per_token:.3g} (tolerance {tolerance:g}, {dtype})"
    return per_token <= tolerance and per_token == per_token, detail


Score = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, Tensor]]


class LayoutCheck:
    """Verifies a packed batch's layout once per model against the padded path, and acts on the verdict.

    Args:
        layout: the layout's name, for messages and the verdict cache (e.g. ``"padding_free+share_prompt"``).
        explicit: the user asked for the layout: a mismatch raises :class:`LayoutMismatchError`. Otherwise
            (``"auto"``) it is turned off with one WARNING and ``on_fallback()`` is called (the trainer
            switches its collator to the padded layout).
        score: ``score(model, batch) -> (sums (2B,), counts (2B,))``, the function that scores batches in training.
    """

    def __init__(
        self, layout: Optional[str], explicit: bool, score: Score, on_fallback: Optional[Callable[[], None]] = None
    ):
        self.layout = layout or "padding_free/share_prompt"
        self.explicit = explicit
        self.score = score
        self.on_fallback = on_fallback

    def __call__(self, models: Mapping[str, nn.Module], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch to score: ``batch`` itself once its layout passed on every model of ``models``
        (``{"policy": ..., "reference": ...}``), else its padded form."""
        if not is_packed(batch):
            return batch
        padded, checked = None, []
        for role, model in models.items():
            verdict = layout_verdict(model, self.layout)
            if verdict is None:
                padded = padded_equivalent(batch) if padded is None else padded
                verdict = compare_layout(model, batch, padded, self.score)
                _set_verdict(model, self.layout, verdict)
                checked.append((role, model, verdict))
            if not verdict[0]:
                self._report(checked)
                return _as_padded(batch, padded)
        self._report(checked)
        return batch

    def _report(self, checked: list[tuple[str, nn.Module, tuple[bool, str]]]) -> None:
        """One line for the models checked now; then the refusal or the fallback if one of them failed."""
        if not checked:
            return
        results = "; ".join(
            f"{role} ({type(causal_lm(model)).__name__}): {verdict[1]}" for role, model, verdict in checked
        )
        logger.info("layout self-check of %s: %s", self.layout, results)
        failed = next(((role, model, verdict) for role, model, verdict in checked if not verdict[0]), None)
        if failed is None:
            return
        role, model, (_, detail) = failed
        name = type(causal_lm(model)).__name__
        if self.explicit:
            raise LayoutMismatchError(
                f"the {self.layout} layout does not give the padded path's log-probs on the {role} ({name}): {detail}. Its "
                "attention probably ignores the 4D attention mask or the position ids the layout passes. Set "
                "padding_free=False and share_prompt=False for this model (or load it with an attention implementation "
                "that honours them)."
            )
        logger.warning(
            "the automatically chosen %s layout does not give the padded path's log-probs on the %s (%s: %s): it is "
            "turned off for this model, batches are scored padded",
            self.layout,
            role,
            name,
            detail,
        )
        if self.on_fallback is not None:
            self.on_fallback()


def _as_padded(batch: dict[str, Tensor], padded: Optional[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The padded batch of the same pairs, with the per-pair extras (row ids, cached reference sums) carried over."""
    padded = dict(padded_equivalent(batch) if padded is None else padded)
    layout_keys = {
        "input_ids",
        "position_ids",
        "segment_ids",
        "branch_ids",
        "logp_positions",
        "logp_targets",
        "logp_sequences",
    }
    padded.update({k: v for k, v in batch.items() if k not in layout_keys and k not in padded})
    return padded
