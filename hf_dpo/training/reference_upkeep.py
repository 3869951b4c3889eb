"""The reference through a run's life: TR-DPO's syncs, the reference in checkpoints and on resume, the saved policy.

One callback, :class:`ReferenceUpkeep`, keeps the reference what the run asked for once
``Trainer`` owns the loop; the work is done by the modules of each feature:
:mod:`hf_dpo.training.ref_sync` (``sync_ref_model``), :mod:`hf_dpo.reference.adapters` and
:mod:`hf_dpo.training.adapter_export` (``ref_adapter``). With neither option it does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..reference.adapters import activate_policy
from ..reference.cache import has_reference_columns
from .adapter_export import write_policy_adapter
from .checkpoints import resolve_resume_checkpoint
from .ref_sync import (
    check_sync_launch,
    mix_,
    required_checkpoint_files,
    restore_reference,
    save_reference,
    sync_pairs,
)


class ReferenceUpkeep(TrainerCallback):
    """Applies TR-DPO's rule after the optimizer steps it is due and saves / restores the synced reference; keeps a
    ``ref_adapter`` frozen and out of the policy's forward after ``Trainer`` resumes; writes the policy of
    ``policy_adapter="new"`` as one adapter.

    Args:
        args: the trainer's ``DPOConfig``; engine: :func:`~hf_dpo.reference.engines.engine_of`'s name;
        reference_mode: ``model``, ``adapter`` or ``none`` (``sync_ref_model`` is checked against them here, at
            the start); reference: returns the separate reference model (engine-wrapped or not), or None when
            there is none (a ``ref_adapter`` is then the reference). Read at each use, so that it sees the
            reference as the Trainer prepared it.
    """

    def __init__(self, args, engine: str, reference_mode: str, reference: Callable):
        self.args = args
        self.sync = bool(args.sync_ref_model)
        self.policy_adapter = args.policy_adapter if args.ref_adapter else None
        self.reference = reference
        self.syncs = 0
        if self.sync:
            check_sync_launch(args, engine, reference_mode)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.policy_adapter is not None:
            # Trainer's resume reloads the adapters and activates "default" alone; "new" stacks it on ref_adapter.
            activate_policy(model, self.policy_adapter)
        if self.sync:
            sync_pairs(self.reference(), model)  # a mismatch stops here, not after ref_model_sync_steps steps
            if has_reference_columns(getattr(kwargs.get("train_dataloader"), "dataset", None)):
                raise ValueError(
                    "--sync_ref_model true, but the training data carries reference log-probs (ref_chosen_logp_sums, "
                    "ref_rejected_logp_sums), which the loss uses instead of the reference: they would not follow "
                    "the syncs. Drop those columns, or turn --sync_ref_model off"
                )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.sync and state.global_step % args.ref_model_sync_steps == 0:
            mix_(sync_pairs(self.reference(), model), args.ref_model_mixup_alpha)
            self.syncs += 1

    def on_save(self, args, state, control, **kwargs):
        reference = self.reference()
        if self.sync and reference is not None and args.should_save:
            # A synced ref_adapter needs nothing here: peft saves it with the policy, in the checkpoint's ref_adapter/.
            save_reference(reference, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def resume_point(self, resume_from_checkpoint: Union[str, bool, None]) -> Optional[str]:
        """What ``Trainer.train`` resumes from (:func:`~hf_dpo.training.checkpoints.resolve_resume_checkpoint`:
        ``True`` is the newest complete checkpoint), with the synced reference loaded from it."""
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args, required_checkpoint_files(self.args))
        reference = self.reference()
        if self.sync and reference is not None and checkpoint is not None and Path(checkpoint).is_dir():
            restore_reference(reference, checkpoint)  # a missing directory is Trainer's to report
        return checkpoint

    def saved(self, output_dir: Union[str, os.PathLike]) -> None:
        """After ``save_model(output_dir)`` (main process): the policy of ``policy_adapter="new"`` as one adapter."""
        write_policy_adapter(self.args, output_dir)
