"""Turn a policy's logits NaN on demand, for the fault tests (tests/dist_harness.py).

A forward hook on the decoder's final norm replaces its output with NaN whenever ``when()`` is true and the module
is in training mode: every logit then comes out NaN, whether the head runs as a module or as a fused projection of
the hidden states (hf_dpo.scoring.projection), and under every engine (the hook sits on the unwrapped module).
"""

import torch


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder's final norm (Llama-style ``model.norm``), also inside a PEFT wrapper."""
    names = [name for name, _ in model.named_modules() if name == "model.norm" or name.endswith(".model.norm")]
    if len(names) != 1:
        raise ValueError(f"expected one final norm named model.norm, found {names}")
    return model.get_submodule(names[0])


def poison_hidden_states(model: torch.nn.Module, when) -> torch.utils.hooks.RemovableHandle:
    """Register the hook on ``model``'s final norm; ``when()`` is asked at every training forward."""

    def hook(module, inputs, output):
        if module.training and when():
            return output + float("nan")
        return output

    return final_norm(model).register_forward_hook(hook)
