"""TR-DPO (``sync_ref_model``): TRL 1.16's rule, the synced reference in checkpoints and on resume, the refusals.

The rule (TRL's ``SyncRefModelCallback``, measured in TRL 1.16): after each optimizer step with
``global_step % ref_model_sync_steps == 0``, every reference parameter becomes
``(1 - alpha) * ref + alpha * policy``; buffers are left alone. The tests recompute it from
snapshots of the policy taken at every step and compare with the trainer's reference; they
resume runs from a middle checkpoint and compare the later losses with the uninterrupted run.
Tiny Llama (hidden 16, 1 layer), fp32 on CPU, 8 pairs, batch 2, lr 1e-2.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil

import datasets
import pytest
import torch
from cpu_run import TINY_LLAMA, cpu_args, tiny_trainer
from transformers import TrainerCallback

from hf_dpo import DPOConfig, NormalizedDPOTrainer
from hf_dpo.cli.demo import build_model, build_tokenizer, make_preference_rows
from hf_dpo.training.ref_sync import REF_MODEL_FILE, check_sync_launch

datasets.disable_progress_bars()
ALPHA, EVERY = 0.6, 2


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture(scope="module")
def rows():
    return make_preference_rows(8, seed=0)


make_args = functools.partial(
    cpu_args,
    per_device_train_batch_size=2,
    max_steps=6,
    learning_rate=1e-2,
    lr_scheduler_type="constant",
    logging_steps=1,
    max_length=64,
    max_prompt_length=48,
    sync_ref_model=True,
    ref_model_mixup_alpha=ALPHA,
    ref_model_sync_steps=EVERY,
    seed=0,
)


class Snapshots(TrainerCallback):
    """``(global_step, policy parameters, reference parameters)`` at every step end, after the sync (added later).

    ``policy()`` and ``reference()`` return ``{name: parameter}`` with the same names on both sides.
    """

    def __init__(self, policy, reference):
        self.policy, self.reference, self.steps = policy, reference, []

    def on_step_end(self, args, state, control, **kwargs):
        policy, reference = ({n: p.detach().clone() for n, p in get().items()} for get in (self.policy, self.reference))
        self.steps.append((state.global_step, policy, reference))


def losses_of(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def expected_references(initial: dict, steps: list, alpha: float, every: int) -> list[dict]:
    """The rule applied by hand: the reference after each step, from the policy snapshots."""
    ref = {name: value.clone() for name, value in initial.items()}
    out = []
    for step, policy, _ in steps:
        if step % every == 0:
            ref = {name: (1 - alpha) * ref[name] + alpha * policy[name] for name in ref}
        out.append(ref)
    return out


def test_the_reference_follows_trls_rule_and_step_0_is_ln2(tokenizer, rows, tmp_path):
    """6 steps, a sync at steps 2, 4 and 6: after each step the reference equals the rule applied to the policy
    snapshots (within float32 rounding), it moved away from the initial model, and the first loss is ln 2."""
    model = build_model(tokenizer, **TINY_LLAMA, seed=0)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    initial_buffers = {n: b.clone() for n, b in model.named_buffers()}
    trainer = NormalizedDPOTrainer(
        model=model, args=make_args(tmp_path), train_dataset=rows, processing_class=tokenizer
    )
    snapshots = Snapshots(
        lambda: dict(trainer.model.named_parameters()), lambda: dict(trainer.ref_model.named_parameters())
    )
    trainer.add_callback(snapshots)  # after ReferenceUpkeep: sees the synced reference
    trainer.train()

    assert [s for s, _, _ in snapshots.steps] == [1, 2, 3, 4, 5, 6]
    assert trainer.reference_upkeep.syncs == 3
    expected = expected_references(initial, snapshots.steps, ALPHA, EVERY)
    for (step, policy, reference), wanted in zip(snapshots.steps, expected):
        for name in reference:
            assert torch.allclose(reference[name], wanted[name], rtol=0, atol=1e-6), (step, name)
        moved = max((reference[n] - initial[n]).abs().max().item() for n in reference)
        assert (moved > 1e-3) == (step >= EVERY), (step, moved)  # unchanged until the first sync
        gap = max((reference[n] - policy[n]).abs().max().item() for n in reference)
        assert gap > 1e-4, step  # never the policy itself (alpha < 1)
    for name, buffer in trainer.ref_model.named_buffers():
        assert torch.equal(buffer, initial_buffers[name]), name  # buffers are not mixed
    losses = losses_of(trainer)
    assert losses[1] == pytest.approx(math.log(2), abs=1e-6)  # step 0: the policy is its reference


def test_alpha_1_makes_the_reference_the_policy(tokenizer, rows, tmp_path):
    """alpha = 1 (the paper's hard update) every step: the reference is a copy of the policy after each step."""
    args = make_args(tmp_path, max_steps=2, ref_model_mixup_alpha=1.0, ref_model_sync_steps=1)
    trainer = tiny_trainer(args, rows, tokenizer=tokenizer)
    trainer.train()
    policy = dict(trainer.model.named_parameters())
    for name, param in trainer.ref_model.named_parameters():
        assert torch.equal(param, policy[name]), name


def run(tokenizer, rows, output_dir, resume=None, **overrides):
    args = make_args(output_dir, save_strategy="steps", save_steps=2, **overrides)
    trainer = tiny_trainer(args, rows, tokenizer=tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_restores_the_synced_reference_and_reproduces_the_losses(tokenizer, rows, tmp_path, monkeypatch):
    """Checkpoints at steps 2, 4, 6 hold ref_model.safetensors; resuming from checkpoint-2 (after the first sync)
    gives the uninterrupted run's losses at steps 3-6 within 1e-5. Without restoring the reference the same
    resume differs, so the comparison can fail."""
    full = run(tokenizer, rows, tmp_path / "full")
    expected = losses_of(full)
    for step in (2, 4, 6):
        assert (tmp_path / "full" / f"checkpoint-{step}" / REF_MODEL_FILE).is_file()
    assert len({round(v, 5) for v in expected.values()}) == 6  # the losses move

    # A kill after trainer_state.json but before the reference file: resume=True must pass over those checkpoints.
    shutil.copytree(tmp_path / "full", tmp_path / "resumed", ignore=shutil.ignore_patterns("checkpoint-6"))
    (tmp_path / "resumed" / "checkpoint-4" / REF_MODEL_FILE).unlink()
    resumed = run(tokenizer, rows, tmp_path / "resumed", resume=True)
    got = losses_of(resumed)  # steps 1-2 come from checkpoint-2's log history, 3-6 were trained again
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    for name, param in resumed.ref_model.named_parameters():  # the same reference at the end, too
        assert torch.allclose(param, dict(full.ref_model.named_parameters())[name], rtol=0, atol=1e-6), name

    # The same resume with the initial reference instead of the synced one: step 3 differs.
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "unrestored" / "checkpoint-2")
    monkeypatch.setattr("hf_dpo.training.reference_upkeep.restore_reference", lambda reference, checkpoint: None)
    unrestored = losses_of(run(tokenizer, rows, tmp_path / "unrestored", resume=True))
    assert abs(unrestored[3] - expected[3]) > 1e-4


def test_an_explicit_checkpoint_without_the_synced_reference_is_refused(tokenizer, rows, tmp_path):
    run(tokenizer, rows, tmp_path / "plain", sync_ref_model=False, max_steps=2)
    with pytest.raises(ValueError, match=r"checkpoint-2, which is incomplete: ref_model\.safetensors is missing"):
        run(tokenizer, rows, tmp_path / "plain", resume=str(tmp_path / "plain" / "checkpoint-2"))


def test_refused_settings_say_why(tokenizer, rows, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ValueError, match="precompute_ref_logps: the reference log-probs are computed once"):
        make_args(tmp_path, precompute_ref_logps=True)
    with pytest.raises(ValueError, match="needs a reference, but --reference is none"):
        make_args(tmp_path, reference="none", loss_type="simpo")
    with pytest.raises(ValueError, match=r"ref_model_mixup_alpha must be in \(0, 1\], got 1.5"):
        make_args(tmp_path, ref_model_mixup_alpha=1.5)
    with pytest.raises(ValueError, match="ref_model_sync_steps must be a positive integer, got 0"):
        make_args(tmp_path, ref_model_sync_steps=0)
    with pytest.raises(ValueError, match="policy_adapter new: the policy is the SFT adapter plus a new one"):
        make_args(tmp_path, ref_adapter="some/adapter", policy_adapter="new")
    with pytest.raises(ValueError, match="loss is reference-free"):
        tiny_trainer(make_args(tmp_path, loss_type="simpo"), rows, tokenizer=tokenizer)
    lora = LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="adapter-disabled reference: that reference is the policy's own base"):
        tiny_trainer(make_args(tmp_path), rows, tokenizer=tokenizer, peft_config=lora)
    for engine in ("zero3", "fsdp2", "fsdp1"):
        with pytest.raises(ValueError, match=f"under {engine}: the policy and the reference are sharded"):
            check_sync_launch(make_args(tmp_path), engine, "model")
    for engine in ("single", "ddp", "zero0", "zero1", "zero2"):  # full copies on every process: supported
        check_sync_launch(make_args(tmp_path), engine, "model")
    cached = tiny_trainer(make_args(tmp_path, max_steps=1), rows, tokenizer=tokenizer)
    n = len(cached.train_dataset)
    cached.train_dataset = cached.train_dataset.add_column("ref_chosen_logp_sums", [0.0] * n).add_column(
        "ref_rejected_logp_sums", [0.0] * n
    )
    with pytest.raises(ValueError, match="the training data carries reference log-probs"):
        cached.train()
    other = build_model(tokenizer, hidden_size=16, num_layers=2, num_heads=2)  # a layer more than the policy
    trainer = tiny_trainer(make_args(tmp_path, max_steps=1), rows, tokenizer=tokenizer, ref_model=other)
    with pytest.raises(ValueError, match="reference's parameter model.layers.1.* has no policy parameter"):
        trainer.train()


