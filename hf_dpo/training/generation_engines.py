"""The policy with its full parameters on every rank, so that each rank decodes its own prompts alone.

Decoding runs a different number of forwards on each rank (each stops when its own prompts are
finished). Under DDP and ZeRO-0/1/2 every rank holds the whole model and the plain module
generates without collectives. Under ZeRO-3 and FSDP2 each forward would gather the parameters
with a collective that every rank must join, so the parameters are gathered once before decoding
and the engine's per-forward gathering is switched off until it ends:

* ZeRO-3: ``deepspeed.zero.GatheredParameters`` over every parameter, with the engine's module
  hooks removed (they would re-partition a layer after its forward) and registered again after.
* FSDP2: ``FSDPModule.unshard()`` on every ``fully_shard`` group with ``reshard_after_forward``
  off, then ``reshard()`` and the setting restored.

FSDP1 is refused when the trainer is built (:func:`refuse_generation_engine`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..common.models import unwrap
from ..reference.engines import EngineError


def refuse_generation_engine(engine: str) -> None:
    """Raise :class:`EngineError` for an engine under which evaluation generations cannot run."""
    if engine == "fsdp1":
        raise EngineError(
            "--eval_generations under FSDP1: its parameters cannot be gathered for decoding here. Use FSDP2 "
            "(fsdp_version: 2) or DeepSpeed, or set --eval_generations 0"
        )


@contextlib.contextmanager
def full_parameters(model: nn.Module, engine: str, reshard_after_forward: bool = True) -> Iterator[nn.Module]:
    """``model`` (as Trainer wraps it) unwrapped, with every parameter whole on this rank while the context is open.

    ``reshard_after_forward``: the policy's FSDP2 setting, restored on exit.
    """
    if engine == "zero3":
        with _zero3_gathered(model) as module:
            yield module
    elif engine == "fsdp2":
        with _fsdp2_unsharded(unwrap(model), reshard_after_forward) as module:
            yield module
    else:
        yield unwrap(model)


def _zero3_offload(engine: nn.Module):
    """The object that owns the ZeRO-3 module hooks: the optimizer's ``parameter_offload`` or, without an optimizer,
    the ``DeepSpeedZeRoOffload`` DeepSpeed puts in its place."""
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", optimizer)
    if offload is None or not hasattr(offload, "forward_hooks"):
        raise EngineError(
            "--eval_generations under ZeRO-3 needs the policy inside its DeepSpeed engine (evaluate during or after "
            "train(), not before); or set --eval_generations 0"
        )
    return offload


@contextlib.contextmanager
def _zero3_gathered(engine: nn.Module) -> Iterator[nn.Module]:
    import deepspeed

    module = unwrap(engine)
    offload = _zero3_offload(engine)
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks.clear()
        offload.backward_hooks.clear()
        for param in params:
            param.ds_active_sub_modules.clear()  # no module holds them: GatheredParameters re-partitions on exit
        try:
            yield module
        finally:
            # Registers the hooks anew and invalidates the prefetch trace recorded before decoding.
            offload._register_deepspeed_module(offload.module)


@contextlib.contextmanager
def _fsdp2_unsharded(module: nn.Module, reshard_after_forward: bool) -> Iterator[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for group in groups:
        group.set_reshard_after_forward(False, recurse=False)
        group.unshard()
    try:
        yield module
    finally:
        for group in groups:
            group.set_reshard_after_forward(reshard_after_forward, recurse=False)
            group.reshard()
