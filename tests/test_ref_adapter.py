"""``ref_adapter``: DPO on top of an SFT LoRA adapter, that adapter (frozen) as the reference, one base in memory.

An SFT adapter is made here with random, nonzero LoRA B (so that it changes the model), on a tiny
Llama (hidden 32, 2 layers, fp32, CPU) saved to disk as a user's base would be. Pinned down with
numbers, for ``policy_adapter`` copy and new:
- step 0: loss ln 2 and rewards exactly 0; the reference's per-pair sums equal base + SFT adapter
  loaded independently with peft (before and after training);
- gradients reach only the policy's adapter; the SFT adapter and the base never change;
  ``copy``: the policy adapter starts equal to the SFT adapter and moves away from it;
- the parameters in memory are one base plus the adapters;
- the saved result, reloaded as a user would (``PeftModel.from_pretrained(base, output_dir)``),
  scores held-out pairs like the trainer's policy (1e-5); ``new`` saves one adapter of rank
  r_sft + r_new (a plain top-level adapter would miss the SFT delta: checked to differ);
- ``new``: resuming from a checkpoint reproduces the uninterrupted losses (Trainer's resume
  activates the top-level adapter alone; the SFT adapter must be put back under it).
"""

from __future__ import annotations

import copy
import functools
import json
import math

import datasets
import pytest
import torch
from cpu_run import cpu_args
from transformers import AutoModelForCausalLM

from hf_dpo import NormalizedDPOTrainer
from hf_dpo.cli.demo import build_model, build_tokenizer, make_preference_rows
from hf_dpo.reference.adapters import REF_ADAPTER
from hf_dpo.reference.modes import reference_logp_sums

datasets.disable_progress_bars()
LN2 = math.log(2.0)
SFT_TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture(scope="module")
def rows():
    pool = make_preference_rows(40, seed=3)
    return {"train": pool[:24], "eval": pool[24:]}


@pytest.fixture(scope="module")
def paths(tokenizer, tmp_path_factory):
    """The base model on disk and an SFT adapter of it whose B matrices are random (not the identity init)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("ref_adapter")
    build_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=0).save_pretrained(root / "base")
    torch.manual_seed(1)
    sft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(root / "base"),
        LoraConfig(r=4, lora_alpha=8, target_modules=SFT_TARGETS, init_lora_weights=False, task_type="CAUSAL_LM"),
    )
    sft.save_pretrained(root / "sft")
    return {"base": root / "base", "sft": root / "sft", "root": root}


def load_base(paths):
    return AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)


make_args = functools.partial(
    cpu_args,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=16,
    max_steps=6,
    learning_rate=2e-2,
    lr_scheduler_type="constant",
    logging_steps=1,
    max_length=64,
    max_prompt_length=48,
    seed=0,
)


def new_lora():
    from peft import LoraConfig

    # Other modules than the SFT adapter's, partly overlapping: the saved concatenation must cover the union.
    return LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "o_proj"], task_type="CAUSAL_LM")


def build(paths, tokenizer, rows, output_dir, mode, **overrides):
    args = make_args(output_dir, ref_adapter=str(paths["sft"]), policy_adapter=mode, **overrides)
    return NormalizedDPOTrainer(
        model=load_base(paths),
        args=args,
        train_dataset=rows["train"],
        eval_dataset=rows["eval"],
        processing_class=tokenizer,
        peft_config=new_lora() if mode == "new" else None,
    )


def held_out_batch(trainer):
    return trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])


def sums(trainer, model, batch):
    model.eval()
    with torch.no_grad():
        return trainer.score(model, batch)[0]


def independent_reference(paths):
    """base + SFT adapter, loaded by peft alone: what the reference must compute."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(paths), paths["sft"]).eval()


def adapter_params(model, name):
    return {n.replace(f".{name}.", "."): p.detach().clone() for n, p in model.named_parameters() if f".{name}." in n}


