"""NormalizedDPOTrainer end to end on a tiny random-init Llama (hidden 32, 2 layers, fp32, CPU).

What is pinned down here, with numbers:
- step 0: policy == reference, so every pair's loss is ``-logsigmoid(0) = ln 2`` and every reward is exactly 0;
- a few dozen steps on the demo's antonym task lower the loss and raise the held-out reward accuracy;
- the reference never changes; with PEFT only the adapter trains and the reference is the adapter-disabled base;
- batch 4 x accumulation 1 and batch 1 x accumulation 4 make the same SGD update, equal to ``-lr * grad``
  of the mean per-pair loss (so the Trainer divides by the accumulation steps exactly once);
- reference modes, the logged metric keys and their averaging over the logging interval;
- plain ``TrainingArguments`` and every accepted data form.
"""

from __future__ import annotations

import copy
import functools
import json
import math

import datasets
import pytest
import torch
import torch.nn.functional as F
from cpu_run import CPU_RUN, cpu_args
from torch.utils.data import SequentialSampler
from transformers import TrainingArguments

from hf_dpo import DPOCollator, DPOConfig, NormalizedDPOTrainer, load_preference_dataset, tokenize_dataset
from hf_dpo.cli.demo import build_model, build_tokenizer, make_preference_rows
from hf_dpo.reference.modes import reference_logp_sums, resolve_reference_mode

LN2 = math.log(2.0)
METRIC_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "lengths/chosen",
    "lengths/rejected",
)
MAX_LENGTH, MAX_PROMPT_LENGTH = 64, 48

datasets.disable_progress_bars()


class SequentialTrainer(NormalizedDPOTrainer):
    """Feeds pairs in data set order and records the metrics of every ``pair_losses`` call.

    ``recorded`` holds ``(split, {metric: float})`` in call order, the per-step values that
    ``log`` must average over the logging interval.
    """

    def __init__(self, *args, **kwargs):
        self.recorded = []
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)

    def pair_losses(self, model, batch):
        losses, aux_term, metrics = super().pair_losses(model, batch)
        split = "train" if model.training else "eval"
        self.recorded.append((split, {key: float(value) for key, value in metrics.items()}))
        return losses, aux_term, metrics


make_args = functools.partial(
    cpu_args,
    max_length=MAX_LENGTH,
    max_prompt_length=MAX_PROMPT_LENGTH,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    lr_scheduler_type="constant",
    seed=0,
)


def max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture(scope="module")
def rows():
    """48 training rows and 32 held-out rows.

    The held-out rows ask for words seen in training, in phrasings never seen with that
    word (the demo has 4-6 phrasings per word): a random 2-layer model cannot learn the
    antonym rule for unseen words in a few dozen steps, but it does generalize across phrasings.
    """
    pool = make_preference_rows(1000, seed=0)
    train = pool[:48]
    answers = {row["chosen"][-1]["content"] for row in train}
    prompts = {row["chosen"][-2]["content"] for row in train}
    held_out = [
        row
        for row in pool[48:]
        if row["chosen"][-1]["content"] in answers and row["chosen"][-2]["content"] not in prompts
    ][:32]
    assert len(held_out) == 32
    return {"train": train, "eval": held_out}


@pytest.fixture(scope="module")
def trained(tokenizer, rows, tmp_path_factory):
    """One 20-step run (lr 3e-3, batch 8, log every 5 steps plus the first), evaluated before and after."""
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    initial = {name: value.detach().clone() for name, value in model.state_dict().items()}
    args = make_args(
        tmp_path_factory.mktemp("trained"), learning_rate=3e-3, max_steps=20, logging_steps=5, logging_first_step=True
    )
    trainer = SequentialTrainer(
        model=model, args=args, train_dataset=rows["train"], eval_dataset=rows["eval"], processing_class=tokenizer
    )
    first_batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        step0 = trainer.pair_losses(trainer.model, first_batch)
        step0_loss = trainer.compute_loss(trainer.model, first_batch)
    trainer.recorded.clear()
    before = trainer.evaluate()
    n_before = len(trainer.recorded)
    trainer.train()
    after = trainer.evaluate()
    return dict(
        trainer=trainer,
        initial=initial,
        step0=step0,
        step0_loss=step0_loss,
        before=before,
        after=after,
        n_before=n_before,
    )


# ---------------------------------------------------------------- step 0


