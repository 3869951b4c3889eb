"""The reference under each distributed engine.

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

The launch checks that stop a run which would not get the engine it asked for are
in :mod:`hf_dpo.training.launch`. See docs/distributed.md.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
from torch import nn

from ..common.models import text_config, unwrap

logger = logging.getLogger(__name__)


def engine_of(accelerator) -> str:
    """The engine ``accelerator`` runs the policy with: single, ddp, zero0..zero3, fsdp1 or fsdp2."""
    state = accelerator.state
    if getattr(state, "deepspeed_plugin", None) is not None:
        return f"zero{int(state.deepspeed_plugin.zero_stage)}"
    if getattr(state, "fsdp_plugin", None) is not None:
        return f"fsdp{int(getattr(state.fsdp_plugin, 'fsdp_version', 1) or 1)}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def is_zero3_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


def refuse_partitioned_copy(model: nn.Module) -> None:
    """Raise when the policy is ZeRO-3-partitioned and so cannot be deep-copied into a reference."""
    if is_zero3_partitioned(model):
        raise ValueError(
            "the policy was partitioned by ZeRO-3 as it loaded (zero3_init_flag), so it cannot be copied into a "
            "reference: pass ref_model= (a path, or a model loaded after DPOConfig so that ZeRO-3 partitions it too)"
        )


class EngineError(RuntimeError):
    """A launch asked for a distributed engine (or several processes) that the run would not use."""


def prepare_reference(ref_model: nn.Module, accelerator) -> nn.Module:
    """The frozen ``ref_model`` prepared by the engine ``accelerator`` runs the policy with (see the module docstring)."""
    engine = engine_of(accelerator)
    if engine.startswith("zero"):
        return deepspeed_reference(ref_model, accelerator.state.deepspeed_plugin.deepspeed_config, int(engine[-1]))
    if engine == "fsdp2":
        return fsdp2_reference(
            ref_model, accelerator.state.fsdp_plugin, getattr(accelerator, "torch_device_mesh", None)
        )
    if engine == "fsdp1":
        raise EngineError(
            "a separate reference under FSDP1 would be a full copy on every device: use FSDP2 (fsdp_version: 2), "
            "a PEFT adapter reference, or precompute_ref_logps"
        )
    return accelerator.prepare_model(ref_model, evaluation_mode=True)


def _hidden_size(model: nn.Module) -> int:
    size = getattr(model.config, "hidden_size", None) or getattr(text_config(model), "hidden_size", None)
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


def deepspeed_reference(ref_model: nn.Module, train_config: dict, stage: int) -> nn.Module:
    """``ref_model`` in its own inference-only DeepSpeed engine built from the policy's ``train_config``."""
    import deepspeed

    config = reference_deepspeed_config(train_config, stage, _hidden_size(ref_model))
    engine, *_ = deepspeed.initialize(model=ref_model, config=config)
    engine.eval()
    logger.info("reference: its own inference-only DeepSpeed engine at stage %d", config["zero_optimization"]["stage"])
    return engine


def _reshard_after_forward(module, inputs, output):
    module.reshard()  # FSDP2 leaves the root group gathered after a forward; the reference has no backward to need it


def fsdp2_reference(ref_model: nn.Module, plugin, mesh=None) -> nn.Module:
    """``ref_model`` sharded with ``fully_shard`` like the policy (accelerate's FSDP ``plugin``), never for gradients."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"reshard_after_forward": True}
    if mesh is not None:
        kwargs["mesh"] = mesh
    if isinstance(getattr(plugin, "mixed_precision_policy", None), MixedPrecisionPolicy):
        kwargs["mp_policy"] = plugin.mixed_precision_policy
    names = set(getattr(plugin, "transformer_cls_names_to_wrap", None) or []) or set(
        getattr(ref_model, "_no_split_modules", None) or []
    )
    ref_model.requires_grad_(False)
    layers = [m for m in ref_model.modules() if type(m).__name__ in names]
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(ref_model, **kwargs)
    ref_model.register_forward_hook(_reshard_after_forward)
    ref_model.eval()
    logger.info(
        "reference: sharded with fully_shard (%d layers and the root), resharded after each forward", len(layers)
    )
    return ref_model


def full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)`` for every parameter and buffer, one gathered at a time under ZeRO-3 / FSDP2."""
    model = unwrap(model)
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
    for tensor in unwrap(model).parameters():
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
