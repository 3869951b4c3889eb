"""Every TRL 1.16 loss name trains through ``NormalizedDPOTrainer`` and the ``hf-dpo`` command.

For each name: two optimizer steps on a tiny random-init Llama with hf_dpo's defaults (length-normalized,
beta 2), the first logged loss equal to the loss the objective predicts at zero log-ratio (the step-0
self-check's value, so that check passes: no "SELF-CHECK FAILED") and every logged loss finite. A weighted
list through the command logs each term, train and eval, and the terms recombine into the loss.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import datasets
import pytest
from cpu_run import cpu_args

from hf_dpo import DPOConfig, NormalizedDPOTrainer
from hf_dpo.cli.arguments import parse_args
from hf_dpo.cli.demo import build_model, build_tokenizer, make_preference_rows
from hf_dpo.losses import LossObjective

TRL_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model and 8 tokenized pairs, tokenized once (the first trainer's data set is reused)."""
    tokenizer = build_tokenizer("chatml")
    model = build_model(tokenizer, hidden_size=16, num_layers=1)
    rows = [{"prompt": r["chosen"][:-1], "chosen": r["chosen"][-1:], "rejected": r["rejected"][-1:]}
            for r in make_preference_rows(8, seed=5)]  # fmt: skip
    first = NormalizedDPOTrainer(model=copy.deepcopy(model), args=args_for(tmp_path_factory.mktemp("tok"), "sigmoid"),
                                 train_dataset=rows, processing_class=tokenizer)  # fmt: skip
    return tokenizer, model, first.train_dataset


def args_for(output_dir, loss_type, **overrides) -> DPOConfig:
    return cpu_args(
        output_dir,
        loss_type=loss_type,
        max_length=64,
        max_prompt_length=48,
        per_device_train_batch_size=4,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        warmup_steps=0,
        seed=0,
        **overrides,
    )


def test_every_trl_loss_name_parses_on_the_command_line():
    for name in TRL_LOSS_TYPES:
        _, _, args = parse_args(["--loss_type", name])
        assert args.loss_type == [name]


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_every_trl_loss_name_trains(setup, tmp_path, caplog, loss_type):
    tokenizer, model, train_dataset = setup
    args = args_for(tmp_path, loss_type)
    trainer = NormalizedDPOTrainer(
        model=copy.deepcopy(model), args=args, train_dataset=train_dataset, processing_class=tokenizer
    )
    with caplog.at_level(logging.INFO, logger="hf_dpo"):
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    expected, _ = LossObjective.from_config(args).loss_at_zero()
    if expected is not None:  # policy == reference at the first step: the predicted value, and the self-check passes
        assert losses[0] == pytest.approx(expected, rel=1e-5)
        assert "self-check passed" in caplog.text
    else:  # sft: the chosen NLL of a random model, about ln(vocabulary size) per token
        assert 0.5 * math.log(len(tokenizer)) < losses[0] < 2 * math.log(len(tokenizer))
    assert "SELF-CHECK FAILED" not in caplog.text
    assert losses[1] != losses[0]  # the first step moved the policy


def test_a_weighted_list_through_the_command_logs_each_term(tmp_path):
    """``hf-dpo --loss_type sigmoid sft --loss_weights 1 0.5`` on the demo: loss = loss/sigmoid + 0.5 loss/sft,
    in training and in evaluation (eval_loss/...)."""
    from hf_dpo.cli.main import main

    output_dir = tmp_path / "run"
    main(
        ["--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.5", "--max_steps", "2", "--logging_steps", "1"]
        + ["--max_train_samples", "32", "--max_eval_samples", "16", "--per_device_eval_batch_size", "16"]
        + ["--eval_steps", "2", "--output_dir", str(output_dir), "--plot", "false"]
    )
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    train = [entry for entry in history if "loss" in entry]
    evals = [entry for entry in history if "eval_loss" in entry]
    assert len(train) == 2 and len(evals) >= 2
    for entry in train:
        assert entry["loss"] == pytest.approx(entry["loss/sigmoid"] + 0.5 * entry["loss/sft"], rel=1e-5)
    for entry in evals:
        assert entry["eval_loss"] == pytest.approx(entry["eval_loss/sigmoid"] + 0.5 * entry["eval_loss/sft"], rel=1e-5)
    assert evals[0]["eval_loss/sigmoid"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy == reference
    card = (output_dir / "README.md").read_text()
    assert "| loss_weights | 1, 0.5 |" in card and "sft: NLL of the chosen answers" in card


def test_wpo_with_a_precomputed_reference_equals_the_live_reference(setup, tmp_path):
    """WPO weighs pairs by the policy alone, so cached reference sums serve it: the same per-pair losses."""
    import torch

    tokenizer, model, train_dataset = setup
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    results = {}
    for precompute in (False, True):
        args = args_for(
            tmp_path / str(precompute),
            "sigmoid",
            use_weighting=True,
            precompute_ref_logps=precompute,
            ref_logps_cache_dir="",
        )
        trainer = NormalizedDPOTrainer(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(model),
            args=args,
            train_dataset=train_dataset,
            processing_class=tokenizer,
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        assert ("ref_chosen_logp_sums" in batch) == precompute
        with torch.no_grad():
            results[precompute] = trainer.pair_losses(trainer.model, batch)[0]
    torch.testing.assert_close(results[True], results[False], rtol=1e-6, atol=1e-7)
    assert (results[False] - math.log(2)).abs().max() > 1e-3  # informative: WPO weights and a moved policy
