"""Every one of the eleven real chat templates trains two steps in both completion_turns modes.

A tiny Llama is built for each template's local tokenizer; the data mixes a single-turn,
a system and a multi-turn row. Each run must start at ln 2 (the trainer's step-0 check,
policy == reference), end with finite losses and changed weights, and in "all" mode
score the earlier answer too (more scored tokens than in "last" mode).
"""

import json
import math

import pytest
import torch
from cpu_run import TINY_LLAMA, cpu_args
from real_templates import NAMES, build_template_tokenizer

from hf_dpo import DPOCollator, NormalizedDPOTrainer
from hf_dpo.cli.demo import build_model

ROWS = [
    {
        "prompt": [{"role": "user", "content": "What is the opposite of hot?"}],
        "chosen": [{"role": "assistant", "content": "Cold."}],
        "rejected": [{"role": "assistant", "content": "Warm."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "You answer with one word."},
            {"role": "user", "content": "Opposite of big?"},
        ],
        "chosen": [{"role": "assistant", "content": "Small."}],
        "rejected": [{"role": "assistant", "content": "Large."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! Ask me for the opposite of any word."},
            {"role": "user", "content": "Opposite of up?"},
        ],
        "chosen": [{"role": "assistant", "content": "<think>\nUp points high.\n</think>\n\nDown."}],
        "rejected": [{"role": "assistant", "content": "Left."}],
    },
    {
        "prompt": [{"role": "user", "content": "你好"}],
        "chosen": [{"role": "assistant", "content": "你好，世界"}],
        "rejected": [{"role": "assistant", "content": "世界你好"}],
    },
]


@pytest.mark.parametrize("name", NAMES)
def test_each_template_trains_in_both_modes(name, tmp_path):
    tokenizer = build_template_tokenizer(name)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS))
    # Padding is not under test here; a tokenizer without a pad token pads with EOS (masks are positional).
    collator = DPOCollator(
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    scored = {}
    for mode in ("last", "all"):
        model = build_model(tokenizer, **TINY_LLAMA)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = cpu_args(
            tmp_path / mode,
            max_length=256,
            max_prompt_length=192,
            per_device_train_batch_size=4,
            max_steps=2,
            learning_rate=1e-2,
            logging_steps=1,
            completion_turns=mode,
            seed=0,
        )
        trainer = NormalizedDPOTrainer(
            model=model, args=args, train_dataset=str(path), processing_class=tokenizer, data_collator=collator
        )
        assert len(trainer.train_dataset) == len(ROWS)
        scored[mode] = sum(sum(m) for m in trainer.train_dataset["chosen_response_mask"])
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
        assert abs(losses[0] - math.log(2)) < 1e-4  # step 0: policy == reference
        assert any(not torch.equal(start[n], p) for n, p in model.named_parameters())
    # "all" also scores the earlier answer of the multi-turn row.
    assert scored["all"] > scored["last"]