def test_step0_pair_losses_are_ln2_and_rewards_zero(trained):
    """policy == reference: margin 0, ``-logsigmoid(0) = ln 2`` per pair, rewards exactly 0, ties count 0.5."""
    losses, aux_term, metrics = trained["step0"]
    assert aux_term is None  # a dense model has no router term
    assert losses.dtype == torch.float32 and losses.shape == (8,)
    assert (losses - LN2).abs().max().item() < 1e-6
    assert abs(trained["step0_loss"].item() - LN2) < 1e-6
    assert metrics["rewards/chosen"].item() == 0.0
    assert metrics["rewards/rejected"].item() == 0.0
    assert metrics["rewards/margins"].item() == 0.0
    assert metrics["rewards/accuracies"].item() == 0.5


def test_first_logged_loss_and_step0_eval_are_ln2(trained):
    """The step-1 log (logging_first_step) is the loss of the untouched policy; evaluate() before training too."""
    first = trained["trainer"].state.log_history[0]
    assert first["step"] == 1
    assert abs(first["loss"] - LN2) < 1e-6
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    before = trained["before"]
    assert abs(before["eval_loss"] - LN2) < 1e-6
    assert before["eval_rewards/margins"] == 0.0
    assert before["eval_rewards/accuracies"] == 0.5


# ---------------------------------------------------------------- learning


def test_training_lowers_loss_and_raises_held_out_accuracy(trained):
    logs = [h for h in trained["trainer"].state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 5, 10, 15, 20]
    assert logs[-1]["loss"] < LN2 - 0.05
    assert logs[-1]["loss"] < logs[1]["loss"]
    after = trained["after"]
    assert after["eval_loss"] < LN2 - 0.05
    assert after["eval_rewards/accuracies"] >= 0.7
    assert after["eval_rewards/margins"] > 0.1
    assert after["eval_rewards/chosen"] > after["eval_rewards/rejected"]


def test_reference_never_changes_and_is_frozen(trained):
    trainer, initial = trained["trainer"], trained["initial"]
    assert trainer.reference_mode == "model"
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert ref is not trainer.model
    assert not ref.training
    assert not any(p.requires_grad for p in ref.parameters())
    ref_state = ref.state_dict()
    assert ref_state.keys() == initial.keys()
    for name, value in initial.items():
        assert torch.equal(ref_state[name], value), name
    # The policy did move, so the frozen reference is a real check and not two views of one tensor.
    policy_state = trainer.model.state_dict()
    assert max((policy_state[k] - initial[k]).abs().max().item() for k in initial) > 1e-3


# ---------------------------------------------------------------- metrics


def test_logged_metric_keys_in_train_and_eval(trained):
    trainer = trained["trainer"]
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    for log in train_logs:
        assert set(METRIC_KEYS) <= set(log), log
    for result in (trained["before"], trained["after"]):
        assert {f"eval_{key}" for key in METRIC_KEYS} <= set(result)
        assert not set(METRIC_KEYS) & set(result)  # never unprefixed in evaluation
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert all(not set(METRIC_KEYS) & set(h) for h in eval_logs)


def test_logged_metrics_are_means_over_the_logging_interval(trained):
    """Log at step s averages the per-step values of steps (previous log, s]; eval averages its batches."""
    trainer = trained["trainer"]
    n_before = trained["n_before"]
    eval_before = [m for _, m in trainer.recorded[:n_before]]
    train_steps = [m for split, m in trainer.recorded[n_before:] if split == "train"]
    eval_after = [m for split, m in trainer.recorded[n_before:] if split == "eval"]
    assert len(train_steps) == 20  # accumulation 1: one pair_losses call per optimizer step
    assert len(eval_before) == len(eval_after) == 2  # 32 held-out pairs in batches of 16

    def mean(records, key):
        return sum(r[key] for r in records) / len(records)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    intervals = {1: (0, 1), 5: (1, 5), 10: (5, 10), 15: (10, 15), 20: (15, 20)}
    for log in logs:
        start, end = intervals[log["step"]]
        for key in METRIC_KEYS:
            assert log[key] == pytest.approx(mean(train_steps[start:end], key), rel=1e-6, abs=1e-7), (log["step"], key)
    # The interval really varies, so a "last value" or "running mean" logger would fail this test.
    assert len({round(mean(train_steps[s:e], "rewards/margins"), 6) for s, e in intervals.values()}) == 5
    for result, records in ((trained["before"], eval_before), (trained["after"], eval_after)):
        for key in METRIC_KEYS:
            assert result[f"eval_{key}"] == pytest.approx(mean(records, key), rel=1e-6, abs=1e-7), key


