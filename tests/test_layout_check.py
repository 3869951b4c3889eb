"""The first-batch layout self-check: custom-code models that ignore the packed layouts' mask refuse them."""

import shutil
from pathlib import Path

import pytest
import torch
from cpu_run import cpu_args
from test_packing import random_features
from transformers import AutoModelForCausalLM

from hf_dpo import DPOCollator, DPOConfig, NormalizedDPOTrainer
from hf_dpo.cli.demo import build_tokenizer, make_preference_rows
from hf_dpo.layouts.check import LayoutMismatchError, layout_verdict, padded_equivalent
from hf_dpo.layouts.packed import PackedDPOCollator

CUSTOM_CODE = Path(__file__).parent / "custom_models" / "modeling_tiny_custom.py"


@pytest.mark.parametrize(
    "layout",
    [
        dict(padding_free=True),
        dict(share_prompt=True),
        dict(padding_free=True, share_prompt=True),
        dict(padding_free=True, max_row_tokens=16),
    ],
)
def test_padded_equivalent_is_the_plain_collators_batch(layout):
    features = random_features(3, prompt_mask=True)
    want = DPOCollator(pad_token_id=0)(features)
    got = padded_equivalent(PackedDPOCollator(pad_token_id=0, **layout)(features))
    for key in ("input_ids", "attention_mask", "response_mask", "chosen_lengths", "rejected_lengths"):
        assert torch.equal(got[key], want[key].to(got[key].dtype)), key


