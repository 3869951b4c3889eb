"""DPOConfig: defaults, validation messages naming flag and value, HfArgumentParser."""

import dataclasses

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_dpo.losses import LOSS_REGISTRY
from hf_dpo.training.config import DPOConfig


def test_defaults(tmp_path):
    args = DPOConfig(output_dir=str(tmp_path))
    assert args.beta == 2.0 and args.beta_is_default
    assert args.length_normalize is True
    assert args.remove_unused_columns is False
    assert (args.loss_type, args.completion_turns, args.reference, args.on_bad_row) == (
        ["sigmoid"],
        "last",
        "auto",
        "error",
    )
    assert (args.max_length, args.max_prompt_length, args.label_smoothing, args.sft_weight) == (1024, 512, None, 0.0)


def test_training_defaults_are_dpo_ones_not_supervised_ones(tmp_path):
    """TrainingArguments' 5e-5 for 3 epochs is 50x DPO's usual rate (TRL: 1e-6); logging every 500 steps shows nothing."""
    ours, theirs = DPOConfig(output_dir=str(tmp_path)), TrainingArguments(output_dir=str(tmp_path))
    assert (theirs.learning_rate, theirs.num_train_epochs, theirs.logging_steps, theirs.warmup_steps) == (
        5e-5,
        3,
        500,
        0,
    )
    assert (ours.learning_rate, ours.num_train_epochs, ours.logging_steps, ours.warmup_steps) == (1e-6, 1, 10, 0.1)
    (parsed,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert (parsed.learning_rate, parsed.num_train_epochs) == (1e-6, 1)
    assert (
        HfArgumentParser(DPOConfig)
        .parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--learning_rate", "5e-7"])[0]
        .learning_rate
        == 5e-7
    )


def test_max_length_alone_is_always_valid(tmp_path):
    """Unset max_prompt_length is half of max_length (TRL users with max_length <= 512 hit the old fixed 512)."""
    args = DPOConfig(output_dir=str(tmp_path), max_length=128)
    assert (args.max_length, args.max_prompt_length, args.max_prompt_length_is_default) == (128, 64, True)
    assert DPOConfig(output_dir=str(tmp_path), max_length=3).max_prompt_length == 1
    assert DPOConfig(output_dir=str(tmp_path), max_length=None).max_prompt_length is None  # no limit at all
    explicit = DPOConfig(output_dir=str(tmp_path), max_length=128, max_prompt_length=100)
    assert (explicit.max_prompt_length, explicit.max_prompt_length_is_default) == (100, False)
    (parsed,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--max_length", "256"]
    )
    assert parsed.max_prompt_length == 128
    # An explicit value that conflicts is still refused, and so is a max_length with no room for both parts.
    with pytest.raises(ValueError, match=r"--max_prompt_length \(128\) must be below --max_length \(128\)"):
        DPOConfig(output_dir=str(tmp_path), max_length=128, max_prompt_length=128)
    with pytest.raises(ValueError, match="--max_length must be at least 2"):
        DPOConfig(output_dir=str(tmp_path), max_length=1)


def test_beta_default_follows_length_normalize(tmp_path):
    """Per-token log-ratios are ~|y| times smaller than summed ones: 2.0 for the mean, 0.1 for the sum."""
    summed = DPOConfig(output_dir=str(tmp_path), length_normalize=False)
    assert summed.beta == 0.1 and summed.beta_is_default
    explicit = DPOConfig(output_dir=str(tmp_path), beta=0.5)
    assert explicit.beta == 0.5 and not explicit.beta_is_default


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"loss_type": "dpo"}, "--loss_type: got 'dpo'; choose one of " + ", ".join(LOSS_REGISTRY)),
        ({"loss_type": ["sigmoid", "dpo"]}, "--loss_type: got 'dpo'; choose one of sigmoid, hinge, ipo"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "--loss_weights: 1 weights for 2 loss types"),
        ({"loss_type": "bco_pair", "f_divergence_type": "forward_kl"}, "is not defined for --loss_type bco_pair"),
        ({"ld_alpha": 0.5, "precompute_ref_logps": True}, "--ld_alpha cannot be used with --precompute_ref_logps"),
        ({"completion_turns": "first"}, "--completion_turns: got 'first'; choose one of last, all"),
        ({"reference": "frozen"}, "--reference: got 'frozen'; choose one of auto, model, adapter, none"),
        ({"on_bad_row": "ignore"}, "--on_bad_row: got 'ignore'; choose one of error, skip"),
        ({"beta": 0.0}, "--beta must be > 0, got 0.0"),
        ({"beta": -1.5}, "--beta must be > 0, got -1.5"),
        ({"beta": float("nan")}, "--beta must be > 0, got nan"),
        ({"label_smoothing": 0.5}, "--label_smoothing must be in [0, 0.5), got 0.5"),
        ({"label_smoothing": -0.1}, "--label_smoothing must be in [0, 0.5), got -0.1"),
        ({"sft_weight": -1.0}, "--sft_weight must be >= 0, got -1.0"),
        (
            {"loss_type": "ipo", "label_smoothing": 0.1},
            "--label_smoothing 0.1 has no effect with --loss_type ipo; set it to 0",
        ),
        (
            {"loss_type": "hinge", "label_smoothing": 0.2},
            "--label_smoothing 0.2 has no effect with --loss_type hinge; set it to 0",
        ),
        ({"max_length": 0}, "--max_length must be a positive integer, got 0"),
        ({"logprob_chunk_size": 0}, "--logprob_chunk_size must be a positive integer, got 0"),
        ({"max_prompt_length": 1024}, "--max_prompt_length (1024) must be below --max_length (1024)"),
        ({"max_prompt_length": 600, "max_length": 512}, "--max_prompt_length (600) must be below --max_length (512)"),
        ({"reference": "none"}, "--reference none cannot be used with --loss_type sigmoid, which needs a reference"),
    ],
)
def test_bad_values_name_flag_and_value(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as info:
        DPOConfig(output_dir=str(tmp_path), **kwargs)
    assert message in str(info.value)


def test_reference_free_loss_accepts_no_reference(tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), loss_type="simpo", reference="none")
    assert (args.loss_type, args.reference) == (["simpo"], "none")
    nll_only = DPOConfig(output_dir=str(tmp_path), loss_type="sft", reference="none")  # sft needs no reference
    assert nll_only.loss_type == ["sft"]