@pytest.mark.parametrize("mode", ["copy", "new"])
def test_dpo_on_an_sft_adapter(mode, paths, tokenizer, rows, tmp_path):
    from peft import PeftModel

    trainer = build(paths, tokenizer, rows, tmp_path / "run", mode)
    model = trainer.model
    assert trainer.reference_mode == "adapter" and trainer.ref_model is None
    base_numel = sum(p.numel() for p in load_base(paths).parameters())
    adapter_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert sum(p.numel() for p in model.parameters()) == base_numel + adapter_numel  # one base in memory
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".default." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x 2 modules x (A, B)
    sft_start = adapter_params(model, REF_ADAPTER)
    policy_start = adapter_params(model, "default")
    base_start = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    if mode == "copy":
        assert policy_start.keys() == sft_start.keys()
        assert all(
            torch.equal(policy_start[n], sft_start[n]) for n in sft_start
        )  # the policy starts as the SFT adapter

    # Step 0: the reference is base + SFT adapter, the policy equals it: loss ln 2, rewards 0.
    batch = held_out_batch(trainer)
    expected_ref = sums(trainer, independent_reference(paths), batch)
    base_only = sums(trainer, load_base(paths), batch)
    assert (expected_ref - base_only).abs().max().item() > 1e-2  # the SFT adapter matters
    with torch.no_grad():
        ref = reference_logp_sums("adapter", model, None, batch, trainer.score)
    assert (ref - expected_ref).abs().max().item() < 1e-5
    assert (sums(trainer, model, batch) - expected_ref).abs().max().item() < 1e-5
    with torch.no_grad():
        losses, _, metrics = trainer.pair_losses(model, batch)
    assert losses.tolist() == pytest.approx([LN2] * len(losses), abs=1e-6)
    assert metrics["rewards/chosen"].item() == metrics["rewards/rejected"].item() == 0.0

    # Gradients reach the policy's adapter and nothing else.
    model.train()
    trainer.compute_loss(model, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable
    # B's gradients are nonzero (A's are zero for a new adapter, whose B starts at zero).
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if ".lora_B." in n)
    model.zero_grad(set_to_none=True)

    trainer.train()
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    assert losses[1] == pytest.approx(LN2, abs=1e-6) and losses[6] < 0.66  # it learns
    sft_end, policy_end = adapter_params(model, REF_ADAPTER), adapter_params(model, "default")
    assert all(torch.equal(sft_end[n], sft_start[n]) for n in sft_start)  # the reference adapter never changes
    assert all(torch.equal(p, base_start[n]) for n, p in model.named_parameters() if "lora_" not in n)
    assert min((policy_end[n] - policy_start[n]).abs().max().item() for n in policy_start) > 1e-4
    with torch.no_grad():
        ref = reference_logp_sums("adapter", model, None, batch, trainer.score)
    assert (ref - expected_ref).abs().max().item() < 1e-5  # still base + SFT adapter after training
    policy = sums(trainer, model, batch)
    assert (policy - expected_ref).abs().max().item() > 1e-2  # and the policy moved away from it

    # The saved result, as a user loads it.
    trainer.save_model(str(tmp_path / "final"))
    final = tmp_path / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert (final / REF_ADAPTER / "adapter_model.safetensors").is_file()  # the reference, kept beside the policy
    # A local base is named, not located, in the published adapter config: the user loads the base they have.
    assert config["base_model_name_or_path"] == "base"
    reloaded = PeftModel.from_pretrained(load_base(paths), final)
    assert (sums(trainer, reloaded, batch) - policy).abs().max().item() < 1e-5
    saved_ref = PeftModel.from_pretrained(load_base(paths), final / REF_ADAPTER)
    assert (sums(trainer, saved_ref, batch) - expected_ref).abs().max().item() < 1e-5
    if mode == "new":
        assert config["r"] == 4 + 2 and config["lora_alpha"] == 6
        assert sorted({t.rsplit(".", 1)[1] for t in config["target_modules"]}) == ["o_proj", "q_proj", "v_proj"]
        # What peft writes at the top level by itself (the new adapter alone) would not be the policy.
        trainer.model.save_pretrained(tmp_path / "native")
        alone = PeftModel.from_pretrained(load_base(paths), tmp_path / "native")
        assert (sums(trainer, alone, batch) - policy).abs().max().item() > 1e-2
    else:
        assert config["r"] == 4 and sorted(config["target_modules"]) == SFT_TARGETS  # the SFT adapter's settings
    card = (final / "README.md").read_text()
    assert f"| ref_adapter | {paths['sft']} (the reference: the base with it, frozen); policy: " in card
    assert f"| r | {config['r']} |" in card  # the card describes the adapter in the directory


