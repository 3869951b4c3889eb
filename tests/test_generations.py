"""--eval_generations on a tiny random-init Llama (hidden 32, 2 layers, fp32, CPU): what is generated, recorded and logged.

Pinned down with numbers:
- the prompts are the held-out pairs' inference prompts (``apply_chat_template(..., add_generation_prompt=True)``),
  the first N distinct ones; the step-0 completions are, token for token, the reference model's own ``generate``
  of each prompt alone (no padding), and the last evaluation's are the trained policy's own;
- records exist for every prompt at every evaluation step, and every logged scalar is recomputed from them;
- the KL estimate is exactly 0 at step 0 and equals a direct computation (plain forwards, log_softmax) afterwards;
- LoRA: the step-0 sample is the adapter-disabled base; a precomputed reference logs no KL and says why;
- sampling draws from a forked, seeded generator: training is bit-identical with and without generations.
"""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch
from cpu_run import cpu_args
from transformers import GenerationConfig

from hf_dpo import DPOConfig, NormalizedDPOTrainer
from hf_dpo.cli.demo import build_model, build_tokenizer, make_preference_rows

datasets.disable_progress_bars()

N, MAX_NEW = 5, 12


def make_args(output_dir, **overrides) -> DPOConfig:
    values = dict(
        max_length=64,
        max_prompt_length=48,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=3,  # 5 prompts: two generate() calls, of 3 and 2 left-padded prompts
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        seed=0,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=3,
        eval_on_start=True,
        eval_generations=N,
        eval_generation_max_new_tokens=MAX_NEW,
    )
    values.update(overrides)
    return cpu_args(output_dir, **values)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture(scope="module")
def rows():
    """48 training rows; 10 held-out rows whose second repeats the first's prompt with other answers."""
    pool = make_preference_rows(58, seed=0)
    held_out = pool[48:]
    duplicate = json.loads(json.dumps(held_out[0]))
    duplicate["rejected"][-1]["content"] = "no idea"
    return {"train": pool[:48], "eval": [held_out[0], duplicate, *held_out[1:]]}


def read_records(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "generations.jsonl").read_text().splitlines()]


def prompt_ids(tokenizer, row) -> list[int]:
    text = tokenizer.apply_chat_template(row["chosen"][:-1], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def own_generate(model, tokenizer, ids) -> list[int]:
    """``model.generate`` of one prompt alone: greedy, no padding, stopping at ``<|im_end|>``."""
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=[stop], pad_token_id=stop)
    with torch.no_grad():
        output = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                generation_config=config)  # fmt: skip
    return output[0, len(ids) :].tolist()


def direct_logratio(policy, ref, ids, completion) -> float:
    """Sum over the completion's tokens of ``log pi - log pi_ref``, from plain forwards of prompt + completion."""
    sequence = torch.tensor([list(ids) + list(completion)])
    positions = torch.arange(len(ids) - 1, len(ids) + len(completion) - 1)  # the logits that predict each new token
    targets = sequence[0, len(ids) :]
    with torch.no_grad():
        policy_logps = policy(sequence).logits[0].double().log_softmax(-1)[positions, targets]
        ref_logps = ref(sequence).logits[0].double().log_softmax(-1)[positions, targets]
    return float((policy_logps - ref_logps).sum())


@pytest.fixture(scope="module")
def run(tokenizer, rows, tmp_path_factory):
    """6 steps evaluated at steps 0, 3 and 6, with a separate (frozen copy) reference."""
    output_dir = tmp_path_factory.mktemp("generations")
    trainer = NormalizedDPOTrainer(
        model=build_model(tokenizer, hidden_size=32, num_layers=2),
        args=make_args(output_dir),
        train_dataset=rows["train"],
        eval_dataset=rows["eval"],
        processing_class=tokenizer,
    )
    trainer.train()
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    return {"trainer": trainer, "records": read_records(output_dir), "evaluations": evaluations}


def test_prompts_are_the_first_distinct_inference_prompts(run, tokenizer, rows):
    records = [r for r in run["records"] if r["step"] == 0]
    expected = [rows["eval"][0], *rows["eval"][2 : 2 + N - 1]]  # row 1 repeats row 0's prompt: skipped
    assert [r["row_id"] for r in records] == [0, 2, 3, 4, 5]
    for record, row in zip(records, expected):
        assert record["prompt"] == tokenizer.decode(prompt_ids(tokenizer, row))
        assert record["source"] == f"<rows>:{record['row_id']}"
    assert len({len(prompt_ids(tokenizer, row)) for row in expected}) > 1  # left padding was exercised


