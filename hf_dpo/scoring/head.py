"""Is a model's logit head a plain projection? Only then may :mod:`hf_dpo.scoring.projection` replace it.

A causal LM's logits are ``hidden @ W.T (+ b)`` for most architectures. Those that
soft-cap (``final_logit_softcapping``), scale (``logit_scale``, ``logits_scaling``,
``output_multiplier``...) or otherwise transform the projection, PEFT-wrapped heads
(``lora.Linear``, ``ModulesToSaveWrapper``), quantized heads and sharded weights (FSDP,
DeepSpeed ZeRO-3) are detected and keep the model's own logits:
:func:`plain_projection_problem` names the structural reason, and on the model's first
forward :mod:`hf_dpo.scoring.batch` keeps the logits of one position and compares them
with :func:`projection_matches_logits`, so a transformation no config attribute declares
is caught rather than guessed; the verdict is cached on the model.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn

from ..common.models import causal_lm, text_config

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

# Config attributes that make the logits differ from ``hidden @ W.T``; the value that means "no change".
LOGIT_TRANSFORM_ATTRIBUTES = {
    "final_logit_softcapping": None,  # Gemma 2/3: cap * tanh(logits / cap)
    "logit_scale": 1.0,  # Cohere
    "logits_scaling": 1.0,  # Granite, MiniCPM3, HyperCLOVA X
    "output_multiplier": 1.0,
    "lm_head_multiplier": 1.0,  # Falcon-H1
    "scale_width": None,  # MiniCPM: logits / (hidden / dim_model_base)
    "logit_softcapping": None,
}

_VERDICT_ATTRIBUTE = "_hf_dpo_plain_projection"


def plain_projection_problem(model: nn.Module) -> Optional[str]:
    """Why the logits of ``model`` may not be ``last_hidden @ W.T (+ b)``; None when they are.

    Structural checks only; :func:`projection_matches_logits` checks the numbers.
    """
    wrapper = model
    while isinstance(wrapper, nn.Module):
        if type(wrapper).__name__ == "FullyShardedDataParallel":
            return "FSDP shards the output embedding outside its own forward"
        wrapper = getattr(wrapper, "module", None)
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    if config is None or not hasattr(lm, "get_output_embeddings") or not hasattr(lm, "get_decoder"):
        return f"{type(lm).__name__} is not a transformers causal LM"
    config = text_config(config)
    for name, neutral in LOGIT_TRANSFORM_ATTRIBUTES.items():
        value = getattr(config, name, neutral)
        if value is not None and value != neutral:
            return f"config.{name}={value!r} transforms the logits"
    head = lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        # lora.Linear, ModulesToSaveWrapper, bnb Linear4bit...: their forward is not F.linear(weight).
        return f"the output embedding is a {type(head).__name__}, not a plain nn.Linear"
    weight = head.weight
    if hasattr(weight, "ds_id") or type(weight).__name__ == "DTensor" or weight.dim() != 2 or weight.numel() == 0:
        return "the output embedding's weight is sharded (FSDP / DeepSpeed ZeRO-3)"
    if "logits_to_keep" not in inspect.signature(type(lm).forward).parameters:
        return f"{type(lm).__name__}.forward has no logits_to_keep argument"
    try:
        lm.get_decoder()
    except (AttributeError, NotImplementedError, ValueError) as err:
        return f"no decoder module to read the last hidden states from ({err})"
    return None


@contextlib.contextmanager
def captured_last_hidden(model: nn.Module) -> Iterator[list]:
    """Within the context, every forward of ``model`` appends its decoder's ``last_hidden_state`` to the yielded list.

    A hook, rather than calling the decoder directly, so that the forward still goes
    through DDP and PEFT wrappers (gradient synchronisation, adapters).
    """
    captured: list[Tensor] = []

    def hook(module, args, output):
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(output[0] if hidden is None else hidden)

    handle = causal_lm(model).get_decoder().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def projection_matches_logits(model: nn.Module, logits: Tensor, hidden: Tensor) -> bool:
    """Whether ``logits`` ``(..., V)`` equal ``model``'s output embedding applied to ``hidden`` ``(..., H)``.

    Both come from the same forward, so any transformation between the decoder and
    the logits (scaling, capping, a custom head) shows up here whether or not the
    config names it.
    """
    head = output_projection(model)
    with torch.no_grad():
        projected = nn.functional.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float()
    tolerance = 1e-5 if logits.dtype == torch.float32 else 2e-2
    return logits.shape == projected.shape and torch.allclose(logits.float(), projected, rtol=tolerance, atol=tolerance)


def projection_verdict(model: nn.Module) -> Optional[bool]:
    """The cached result of the numerical check for ``model``: True, False, or None (not checked yet)."""
    return getattr(causal_lm(model), _VERDICT_ATTRIBUTE, None)


def set_projection_verdict(model: nn.Module, verdict: bool, reason: str = "") -> None:
    """Remember whether ``model``'s logits are a plain projection, and say so once when they are not."""
    if not verdict:
        logger.warning("response_only_logits: using the model's full logits because %s", reason)
    setattr(causal_lm(model), _VERDICT_ATTRIBUTE, verdict)


def output_projection(model: nn.Module) -> nn.Linear:
    """The output embedding (``lm_head``) of a causal LM, through DDP / PEFT wrappers."""
    return causal_lm(model).get_output_embeddings()
