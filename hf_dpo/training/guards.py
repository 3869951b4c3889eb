"""Numerical guards and start-of-training self-checks for :class:`hf_dpo.NormalizedDPOTrainer`.

* A non-finite training loss, or a non-finite gradient behind a finite loss,
  raises :class:`NonFiniteLossError` naming the rows of the batch
  (``nonfinite_loss="error"``), or skips the whole optimizer step
  (``nonfinite_loss="skip"``): gradients are dropped before ``optimizer.step``
  so parameters and optimizer state stay bit-identical, the learning-rate
  schedule does not advance, and the count is logged as ``nonfinite_loss_skipped``.
* At the first training step the policy equals its reference, so the loss must
  equal the loss at zero log-ratio (ln 2 for the sigmoid loss). If it does not,
  a loud warning names the likely causes found by inspecting the models.
* With length normalization, a beta below 1 that the user did not choose is
  almost always a summed-log-prob default carried over; warn once.

Rules and messages are documented in docs/reliability.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback

from ..common.columns import REF_LOGP_COLUMNS
from ..common.models import dropout_rates, float_dtype, unwrap
from ..losses import LossObjective, as_loss_types

logger = logging.getLogger(__name__)

LN2 = math.log(2.0)
# Policy and reference run the same weights on the same batch at step 0, so the
# loss is exact up to kernel noise; a wrong reference moves it by far more.
FIRST_STEP_RTOL = 1e-3


class NonFiniteLossError(FloatingPointError):
    """The training loss is NaN or infinite; the message names the rows of the batch."""


# --------------------------------------------------------------------------- non-finite loss


def nonfinite_loss_message(
    loss: float, losses: torch.Tensor, row_ids: Optional[torch.Tensor], step: int, where=None
) -> str:
    """Describe a non-finite loss: which pairs of the batch ``(B,)`` are non-finite, and all the batch's rows.

    ``where(row_id) -> "file:line"`` turns row ids into locations when given.
    """
    bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
    if row_ids is None:
        rows, bad_rows = "unknown (the data set has no row_id column)", f"batch positions {bad}"
    else:
        ids = row_ids.tolist()
        name = where or (lambda row_id: f"row {row_id}")
        rows = ", ".join(name(i) for i in ids)
        bad_rows = ", ".join(name(ids[i]) for i in bad) or "none (the mean overflowed)"
    return (
        f"non-finite training loss ({loss}) at step {step}. Non-finite pairs: {bad_rows}. Rows in the batch: {rows}. "
        "Likely causes: fp16 overflow (use bf16), a learning rate that is too high, or a row whose response "
        "the model finds impossible."
    )


# --------------------------------------------------------------------------- first-step self-check


def initial_loss(args) -> Optional[float]:
    """The loss of a policy equal to its reference (all log-ratios zero), or None when it cannot be predicted.

    ln 2 for ``sigmoid``, ``robust``, ``aot`` (any label smoothing), 1 for ``hinge`` and the APO losses,
    ``(1 / (2 beta))^2`` for ``ipo``, ... and the weighted sum for a list
    (:meth:`hf_dpo.losses.LossObjective.loss_at_zero`). None for reference-free losses, with WPO weights
    and when an SFT term (which depends on the data) is part of the loss.
    """
    return LossObjective.from_config(args).loss_at_zero()[0]


def active_dropout(model: nn.Module) -> list[str]:
    """Names of dropout that is live in ``model`` (module in train mode and probability above 0)."""
    return [
        f"{name or 'model'} (p={value})" if attribute == "p" else f"{name or 'model'}.{attribute}={value}"
        for name, module, attribute, value in dropout_rates(model)
        if module.training and value > 0
    ]


def _differing_tensors(policy: nn.Module, reference: nn.Module) -> Optional[tuple[int, int, str]]:
    """``(differing, total, first name)`` over the parameters both models share, or None if they cannot be compared."""
    ref_params = dict(reference.named_parameters())
    pairs = [(n, p, ref_params.get(n)) for n, p in policy.named_parameters()]
    pairs = [(n, p, r) for n, p, r in pairs if r is not None and r.shape == p.shape]
    if not pairs:
        return None
    with torch.no_grad():
        differing = [n for n, p, r in pairs if not torch.equal(p.detach().to(r.device, r.dtype), r.detach())]
    return len(differing), len(pairs), (differing[0] if differing else "")


def likely_causes(policy: nn.Module, reference: Optional[nn.Module], mode: str, batch: dict[str, Any]) -> list[str]:
    """The reasons found by inspection, most specific first, then the causes that cannot be seen from here."""
    policy, reference = unwrap(policy), None if reference is None else unwrap(reference)
    causes = []
    dropout = active_dropout(policy)
    if dropout:
        shown = ", ".join(dropout[:3]) + (f" and {len(dropout) - 3} more" if len(dropout) > 3 else "")
        causes.append(
            f"dropout is on in the policy ({shown}) but not in the reference: set disable_dropout=True, "
            "or zero the dropout fields of the model config"
        )
    if REF_LOGP_COLUMNS[0] in batch:
        causes.append(
            "the cached reference log-probs (ref_chosen_logp_sums/ref_rejected_logp_sums) were computed with another "
            "model, tokenizer, max_length, chat template or precision"
        )
    elif mode == "model" and reference is not None:
        policy_dtype, ref_dtype = float_dtype(policy), float_dtype(reference)
        if policy_dtype != ref_dtype:
            causes.append(
                f"the policy runs in {policy_dtype} but the reference in {ref_dtype}: load both in the same dtype"
            )
        compared = _differing_tensors(policy, reference)
        if compared is not None and compared[0]:
            differing, total, first = compared
            causes.append(
                f"the reference's weights differ from the policy's in {differing} of {total} tensors (e.g. {first}): "
                "ref_model is not the model that training starts from"
            )
    elif mode == "adapter":
        causes.append(
            "the adapter is not a no-op at the start (a pre-trained adapter was loaded, or LoRA B is not zero)"
        )
    causes.append("the policy was changed after the trainer was built (the frozen reference is taken in __init__)")
    return causes


def first_step_message(loss: float, expected: float, loss_type, causes: list[str]) -> str:
    """The warning text for a first-step loss that is not the loss at zero log-ratio."""
    target = f"ln 2 = {LN2:.4f}" if math.isclose(expected, LN2, rel_tol=1e-9) else f"{expected:.4f}"
    listed = " ".join(f"({i}) {cause};" for i, cause in enumerate(causes, start=1))
    return (
        f"SELF-CHECK FAILED at the first training step: the loss is {loss:.4f}, but a policy identical to its "
        f"reference gives {target} ({' + '.join(as_loss_types(loss_type))} loss, tolerance "
        f"{FIRST_STEP_RTOL:.1%}). The policy and the "
        f"reference differ at the start, so every reward is measured from a wrong baseline. Likely causes: {listed}"
    )


# --------------------------------------------------------------------------- beta


def beta_warning(args) -> Optional[tuple[int, str]]:
    """``(log level, message)`` when length normalization meets a beta below 1, else None.

    A beta the user did not choose (``beta_is_default``) is a WARNING: it is a
    summed-log-prob default (0.1) carried over. A beta set explicitly is
    respected and only noted at INFO.
    """
    if not args.length_normalize or args.beta >= 1:
        return None
    explicit = not getattr(args, "beta_is_default", False)
    message = (
        f"beta={args.beta} with length_normalize=True: per-token log-ratios are about |y| times smaller than "
        "summed ones, so a beta below 1 leaves the sigmoid nearly flat and the policy barely moves; practitioners "
        "use beta of about 2 to 10 with length normalization"
    )
    if explicit:
        return logging.INFO, message + " (beta was set explicitly, so it is kept)"
    return logging.WARNING, message + "; set beta explicitly (e.g. beta=2.0) to choose it"


# --------------------------------------------------------------------------- the callback


class TrainingGuards(TrainerCallback):
    """Runs the guards of one trainer: call :meth:`check_loss` from ``compute_loss``; the Trainer hooks do the rest.

    Args:
        args: the trainer's :class:`~hf_dpo.DPOConfig` (``nonfinite_loss``, the loss settings).
        accelerator: the trainer's accelerator (processes agree on skipping a step).
        reference_mode: ``model``, ``adapter`` or ``none``.
        reference: returns the separate reference model (None when there is none or it was released).
        where: turns a row id into ``"file:line"`` for messages.
    """

    def __init__(
        self,
        args,
        accelerator,
        reference_mode: str,
        reference: Callable[[], Optional[nn.Module]],
        where: Callable[[int], str],
    ):
        self.args = args
        self.accelerator = accelerator
        self.reference_mode = reference_mode
        self.reference = reference
        self.where = where
        self.mode = args.nonfinite_loss
        self.skipped_steps = 0
        self._skip_pending = False
        self._marked_overflow = False
        self._first_step_checked = False
        self._step_rows: list[int] = []

    # -- called from compute_loss

    def check_loss(
        self,
        model: nn.Module,
        loss: torch.Tensor,
        losses: torch.Tensor,
        batch: dict[str, Any],
        step: int,
        first_step_loss: Optional[torch.Tensor] = None,
    ) -> None:
        """Check a training ``loss`` at ``step`` (optimizer steps done): raise or flag the step when it is not
        finite; at step 0, self-check ``first_step_loss`` (the preference loss without an MoE aux term)."""
        if not model.training:
            return
        if batch.get("row_ids") is not None:
            self._step_rows += batch["row_ids"].tolist()
        if not bool(torch.isfinite(loss.detach())):
            self._fail_or_flag(nonfinite_loss_message(loss.item(), losses, batch.get("row_ids"), step + 1, self.where))
            self._first_step_checked = True
            return
        if not self._first_step_checked:
            self._first_step_checked = True
            if step == 0:
                self._check_first_step(model, float(loss if first_step_loss is None else first_step_loss), batch)

    def _fail_or_flag(self, message: str) -> None:
        if self.mode == "error":
            raise NonFiniteLossError(
                message + " Set nonfinite_loss='skip' to skip such optimizer steps instead of stopping."
            )
        logger.warning("%s Skipping this optimizer step.", message)
        self._skip_pending = True

    def _check_first_step(self, model: nn.Module, loss: float, batch: dict[str, Any]) -> None:
        args = self.args
        expected = initial_loss(args)
        if expected is None or self.reference_mode == "none":
            return
        if math.isclose(loss, expected, rel_tol=FIRST_STEP_RTOL):
            logger.info(
                "self-check passed: first-step loss %.6f equals the loss at zero log-ratio %.6f", loss, expected
            )
            return
        causes = likely_causes(model, self.reference(), self.reference_mode, batch)
        logger.warning(first_step_message(loss, expected, args.loss_type, causes))

    def log_entries(self) -> dict[str, float]:
        """Entries for the training logs: the running count of skipped steps (skip mode only)."""
        return {"nonfinite_loss_skipped": float(self.skipped_steps)} if self.mode == "skip" else {}

    # -- Trainer hooks

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._skip_pending = False
        self._step_rows = []
        if self._marked_overflow and optimizer is not None:
            optimizer._is_overflow = False
            self._marked_overflow = False

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            return
        # Under fp16 the GradScaler owns overflowing gradients: it skips those steps itself.
        if not self._skip_pending and getattr(optimizer, "scaler", None) is None and not gradients_finite(optimizer):
            rows = ", ".join(self.where(row_id) for row_id in self._step_rows) or "unknown"
            self._fail_or_flag(
                f"non-finite gradient at step {state.global_step + 1} although the loss was finite. Rows of this step: "
                f"{rows}. Likely causes: a learning rate that is too high, or an operation without a safe gradient "
                "(sqrt or log at 0, torch.where over a NaN branch) in a custom model or loss."
            )
        if self.mode != "skip":
            return
        skip = self._skip_pending
        accelerator = self.accelerator
        if accelerator.num_processes > 1:
            # One process's bad step is everyone's: all of them must skip it together.
            flag = torch.tensor(float(skip), device=accelerator.device)
            skip = bool(accelerator.reduce(flag, reduction="sum") > 0)
        if not skip:
            return
        _drop_gradients(optimizer)
        self.skipped_steps += 1
        self._skip_pending = True

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._skip_pending and optimizer is not None and hasattr(optimizer, "_is_overflow"):
            # accelerate's flag for a step GradScaler skipped: Trainer and the wrapped scheduler then keep the learning rate.
            optimizer._is_overflow = True
            self._marked_overflow = True


def gradients_finite(optimizer) -> bool:
    """Whether every gradient the optimizer would apply is finite (one fused norm, one host sync)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0)))


