"""TR-DPO: the reference pulled towards the policy during training (``sync_ref_model``), TRL 1.16's rule.

After every optimizer step whose ``global_step`` is a multiple of ``ref_model_sync_steps``,
each reference parameter (not buffer) becomes ``(1 - alpha) * ref + alpha * policy``,
``alpha = ref_model_mixup_alpha`` (https://huggingface.co/papers/2404.09656; TRL's
``SyncRefModelCallback``). ``alpha = 1`` is the paper's hard update, ``sync_steps = 1`` with a
small alpha its soft update.

Where the reference lives decides what is mixed and where it is saved:

* a separate reference model (``reference="model"``): its parameters, paired with the policy's
  by name; every checkpoint gets ``ref_model.safetensors`` (the synced parameters), which
  :func:`restore_reference` loads when training resumes;
* the frozen SFT adapter of ``ref_adapter`` with ``policy_adapter="copy"``: the reference
  adapter's parameters, paired with the policy adapter's (the base is shared by both, so mixing
  it would change nothing); peft saves the adapter in every checkpoint's ``ref_adapter/`` and
  ``Trainer`` reloads it on resume.

Refused at the start, with the reason (:func:`check_sync_settings`, :func:`check_sync_launch`):
a reference precomputed once, no reference, the adapter-disabled base (it is the policy's own
base), ``policy_adapter="new"`` (the policy has parameters the reference lacks) and sharded
engines (ZeRO-3, FSDP). Under DDP and ZeRO-0/1/2 every process holds full copies of both and
applies the same update.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..common.models import unwrap
from ..reference.adapters import POLICY_ADAPTER, REF_ADAPTER

logger = logging.getLogger(__name__)

REF_MODEL_FILE = "ref_model.safetensors"
SHARDED_ENGINES = ("zero3", "fsdp1", "fsdp2")

Pairs = list[tuple[str, torch.Tensor, torch.Tensor]]


def check_sync_settings(args) -> None:
    """Raise ``ValueError`` for ``sync_ref_model`` settings that cannot work together (from ``DPOConfig``)."""
    if not 0 < args.ref_model_mixup_alpha <= 1:
        raise ValueError(f"--ref_model_mixup_alpha must be in (0, 1], got {args.ref_model_mixup_alpha}")
    if args.ref_model_sync_steps < 1:
        raise ValueError(f"--ref_model_sync_steps must be a positive integer, got {args.ref_model_sync_steps}")
    if not args.sync_ref_model:
        return
    if args.precompute_ref_logps:
        raise ValueError(
            "--sync_ref_model true with --precompute_ref_logps: the reference log-probs are computed once before "
            "training, but TR-DPO changes the reference during training. Turn one of them off"
        )
    if args.reference == "none":
        raise ValueError("--sync_ref_model true needs a reference, but --reference is none")
    if args.ref_adapter and args.policy_adapter == "new":
        raise ValueError(
            "--sync_ref_model true with --policy_adapter new: the policy is the SFT adapter plus a new one, so the "
            "reference (the SFT adapter alone) has no parameter to mix each new one into. Use --policy_adapter copy"
        )


def check_sync_launch(args, engine: str, reference_mode: str) -> None:
    """Raise ``ValueError`` when TR-DPO cannot update this trainer's reference (called once, at the start)."""
    if reference_mode == "none":
        raise ValueError("--sync_ref_model true needs a reference, but the loss is reference-free")
    if reference_mode == "adapter" and not args.ref_adapter:
        raise ValueError(
            "--sync_ref_model true with the adapter-disabled reference: that reference is the policy's own base "
            "model, shared with the policy, so it cannot be mixed with it. Pass a separate ref_model "
            "(--ref_model_name_or_path), or --ref_adapter with --policy_adapter copy"
        )
    if engine in SHARDED_ENGINES:
        raise ValueError(
            f"--sync_ref_model true under {engine}: the policy and the reference are sharded, and syncing them is "
            "not supported here. Use DDP or DeepSpeed ZeRO-0/1/2, or turn --sync_ref_model off"
        )