def test_new_resumes_with_the_sft_adapter_under_the_new_one(paths, tokenizer, rows, tmp_path):
    """Checkpoints keep peft's two adapters (resumable); a resume from checkpoint-2 reproduces steps 3-6 (1e-5)."""
    full = build(paths, tokenizer, rows, tmp_path / "run", "new", save_strategy="steps", save_steps=2)
    full.train()
    expected = {e["step"]: e["loss"] for e in full.state.log_history if "loss" in e}
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert json.loads((checkpoint / "adapter_config.json").read_text())["r"] == 2  # the new adapter, for resuming
    resumed = build(paths, tokenizer, rows, tmp_path / "run", "new")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    got = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    for step in (3, 4, 5, 6):
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    assert resumed.model.base_model.active_adapters == ["default", REF_ADAPTER]


@pytest.mark.parametrize("mode", ["copy", "new"])
def test_precomputed_reference_is_base_plus_sft_adapter(mode, paths, tokenizer, rows, tmp_path):
    """precompute_ref_logps scores the pairs through the reference adapter: the cached sums are base + SFT's."""
    trainer = build(paths, tokenizer, rows, tmp_path, mode, precompute_ref_logps=True, ref_logps_cache_dir="")
    train = trainer.train_dataset
    batch = trainer.data_collator([train[i] for i in range(len(train))])
    expected = sums(trainer, independent_reference(paths), batch)  # (2N,): chosen, then rejected
    cached = torch.tensor([*train["ref_chosen_logp_sums"], *train["ref_rejected_logp_sums"]], dtype=expected.dtype)
    assert (cached - expected).abs().max().item() < 1e-5
    assert trainer.model.base_model.active_adapters == (["default"] if mode == "copy" else ["default", REF_ADAPTER])


