"""One answer each to "which module is the model?" and "which config holds its text settings?".

A policy reaches hf_dpo wrapped in up to three layers: DDP or a DeepSpeed engine
(``.module``), ``torch.compile`` (``._orig_mod``), and PEFT (``PeftModel`` around the
transformers ``*ForCausalLM``). Multimodal configs keep the language model's settings
in a sub-config (``get_text_config``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DeepSpeed / compile wrappers (which keep it in ``.module`` / ``._orig_mod``).

    A ``PeftModel`` is not unwrapped: it is the model the trainer trains.
    """
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``*ForCausalLM`` inside a (PEFT-, DDP-, DeepSpeed-)wrapped model."""
    model = unwrap(model)
    if hasattr(model, "get_base_model"):  # PeftModel
        model = model.get_base_model()
    return model


def text_config(model_or_config):
    """The config that holds the language model's settings (``hidden_size``, ``num_experts``...), or None."""
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(model_or_config, nn.Module):
        config = getattr(causal_lm(model_or_config), "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating-point parameter (what it computes in), or None."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def is_peft_model(model: nn.Module) -> bool:
    """Whether ``model`` carries PEFT adapters that can be disabled."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def dropout_rates(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, float]]:
    """Every dropout probability in ``model``: ``(module name, module, attribute, value)``.

    Covers dropout modules (``p``) and the float rates that many transformers layers
    pass to ``F.dropout`` or attention kernels themselves (``attention_dropout``,
    ``hidden_dropout``, ``activation_dropout``, ``*_pdrop``...).
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            yield name, module, "p", module.p
        for attribute, value in list(vars(module).items()):
            if ("dropout" in attribute or attribute.endswith("_pdrop")) and isinstance(value, float):
                yield name, module, attribute, value


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0, so that policy and reference agree exactly at step 0.

    The model's config is left as it is.
    """
    for _, module, attribute, value in list(dropout_rates(model)):
        if value != 0.0:
            setattr(module, attribute, 0.0)
