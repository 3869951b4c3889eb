"""The router load-balancing loss of mixture-of-experts policies (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE...).

Pre-training and SFT keep experts balanced with ``router_aux_loss_coef * aux_loss``
(Switch Transformer, eqs. 4-6); dropping it during DPO lets routing collapse. When
the policy's config has ``output_router_logits=True`` (or ``DPOConfig.router_aux_loss_coef``
is set), :class:`RouterAux` asks the policy's forward for its router logits, and
the trainer adds ``coef * aux_loss`` to the loss and logs ``aux_loss``. The
reference never computes router logits: its forwards run with
``output_router_logits=False`` whatever its config says.

Which tokens count. transformers' ``load_balancing_loss_func`` averages over the
tokens its ``attention_mask`` marks, i.e. every real token of the 2B padded
sequences, prompts included, and no padding. The aux loss here is that same
quantity, computed from the captured router logits with weight 1 on each real token
and 0 on padding; the response-only projection does not touch it (the routers run in
the decoder, before the head). An MoE policy that trains its aux loss runs the padded
layout only: the model's own forward computes the aux loss from a 2D ``attention_mask``,
which the packed layouts replace by a 4D block mask (:meth:`RouterAux.refuse_packed_layouts`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn

from ..common.models import causal_lm, text_config

Tensor = torch.Tensor


def routes_tokens(model: nn.Module) -> bool:
    """Whether ``model``'s forward can return router logits (a mixture-of-experts causal LM)."""
    lm = causal_lm(model)
    return (
        hasattr(text_config(model), "output_router_logits")
        and "output_router_logits" in inspect.signature(type(lm).forward).parameters
    )


def router_aux_coef(model: nn.Module, coef: Optional[float]) -> Optional[float]:
    """The coefficient to train with: ``coef`` if set, else the model config's when it outputs router logits; None: off."""
    if coef is None:
        config = text_config(model)
        if not (routes_tokens(model) and getattr(config, "output_router_logits", False)):
            return None
        return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)
    if not routes_tokens(model):
        raise ValueError(
            f"--router_aux_loss_coef {coef} needs a mixture-of-experts model whose forward returns router logits, "
            f"but {type(causal_lm(model)).__name__} has none; leave the flag unset"
        )
    return float(coef)


def token_weights(batch: dict[str, Tensor]) -> Tensor:
    """``(2B * T,)`` weight of every position in the load-balancing loss: 1 on real tokens, 0 on padding."""
    return batch["attention_mask"].reshape(-1).float()


def load_balancing_loss(router_logits: tuple[Tensor, ...], weights: Tensor, num_experts: int, top_k: int) -> Tensor:
    """Switch-Transformer load balancing over weighted tokens, summed over layers as transformers does.

    Args:
        router_logits: per layer ``(N, E)`` (or ``(R, L, E)``), N = R * L positions.
        weights: ``(N,)`` weight of each position (0 on padding).

    Returns ``num_experts * sum_e f_e * P_e`` (fp32 scalar) where ``f_e`` is the weighted share of
    top-k assignments to expert e and ``P_e`` its weighted mean router probability, over all layers.
    """
    device = router_logits[0].device
    weights = weights.to(device=device, dtype=torch.float32)
    assignments = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probabilities = torch.zeros(num_experts, dtype=torch.float32, device=device)
    for logits in router_logits:
        routing = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)  # (N, E)
        selected = torch.topk(routing, top_k, dim=-1).indices  # (N, k)
        assignments = assignments + torch.zeros_like(assignments).index_add(
            0, selected.reshape(-1), weights.repeat_interleave(top_k)
        )
        probabilities = probabilities + (routing * weights[:, None]).sum(0)
    total = weights.sum() * len(router_logits)
    return num_experts * (assignments / total * probabilities / total).sum()


class RouterAux:
    """Captures the policy's router logits during :meth:`capture` and turns them into the aux loss.

    Installed once per trainer; a no-op (``coef is None``) for models without routers.
    """

    def __init__(self, policy: nn.Module, reference: Optional[nn.Module], coef: Optional[float]):
        self.coef = router_aux_coef(policy, coef)
        self._capturing = False
        self._captured: list[tuple[Tensor, ...]] = []
        self.handles = []
        if self.coef is None:
            return
        config = text_config(policy)
        self.num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
        self.top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", 2)
        lm = causal_lm(policy)
        # Outside capture() (reference forwards of an adapter-disabled policy), no router logits.
        self.handles.append(lm.register_forward_pre_hook(self._ask, with_kwargs=True))
        self.handles.append(lm.register_forward_hook(self._keep))
        if reference is not None and routes_tokens(reference):
            self.handles.append(causal_lm(reference).register_forward_pre_hook(_never_ask, with_kwargs=True))

    def refuse_packed_layouts(self, padding_free, share_prompt) -> None:
        """Raise for a packed or shared-prompt layout: the model's own forward computes its aux loss from the
        ``attention_mask``, which those layouts pass as a 4D block mask (transformers fails on it)."""
        if self.coef is None:
            return
        for flag, value in (("padding_free", padding_free), ("share_prompt", share_prompt)):
            if value is True:
                raise ValueError(
                    f"--{flag} true is not supported with a mixture-of-experts policy that trains its router "
                    "load-balancing loss (the model computes it from a 2D attention_mask); use the padded layout "
                    f"(--{flag} false), or --router_aux_loss_coef 0 with output_router_logits=False to drop the aux loss"
                )

    def _ask(self, module, args, kwargs):
        if self._capturing:
            return args, {**kwargs, "output_router_logits": True}
        # Outside capture (the adapter-disabled reference), none unless the caller asks explicitly.
        return args, {"output_router_logits": False, **kwargs}

    def _keep(self, module, args, output):
        if self._capturing and getattr(output, "router_logits", None) is not None:
            self._captured.append(tuple(output.router_logits))

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Within the context, the policy's forwards return router logits, kept for :meth:`loss`."""
        self._captured = []
        self._capturing = self.coef is not None
        try:
            yield
        finally:
            self._capturing = False

    def loss(self, batch: dict[str, Tensor]) -> Optional[Tensor]:
        """The aux loss of the forward captured last (fp32 scalar), or None when off."""
        if self.coef is None:
            return None
        if not self._captured:
            raise RuntimeError(
                "the policy's forward returned no router logits although output_router_logits was requested"
            )
        # The last forward is the one scored (a fallback from the response-only projection runs a second one).
        router_logits, self._captured = self._captured[-1], []
        num_experts = self.num_experts or router_logits[0].shape[-1]
        return load_balancing_loss(router_logits, token_weights(batch), num_experts, self.top_k)


def _never_ask(module, args, kwargs):
    return args, {**kwargs, "output_router_logits": False}