def _drop_gradients(optimizer) -> None:
    """Make the coming ``optimizer.step()`` a no-op: parameters without a gradient are not touched at all.

    Zeroed gradients would not do: AdamW would still move the parameters by its
    momentum and by weight decay, and count the step.
    """
    scaler = getattr(optimizer, "scaler", None)
    if scaler is not None:
        # GradScaler.step needs the inf checks that unscale_ records; after clipping they exist already.
        try:
            scaler.unscale_(optimizer.optimizer)
        except RuntimeError:
            pass
    for group in optimizer.param_groups:
        for param in group["params"]:
            param.grad = None


# --------------------------------------------------------------------------- learning rate

# Above this, a full fine-tune of a pretrained model is past the usual DPO range (1e-7 to 5e-6).
HIGH_FULL_FINETUNE_LR = 2e-5
# Below this many parameters a model is a toy (the demo's has ~0.1M): random-init models train at far higher rates.
PRETRAINED_SIZE = 10_000_000


def learning_rate_warning(learning_rate: float, adapter_only: bool, n_parameters: int) -> Optional[str]:
    """The warning for a full fine-tune of a real model at a learning rate far above DPO's usual range, else None."""
    if adapter_only or n_parameters < PRETRAINED_SIZE or learning_rate <= HIGH_FULL_FINETUNE_LR:
        return None
    return (
        f"learning_rate={learning_rate:g} for a full fine-tune of a {n_parameters / 1e6:.0f}M-parameter model: DPO's "
        f"usual range is 1e-7 to 5e-6 (the default is 1e-6); rates made for supervised fine-tuning (5e-5) move a "
        "pretrained model far from its reference within a few steps. Set --learning_rate explicitly if this is intended"
    )


def warn_about_settings(args, model) -> None:
    """Log :func:`beta_warning` and :func:`learning_rate_warning` once, when they apply to ``args`` and ``model``."""
    warning = beta_warning(args)
    if warning is not None:
        logger.log(*warning)
    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    adapter_only = sum(p.numel() for p in trainable) < 0.5 * total  # LoRA and other adapters train a small share
    message = learning_rate_warning(args.learning_rate, adapter_only, total)
    if message is not None:
        logger.warning(message)
