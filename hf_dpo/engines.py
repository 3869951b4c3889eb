"""The reference under each distributed engine, and launches that would not use the engine they ask for.

Engines (what :func:`engine_of` returns): ``single``, ``ddp``, ``zero0``-``zero3``
(DeepSpeed), ``fsdp2``, ``fsdp1``. The reference is prepared by the engine that
runs the policy, so that it is sharded wherever the policy is:

* ``single``/``ddp``: moved to the device, never wrapped (it takes no gradient).
* ZeRO-0/1/2: its own DeepSpeed engine at stage 0 (a full copy, like the policy's
  parameters, in the engine's dtype).
* ZeRO-3: its own inference-only DeepSpeed engine (stage 3, no optimizer), so its
  parameters are gathered layer by layer like the policy's. The overrides are put
  inside ``zero_optimization``: DeepSpeed ignores top-level dotted keys, and a tiny
  model then stays fully resident on every rank.
* FSDP2: ``fully_shard`` per decoder layer and on the root, never wrapped for
  gradients, resharded after every forward (FSDP2 keeps the root gathered otherwise).

:func:`check_launch` and :func:`check_wrapped` stop a run that asked for an engine
(accelerate config, ``fsdp=``/``deepspeed=``, a multi-process launcher) and would
not get it. See docs/distributed.md.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Iterator

import torch
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A launch asked for a distributed engine (or several processes) that the run would not use."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def engine_of(trainer) -> str:
    """The engine that runs the trainer's policy: single, ddp, zero0..zero3, fsdp1 or fsdp2."""
    state = trainer.accelerator.state
    if getattr(state, "deepspeed_plugin", None) is not None:
        return f"zero{int(state.deepspeed_plugin.zero_stage)}"
    if getattr(state, "fsdp_plugin", None) is not None:
        return f"fsdp{int(getattr(state.fsdp_plugin, 'fsdp_version', 1) or 1)}"
    return "ddp" if trainer.accelerator.num_processes > 1 else "single"


def is_zero3_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def refuse_partitioned_copy(model: nn.Module) -> None:
    """Raise when the policy is ZeRO-3-partitioned and so cannot be deep-copied into a reference."""
    if is_zero3_partitioned(model):
        raise ValueError(
            "the policy was partitioned by ZeRO-3 as it loaded (zero3_init_flag), so it cannot be copied into a "
            "reference: pass ref_model= (a path, or a model loaded after DPOConfig so that ZeRO-3 partitions it too)"
        )


def check_launch(trainer) -> None:
    """Raise :class:`EngineError` when the launch asks for an engine or a world size that accelerate did not set up."""
    from accelerate.utils import DistributedType

    args, accelerator = trainer.args, trainer.accelerator
    engine = engine_of(trainer)
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
        raise EngineError(f"DeepSpeed was asked for (deepspeed= or a DEEPSPEED accelerate config) but the run uses {engine}")
    if engine == "zero3":
        zero = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if not zero.get("stage3_gather_16bit_weights_on_model_save", False):
            raise EngineError(
                "ZeRO-3 without stage3_gather_16bit_weights_on_model_save: save_model() would write no weights. Set it "
                "to true in the DeepSpeed config (zero3_save_16bit_model: true in an accelerate config)"
            )
    if engine == "zero3" and args.precompute_ref_logps and getattr(trainer, "reference_mode", None) == "adapter":
        raise EngineError(
            "precompute_ref_logps with the adapter reference under ZeRO-3: the reference pass runs at construction, "
            "before the policy is inside its engine, so its partitioned weights cannot run. Pass a separate ref_model "
            "(it gets its own inference engine), or turn precompute_ref_logps off"
        )
    if engine.startswith("zero") and getattr(args, "nonfinite_loss", "error") == "skip":
        raise EngineError(
            "nonfinite_loss='skip' cannot work under DeepSpeed: the engine owns the gradients and steps the optimizer "
            "itself, so the guard cannot drop a step. Use nonfinite_loss='error'"
        )
    if engine.startswith("zero"):
        logger.info("DeepSpeed: the non-finite gradient check is off (the engine keeps the gradients); the loss check stays on")
    if engine in ("zero3", "fsdp2") and getattr(args, "response_only_logits", False):
        logger.warning(
            "response_only_logits is turned off under %s: it projects the hidden states after the forward, when the "
            "output embedding is sharded again; the full logits are used (same numbers)", engine
        )
        args.response_only_logits = False