def test_a_loss_list_from_python_and_from_flags(tmp_path):
    """TRL's semantics: a string is a one-element list; one weight per loss, 1 each when not given."""
    args = DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "sft"], loss_weights=[1, 0.5])
    assert (args.loss_type, args.loss_weights) == (["sigmoid", "sft"], [1.0, 0.5])
    (parsed,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.5"]
    )
    assert (parsed.loss_type, parsed.loss_weights) == (["sigmoid", "sft"], [1.0, 0.5])
    # TRL's remaining options are fields of the same names.
    (parsed,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--loss_type", "apo_zero", "--use_weighting", "true", "--ld_alpha", "0.5"]
    )
    assert (parsed.loss_type, parsed.use_weighting, parsed.ld_alpha, parsed.beta) == (["apo_zero"], True, 0.5, 2.0)


def test_beta_default_is_per_token_for_a_list_of_per_token_losses(tmp_path):
    """sigmoid_norm is always per token: even with length_normalize false its default beta is the per-token one."""
    assert DPOConfig(output_dir=str(tmp_path), loss_type="sigmoid_norm", length_normalize=False).beta == 2.0
    assert DPOConfig(output_dir=str(tmp_path), loss_type="sigmoid", length_normalize=False).beta == 0.1


def test_every_dpo_field_has_help():
    """One description per field, which HfArgumentParser shows."""
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f for f in dataclasses.fields(DPOConfig) if f.name not in base]
    assert {"beta", "loss_type", "length_normalize", "completion_turns", "reference", "on_bad_row"} <= {
        f.name for f in own
    }
    for f in own:
        assert f.metadata.get("help", "").strip(), f.name


def test_hf_argument_parser_parses_dpo_flags(tmp_path):
    parser = HfArgumentParser(DPOConfig)
    (args,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--loss_type",
            "ipo",
            "--beta",
            "0.5",
            "--no_length_normalize",
            "--completion_turns",
            "all",
            "--max_length",
            "64",
            "--max_prompt_length",
            "32",
            "--on_bad_row",
            "skip",
        ]
    )
    assert (args.loss_type, args.beta, args.length_normalize, args.completion_turns) == (["ipo"], 0.5, False, "all")
    assert (args.max_length, args.max_prompt_length, args.on_bad_row, args.beta_is_default) == (64, 32, "skip", False)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--length_normalize", "False"])
    assert args.beta == 0.1 and args.beta_is_default
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--loss_type", "dpo"])


def test_help_shows_loss_choices_from_registry():
    parser = HfArgumentParser(DPOConfig)
    action = next(a for a in parser._actions if a.dest == "loss_type")
    assert list(action.choices) == list(LOSS_REGISTRY)
    for name, spec in LOSS_REGISTRY.items():
        assert f"{name}: {spec.description}" in action.help
    help_text = " ".join(parser.format_help().split())  # argparse wraps lines
    assert "--loss_type {" + ",".join(LOSS_REGISTRY) + "}" in help_text
    assert "Choices: " + ", ".join(LOSS_REGISTRY) + "." in help_text