def test_step0_generations_are_the_reference_models_own_generate(run, tokenizer, rows):
    trainer = run["trainer"]
    expected_rows = {0: rows["eval"][0], **{i: rows["eval"][i] for i in range(2, 6)}}
    for record in (r for r in run["records"] if r["step"] == 0):
        ids = prompt_ids(tokenizer, expected_rows[record["row_id"]])
        assert record["completion_ids"] == own_generate(trainer.ref_model, tokenizer, ids), record["row_id"]
    # After training, the last evaluation's completions are the trained policy's own.
    for record in (r for r in run["records"] if r["step"] == 6):
        ids = prompt_ids(tokenizer, expected_rows[record["row_id"]])
        assert record["completion_ids"] == own_generate(trainer.model, tokenizer, ids), record["row_id"]
    changed = [r["completion_ids"] for r in run["records"] if r["step"] == 0] != [
        r["completion_ids"] for r in run["records"] if r["step"] == 6
    ]
    assert changed  # six steps at lr 3e-3 changed what the policy writes, so the comparison above is not vacuous


def test_records_at_every_evaluation_and_the_scalars_recomputed_from_them(run, tokenizer, rows):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    steps = [e["step"] for e in run["evaluations"]]
    assert steps == [0, 3, 6]
    by_step = {step: [r for r in run["records"] if r["step"] == step] for step in steps}
    assert len(run["records"]) == 3 * N
    chosen = {}
    for i in (0, 2, 3, 4, 5):
        row = rows["eval"][i]
        full = tokenizer.apply_chat_template(row["chosen"], tokenize=False)
        chosen[i] = len(tokenizer(full, add_special_tokens=False)["input_ids"]) - len(prompt_ids(tokenizer, row))
    step0_mean = sum(r["tokens"] for r in by_step[0]) / N
    for evaluation in run["evaluations"]:
        records = by_step[evaluation["step"]]
        assert [r["row_id"] for r in records] == [0, 2, 3, 4, 5]
        for r in records:
            assert r["tokens"] == len(r["completion_ids"]) <= MAX_NEW
            assert r["finished"] == (r["completion_ids"][-1] == im_end)
            assert im_end not in r["completion_ids"][:-1]  # cut right after the first end of turn
            assert r["finished"] or r["tokens"] == MAX_NEW
            assert r["completion"] == tokenizer.decode(r["completion_ids"][: -1 if r["finished"] else None])
        mean = sum(r["tokens"] for r in records) / N
        assert evaluation["eval_generation/length_mean"] == pytest.approx(mean, abs=1e-12)
        assert evaluation["eval_generation/length_ratio"] == pytest.approx(mean / step0_mean, abs=1e-12)
        assert evaluation["eval_generation/finished_fraction"] == sum(r["finished"] for r in records) / N
        chosen_mean = sum(chosen[r["row_id"]] for r in records) / N
        assert evaluation["eval_generation/chosen_length_ratio"] == pytest.approx(mean / chosen_mean, abs=1e-12)
        kl = sum(r["logratio"] * r["tokens"] for r in records) / sum(r["tokens"] for r in records)
        assert evaluation["eval_generation/kl"] == pytest.approx(kl, abs=1e-9)
        assert 0 < evaluation["eval_generation/runtime"] < evaluation["eval_runtime"]


def test_kl_is_zero_at_step0_and_equals_a_direct_computation(run):
    trainer = run["trainer"]
    first, last = run["evaluations"][0], run["evaluations"][-1]
    assert first["eval_generation/kl"] == 0.0  # policy == reference: every log-ratio is exactly 0
    assert all(r["logratio"] == 0.0 for r in run["records"] if r["step"] == 0)
    records = [r for r in run["records"] if r["step"] == 6]
    sums = [direct_logratio(trainer.model, trainer.ref_model, _ids(trainer, r), r["completion_ids"]) for r in records]
    for record, direct in zip(records, sums):
        assert record["logratio"] == pytest.approx(direct / record["tokens"], abs=1e-5)
    direct_kl = sum(sums) / sum(r["tokens"] for r in records)
    assert last["eval_generation/kl"] == pytest.approx(direct_kl, abs=1e-5)
    assert abs(direct_kl) > 1e-3  # the policy moved: the equality is not 0 == 0


