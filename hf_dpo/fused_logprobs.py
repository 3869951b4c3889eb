"""Response-only log-probs straight from the last hidden states, without storing logits.

A causal LM's logits are ``hidden @ W.T (+ b)``. DPO needs the log-prob of one
label per response position, so this module projects only the hidden states of
the M positions that predict a response token, in chunks of ``chunk_size`` rows,
and keeps per row just the fp32 log-sum-exp. The backward pass recomputes each
chunk's logits instead of storing them, so the memory of this part is
``O(chunk_size * V)`` instead of ``O(2B * T * V)`` (the plain path keeps the
full logits of every position for the backward pass).

It is only valid when the logits really are a plain projection. Architectures
that soft-cap (``final_logit_softcapping``), scale (``logit_scale``,
``logits_scaling``, ``output_multiplier``...) or otherwise transform the
projection, PEFT-wrapped heads (``lora.Linear``, ``ModulesToSaveWrapper``),
quantized heads and sharded weights (FSDP, DeepSpeed ZeRO-3) are detected and
fall back to the model's own logits: :func:`plain_projection_problem` names the
structural reason, and on the model's first forward :mod:`hf_dpo.scoring` keeps
the logits of one position and compares them with
:func:`projection_matches_logits`, so a transformation no config attribute
declares is caught rather than guessed; the verdict is cached on the model.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Iterator, Optional

import torch
from torch import nn

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


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype the plain head's matmul would run in: the autocast dtype when autocast is on."""
    device_type = hidden.device.type
    if hasattr(torch, "get_autocast_dtype") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


class LinearTokenLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[m, targets[m]]`` per row, chunked, recomputed in backward.

    Forward keeps only the fp32 log-sum-exp ``(M,)`` besides the inputs; backward
    recomputes each ``(chunk, V)`` block of logits, turns it into the logits'
    gradient ``grad * (onehot - softmax)`` and accumulates the weight gradient in fp32.
    The matmuls run in the autocast dtype when autocast is on (explicit casts, so
    that the recompute in backward, where autocast is off, matches the forward).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, chunk_size: int) -> Tensor:
        dtype = _compute_dtype(hidden)
        accumulate = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        n_rows = hidden.shape[0]
        lse = torch.empty(n_rows, dtype=accumulate, device=hidden.device)  # (M,)
        target_logits = torch.empty(n_rows, dtype=accumulate, device=hidden.device)  # (M,)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, n_rows, chunk_size):
                rows = slice(start, start + chunk_size)
                # Like the plain head: the matmul in the model's dtype, the softmax in fp32.
                logits = nn.functional.linear(hidden[rows].to(dtype), w, b).to(accumulate)  # (c, V)
                lse[rows] = torch.logsumexp(logits, dim=-1)
                target_logits[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return target_logits - lse

    @staticmethod
    def backward(ctx, grad_logps: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        dtype = ctx.dtype
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # fp32 accumulators: summing low-precision chunk products would round every chunk.
        accumulate = lse.dtype
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if needs_bias else None
        grad_logps = grad_logps.to(accumulate)
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                rows = slice(start, start + ctx.chunk_size)
                h = hidden[rows].to(dtype)  # (c, H)
                logits = nn.functional.linear(h, w, b).to(accumulate)  # (c, V)
                # d logp / d logits = onehot(target) - softmax, times the incoming gradient.
                grad_logits = torch.exp(logits - lse[rows, None]).mul_(-grad_logps[rows, None])  # (c, V)
                del logits
                grad_logits.scatter_add_(-1, targets[rows, None], grad_logps[rows, None])
                grad_logits = grad_logits.to(dtype)
                if needs_hidden:
                    grad_hidden[rows] = grad_logits @ w
                if needs_weight:
                    grad_weight.addmm_(grad_logits.t().to(accumulate), h.to(accumulate))
                if needs_bias:
                    grad_bias += grad_logits.to(accumulate).sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def linear_token_logps(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, chunk_size: int = 1024
) -> Tensor:
    """fp32 log-prob ``(M,)`` of each target under the logits ``hidden @ weight.T + bias``.

    Args:
        hidden: ``(M, H)`` last hidden states (after the final norm) at the predicting positions.
        weight: ``(V, H)`` output embedding; ``bias``: ``(V,)`` or None.
        targets: ``(M,)`` token ids.
        chunk_size: rows per projected chunk; bounds the temporaries at ``(chunk_size, V)`` fp32.
    """
    if hidden.shape[0] == 0:
        # Keep the graph connected so that backward() still reaches the parameters.
        return (hidden.sum() * 0).float().expand(0)
    return LinearTokenLogps.apply(hidden, weight, bias, targets, chunk_size)


# --------------------------------------------------------------------------- model inspection


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DeepSpeed / compile wrappers (which keep it in ``.module`` / ``._orig_mod``)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a (PEFT-)wrapped model."""
    model = unwrap(model)
    if hasattr(model, "get_base_model"):  # PeftModel
        model = model.get_base_model()
    return model


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
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, neutral in LOGIT_TRANSFORM_ATTRIBUTES.items():
        value = getattr(text_config, name, neutral)
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
