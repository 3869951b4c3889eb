"""Launches that would not use the engine they ask for, stopped before they train.

:func:`check_launch` runs once the Trainer has built its accelerator: it raises
:class:`~hf_dpo.reference.engines.EngineError` when the launch asks for an engine
(accelerate config, ``fsdp=``/``deepspeed=``, a multi-process launcher) or a world size
that accelerate did not set up, and reports what the engine allows (it never changes
the config). :class:`EngineCheck` runs :func:`check_wrapped` once the policy is wrapped,
at the start of training. See docs/distributed.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import TrainerCallback

from ..common.flags import parse_bool
from ..reference.engines import EngineError, engine_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchCheck:
    """What :func:`check_launch` found: the engine, and whether the response-only projection may run under it."""

    engine: str
    response_only_logits: bool


def _env_true(name: str) -> bool:
    return bool(parse_bool(os.environ.get(name, "false")))


def check_launch(args, accelerator, reference_mode: str) -> LaunchCheck:
    """Raise :class:`EngineError` when the launch asks for an engine or a world size that accelerate did not set up.

    ``args``: the trainer's :class:`~hf_dpo.DPOConfig`; ``reference_mode``: ``model``, ``adapter`` or ``none``.
    Every process reaches the same verdict (same arguments, same launch), so a refusal is not relayed between
    processes (``raised_on_every_rank``, :mod:`hf_dpo.training.faults`).
    """
    try:
        return _check_launch(args, accelerator, reference_mode)
    except EngineError as error:
        error.raised_on_every_rank = True
        raise


def _check_launch(args, accelerator, reference_mode: str) -> LaunchCheck:
    from accelerate.utils import DistributedType

    engine = engine_of(accelerator)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and accelerator.num_processes != world:
        raise EngineError(
            f"launched as {world} processes (WORLD_SIZE={world}) but accelerate set up {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type}): every process would train alone on all the data. "
            "Without GPUs set use_cpu=True for DDP over gloo; DeepSpeed on CPU needs the accelerate state created "
            "with the gloo backend first (docs/distributed.md)"
        )
    wants_fsdp = bool(getattr(args, "fsdp", None)) or _env_true("ACCELERATE_USE_FSDP")
    if wants_fsdp and accelerator.distributed_type != DistributedType.FSDP:
        raise EngineError(
            f"FSDP was asked for (fsdp= or an FSDP accelerate config) but accelerate runs {accelerator.distributed_type}: "
            "the model would not be sharded and, on CPU, gradients would not be synchronised. accelerate enables FSDP "
            "only on GPU-like devices; run on GPUs, or use DDP (use_cpu=True) on CPU"
        )
    wants_deepspeed = bool(getattr(args, "deepspeed", None)) or _env_true("ACCELERATE_USE_DEEPSPEED")
    if wants_deepspeed and not engine.startswith("zero"):
        raise EngineError(
            f"DeepSpeed was asked for (deepspeed= or a DEEPSPEED accelerate config) but the run uses {engine}"
        )
    if engine == "zero3":
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if not zero.get("stage3_gather_16bit_weights_on_model_save", False):
            raise EngineError(
                "ZeRO-3 without stage3_gather_16bit_weights_on_model_save: save_model() would write no weights. Set it "
                "to true in the DeepSpeed config (zero3_save_16bit_model: true in an accelerate config)"
            )
    if engine == "zero3" and args.precompute_ref_logps and reference_mode == "adapter":
        raise EngineError(
            "precompute_ref_logps with the adapter reference under ZeRO-3: the reference pass runs at construction, "
            "before the policy is inside its engine, so its partitioned weights cannot run. Pass a separate ref_model "
            "(it gets its own inference engine), or turn precompute_ref_logps off"
        )
    if engine.startswith("zero") and args.nonfinite_loss == "skip":
        raise EngineError(
            "nonfinite_loss='skip' cannot work under DeepSpeed: the engine owns the gradients and steps the optimizer "
            "itself, so the guard cannot drop a step. Use nonfinite_loss='error'"
        )
    if engine.startswith("zero"):
        logger.info(
            "DeepSpeed: the non-finite gradient check is off (the engine keeps the gradients); the loss check stays on"
        )
    response_only = bool(args.response_only_logits)
    if engine in ("zero3", "fsdp2") and response_only:
        logger.warning(
            "response_only_logits is not used under %s: it projects the hidden states after the forward, when the "
            "output embedding is sharded again; the full logits are used (same numbers)",
            engine,
        )
        response_only = False
    return LaunchCheck(engine=engine, response_only_logits=response_only)


def check_wrapped(engine: str, wrapped: nn.Module, model: nn.Module) -> None:
    """At the start of training: raise when the policy (``model``, wrapped as ``wrapped``) is not in the engine in use."""
    if engine.startswith("zero"):
        import deepspeed

        ok = isinstance(wrapped, deepspeed.DeepSpeedEngine)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        ok = any(isinstance(m, FSDPModule) for m in model.modules())
    elif engine == "ddp":
        ok = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    else:
        ok = True
    if not ok:
        raise EngineError(
            f"the run uses {engine} but the policy is a plain {type(wrapped).__name__}: it would train unsharded"
        )


class EngineCheck(TrainerCallback):
    """Runs :func:`check_wrapped` once the Trainer has wrapped the policy (at the start of training).

    ``models()`` returns ``(wrapped, model)``: Trainer's ``model_wrapped`` and ``model``, read when training begins.
    """

    def __init__(self, engine: str, models):
        self.engine = engine
        self.models = models

    def on_train_begin(self, args, state, control, **kwargs):
        check_wrapped(self.engine, *self.models())