# ---------------------------------------------------------------- PEFT


def test_peft_trains_only_the_adapter_against_the_disabled_base(tokenizer, rows, tmp_path):
    from peft import LoraConfig

    base = build_model(tokenizer, hidden_size=32, num_layers=2)
    base_copy = copy.deepcopy(base)  # an independent reference: the same weights, never wrapped
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = make_args(tmp_path, learning_rate=1e-2, max_steps=3)
    trainer = SequentialTrainer(
        model=base, args=args, train_dataset=rows["train"], processing_class=tokenizer, peft_config=lora
    )
    assert trainer.reference_mode == "adapter"
    assert trainer.ref_model is None

    named = dict(trainer.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (lora_A, lora_B)
    before = {n: p.detach().clone() for n, p in named.items()}
    trainer.train()
    for name, param in trainer.model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in trainable), name

    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        ref_sums = reference_logp_sums(trainer.reference_mode, trainer.model, None, batch, trainer.score)
        base_sums, _ = trainer.score(base_copy.eval(), batch)
        policy_sums, _ = trainer.score(trainer.model, batch)
    assert (ref_sums - base_sums).abs().max().item() < 1e-5
    assert (policy_sums - base_sums).abs().max().item() > 1e-3  # the adapter is back on after the reference pass


def test_adapter_reference_runs_without_dropout_when_the_policy_keeps_it(tokenizer, rows, tmp_path):
    """disable_dropout=False and attention dropout 0.5: the policy stays stochastic, the reference does not."""
    from peft import LoraConfig

    base = build_model(tokenizer, hidden_size=32, num_layers=2)
    for module in base.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5  # what a config with attention_dropout=0.5 builds
    base_copy = copy.deepcopy(base).eval()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = make_args(tmp_path, disable_dropout=False)
    trainer = NormalizedDPOTrainer(
        model=base, args=args, train_dataset=rows["train"][:8], processing_class=tokenizer, peft_config=lora
    )
    batch = next(iter(trainer.get_train_dataloader()))
    policy = trainer.model.train()
    with torch.no_grad():
        first = reference_logp_sums("adapter", policy, None, batch, trainer.score)
        second = reference_logp_sums("adapter", policy, None, batch, trainer.score)
        expected, _ = trainer.score(base_copy, batch)
        policy_a, _ = trainer.score(policy, batch)
        policy_b, _ = trainer.score(policy, batch)
    assert torch.equal(first, second)
    assert (first - expected).abs().max().item() < 1e-5
    assert all(module.training for module in policy.modules())  # train mode restored after the reference pass
    assert (policy_a - policy_b).abs().max().item() > 1e-3  # the user's dropout is still on in the policy


def test_disable_dropout_zeroes_modules_and_float_rates():
    from hf_dpo.common.models import disable_dropout

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_dropout, self.hidden_dropout, self.activation_dropout, self.dropout = 0.1, 0.2, 0.3, 0.4
            self.scale = 0.5  # not a dropout rate
            self.drop, self.drop2d = torch.nn.Dropout(0.4), torch.nn.Dropout2d(0.5)

    block = torch.nn.Sequential(Block(), torch.nn.Dropout(0.6))
    disable_dropout(block)
    inner = block[0]
    assert (inner.attention_dropout, inner.hidden_dropout, inner.activation_dropout, inner.dropout) == (
        0.0,
        0.0,
        0.0,
        0.0,
    )
    assert inner.scale == 0.5
    assert inner.drop.p == inner.drop2d.p == block[1].p == 0.0


# ---------------------------------------------------------------- gradient accumulation


