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
from typing import Callable, Optional

import torch
from torch import nn

from .fused_logprobs import causal_lm
from .packing import CHOSEN_BRANCH, PROMPT_BRANCH, REJECTED_BRANCH

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

_VERDICT_ATTRIBUTE = "_hf_dpo_layout_verdicts"
# Per-token log-prob tolerance: layouts reorder reductions, so fp32 agrees to ~1e-6;
# a model that ignores the mask is off by far more than this (~1e-1 per token).
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class LayoutMismatchError(RuntimeError):
    """A padding-free or shared-prompt layout does not give the padded path's log-probs on this model."""


def layout_name(args) -> Optional[str]:
    """The layout ``args`` asks for (``"padding_free"``, ``"share_prompt"``, ``"padding_free+share_prompt"``), or None."""
    parts = [name for name in ("padding_free", "share_prompt") if getattr(args, name, False) is True]
    if parts == ["padding_free"] and getattr(args, "padding_free_max_row_tokens", None):
        return f"padding_free (padding_free_max_row_tokens={args.padding_free_max_row_tokens})"
    return "+".join(parts) or None


def padded_equivalent(batch: dict[str, Tensor], pad_token_id: int = 0) -> dict[str, Tensor]:
    """The plain :class:`~hf_dpo.DPOCollator` batch of the same pairs as the packed ``batch``.

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


def compare_layout(model: nn.Module, batch: dict[str, Tensor], padded: dict[str, Tensor], score: Callable) -> tuple[bool, str]:
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
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tolerance = TOLERANCE.get(dtype, 1e-2)
    detail = f"max per-token log-prob difference {per_token:.3g} (tolerance {tolerance:g}, {dtype})"
    return per_token <= tolerance and per_token == per_token, detail


def check_layout(trainer, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Verify ``batch``'s layout on ``model`` and on a separate reference model, once per model; returns the batch to score.

    An explicitly requested layout that fails raises :class:`LayoutMismatchError`; one chosen
    automatically (``"auto"``) is turned off with one WARNING and the batch comes back in the
    plain padded layout (so are later packed batches, should a data loader worker still send them).
    """
    if "logp_positions" not in batch:
        return batch
    choice = getattr(trainer, "layout", None)
    layout = (choice.name if choice is not None else layout_name(trainer.args)) or "padding_free/share_prompt"
    explicit = choice.explicit if choice is not None else True
    models = [model]
    if getattr(trainer, "reference_mode", None) == "model" and trainer.ref_model is not None and trainer.ref_model is not model:
        models.append(trainer.ref_model)
    padded = None
    for checked in models:
        verdict = layout_verdict(checked, layout)
        if verdict is None:
            if padded is None:
                padded = padded_equivalent(batch)
            verdict = compare_layout(checked, batch, padded, trainer.score)
            _set_verdict(checked, layout, verdict)
            logger.info("layout self-check of %s on %s: %s", layout, type(causal_lm(checked)).__name__, verdict[1])
            if not verdict[0] and not explicit:
                logger.warning(
                    "the automatically chosen %s layout does not give the padded path's log-probs on %s (%s): it is "
                    "turned off for this model, batches are scored padded", layout, type(causal_lm(checked)).__name__, verdict[1],
                )
        if not verdict[0]:
            if not explicit:
                return _as_padded(batch, padded)
            name = type(causal_lm(checked)).__name__
            raise LayoutMismatchError(
                f"the {layout} layout does not give the padded path's log-probs on {name}: {verdict[1]}. Its attention "
                "probably ignores the 4D attention mask or the position ids the layout passes. Set padding_free=False "
                "and share_prompt=False for this model (or load it with an attention implementation that honours them)."
            )
    return batch


def _as_padded(batch: dict[str, Tensor], padded: Optional[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The padded batch of the same pairs, with the per-pair extras (row ids, cached reference sums) carried over."""
    padded = dict(padded_equivalent(batch) if padded is None else padded)
    layout_keys = {"input_ids", "position_ids", "segment_ids", "branch_ids", "logp_positions", "logp_targets", "logp_sequences"}
    padded.update({k: v for k, v in batch.items() if k not in layout_keys and k not in padded})
    return padded
