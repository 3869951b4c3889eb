"""Completions of held-out prompts: which prompts, where a completion stops, the batched decode, the split over ranks.

The prompts are the held-out pairs' own inference prompts: a tokenized pair's first
``prompt_length`` tokens are exactly ``apply_chat_template(prompt, add_generation_prompt=True)``
(after prompt truncation; docs/data.md), so a completion is what the model writes for that
conversation at inference. Decoding is batched with left padding, so that the new tokens of every
row start in the same column, uses the KV cache, and stops at the template's end-of-turn token or EOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers import GenerationConfig

from ..common.models import causal_lm
from ..data.errors import DataError
from ..tokenization.special_tokens import special_token_strings
from ..tokenization.templates import end_of_turn_text

# Set from their own flags (or by hf_dpo): refused in --eval_generation_kwargs.
RESERVED_KWARGS = ("max_new_tokens", "max_length", "eos_token_id", "pad_token_id", "num_return_sequences")


@dataclass(frozen=True)
class Prompt:
    """A held-out prompt: the ``row_id`` of its pair, its token ids, and the scored length of the pair's chosen answer."""

    row_id: int
    ids: tuple[int, ...]
    chosen_tokens: int


@dataclass(frozen=True)
class Completion:
    """What the model wrote after ``prompt``: ``ids`` up to and including the stop token when ``finished``."""

    prompt: Prompt
    ids: tuple[int, ...]
    finished: bool


def select_prompts(dataset, n: int) -> list[Prompt]:
    """The first ``n`` distinct prompts of a tokenized evaluation set, in data set order (fewer if it has fewer)."""
    prompts: list[Prompt] = []
    seen: set[tuple[int, ...]] = set()
    for index, row in enumerate(dataset):  # stops early: an iterable evaluation set is read only as far as needed
        if len(prompts) == n:
            break
        if "prompt_length" not in row:
            raise ValueError(
                "--eval_generations needs the evaluation set's prompt_length column (written by hf_dpo's tokenization): "
                "pass raw or canonical rows, or add the column to your tokenized pairs"
            )
        length = int(row["prompt_length"])
        ids = tuple(int(i) for i in row["chosen_input_ids"][:length])
        if ids in seen:
            continue
        seen.add(ids)
        chosen = sum(int(m) for m in row["chosen_response_mask"][length:])  # the final answer, not earlier turns
        prompts.append(Prompt(int(row.get("row_id", index)), ids, chosen))
    return prompts


def stop_token_ids(tokenizer, model: nn.Module, chat_template_kwargs: Optional[dict] = None) -> list[int]:
    """The ids that end a completion: the chat template's end-of-turn token, the tokenizer's and the model's EOS.

    The end-of-turn token is the first special token of the text the template writes after an
    answer (``<|im_end|>``, ``<|eot_id|>``...), found as the tokenization finds the scored span.
    """
    ids: list[int] = []
    if getattr(tokenizer, "chat_template", None):
        try:
            text = end_of_turn_text(tokenizer, chat_template_kwargs)
        except DataError:
            text = ""  # no discoverable end of turn: EOS and the token budget end a completion
        special = {tokenizer.convert_tokens_to_ids(t) for t in special_token_strings(tokenizer)}
        ids += [i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i in special][:1]
    model_eos = getattr(getattr(causal_lm(model), "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, model_eos):
        ids += value if isinstance(value, list) else [] if value is None else [value]
    return list(dict.fromkeys(int(i) for i in ids))


def check_generation_kwargs(kwargs: Optional[dict]) -> None:
    """Refuse ``--eval_generation_kwargs`` that :class:`~transformers.GenerationConfig` rejects or hf_dpo sets itself."""
    kwargs = dict(kwargs or {})
    reserved = sorted(set(kwargs) & set(RESERVED_KWARGS))
    if reserved:
        raise ValueError(
            f"--eval_generation_kwargs: {', '.join(reserved)} cannot be set there (one completion per prompt, ending "
            "at the template's end of turn); use --eval_generation_max_new_tokens for the budget"
        )
    try:
        GenerationConfig(**{"do_sample": False, **kwargs}).validate(strict=True)
    except ValueError as err:
        raise ValueError(f"--eval_generation_kwargs {kwargs}: {err}") from None


def generation_config(
    kwargs: Optional[dict], max_new_tokens: int, stop_ids: Sequence[int], pad_token_id: int
) -> GenerationConfig:
    """Greedy unless ``kwargs`` say otherwise; fields left unset come from the model's generation_config, as in generate()."""
    return GenerationConfig(
        **{"do_sample": False, **(kwargs or {})},
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_token_id,
        use_cache=True,
    )


def left_padded(prompts: Sequence[Sequence[int]], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``(B, P)``, each prompt right-aligned so that generation continues in column P."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)  # (B, P)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> tuple[tuple[int, ...], bool]:
    """``ids`` up to and including the first stop token, and whether there was one (the rest is generate()'s padding)."""
    stops = set(stop_ids)
    for position, token in enumerate(ids):
        if token in stops:
            return tuple(ids[: position + 1]), True
    return tuple(ids), False


def generate(
    model: nn.Module, prompts: Sequence[Prompt], config: GenerationConfig, batch_size: int, device
) -> list[Completion]:
    """Complete ``prompts`` with ``model.generate``, ``batch_size`` at a time; one :class:`Completion` per prompt, in order."""
    completions = []
    stop_ids = config.eos_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        inputs = left_padded([p.ids for p in chunk], config.pad_token_id, device)
        with torch.no_grad():
            output = model.generate(**inputs, generation_config=config)  # (B, P + new)
        new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()
        for prompt, ids in zip(chunk, new_tokens):
            kept, finished = cut_at_stop(ids, stop_ids)
            completions.append(Completion(prompt, kept, finished))
    return completions


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Rank ``rank``'s contiguous share of ``items``: sizes differ by at most one, every item on exactly one rank."""
    base, extra = divmod(len(items), world)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (rank < extra)])