def test_accumulation_matches_the_full_batch_update(tokenizer, rows, tmp_path):
    """One SGD step (lr 0.1, no clipping): batch 4 x GA 1 == batch 1 x GA 4 == ``-lr * grad(mean_i loss_i)``.

    Adam would hide a scale error (its first step is about ``lr * sign(g)``), clipping could too;
    plain SGD makes the update proportional to the accumulated gradient.
    """
    lr = 0.1
    deltas = []
    for batch_size, accumulation in ((4, 1), (1, 4)):
        model = build_model(tokenizer, hidden_size=32, num_layers=2)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = make_args(
            tmp_path / f"b{batch_size}",
            optim="sgd",
            learning_rate=lr,
            max_grad_norm=0.0,
            weight_decay=0.0,
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
        )
        trainer = SequentialTrainer(model=model, args=args, train_dataset=rows["train"][:8], processing_class=tokenizer)
        trainer.train()
        assert len([split for split, _ in trainer.recorded if split == "train"]) == accumulation
        deltas.append({n: p.detach() - start[n] for n, p in model.named_parameters()})

    # The expected update from a hand-made full batch of the same 4 pairs.
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    trainer = SequentialTrainer(
        model=model,
        args=make_args(tmp_path / "manual", per_device_train_batch_size=4),
        train_dataset=rows["train"][:8],
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    losses, _, _ = trainer.pair_losses(model, batch)
    losses.mean().backward()
    expected = {n: -lr * p.grad for n, p in model.named_parameters()}

    scale = max(d.abs().max().item() for d in expected.values())
    assert scale > 1e-4
    assert max_abs_diff(deltas[0], expected) / scale < 1e-5
    assert max_abs_diff(deltas[1], expected) / scale < 1e-5
    assert max_abs_diff(deltas[0], deltas[1]) / scale < 1e-5


# ---------------------------------------------------------------- reference modes


def test_reference_mode_resolution(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    ref = build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)
    peft_model = get_peft_model(
        build_model(tokenizer, hidden_size=32, num_layers=2), LoraConfig(r=2, target_modules=["q_proj"])
    )
    assert resolve_reference_mode(model, ref, "auto", True) == "model"
    assert resolve_reference_mode(model, None, "auto", True) == "model"
    assert resolve_reference_mode(peft_model, None, "auto", True) == "adapter"
    assert resolve_reference_mode(peft_model, ref, "auto", True) == "model"  # an explicit ref_model wins
    assert resolve_reference_mode(model, None, "auto", False) == "none"
    assert resolve_reference_mode(peft_model, None, "auto", False) == "none"
    with pytest.raises(ValueError, match="needs a PEFT model"):
        resolve_reference_mode(model, None, "adapter", True)
    with pytest.raises(ValueError, match="needs a reference"):
        resolve_reference_mode(model, None, "none", True)
    with pytest.raises(ValueError, match="needs a reference"):
        DPOConfig(output_dir=str(tmp_path), reference="none", loss_type="sigmoid")


def test_trainer_reference_modes(tokenizer, rows, tmp_path):
    train = rows["train"][:8]
    # An explicit ref_model is used as is, frozen.
    model, ref = (
        build_model(tokenizer, hidden_size=32, num_layers=2),
        build_model(tokenizer, hidden_size=32, num_layers=2, seed=1),
    )
    ref.train()
    trainer = NormalizedDPOTrainer(
        model=model, ref_model=ref, args=make_args(tmp_path), train_dataset=train, processing_class=tokenizer
    )
    assert trainer.reference_mode == "model"
    assert trainer.accelerator.unwrap_model(trainer.ref_model) is ref
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    # Without one: a frozen copy of the initial policy, not the policy itself.
    trainer = NormalizedDPOTrainer(
        model=model, args=make_args(tmp_path), train_dataset=train, processing_class=tokenizer
    )
    copy_ = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert copy_ is not model and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(copy_.state_dict().values(), model.state_dict().values()))
    assert {a.data_ptr() for a in copy_.parameters()}.isdisjoint({b.data_ptr() for b in model.parameters()})
    # "adapter" without an adapter is refused with a message naming the fix.
    with pytest.raises(ValueError, match="reference='adapter' needs a PEFT model"):
        NormalizedDPOTrainer(
            model=model, args=make_args(tmp_path, reference="adapter"), train_dataset=train, processing_class=tokenizer
        )


def test_simpo_trains_without_a_reference(tokenizer, rows, tmp_path):
    """SimPO at step 0: ``-logsigmoid(beta * (mean_c - mean_r) - gamma)`` from the policy alone (beta 2, gamma 0.5)."""
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = make_args(tmp_path, loss_type="simpo", learning_rate=1e-2, max_steps=2, per_device_train_batch_size=4)
    trainer = SequentialTrainer(model=model, args=args, train_dataset=rows["train"][:8], processing_class=tokenizer)
    assert trainer.reference_mode == "none" and trainer.ref_model is None
    assert args.beta == 2.0 and args.simpo_gamma == 0.5
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        losses, _, metrics = trainer.pair_losses(model, batch)
        sums, counts = trainer.score(model, batch)
    means = sums.double() / counts.double()
    expected = -F.logsigmoid(2.0 * (means[:4] - means[4:]) - 0.5)
    assert (losses.double() - expected).abs().max().item() < 1e-6
    assert metrics["rewards/chosen"].item() == pytest.approx(2.0 * means[:4].mean().item(), rel=1e-5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "train_loss" in h]
    assert math.isfinite(logs[0]["train_loss"])
    assert max((p.detach() - start[n]).abs().max().item() for n, p in model.named_parameters()) > 1e-4