def _ids(trainer, record) -> list[int]:
    """The prompt ids of a record, from the tokenized evaluation set (its first ``prompt_length`` tokens)."""
    row = next(r for r in trainer.eval_dataset if r["row_id"] == record["row_id"])
    return row["chosen_input_ids"][: row["prompt_length"]]


def test_lora_step0_sample_is_the_adapter_disabled_base(tokenizer, rows, tmp_path):
    from peft import LoraConfig

    torch.manual_seed(0)
    trainer = NormalizedDPOTrainer(
        model=build_model(tokenizer, hidden_size=32, num_layers=2),
        args=make_args(tmp_path, max_steps=3, learning_rate=3e-2, eval_generations=3),
        train_dataset=rows["train"],
        eval_dataset=rows["eval"],
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    assert trainer.reference_mode == "adapter"
    trainer.train()
    records = read_records(tmp_path)
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert [e["step"] for e in evaluations] == [0, 3]
    with trainer.model.disable_adapter():
        for record in (r for r in records if r["step"] == 0):
            assert record["completion_ids"] == own_generate(trainer.model, tokenizer, _ids(trainer, record))
            assert record["logratio"] == 0.0
        base = [own_generate(trainer.model, tokenizer, _ids(trainer, r)) for r in records if r["step"] == 3]
    assert evaluations[0]["eval_generation/kl"] == 0.0
    last = [r for r in records if r["step"] == 3]
    assert [r["completion_ids"] for r in last] != base  # the adapter changed what is written...
    for record in last:  # ...and the log-ratio is taken against the adapter-disabled base
        assert record["completion_ids"] == own_generate(trainer.model, tokenizer, _ids(trainer, record))
        direct = direct_logratio(trainer.model, _Base(trainer.model), _ids(trainer, record), record["completion_ids"])
        assert record["logratio"] == pytest.approx(direct / record["tokens"], abs=1e-5)


class _Base:
    """Calls a PEFT model with its adapter disabled (for :func:`direct_logratio`'s reference)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)


def test_precomputed_reference_logs_no_kl_and_says_why(tokenizer, rows, tmp_path, caplog):
    trainer = NormalizedDPOTrainer(
        model=build_model(tokenizer, hidden_size=32, num_layers=2),
        args=make_args(tmp_path, precompute_ref_logps=True, ref_logps_cache_dir=""),
        eval_dataset=rows["eval"],
        processing_class=tokenizer,
    )
    assert trainer.ref_model is None
    with caplog.at_level(logging.WARNING, logger="hf_dpo.training.generation_eval"):
        metrics = trainer.evaluate()
    assert "eval_generation/length_mean" in metrics and "eval_generation/kl" not in metrics
    assert "eval_generation/kl is not logged: the reference model was released" in caplog.text
    assert all(r["logratio"] is None for r in read_records(tmp_path))


def test_sampling_leaves_training_bit_identical_and_is_seeded(run, tokenizer, rows, tmp_path):
    def losses(output_dir, **overrides):
        trainer = NormalizedDPOTrainer(
            model=build_model(tokenizer, hidden_size=32, num_layers=2),
            args=make_args(output_dir, max_steps=3, eval_steps=1, logging_steps=1, **overrides),
            train_dataset=rows["train"],
            eval_dataset=rows["eval"],
            processing_class=tokenizer,
        )
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    sampling = {"eval_generation_kwargs": '{"do_sample": true, "top_k": 0, "temperature": 1.5}'}
    plain = losses(tmp_path / "plain", eval_generations=0)
    sampled = losses(tmp_path / "a", **sampling)
    assert sampled == plain and len(plain) == 3  # dropout is off and the eval order fixed: only the RNG could differ
    assert losses(tmp_path / "b", **sampling) == plain
    first, second = read_records(tmp_path / "a"), read_records(tmp_path / "b")
    assert [r["completion_ids"] for r in first] == [r["completion_ids"] for r in second]  # seeded by seed + step
    greedy = [r["completion_ids"] for r in run["records"] if r["step"] == 0]  # the same initial model and prompts
    assert [r["completion_ids"] for r in first if r["step"] == 0] != greedy  # it did sample
    assert not (tmp_path / "plain" / "generations.jsonl").exists()
