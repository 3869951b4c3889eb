"""The saved policy of ``policy_adapter="new"``: one LoRA adapter, the SFT adapter and the new one concatenated.

During training the policy is base + SFT adapter (``ref_adapter``, frozen) + the new adapter,
two LoRA deltas that peft saves as two adapters (the new one at the top level, the SFT one in
``ref_adapter/``). Loaded the usual way, ``PeftModel.from_pretrained(base, output_dir)``, the
top level alone would silently miss the SFT delta. So every save that is not a resumable
``checkpoint-<step>`` replaces the top-level adapter by their concatenation along the rank
(what peft's ``add_weighted_adapter(..., combination_type="cat")`` builds):

    A = [s_sft * A_sft ; s_new * A_new]   (r_sft + r_new, in)
    B = [B_sft , B_new]                   (out, r_sft + r_new)
    B @ A = s_sft * B_sft @ A_sft + s_new * B_new @ A_new,  with scaling lora_alpha / r = 1

so the one adapter is exactly the policy; a module adapted by only one of them gets zeros in
the other's rows. ``ref_adapter/`` stays beside it: the reference the run was trained against.
Checkpoints keep peft's two adapters, which is what ``Trainer`` resumes from.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..reference.adapters import REF_ADAPTER
from .checkpoints import CHECKPOINT_PATTERN

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Suffix of a LoRA A / B tensor -> the dimension its rank is on (A: rows, B: columns), for linear, conv and embeddings.
_RANK_DIM = {".lora_A.weight": 0, ".lora_B.weight": 1, ".lora_embedding_A": 0, ".lora_embedding_B": 1}


def _split_key(key: str) -> tuple[str, str]:
    for suffix in _RANK_DIM:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    raise ValueError(f"cannot concatenate LoRA adapters holding {key!r}: only LoRA A and B tensors can be")


def lora_scaling(config: dict) -> float:
    """The factor peft multiplies ``B @ A`` by: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA."""
    r = config["r"]
    return config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)


def concatenate_lora(
    first: tuple[dict[str, torch.Tensor], dict], second: tuple[dict[str, torch.Tensor], dict]
) -> tuple[dict[str, torch.Tensor], dict]:
    """One LoRA adapter (state dict, config dict) whose delta is the sum of the deltas of ``first`` and ``second``.

    Each is ``(state dict as peft saves it, adapter_config.json as a dict)``; the result takes ``second``'s
    other settings. The module docstring has the formula.
    """
    (first_state, first_config), (second_state, second_config) = first, second
    ranks = (first_config["r"], second_config["r"])
    scalings = (lora_scaling(first_config), lora_scaling(second_config))
    modules: dict[str, dict[str, list]] = {}
    for index, state in enumerate((first_state, second_state)):
        for key, tensor in state.items():
            module, suffix = _split_key(key)
            modules.setdefault(module, {}).setdefault(suffix, [None, None])[index] = tensor
    combined = {}
    for module, parts in modules.items():
        for suffix, tensors in parts.items():
            dim = _RANK_DIM[suffix]
            present = next(t for t in tensors if t is not None)
            blocks = []
            for index, tensor in enumerate(tensors):
                if tensor is None:  # this adapter does not adapt the module: zero rows of A, zero columns of B
                    shape = list(present.shape)
                    shape[dim] = ranks[index]
                    tensor = present.new_zeros(shape)
                elif dim == 0:  # the scaling goes into A, as peft's "cat" combination does
                    tensor = (tensor.double() * scalings[index]).to(tensor.dtype)
                blocks.append(tensor)
            combined[module + suffix] = torch.cat(blocks, dim=dim).contiguous()
    prefix = "base_model.model."
    targets = sorted({m[len(prefix) :] if m.startswith(prefix) else m for m in modules})
    config = dict(second_config)
    config.update(
        r=sum(ranks),
        lora_alpha=sum(ranks),  # scaling 1: the scalings are inside A
        use_rslora=False,
        target_modules=targets,  # the exact modules, so that no other one gets an (empty) adapter
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        rank_pattern={},
        alpha_pattern={},
        base_model_name_or_path=second_config.get("base_model_name_or_path")
        or first_config.get("base_model_name_or_path"),
    )
    return combined, config


def _read(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    return load_file(str(directory / WEIGHTS_NAME)), json.loads((directory / CONFIG_NAME).read_text())


def write_policy_adapter(args, output_dir: Union[str, os.PathLike]) -> bool:
    """For ``policy_adapter="new"``, rewrite the adapter saved in ``output_dir`` as the whole policy (one adapter).

    Returns whether it did: not for other runs, nor for a ``checkpoint-<step>`` directory (kept resumable).
    """
    output_dir = Path(output_dir)
    if not args.ref_adapter or args.policy_adapter != "new" or CHECKPOINT_PATTERN.match(output_dir.name):
        return False
    from safetensors.torch import save_file

    state, config = concatenate_lora(_read(output_dir / REF_ADAPTER), _read(output_dir))
    save_file(state, str(output_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (output_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def saved_lora_settings(output_dir: Union[str, os.PathLike]) -> Optional[tuple[int, float, Any]]:
    """``(r, lora_alpha, target modules)`` of the LoRA adapter saved in ``output_dir``, or None when there is none.

    Target modules given as full module names (a concatenated adapter's) are shown by their last part.
    """
    path = Path(output_dir) / CONFIG_NAME
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    targets = config.get("target_modules")
    if isinstance(targets, list):
        targets = sorted({name.rsplit(".", 1)[-1] for name in targets})
    return config.get("r"), config.get("lora_alpha"), targets