# ---------------------------------------------------------------- drop-in arguments and data forms


def test_plain_training_arguments_are_converted(tokenizer, rows, tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        **CPU_RUN,
        learning_rate=1e-3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        seed=7,
        remove_unused_columns=True,
        max_grad_norm=0.5,
        lr_scheduler_type="cosine",
    )
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    trainer = NormalizedDPOTrainer(model=model, args=args, train_dataset=rows["train"][:8], processing_class=tokenizer)
    converted = trainer.args
    assert isinstance(converted, DPOConfig)
    # DPO defaults filled in; the collator's columns survive although the user asked to remove unused ones.
    assert converted.beta == 2.0 and converted.length_normalize and converted.loss_type == ["sigmoid"]
    assert converted.remove_unused_columns is False
    for name in (
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_steps",
        "seed",
        "max_grad_norm",
        "output_dir",
    ):
        assert getattr(converted, name) == getattr(args, name), name
    assert converted.lr_scheduler_type == args.lr_scheduler_type
    result = trainer.train()
    assert result.global_step == 1 and abs(result.training_loss - LN2) < 1e-6


def test_raw_canonical_and_tokenized_data_sets_are_accepted(tokenizer, rows, tmp_path):
    train = rows["train"][:6]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in train), encoding="utf-8")
    canonical = load_preference_dataset(train)
    tokenized, _ = tokenize_dataset(canonical, tokenizer, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    # The same pairs in the conversational layout (explicit prompt, one-message answers).
    conversational = [
        {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]} for row in train
    ]
    forms = {
        "rows": train,
        "dataset": datasets.Dataset.from_list(train),
        "jsonl": str(jsonl),
        "conversational": conversational,
        "canonical": canonical,
        "tokenized": tokenized,
    }
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    ids = {}
    for name, data in forms.items():
        trainer = NormalizedDPOTrainer(
            model=model, args=make_args(tmp_path), train_dataset=data, processing_class=tokenizer
        )
        ds = trainer.train_dataset
        ids[name] = (
            ds["chosen_input_ids"],
            ds["chosen_response_mask"],
            ds["rejected_input_ids"],
            ds["rejected_response_mask"],
        )
    assert len(ids["rows"][0]) == 6
    for name, value in ids.items():
        assert value == ids["rows"], name
    # Tokenized pairs need no tokenizer when a collator is given; raw rows do.
    collator = DPOCollator(pad_token_id=tokenizer.pad_token_id)
    trainer = NormalizedDPOTrainer(
        model=model, args=make_args(tmp_path), train_dataset=tokenized, data_collator=collator
    )
    assert trainer.train_dataset is tokenized
    with pytest.raises(ValueError, match="tokenizer"):
        NormalizedDPOTrainer(model=model, args=make_args(tmp_path), train_dataset=train, data_collator=collator)


def test_string_layout_rows_train(tokenizer, tmp_path):
    """``{"prompt": str, "chosen": str, "rejected": str}``: raw concatenation, EOS appended to each response."""
    rows = [
        {
            "prompt": "What is the opposite of hot?",
            "chosen": " The opposite of hot is cold.",
            "rejected": " The opposite of hot is hot.",
        },
        {
            "prompt": "What is the opposite of big?",
            "chosen": " The opposite of big is small.",
            "rejected": " The opposite of big is big.",
        },
    ]
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    trainer = NormalizedDPOTrainer(
        model=model,
        args=make_args(tmp_path, per_device_train_batch_size=2),
        train_dataset=rows,
        processing_class=tokenizer,
    )
    first = trainer.train_dataset[0]
    prompt_ids = tokenizer(rows[0]["prompt"], add_special_tokens=False)["input_ids"]
    assert first["chosen_input_ids"][: len(prompt_ids)] == prompt_ids
    assert first["chosen_input_ids"][-1] == tokenizer.eos_token_id
    assert sum(first["chosen_response_mask"]) == len(first["chosen_input_ids"]) - len(prompt_ids)
    batch = next(iter(trainer.get_train_dataloader()))
    losses, _, _ = trainer.pair_losses(trainer.model, batch)
    assert (losses - LN2).abs().max().item() < 1e-6


