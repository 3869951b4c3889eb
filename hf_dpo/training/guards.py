"""Numerical guards for :class:`hf_dpo.NormalizedDPOTrainer`, agreed across processes.

* Every training loss is shared with all processes (one small all-gather per
  micro-batch) before anyone acts on it, so that a non-finite loss on one rank is
  seen by every rank at the same micro-batch. ``nonfinite_loss="error"`` then raises
  :class:`NonFiniteLossError` on every rank with the same message, naming the rank,
  the step and the rows; ``nonfinite_loss="skip"`` skips that optimizer step on every
  rank: gradients are dropped before ``optimizer.step`` so parameters and optimizer
  state stay bit-identical, the learning-rate schedule does not advance, the count is
  logged as ``nonfinite_loss_skipped``, and ``nonfinite_max_consecutive_skips`` steps
  skipped in a row stop the run with the error.
* A non-finite gradient behind a finite loss is agreed on the same way, once per
  optimizer step.
* The logged ``loss`` is the mean over the finite per-rank step losses, with the
  count of the others (:class:`~hf_dpo.training.metrics.LossLog`).
* At step 0, the first-step self-check of :mod:`hf_dpo.training.selfcheck`.

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

from .metrics import LossLog
from .selfcheck import FIRST_STEP_RTOL, first_step_message, initial_loss, likely_causes

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss (or gradient) is NaN or infinite; the message names the rank, the step and the rows."""

    # Raised at the same micro-batch on every process, so that no rank is left waiting for another.
    raised_on_every_rank = True


# --------------------------------------------------------------------------- messages


def nonfinite_loss_message(
    loss: float, losses: torch.Tensor, row_ids: Optional[torch.Tensor], step: int, where=None, rank=None
) -> str:
    """Describe a non-finite loss: which pairs of the batch ``(B,)`` are non-finite, and all the batch's rows.

    ``where(row_id) -> "file:line"`` turns row ids into locations when given; ``rank`` is named when given.
    """
    bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist()
    if row_ids is None:
        rows, bad_rows = "unknown (the data set has no row_id column)", f"batch positions {bad}"
    else:
        ids = row_ids.tolist()
        name = where or (lambda row_id: f"row {row_id}")
        rows = ", ".join(name(i) for i in ids)
        bad_rows = ", ".join(name(ids[i]) for i in bad) or "none (the mean overflowed)"
    on_rank = "" if rank is None else f" on rank {rank}"
    return (
        f"non-finite training loss ({loss}){on_rank} at step {step}. Non-finite pairs: {bad_rows}. Rows in the batch: "
        f"{rows}. Likely causes: fp16 overflow (use bf16), a learning rate that is too high, or a row whose response "
        "the model finds impossible."
    )


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


# --------------------------------------------------------------------------- the callback


