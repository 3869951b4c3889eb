"""The real-model configuration of ``benchmarks/bench.py``: SmolLM2-135M-Instruct on LLaMA-Factory's DPO pairs.

The model is the one ``hf-dpo fetch-model`` converts and caches (a float32 ``LlamaForCausalLM``, 134.5M
parameters, 30 layers, hidden 576, vocabulary 49,152, tied embeddings, ChatML template); the pairs are
``examples/data/llamafactory_dpo_en_240.json`` (LLaMA-Factory's sharegpt preference layout, long English
answers). hf_dpo reads those rows as they are; TRL 1.16 reads conversational rows, so each row is converted to
its ``prompt`` / ``chosen`` / ``rejected`` message lists by :func:`sharegpt_to_trl`.

Both libraries must train on the same tokens. They truncate differently: TRL keeps the first ``max_length``
tokens of prompt + answer (``truncation_mode="keep_start"``), hf_dpo drops the prompt's oldest tokens down to
``max_prompt_length`` (default ``max_length // 2``) and then cuts the answer from the right. For a prompt of
at most ``max_length // 2`` tokens the two rules give the same sequence, so :func:`real_rows` keeps, in file
order, the rows whose inference prompt is that short (most answers are still cut at ``max_length``, as a user
training at that length sees them), and the bench compares a digest of every pair's token ids and scored-token
masks across the contestants (:func:`pair_tokens`), refusing a table built on different tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

REAL_DATA = Path(__file__).resolve().parents[1] / "examples" / "data" / "llamafactory_dpo_en_240.json"
# LLaMA-Factory's sharegpt role tags (its data/README.md) -> chat roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def real_model_folder() -> Path:
    """The converted SmolLM2-135M-Instruct folder (fetched and converted once by ``hf-dpo fetch-model``)."""
    from hf_dpo.cli.real_model import fetch_real_model

    return fetch_real_model()


def load_real_model():
    """SmolLM2-135M-Instruct in float32 with SDPA attention, dropout off as loaded."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(real_model_folder(), attn_implementation="sdpa", dtype=torch.float32)


def load_real_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_folder())


def sharegpt_to_trl(row: dict) -> dict:
    """One LLaMA-Factory sharegpt preference row -> TRL's conversational ``{prompt, chosen, rejected}`` messages.

    ``conversations`` becomes the prompt (a ``system`` column goes first unless the conversation opens with a
    system turn, LLaMA-Factory's rule); ``chosen`` and ``rejected`` become one assistant message each.
    """
    prompt = [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]} for turn in row["conversations"]]
    if row.get("system") and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": row["system"]})
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}],
    }


def prompt_tokens(row: dict, tokenizer) -> int:
    """Tokens of the row's inference prompt: its messages through the chat template with the generation prompt."""
    text = tokenizer.apply_chat_template(sharegpt_to_trl(row)["prompt"], add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def real_rows(tokenizer, max_length: int, n: int) -> list[dict]:
    """The first ``n`` rows of the real pairs, in file order, whose prompt fits ``max_length // 2`` tokens.

    For those, TRL's ``keep_start`` truncation and hf_dpo's default truncation keep the same tokens.
    """
    rows = json.loads(REAL_DATA.read_text())
    kept = [row for row in rows if prompt_tokens(row, tokenizer) <= max_length // 2]
    if len(kept) < n:
        raise ValueError(
            f"{REAL_DATA.name} has {len(kept)} pairs with a prompt of at most {max_length // 2} tokens, {n} needed: "
            "lower --steps/--warmup/--batch or raise --max-length"
        )
    return kept[:n]


def pair_tokens(features: list[dict], batch: dict) -> list[list[list[int]]]:
    """Per pair: [chosen ids, chosen scored mask, rejected ids, rejected scored mask], as the contestant trains on it.

    TRL's features hold untruncated ids (its collator truncates), so its pairs are read back from the collated
    ``(2B, T)`` batch: rows ``[chosen_1..B, rejected_1..B]``, ``attention_mask`` for the length and
    ``completion_mask`` for the scored tokens. hf_dpo's features are already truncated.
    """
    if "prompt_ids" in features[0]:  # TRL
        n = len(features)
        sides = []
        for row in range(2 * n):
            length = int(batch["attention_mask"][row].sum())
            sides.append([batch["input_ids"][row, :length].tolist(), batch["completion_mask"][row, :length].tolist()])
        return [[*sides[i], *sides[n + i]] for i in range(n)]
    return [
        [f["chosen_input_ids"], f["chosen_response_mask"], f["rejected_input_ids"], f["rejected_response_mask"]]
        for f in features
    ]


def tokens_digest(pairs: list[list[list[int]]]) -> str:
    """A short hash of the pairs' token ids and scored masks, in order: equal digests = the same training tokens."""
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]