def test_refusals_name_the_conflict(paths, tokenizer, rows, tmp_path):
    from peft import LoraConfig, get_peft_model

    sft = str(paths["sft"])

    def trainer(mode="copy", **kwargs):
        kwargs.setdefault("model", load_base(paths))
        return NormalizedDPOTrainer(
            args=make_args(tmp_path, ref_adapter=sft, policy_adapter=mode),
            train_dataset=rows["train"],
            processing_class=tokenizer,
            **kwargs,
        )

    with pytest.raises(ValueError, match="already has adapters: pass the base model"):
        trainer(model=get_peft_model(load_base(paths), new_lora()))
    with pytest.raises(ValueError, match="do not also pass ref_model"):
        trainer(ref_model=load_base(paths))
    with pytest.raises(ValueError, match="policy_adapter copy trains the SFT adapter itself"):
        trainer(peft_config=new_lora())
    with pytest.raises(ValueError, match="policy_adapter new .* needs its LoRA settings"):
        trainer("new")
    dora = paths["root"] / "dora"
    get_peft_model(load_base(paths), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(dora)
    with pytest.raises(ValueError, match="cannot hold a DoRA magnitude vector of --ref_adapter"):
        NormalizedDPOTrainer(
            model=load_base(paths),
            args=make_args(tmp_path, ref_adapter=str(dora), policy_adapter="new"),
            train_dataset=rows["train"],
            processing_class=tokenizer,
            peft_config=new_lora(),
        )
    with pytest.raises(ValueError, match="contradicts --reference model"):
        make_args(tmp_path, ref_adapter=sft, reference="model")
    with pytest.raises(ValueError, match="--policy_adapter new has no effect without --ref_adapter"):
        make_args(tmp_path, policy_adapter="new")


def test_concatenation_equals_peft_cat_and_the_sum_of_deltas(paths):
    """concatenate_lora's delta B @ A of every module = s1 B1 A1 + s2 B2 A2, as peft's add_weighted_adapter("cat")."""
    from peft import PeftModel, get_peft_model
    from safetensors.torch import load_file

    from hf_dpo.training.adapter_export import concatenate_lora, lora_scaling

    root = paths["root"]
    torch.manual_seed(2)
    other = new_lora()
    other.init_lora_weights = False
    get_peft_model(load_base(paths), other).save_pretrained(root / "other")

    def read(directory):
        return load_file(str(directory / "adapter_model.safetensors")), json.loads(
            (directory / "adapter_config.json").read_text()
        )

    first, second = read(paths["sft"]), read(root / "other")
    state, config = concatenate_lora(first, second)
    peft_model = PeftModel.from_pretrained(load_base(paths), paths["sft"], adapter_name="a")
    peft_model.load_adapter(root / "other", adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "cat", combination_type="cat")
    layers = {n: m for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "cat" in m.lora_A}
    assert len(layers) == 2 * 3  # q, v, o in 2 layers
    for name, layer in layers.items():
        module = name.replace("base_model.model.", "", 1)
        a, b = state[f"base_model.model.{module}.lora_A.weight"], state[f"base_model.model.{module}.lora_B.weight"]
        ours = (b.double() @ a.double()) * config["lora_alpha"] / config["r"]
        theirs = layer.get_delta_weight("cat").double()
        by_hand = sum(
            (source[0][f"base_model.model.{module}.lora_B.weight"].double())
            @ source[0][f"base_model.model.{module}.lora_A.weight"].double()
            * lora_scaling(source[1])
            for source in (first, second)
            if f"base_model.model.{module}.lora_A.weight" in source[0]
        )
        assert (ours - by_hand).abs().max().item() < 1e-6, name
        assert (ours - theirs).abs().max().item() < 1e-6, name
    assert copy.deepcopy(config)["r"] == 6


def test_the_documented_command_trains_on_top_of_an_sft_adapter(hf_dpo_command, tmp_path):
    """docs/usage.md's demo command, run as written (cwd: a folder whose outputs/demo-sft is an adapter of the demo
    model with random B, standing in for an SFT adapter): step 0 is a tie, the run learns, and the saved adapter
    (rank 8 + 4) reloaded with peft gives the run's held-out log-probs (1e-5)."""
    import os
    import re
    import shlex
    import subprocess
    from pathlib import Path

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer

    from hf_dpo import load_preference_dataset
    from hf_dpo.cli.demo import build_demo

    usage = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", usage, re.S)
    line = next(line for block in blocks for line in block.splitlines() if "--ref_adapter outputs/demo-sft" in line)
    argv = shlex.split(line)
    assert argv[0] == "hf-dpo"
    assets = build_demo(tmp_path / "assets")
    torch.manual_seed(0)
    sft = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(assets["model"]), sft).save_pretrained(
        tmp_path / "outputs" / "demo-sft"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [hf_dpo_command, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-5000:]

    output_dir = tmp_path / "outputs" / "demo-dpo-on-sft"
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["reference"] == "adapter" and summary["use_peft"]
    before, after = summary["held_out"]["before"], summary["held_out"]["after"]
    assert (before["rewards/margins"], before["rewards/accuracies"]) == (0.0, 0.5)  # policy == reference
    assert before["loss"] == pytest.approx(LN2, abs=1e-6)
    assert after["rewards/margins"] > 0.05
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 + 4
    # The demo's base lives under the output folder, so the adapter config names it relative to that folder.
    base = AutoModelForCausalLM.from_pretrained(output_dir / config["base_model_name_or_path"])
    args = cpu_args(tmp_path / "reload", per_device_eval_batch_size=64, max_length=128, max_prompt_length=96)
    reloaded = NormalizedDPOTrainer(
        model=PeftModel.from_pretrained(base, output_dir),
        args=args,
        eval_dataset=load_preference_dataset(output_dir / "demo_assets" / "eval.jsonl"),
        processing_class=AutoTokenizer.from_pretrained(output_dir),
    ).evaluate()
    for key in ("logps/chosen", "logps/rejected"):  # the policy's own numbers (the reloaded run has another reference)
        assert reloaded[f"eval_{key}"] == pytest.approx(after[key], abs=1e-5), key