class EngineCheck(TrainerCallback):
    """Runs :func:`check_wrapped` once the Trainer has wrapped the policy (at the start of training)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        check_wrapped(self.trainer)


def check_wrapped(trainer) -> None:
    """At the start of training: raise when the policy is not actually wrapped by the engine in use."""
    engine = engine_of(trainer)
    wrapped = trainer.model_wrapped
    if engine.startswith("zero"):
        import deepspeed

        ok = isinstance(wrapped, deepspeed.DeepSpeedEngine)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        ok = any(isinstance(m, FSDPModule) for m in trainer.model.modules())
    elif engine == "ddp":
        ok = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    else:
        ok = True
    if not ok:
        raise EngineError(f"the run uses {engine} but the policy is a plain {type(wrapped).__name__}: it would train unsharded")


# --------------------------------------------------------------------------- the reference


def prepare_reference(trainer, ref_model: nn.Module) -> nn.Module:
    """The frozen ``ref_model`` prepared by the trainer's engine (see the module docstring)."""
    engine = engine_of(trainer)
    if engine.startswith("zero"):
        return deepspeed_reference(trainer, ref_model, int(engine[-1]))
    if engine == "fsdp2":
        return fsdp2_reference(trainer, ref_model)
    if engine == "fsdp1":
        raise EngineError(
            "a separate reference under FSDP1 would be a full copy on every device: use FSDP2 (fsdp_version: 2), "
            "a PEFT adapter reference, or precompute_ref_logps"
        )
    return trainer.accelerator.prepare_model(ref_model, evaluation_mode=True)


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    size = getattr(config, "hidden_size", None)
    if size is None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "hidden_size", None)
    if size is None:
        raise ValueError("cannot size the ZeRO-3 reference engine's buckets: the model config has no hidden_size")
    return int(size)


def reference_deepspeed_config(train_config: dict, stage: int, hidden_size: int) -> dict:
    """The inference-only DeepSpeed config of the reference: the training config without optimizer or scheduler.

    Stage 3 keeps stage 3 with bucket sizes from ``hidden_size`` (nested keys); other stages become stage 0.
    """
    config = copy.deepcopy(train_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    if stage == 3:
        zero = {k: v for k, v in config.get("zero_optimization", {}).items() if v != "auto"}
        zero.update(
            stage=3,
            reduce_bucket_size=hidden_size * hidden_size,
            stage3_param_persistence_threshold=10 * hidden_size,
            stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size),
        )
        config["zero_optimization"] = zero
    else:
        config["zero_optimization"] = {"stage": 0}
    return config


def deepspeed_reference(trainer, ref_model: nn.Module, stage: int) -> nn.Module:
    import deepspeed

    train_config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    config = reference_deepspeed_config(train_config, stage, _hidden_size(ref_model))
    engine, *_ = deepspeed.initialize(model=ref_model, config=config)
    engine.eval()
    logger.info("reference: its own inference-only DeepSpeed engine at stage %d", config["zero_optimization"]["stage"])
    return engine


def _reshard_after_forward(module, inputs, output):
    module.reshard()  # FSDP2 leaves the root group gathered after a forward; the reference has no backward to need it


def fsdp2_reference(trainer, ref_model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = trainer.accelerator.state.fsdp_plugin
    kwargs = {"reshard_after_forward": True}
    mesh = getattr(trainer.accelerator, "torch_device_mesh", None)
    if mesh is not None:
        kwargs["mesh"] = mesh
    if isinstance(getattr(plugin, "mixed_precision_policy", None), MixedPrecisionPolicy):
        kwargs["mp_policy"] = plugin.mixed_precision_policy
    names = set(getattr(plugin, "transformer_cls_names_to_wrap", None) or []) or set(getattr(ref_model, "_no_split_modules", None) or [])
    ref_model.requires_grad_(False)
    layers = [m for m in ref_model.modules() if type(m).__name__ in names]
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(ref_model, **kwargs)
    ref_model.register_forward_hook(_reshard_after_forward)
    ref_model.eval()
    logger.info("reference: sharded with fully_shard (%d layers and the root), resharded after each forward", len(layers))
    return ref_model


def unwrap_engine(model: nn.Module) -> nn.Module:
    """The module inside a DeepSpeed engine or DDP wrapper (FSDP2 shards in place)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for every parameter and buffer, one gathered at a time under ZeRO-3 / FSDP2."""
    model = unwrap_engine(model)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if hasattr(tensor, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor]):
                yield name, tensor.detach().clone()
        elif hasattr(tensor, "full_tensor"):
            yield name, tensor.full_tensor().detach()
        else:
            yield name, tensor


def local_numel(model: nn.Module) -> tuple[int, int]:
    """``(this rank's stored elements, full elements)`` of ``model``'s parameters (shared tensors once)."""
    local = full = 0
    seen = set()
    for tensor in unwrap_engine(model).parameters():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if hasattr(tensor, "ds_numel"):
            local, full = local + tensor.ds_tensor.numel(), full + tensor.ds_numel
        elif hasattr(tensor, "to_local"):
            local, full = local + tensor.to_local().numel(), full + tensor.numel()
        else:
            local, full = local + tensor.numel(), full + tensor.numel()
    return local, full