def save_custom_model(directory: Path, vocab_size: int, honour_mask: bool) -> Path:
    """Write the modeling file and a random-init checkpoint whose config.json points to it through auto_map."""
    directory.mkdir()
    shutil.copy(CUSTOM_CODE, directory / CUSTOM_CODE.name)
    import importlib.util

    spec = importlib.util.spec_from_file_location("modeling_tiny_custom", directory / CUSTOM_CODE.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.TinyCustomConfig(vocab_size=vocab_size, honour_mask=honour_mask)
    config.auto_map = {
        "AutoConfig": "modeling_tiny_custom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
    }
    torch.manual_seed(0)
    module.TinyCustomForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture(scope="module")
def custom_dirs(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    return {honour: save_custom_model(root / f"honour_{honour}", len(tokenizer), honour) for honour in (False, True)}


def run(directory, tokenizer, output_dir, **layout):
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)
    assert type(model).__name__ == "TinyCustomForCausalLM" and type(model).__module__.startswith("transformers_modules")
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = cpu_args(
        output_dir, max_steps=2, logging_steps=1, per_device_train_batch_size=4, learning_rate=1e-2, seed=0, **layout
    )
    trainer = NormalizedDPOTrainer(
        model=model, args=args, train_dataset=make_preference_rows(8, seed=0), processing_class=tokenizer
    )
    return trainer, initial


@pytest.mark.parametrize("layout", ["padding_free", "share_prompt"])
def test_mask_ignoring_custom_model_refuses_the_layout_before_training(custom_dirs, tokenizer, tmp_path, layout):
    other = "share_prompt" if layout == "padding_free" else "padding_free"
    trainer, initial = run(custom_dirs[False], tokenizer, tmp_path, **{layout: True, other: False})
    with pytest.raises(LayoutMismatchError) as raised:
        trainer.train()
    message = str(raised.value)
    assert "TinyCustomForCausalLM" in message and f"the {layout} layout" in message
    difference = float(message.split("max per-token log-prob difference ")[1].split()[0])
    assert difference > 1e-2  # the measured difference, far beyond the fp32 tolerance
    assert trainer.state.global_step == 0
    assert all(torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())  # no optimizer step ran
    assert layout_verdict(trainer.model, layout)[0] is False


def test_mask_ignoring_custom_model_trains_with_the_default_layout(custom_dirs, tokenizer, tmp_path):
    trainer, initial = run(custom_dirs[False], tokenizer, tmp_path)
    trainer.train()
    assert trainer.state.global_step == 2
    assert not all(torch.equal(p, initial[n]) for n, p in trainer.model.named_parameters())


def test_mask_honouring_custom_model_keeps_the_layout(custom_dirs, tokenizer, tmp_path):
    trainer, _ = run(custom_dirs[True], tokenizer, tmp_path, padding_free=True, share_prompt=True)
    trainer.train()
    assert trainer.state.global_step == 2
    ok, detail = layout_verdict(trainer.model, "padding_free+share_prompt")
    assert ok, detail
    assert float(detail.split("difference ")[1].split()[0]) < 1e-5


def test_trainer_loads_custom_code_only_with_trust_remote_code(custom_dirs, tokenizer, tmp_path):
    rows = make_preference_rows(4, seed=0)
    with pytest.raises(ValueError, match="trust_remote_code"):
        NormalizedDPOTrainer(
            model=str(custom_dirs[True]),
            args=cpu_args(tmp_path, max_steps=1),
            train_dataset=rows,
            processing_class=tokenizer,
        )
    args = cpu_args(tmp_path, max_steps=1)
    args.trust_remote_code = True
    trainer = NormalizedDPOTrainer(
        model=str(custom_dirs[True]),
        ref_model=str(custom_dirs[True]),
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
    )
    assert type(trainer.model).__name__ == type(trainer.ref_model).__name__ == "TinyCustomForCausalLM"
    assert type(trainer.model).__module__.startswith("transformers_modules")
    reloaded = AutoModelForCausalLM.from_pretrained(custom_dirs[True], trust_remote_code=True)
    assert all(torch.equal(p, q) for p, q in zip(trainer.ref_model.parameters(), reloaded.parameters()))


def test_layout_flags_parse_auto_true_false_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    def parse(*argv):
        return HfArgumentParser(DPOConfig).parse_args_into_dataclasses(["--output_dir", str(tmp_path), *argv])[0]

    default = parse()
    assert default.padding_free == "auto" and default.share_prompt == "auto"
    flags = parse("--padding_free", "false", "--share_prompt")
    assert flags.padding_free is False and flags.share_prompt is True
    assert parse("--padding_free", "true", "--share_prompt", "auto").padding_free is True
    with pytest.raises(ValueError, match="--padding_free: got 'maybe'"):
        DPOConfig(output_dir=str(tmp_path), padding_free="maybe")


def test_auto_layout_turns_off_with_one_warning_on_a_mask_ignoring_model(custom_dirs, tokenizer, tmp_path, caplog):
    auto, _ = run(custom_dirs[False], tokenizer, tmp_path / "auto")
    # Demo data: prompts are about a third of the tokens, padding about a tenth.
    assert (
        auto.layout.share_prompt and not auto.layout.explicit and "prompts are 34% of the tokens" in auto.layout.reason
    )
    with caplog.at_level("WARNING", logger="hf_dpo.layouts.check"):
        auto.train()
    warnings = [r for r in caplog.records if "turned off for this model" in r.getMessage()]
    assert len(warnings) == 1 and "TinyCustomForCausalLM" in warnings[0].getMessage()
    plain, _ = run(custom_dirs[False], tokenizer, tmp_path / "plain", padding_free=False, share_prompt=False)
    plain.train()

    def losses(trainer):
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    # Scored in the padded layout, the automatic run is the plain run, step for step.
    assert losses(auto) == pytest.approx(losses(plain), abs=1e-6) and len(losses(plain)) == 2


def test_auto_layout_is_kept_on_a_mask_honouring_model(custom_dirs, tokenizer, tmp_path):
    trainer, _ = run(custom_dirs[True], tokenizer, tmp_path)
    trainer.train()
    ok, detail = layout_verdict(trainer.model, trainer.layout.name)
    assert trainer.layout.share_prompt and ok, detail