def test_model_card_and_trl_names(tokenizer, rows, tmp_path):
    from hf_dpo.training.trl_names import translate_argv

    args = make_args(tmp_path, max_steps=2)
    trainer = tiny_trainer(args, rows, tokenizer=tokenizer)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    card = (tmp_path / "final" / "README.md").read_text()
    assert "| sync_ref_model (TR-DPO) | every 2 optimizer steps: reference = 0.4 reference + 0.6 policy |" in card
    assert not (tmp_path / "final" / REF_MODEL_FILE).exists()  # the final save is the policy; checkpoints hold both
    argv = ["--sync_ref_model", "true", "--ref_model_mixup_alpha", "0.5", "--ref_model_sync_steps", "64"]
    assert translate_argv(argv) == argv  # TRL's names are ours
    config = DPOConfig(output_dir=str(tmp_path), report_to=[], sync_ref_model=True)
    assert (config.ref_model_mixup_alpha, config.ref_model_sync_steps) == (0.6, 512)  # TRL 1.16's defaults
    json.dumps(config.to_dict())  # the fields serialize like every other (trainer_state, hub uploads)
    assert copy.deepcopy(config).sync_ref_model


def test_sync_with_an_sft_adapter_reference_mixes_the_adapters_and_resumes(tokenizer, rows, tmp_path):
    """ref_adapter + policy_adapter copy: the rule runs on the adapter parameters (reference adapter <- policy
    adapter; the shared base is untouched); checkpoints carry the synced adapter in ref_adapter/ and a resume
    from checkpoint-2 reproduces steps 3-6 (1e-5)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_dpo.reference.adapters import REF_ADAPTER

    build_model(tokenizer, **TINY_LLAMA, seed=0).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), lora).save_pretrained(tmp_path / "sft")

    def trainer_for(output_dir):
        args = make_args(
            output_dir, save_strategy="steps", save_steps=2, ref_adapter=str(tmp_path / "sft"), learning_rate=5e-2
        )
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        return NormalizedDPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)

    def adapter(model, name):
        return {n.replace(f".{name}.", "."): p for n, p in model.named_parameters() if f".{name}." in n}

    trainer = trainer_for(tmp_path / "run")
    snapshots = Snapshots(lambda: adapter(trainer.model, "default"), lambda: adapter(trainer.model, REF_ADAPTER))
    trainer.add_callback(snapshots)
    initial = {n: p.detach().clone() for n, p in adapter(trainer.model, REF_ADAPTER).items()}
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.train()
    expected = expected_references(initial, snapshots.steps, ALPHA, EVERY)
    for (step, _, reference), wanted in zip(snapshots.steps, expected):
        for name in reference:
            assert torch.allclose(reference[name], wanted[name], rtol=0, atol=1e-6), (step, name)
    assert max((expected[-1][n] - initial[n]).abs().max().item() for n in initial) > 1e-3  # the reference moved
    assert all(torch.equal(p, base[n]) for n, p in trainer.model.named_parameters() if "lora_" not in n)
    saved = load_file(str(tmp_path / "run" / "checkpoint-2" / REF_ADAPTER / "adapter_model.safetensors"))
    assert saved.keys() == initial.keys()
    for name, value in saved.items():  # the checkpoint holds the adapter synced at step 2, not the SFT one
        assert torch.allclose(value, expected[1][name], rtol=0, atol=1e-6), name

    full = losses_of(trainer)
    resumed = trainer_for(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    got = losses_of(resumed)
    for step in (3, 4, 5, 6):
        assert got[step] == pytest.approx(full[step], abs=1e-5), step