class TrainingGuards(TrainerCallback):
    """Runs the guards of one trainer: call :meth:`check_loss` from ``compute_loss``; the Trainer hooks do the rest.

    Args:
        args: the trainer's :class:`~hf_dpo.DPOConfig` (``nonfinite_loss``, the loss settings).
        accelerator: the trainer's accelerator (processes agree on every decision).
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
        self.max_consecutive_skips = args.nonfinite_max_consecutive_skips
        self.skipped_steps = 0
        self.skipped_step_numbers: list[int] = []  # 1-based, as in the messages
        self.loss_log = LossLog()
        self._consecutive: list[int] = []
        self._skip_reason = ""
        self._skip_pending = False
        self._marked_overflow = False
        self._first_step_checked = False
        self._step: Optional[int] = None
        self._step_done = False
        self._step_rows: list[int] = []

    # -- agreement

    def _every_rank(self, values: torch.Tensor) -> torch.Tensor:
        """``(world, K)`` float64 on the CPU: every process's ``(K,)`` ``values``, the same on every process."""
        values = values.detach().to(self.accelerator.device, torch.float32).reshape(1, -1)  # no float64 on MPS
        if self.accelerator.num_processes > 1:
            values = self.accelerator.gather(values)
        return values.cpu().double()

    def _every_rank_text(self, own: Optional[str]) -> list[str]:
        """The non-empty texts of all processes, in rank order (a collective: call it on every process)."""
        if self.accelerator.num_processes == 1:
            return [own] if own else []
        from accelerate.utils import gather_object

        return [text for text in gather_object([own]) if text]

    def _named_rank(self) -> Optional[int]:
        return self.accelerator.process_index if self.accelerator.num_processes > 1 else None

    def position(self) -> str:
        """Where training is, for failure messages: ``at step N (rows of the step: ...)``, ``after step N (...)`` or
        ``before training``."""
        if self._step is None:
            return "before training"
        if self._step_done:
            return f"after step {self._step} (logging, evaluating, saving or reading the next batch)"
        rows = ", ".join(self.where(row_id) for row_id in self._step_rows) or "not read yet"
        return f"at step {self._step} (rows of the step: {rows})"

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
        """Check a training ``loss`` at ``step`` (optimizer steps done) on every process together: raise or flag the
        step when any process's loss is not finite; at step 0, self-check ``first_step_loss`` (the preference loss
        without an MoE aux term). ``losses``: this process's per-pair losses ``(B,)``."""
        if not model.training:
            return
        row_ids = batch.get("row_ids")
        if row_ids is not None:
            self._step_rows += row_ids.tolist()
        rank_losses = self._every_rank(loss.reshape(1))[:, 0]  # (world,)
        self.loss_log.add(rank_losses)
        bad = (~torch.isfinite(rank_losses)).nonzero().flatten().tolist()
        if bad:
            own = None
            if not bool(torch.isfinite(loss.detach())):
                own = nonfinite_loss_message(loss.item(), losses, row_ids, step + 1, self.where, self._named_rank())
            self._first_step_checked = True
            self._fail_or_flag(" Also: ".join(self._every_rank_text(own)))
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
        if self.accelerator.is_main_process:
            logger.warning("%s Skipping this optimizer step on every process.", message)
        self._skip_pending = True
        self._skip_reason = message

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

    def update_logs(self, logs: dict[str, float]) -> None:
        """Rewrite a training log: the honest ``loss``/``train_loss`` (:class:`LossLog`) and, in skip mode, the
        running count of skipped steps."""
        self.loss_log.update(logs)
        if self.mode == "skip":
            logs["nonfinite_loss_skipped"] = float(self.skipped_steps)

    # -- Trainer hooks

    def on_train_begin(self, args, state, control, **kwargs):
        self.loss_log.start()
        self._consecutive = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._skip_pending = False
        self._step = state.global_step + 1
        self._step_done = False
        self._step_rows = []
        if self._marked_overflow and optimizer is not None:
            optimizer._is_overflow = False
            self._marked_overflow = False

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            return
        # Under fp16 the GradScaler owns overflowing gradients: it skips those steps itself.
        local_bad = (
            not self._skip_pending and getattr(optimizer, "scaler", None) is None and not gradients_finite(optimizer)
        )
        bad = self._every_rank(torch.tensor([float(local_bad)]))[:, 0].nonzero().flatten().tolist()
        if bad:
            own = ", ".join(self.where(row_id) for row_id in self._step_rows) or "unknown"
            if self.accelerator.num_processes > 1:
                own = f"rank {self.accelerator.process_index}: {own}"
            rows = "; ".join(self._every_rank_text(own))
            on_rank = "" if self.accelerator.num_processes == 1 else f" on {_ranks(bad)}"
            self._fail_or_flag(
                f"non-finite gradient{on_rank} at step {state.global_step + 1} although the loss was finite. Rows of "
                f"this step: {rows}. Likely causes: a learning rate that is too high, or an operation without a safe "
                "gradient (sqrt or log at 0, torch.where over a NaN branch) in a custom model or loss."
            )
        if self.mode != "skip":
            return
        if not self._skip_pending:
            self._consecutive = []
            return
        self._consecutive.append(state.global_step + 1)
        if len(self._consecutive) >= self.max_consecutive_skips:
            first, last = self._consecutive[0], self._consecutive[-1]
            raise NonFiniteLossError(
                f"nonfinite_loss='skip' skipped {len(self._consecutive)} optimizer steps in a row (steps {first}-{last}"
                f"), the limit set by nonfinite_max_consecutive_skips={self.max_consecutive_skips}: the run stops "
                f"instead of going on without training. The last: {self._skip_reason}"
            )
        _drop_gradients(optimizer)
        self.skipped_steps += 1
        self.skipped_step_numbers.append(state.global_step + 1)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self._skip_pending and optimizer is not None and hasattr(optimizer, "_is_overflow"):
            # accelerate's flag for a step GradScaler skipped: Trainer and the wrapped scheduler then keep the learning rate.
            optimizer._is_overflow = True
            self._marked_overflow = True

    def on_step_end(self, args, state, control, **kwargs):
        self.loss_log.end_step()
        self._step_done = True


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