def test_eval_metrics_weight_every_pair_equally(tokenizer, rows, tmp_path):
    """12 held-out pairs in eval batches of 8 and 4: eval metrics are means over the 12 pairs, like eval_loss.

    A mean of the two batch means would weight the last 4 pairs twice as much as the first 8.
    The policy and the reference are different random models, so rewards are far from 0.
    """
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    ref = build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)
    args = make_args(tmp_path, per_device_eval_batch_size=8, length_normalize=False)
    trainer = SequentialTrainer(
        model=model, ref_model=ref, args=args, eval_dataset=rows["eval"][:12], processing_class=tokenizer
    )
    result = trainer.evaluate()

    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(12)])
    model.eval()
    with torch.no_grad():
        losses, _, _ = trainer.pair_losses(model, batch)
        policy_sums, counts = trainer.score(model, batch)
        ref_sums, _ = trainer.score(ref, batch)
    rewards = 0.1 * (policy_sums - ref_sums).double()  # (2B,) sum form, beta 0.1
    chosen, rejected = rewards[:12], rewards[12:]
    expected = {
        "eval_loss": losses.double().mean().item(),
        "eval_rewards/chosen": chosen.mean().item(),
        "eval_rewards/rejected": rejected.mean().item(),
        "eval_rewards/accuracies": (chosen > rejected).double().mean().item(),
        "eval_rewards/margins": (chosen - rejected).mean().item(),
        "eval_logps/chosen": policy_sums[:12].double().mean().item(),
        "eval_lengths/rejected": counts[12:].double().mean().item(),
    }
    batch_sizes = [8, 4]
    assert [len(r) for r in (trainer.eval_dataset[:8]["row_id"], trainer.eval_dataset[8:]["row_id"])] == batch_sizes
    assert 0.0 < expected["eval_rewards/accuracies"] < 1.0
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_eval_metrics_follow_the_metric_key_prefix(tokenizer, rows, tmp_path):
    """``evaluate(metric_key_prefix=...)``, a dict of eval sets and raw rows: DPO metrics are prefixed like ``*_loss``.

    Each set's metrics are its own: the policy and the reference differ, so the two halves of
    the held-out rows have different rewards, and neither leaks into the other's keys or into
    the next evaluation.
    """
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    ref = build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)
    sets = {"first": rows["eval"][:8], "second": rows["eval"][8:16]}
    args = make_args(tmp_path, per_device_eval_batch_size=8, length_normalize=False)
    trainer = SequentialTrainer(model=model, ref_model=ref, args=args, eval_dataset=sets, processing_class=tokenizer)

    alone = {name: trainer.evaluate(eval_dataset=trainer.eval_dataset[name], metric_key_prefix=name) for name in sets}
    for name, result in alone.items():
        assert {f"{name}_{key}" for key in METRIC_KEYS} <= set(result), name
        assert not any(key.startswith("eval_") for key in result)
    assert alone["first"]["first_rewards/margins"] != pytest.approx(alone["second"]["second_rewards/margins"], abs=1e-3)

    both = trainer.evaluate()
    for name in sets:
        for key in (*METRIC_KEYS, "loss"):
            assert both[f"eval_{name}_{key}"] == pytest.approx(alone[name][f"{name}_{key}"], rel=1e-6, abs=1e-7), (
                name,
                key,
            )
    assert not set(METRIC_KEYS) & set(both)
    assert not {f"eval_{key}" for key in METRIC_KEYS} & set(both)
    # Raw rows handed to evaluate() are prepared like the constructor's.
    raw = trainer.evaluate(eval_dataset=sets["first"], metric_key_prefix="raw")
    for key in (*METRIC_KEYS, "loss"):
        assert raw[f"raw_{key}"] == pytest.approx(alone["first"][f"first_{key}"], rel=1e-6, abs=1e-7), key


def test_predict_does_not_leak_into_the_next_evaluation(tokenizer, rows, tmp_path):
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    ref = build_model(tokenizer, hidden_size=32, num_layers=2, seed=1)
    args = make_args(tmp_path, per_device_eval_batch_size=8)
    trainer = NormalizedDPOTrainer(
        model=model, ref_model=ref, args=args, eval_dataset=rows["eval"][:8], processing_class=tokenizer
    )
    clean = trainer.evaluate()
    trainer.predict(trainer.get_eval_dataloader().dataset.select(range(4)))  # 4 of the 8 pairs: other means
    again = trainer.evaluate()
    for key in METRIC_KEYS:
        assert again[f"eval_{key}"] == pytest.approx(clean[f"eval_{key}"], rel=1e-6, abs=1e-7), key