def sync_pairs(reference: Optional[nn.Module], policy: nn.Module) -> Pairs:
    """``(name, reference parameter, policy parameter)`` for every parameter the rule mixes.

    ``reference``: the separate reference (possibly engine-wrapped), or None when the reference is the
    policy's ``ref_adapter`` (then its parameters are paired with those of ``default``).
    """
    policy = unwrap(policy)
    if reference is None:
        named = dict(policy.named_parameters())
        pairs = [
            (name, param, named.get(name.replace(f".{REF_ADAPTER}.", f".{POLICY_ADAPTER}.")))
            for name, param in named.items()
            if f".{REF_ADAPTER}." in name
        ]
    else:
        named = dict(policy.named_parameters())
        pairs = [(name, param, named.get(name)) for name, param in unwrap(reference).named_parameters()]
        missing = set(named) - {name for name, _, _ in pairs}
        if missing:
            raise ValueError(
                f"--sync_ref_model true: the reference has no parameter {sorted(missing)[0]} of the policy; "
                "TR-DPO needs the reference to be the same architecture as the policy"
            )
    for name, ref, pol in pairs:
        if pol is None or pol.shape != ref.shape:
            raise ValueError(
                f"--sync_ref_model true: the reference's parameter {name} has no policy parameter of the same "
                f"name and shape ({'missing' if pol is None else tuple(pol.shape)} vs {tuple(ref.shape)}); TR-DPO "
                "needs the reference to be the same architecture as the policy"
            )
    if not pairs:
        raise ValueError("--sync_ref_model true: the reference has no parameters to sync")
    return pairs


@torch.no_grad()
def mix_(pairs: Pairs, alpha: float) -> None:
    """``ref <- (1 - alpha) * ref + alpha * policy`` in place, for every pair (TRL's ``mul_(1 - alpha).add_``)."""
    for _, ref, pol in pairs:
        ref.mul_(1.0 - alpha).add_(pol.to(ref.dtype), alpha=alpha)


def restore_reference(reference: nn.Module, checkpoint: Union[str, os.PathLike]) -> None:
    """Load the synced reference that :func:`save_reference` wrote into ``checkpoint``; a clear error when absent."""
    path = Path(checkpoint) / REF_MODEL_FILE
    if not path.is_file():
        raise ValueError(
            f"--sync_ref_model true: {checkpoint} holds no synced reference ({REF_MODEL_FILE}); it was written by a "
            "run without sync_ref_model, so resuming from it would restart TR-DPO from the initial reference. "
            "Resume from a checkpoint of a run with sync_ref_model, or turn it off"
        )
    load_reference(reference, path)
    logger.info("TR-DPO: the synced reference restored from %s", path)


def save_reference(reference: nn.Module, directory: Path) -> Path:
    """Write the reference's parameters to ``directory/ref_model.safetensors`` (atomically)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: param.detach().cpu().contiguous() for name, param in unwrap(reference).named_parameters()}
    path = directory / REF_MODEL_FILE
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(tensors, str(partial), metadata={"format": "pt"})
    os.replace(partial, path)  # a reader sees no file or the whole file
    return path


@torch.no_grad()
def load_reference(reference: nn.Module, path: Path) -> None:
    """Copy the parameters in ``path`` (:func:`save_reference`) into ``reference``; every parameter must be there."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    named = dict(unwrap(reference).named_parameters())
    if set(saved) != set(named):
        different = sorted(set(saved) ^ set(named))
        raise ValueError(f"{path} does not match the reference: parameter {different[0]} is in only one of them")
    for name, param in named.items():
        param.copy_(saved[name].to(device=param.device, dtype=param.dtype))


def reference_settings(args) -> list[tuple[str, str]]:
    """Model-card rows for ``ref_adapter`` and TR-DPO, when set."""
    rows = []
    if getattr(args, "ref_adapter", None):
        what = "a trainable copy of it" if args.policy_adapter == "copy" else "a new adapter on top of it"
        rows.append(("ref_adapter", f"{args.ref_adapter} (the reference: the base with it, frozen); policy: {what}"))
    if getattr(args, "sync_ref_model", False):
        alpha = args.ref_model_mixup_alpha
        rows.append(
            (
                "sync_ref_model (TR-DPO)",
                f"every {args.ref_model_sync_steps} optimizer steps: reference = {1 - alpha:g} reference + "
                f"{alpha:g} policy",
            )
        )
    return rows


def required_checkpoint_files(args) -> tuple[str, ...]:
    """Files a checkpoint of this run must hold to be resumed (the synced reference, with a separate reference)."""
    if getattr(args, "sync_ref_model", False) and not getattr(args, "ref_adapter", None):
        return (REF_MODEL_FILE,)
    return ()
