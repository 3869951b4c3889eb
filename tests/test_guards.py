"""Numerical guards and self-checks: non-finite loss (error / skipped step), fp32 log-probs, zero counts,
the first-step ln 2 check with its diagnosis, and the beta warning."""

import copy
import functools
import logging
import math

import datasets
import pytest
import torch
from cpu_run import TINY_LLAMA, cpu_args, tiny_trainer
from transformers import TrainerCallback

from hf_dpo import NormalizedDPOTrainer
from hf_dpo.cli.demo import build_model, build_tokenizer, make_preference_rows
from hf_dpo.losses import sft_nll
from hf_dpo.scoring.logprobs import response_logp_sums, sequence_logps
from hf_dpo.training.guards import NonFiniteLossError
from hf_dpo.training.metrics import LossLog, PairMetrics
from hf_dpo.training.selfcheck import FIRST_STEP_RTOL, LN2, beta_warning, initial_loss, learning_rate_warning

datasets.disable_progress_bars()
POISONED_ROW = 2


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("chatml")


def tiny_model(tokenizer, seed=0):
    return build_model(tokenizer, **TINY_LLAMA, seed=seed)


config = functools.partial(
    cpu_args,
    per_device_train_batch_size=2,
    max_steps=1,
    logging_steps=1,
    learning_rate=1e-2,
    warmup_steps=0,  # the learning-rate checks below count scheduler steps from a flat start
)


class PoisonedTrainer(NormalizedDPOTrainer):
    """Makes the policy's log-prob sums of row ``POISONED_ROW`` NaN through the scoring seam (the reference stays clean)."""

    def score(self, model, batch):
        sums, counts = super().score(model, batch)
        if model.training:
            poisoned = (batch["row_ids"] == POISONED_ROW).repeat(2)  # (2B,): the row's chosen and rejected
            # Added, not selected with torch.where: a NaN branch would leak NaN gradients into every row.
            sums = sums + torch.where(poisoned, float("nan"), 0.0)
        return sums, counts


# --------------------------------------------------------------------------- non-finite loss


def test_nonfinite_loss_raises_naming_the_rows_of_the_batch(tmp_path, tokenizer):
    trainer = tiny_trainer(config(tmp_path, max_steps=2), tokenizer=tokenizer, trainer_class=PoisonedTrainer)
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.train()
    message = str(caught.value)
    step = trainer.state.global_step + 1
    assert message.startswith(
        f"non-finite training loss (nan) at step {step}. Non-finite pairs: <rows>:{POISONED_ROW}. Rows in the batch: "
    )
    batch_rows = message.split("Rows in the batch: ")[1].split(". ")[0].split(", ")
    assert len(batch_rows) == 2 and f"<rows>:{POISONED_ROW}" in batch_rows
    assert message.endswith(
        "Likely causes: fp16 overflow (use bf16), a learning rate that is too high, or a row whose response the model "
        "finds impossible. Set nonfinite_loss='skip' to skip such optimizer steps instead of stopping."
    )


def test_skipped_step_leaves_parameters_optimizer_and_learning_rate_bit_identical(tmp_path, tokenizer):
    """4 rows, batch 2, 4 steps = 2 epochs: the batch holding row 2 comes once per epoch, so 2 steps are skipped.

    Weight decay 0.1 and AdamW momentum would both move the parameters on a step
    with a zeroed gradient, so equality here means the update really did not happen.
    """
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
            adam_steps = sorted({float(s["step"]) for s in optimizer.state.values()}) if optimizer.state else []
            snapshots.append(
                (
                    trainer.guards.skipped_steps,
                    {n: p.detach().clone() for n, p in model.named_parameters()},
                    adam_steps,
                    lr_scheduler.get_last_lr()[0],
                )
            )

    args = config(tmp_path, max_steps=4, nonfinite_loss="skip", weight_decay=0.1, lr_scheduler_type="linear", seed=3)
    trainer = tiny_trainer(args, tokenizer=tokenizer, trainer_class=PoisonedTrainer)
    trainer.add_callback(Snapshot())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    counts = [snapshot[0] for snapshot in snapshots]
    skipped = [now > before_ for now, before_ in zip(counts, [0] + counts[:-1])]
    assert skipped.count(True) == 2
    previous_params, previous_adam, previous_lr = before, [], 1e-2
    for was_skipped, (_, params, adam_steps, lr) in zip(skipped, snapshots):
        assert all(torch.equal(params[n], previous_params[n]) for n in params) == was_skipped
        if was_skipped:
            assert (adam_steps, lr) == (previous_adam, previous_lr)
        previous_params, previous_adam, previous_lr = params, adam_steps, lr
    assert snapshots[-1][2] == [2.0]  # AdamW counted only the 2 real updates
    logged = [entry["nonfinite_loss_skipped"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == sorted(logged) and logged[-1] == 2.0 and len(logged) == 4


def test_nan_gradient_behind_a_finite_loss_never_reaches_the_weights(tmp_path, tokenizer):
    """A hook turns the second backward's lm_head gradient into NaN while every loss stays finite."""
    model = tiny_model(tokenizer)
    backward_calls = []

    def poison(grad):
        backward_calls.append(1)
        return grad * float("nan") if len(backward_calls) == 2 else grad

    model.lm_head.weight.register_hook(poison)
    trainer = tiny_trainer(config(tmp_path, max_steps=3), tokenizer=tokenizer, model=model)
    with pytest.raises(
        NonFiniteLossError,
        match=r"^non-finite gradient at step 2 although the loss was finite\. Rows of this step: <rows>:\d, <rows>:\d\. ",
    ):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())

    backward_calls.clear()
    after_first = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                after_first.update({n: p.detach().clone() for n, p in model.named_parameters()})
            if state.global_step == 2:
                assert all(torch.equal(p, after_first[n]) for n, p in model.named_parameters())

    trainer = tiny_trainer(config(tmp_path, max_steps=3, nonfinite_loss="skip"), tokenizer=tokenizer)
    trainer.model.lm_head.weight.register_hook(poison)
    trainer.add_callback(Record())
    trainer.train()
    assert trainer.guards.skipped_steps == 1 and after_first
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_config_rejects_an_unknown_nonfinite_policy(tmp_path):
    with pytest.raises(ValueError, match=r"^--nonfinite_loss: got 'ignore'; choose one of error, skip$"):
        config(tmp_path, nonfinite_loss="ignore")


def test_logged_loss_is_the_mean_of_the_finite_step_losses_with_the_count_of_the_others(tmp_path, tokenizer):
    """4 rows, batch 2, 4 steps, logged every 2 steps (one epoch): each interval has one step holding row 2 (NaN, skipped)
    and one finite step. The logged loss is the finite step's loss, with loss_nonfinite 1; Trainer's own would be 0.75
    or 0.5 of it (it adds a NaN step as the interval's running mean, 0 when the NaN comes first). The DPO metrics
    leave the NaN batch's 2 pairs out and say so. Two skips that are not in a row do not stop the run."""
    batch_losses = []

    class Recording(PoisonedTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            batch_losses.append((self.state.global_step + 1, float(loss.detach())))
            return loss

    args = config(
        tmp_path, max_steps=4, logging_steps=2, nonfinite_loss="skip", nonfinite_max_consecutive_skips=2, seed=3
    )
    trainer = tiny_trainer(args, tokenizer=tokenizer, trainer_class=Recording)
    trainer.train()
    finite = {step: loss for step, loss in batch_losses if math.isfinite(loss)}
    assert len(finite) == 2 and len(batch_losses) == 4 and trainer.guards.skipped_steps == 2
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry in logs:
        (step,) = [s for s in finite if entry["step"] - 2 < s <= entry["step"]]
        assert entry["loss"] == pytest.approx(finite[step], abs=1e-6)
        assert entry["loss_nonfinite"] == 1 and entry["nonfinite_pairs"] == 2
        assert all(math.isfinite(v) for k, v in entry.items() if k.startswith(("rewards/", "logps/")))
    summary = trainer.state.log_history[-1]
    assert summary["train_loss"] == pytest.approx(sum(finite.values()) / 2, abs=1e-6)


def test_logged_loss_equals_trainers_own_when_every_loss_is_finite(tmp_path, tokenizer, monkeypatch):
    """5 rows, batch 1, accumulation 2: steps of 2, 2, 1 (the epoch's end) and 2 micro-batches, logged every 2 steps.
    The replaced loss and train_loss equal Trainer's own numbers (captured before the replacement) within float32
    accumulation noise."""
    replaced = []
    original = LossLog.update

    def record(self, logs):
        before = dict(logs)
        original(self, logs)
        replaced.append((before, dict(logs)))

    monkeypatch.setattr(LossLog, "update", record)
    args = config(tmp_path, max_steps=4, logging_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    trainer = tiny_trainer(args, 5, tokenizer=tokenizer)
    trainer.train()
    pairs = [(before[key], after[key]) for before, after in replaced for key in ("loss", "train_loss") if key in before]
    assert len(pairs) == 3  # steps 1-2, steps 3-4, train_loss
    for trainers, ours in pairs:
        assert ours == pytest.approx(trainers, abs=1e-6)
    assert len({round(ours, 4) for _, ours in pairs}) == 3  # three different numbers
    assert not any("loss_nonfinite" in after for _, after in replaced)


def test_skipped_steps_in_a_row_stop_the_run(tmp_path, tokenizer):
    """Every row NaN: with nonfinite_max_consecutive_skips=3 the third skipped step raises, and nothing was updated."""

    class AllPoisoned(NormalizedDPOTrainer):
        def score(self, model, batch):
            sums, counts = super().score(model, batch)
            return (sums + float("nan") if model.training else sums), counts

    args = config(tmp_path, max_steps=10, nonfinite_loss="skip", nonfinite_max_consecutive_skips=3)
    trainer = tiny_trainer(args, 8, tokenizer=tokenizer, trainer_class=AllPoisoned)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.train()
    assert str(caught.value).startswith(
        "nonfinite_loss='skip' skipped 3 optimizer steps in a row (steps 1-3), the limit set by "
        "nonfinite_max_consecutive_skips=3: the run stops instead of going on without training. The last: non-finite "
        "training loss (nan) at step 3. Non-finite pairs: <rows>:"
    )
    assert trainer.guards.skipped_step_numbers == [1, 2]
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_config_bounds_the_skips_and_the_step_timeout(tmp_path):
    with pytest.raises(ValueError, match=r"^--nonfinite_max_consecutive_skips must be >= 1, got 0$"):
        config(tmp_path, nonfinite_max_consecutive_skips=0)
    with pytest.raises(
        ValueError, match=r"^--step_timeout must be >= 0 seconds \(0: ddp_timeout throughout\), got -1$"
    ):
        config(tmp_path, step_timeout=-1)


class TwoRanks:
    """An accelerator of 2 processes whose gather returns the rows given for the next call."""

    num_processes = 2

    def __init__(self):
        self.rows = None

    def gather_for_metrics(self, row):
        return self.rows


def test_pair_metrics_leave_out_a_rank_batch_that_is_not_finite():
    """Rank 0: a=1, b=4 over 2 pairs; rank 1: a=NaN, b=8 over 2 pairs. a and b are rank 0's alone (a batch with any
    non-finite metric is left out whole), nonfinite_pairs 2; Trainer-style sums would give NaN for a."""
    accelerator = TwoRanks()
    metrics = PairMetrics(accelerator)
    accelerator.rows = torch.tensor([[1.0, 4.0, 2.0], [float("nan"), 8.0, 2.0]])
    metrics.add({"a": torch.tensor(0.0), "b": torch.tensor(0.0)}, "train", 2)
    accelerator.rows = torch.tensor([[3.0, 2.0, 1.0], [5.0, 6.0, 3.0]])  # both finite: pair-weighted
    metrics.add({"a": torch.tensor(0.0), "b": torch.tensor(0.0)}, "train", 2)
    assert metrics.drain("train") == pytest.approx({"a": (2 + 3 + 15) / 6, "b": (8 + 2 + 18) / 6, "nonfinite_pairs": 2})
    accelerator.rows = torch.tensor([[float("nan"), 1.0, 2.0], [float("inf"), 1.0, 2.0]])
    metrics.add({"a": torch.tensor(0.0), "b": torch.tensor(0.0)}, "eval", 2)
    drained = metrics.drain("eval")
    assert math.isnan(drained["a"]) and math.isnan(drained["b"]) and drained["nonfinite_pairs"] == 4


def test_loss_log_averages_finite_rank_step_losses():
    """Step 1: ranks 0.5 and NaN; step 2 (two micro-batches): rank 0 (0.2 + 0.6) / 2, rank 1 (0.4 + 0.8) / 2.
    loss = (0.5 + 0.4 + 0.6) / 3 with loss_nonfinite 1; Trainer's filter would log (0.5 + 0 + 0.4 + 0.6) / 4."""
    log = LossLog()
    log.add(torch.tensor([0.5, float("nan")]))
    log.end_step()
    log.add(torch.tensor([0.2, 0.4]))
    log.add(torch.tensor([0.6, 0.8]))
    log.end_step()
    logs = {"loss": 0.375, "learning_rate": 1.0}
    log.update(logs)
    assert logs == pytest.approx({"loss": 0.5, "loss_nonfinite": 1.0, "learning_rate": 1.0})
    log.add(torch.tensor([0.1, 0.3]))
    log.end_step()
    logs = {"loss": 0.2}
    log.update(logs)
    assert logs == pytest.approx({"loss": 0.2})  # the next interval starts afresh; nothing left out
    summary = {"train_loss": 0.0}
    log.update(summary)
    assert summary == pytest.approx({"train_loss": (0.5 + 0.4 + 0.6 + 0.1 + 0.3) / 5})


# --------------------------------------------------------------------------- precision and counts


def test_log_probs_of_half_precision_logits_are_computed_in_fp32():
    """Log-probs of fp16 logits are computed and summed in fp32.

    Expected values: the float64 log-softmax of the very same fp16 numbers (logits near
    1000, where fp16 values are 0.5 apart); an fp16 result could not come within 1e-4.
    """
    torch.manual_seed(0)
    logits = (1000 + 3 * torch.randn(2, 4, 50)).half()  # (N, T, V)
    input_ids = torch.randint(0, 50, (2, 4))
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    sums, counts = response_logp_sums(logits, input_ids, mask)
    exact = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (N, T-1)
    expected = (exact * mask[:, :-1]).sum(-1)
    assert sums.dtype == torch.float64 and counts.tolist() == [3, 2]  # fp32 log-probs, float64 sums
    assert torch.allclose(sums.double(), expected, atol=1e-4)
    # The tolerance is meaningful: merely rounding the exact sums to fp16 misses it.
    assert (expected.half().double() - expected).abs().max() > 1e-3


def test_zero_token_counts_never_reach_a_division():
    sums, counts = torch.tensor([-3.0, -1.0, -2.0]), torch.tensor([3, 0, 2])
    with pytest.raises(
        ValueError, match=r"^sequences \[1\] of the batch have no response token; cannot take a per-token mean$"
    ):
        sequence_logps(sums, counts, length_normalize=True)
    assert sequence_logps(sums, counts, length_normalize=False).tolist() == [-3.0, -1.0, -2.0]
    assert sft_nll(sums, counts).tolist() == [1.0, 1.0, 1.0]  # -(-1) / max(0, 1): finite


# --------------------------------------------------------------------------- first-step self-check


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, LN2),
        ({"loss_type": "robust", "label_smoothing": 0.2}, LN2),
        ({"loss_type": "sigmoid", "label_smoothing": 0.1}, LN2),
        ({"loss_type": "ipo", "beta": 0.5}, 1.0),  # (0 - 1 / (2 * 0.5))^2
        ({"loss_type": "hinge"}, 1.0),  # relu(1 - 0)
        ({"loss_type": "simpo"}, None),  # reference-free: nothing to compare
        ({"sft_weight": 0.5}, None),  # the SFT term depends on the data
    ],
)
def test_initial_loss_is_the_loss_at_zero_log_ratio(tmp_path, overrides, expected):
    value = initial_loss(config(tmp_path, **overrides))
    assert value == (None if expected is None else pytest.approx(expected, abs=1e-12))


def first_step_records(tmp_path, tokenizer, caplog, model, ref_model=None, **overrides):
    trainer = tiny_trainer(
        config(tmp_path, **overrides),
        make_preference_rows(2, seed=1),
        tokenizer=tokenizer,
        model=model,
        ref_model=ref_model,
    )
    with caplog.at_level(logging.INFO, logger="hf_dpo.training.guards"):
        trainer.train()
    return [r for r in caplog.records if r.name == "hf_dpo.training.guards"], trainer


def test_first_step_passes_silently_when_the_reference_is_the_policy(tmp_path, tokenizer, caplog):
    records, trainer = first_step_records(tmp_path, tokenizer, caplog, tiny_model(tokenizer))
    assert [r.levelno for r in records] == [logging.INFO]
    assert (
        records[0].getMessage()
        == "self-check passed: first-step loss 0.693147 equals the loss at zero log-ratio 0.693147"
    )
    assert trainer.state.log_history[0]["loss"] == pytest.approx(LN2, abs=1e-6)


def test_first_step_warns_about_a_wrong_reference(tmp_path, tokenizer, caplog):
    policy, reference = tiny_model(tokenizer), tiny_model(tokenizer, seed=7)
    pairs = list(zip(policy.parameters(), reference.parameters()))
    differing = sum(not torch.equal(p, r) for p, r in pairs)  # the norm weights start at 1 in both
    records, trainer = first_step_records(tmp_path, tokenizer, caplog, policy, ref_model=reference)
    warning = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    loss = trainer.state.log_history[0]["loss"]
    assert not math.isclose(loss, LN2, rel_tol=FIRST_STEP_RTOL)
    assert len(warning) == 1
    assert warning[0].startswith(
        f"SELF-CHECK FAILED at the first training step: the loss is {loss:.4f}, but a policy identical to its reference "
        "gives ln 2 = 0.6931 (sigmoid loss, tolerance 0.1%)."
    )
    assert 0 < differing < len(pairs)
    assert (
        f"(1) the reference's weights differ from the policy's in {differing} of {len(pairs)} tensors (e.g. model.embed_tokens.weight)"
        in warning[0]
    )


def test_first_step_names_a_reference_in_another_dtype(tmp_path, tokenizer, caplog):
    """Sharp logits (lm_head scaled up, as in a trained model) make bf16 rounding visible in the log-probs."""
    policy = tiny_model(tokenizer)
    with torch.no_grad():
        policy.lm_head.weight.mul_(30)
    reference = copy.deepcopy(policy).to(torch.bfloat16)
    records, _ = first_step_records(tmp_path, tokenizer, caplog, policy, ref_model=reference)
    warning = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert (
        "(1) the policy runs in torch.float32 but the reference in torch.bfloat16: load both in the same dtype;"
        in warning[0]
    )


def with_attention_dropout(model, p):
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p
    return model


def test_first_step_names_live_dropout_and_disable_dropout_turns_attention_dropout_off(tmp_path, tokenizer, caplog):
    records, _ = first_step_records(
        tmp_path,
        tokenizer,
        caplog,
        with_attention_dropout(tiny_model(tokenizer), 0.5),
        disable_dropout=False,
        beta=10.0,
    )
    warning = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert (
        "(1) dropout is on in the policy (model.layers.0.self_attn.attention_dropout=0.5) but not in the reference"
        in warning[0]
    )
    caplog.clear()
    records, _ = first_step_records(
        tmp_path, tokenizer, caplog, with_attention_dropout(tiny_model(tokenizer), 0.5), disable_dropout=True, beta=10.0
    )
    assert [r.levelno for r in records] == [logging.INFO]


# --------------------------------------------------------------------------- beta


def test_beta_below_one_with_length_normalization(tmp_path, tokenizer, caplog):
    """A default beta left over from summed log-probs warns; an explicit one is kept and only noted."""
    carried = config(tmp_path, length_normalize=False)  # default beta 0.1 for sums ...
    carried.length_normalize = True  # ... then normalization switched on afterwards
    level, message = beta_warning(carried)
    assert level == logging.WARNING
    assert message == (
        "beta=0.1 with length_normalize=True: per-token log-ratios are about |y| times smaller than summed ones, so a "
        "beta below 1 leaves the sigmoid nearly flat and the policy barely moves; practitioners use beta of about 2 to "
        "10 with length normalization; set beta explicitly (e.g. beta=2.0) to choose it"
    )
    assert beta_warning(config(tmp_path, beta=0.1))[0] == logging.INFO
    assert beta_warning(config(tmp_path)) is None  # default 2.0
    assert beta_warning(config(tmp_path, beta=0.1, length_normalize=False)) is None

    with caplog.at_level(logging.INFO, logger="hf_dpo.training.selfcheck"):
        tiny_trainer(carried, make_preference_rows(2, seed=1), tokenizer=tokenizer)
    warnings = [
        r.getMessage() for r in caplog.records if r.name == "hf_dpo.training.selfcheck" and r.levelno == logging.WARNING
    ]
    assert warnings == [message]  # once, at construction


def test_learning_rate_warning_for_a_full_finetune_far_above_the_dpo_range():
    """A 135M full fine-tune at SFT's 5e-5 warns; DPO's rates, adapters and random-init toys (the demo's 1e-3) do not."""
    message = learning_rate_warning(5e-5, adapter_only=False, n_parameters=134_515_008)
    assert message.startswith("learning_rate=5e-05 for a full fine-tune of a 135M-parameter model")
    assert "usual range is 1e-7 to 5e-6" in message
    assert learning_rate_warning(5e-6, adapter_only=False, n_parameters=134_515_008) is None  # inside the range
    assert learning_rate_warning(1e-4, adapter_only=True, n_parameters=134_515_008) is None  # LoRA takes ~10x more
    assert learning_rate_warning(1e-3, adapter_only=False, n_parameters=120_000) is None  # the demo's toy


def test_trainer_warns_once_about_a_high_learning_rate_on_a_pretrained_size_model(tokenizer, tmp_path, caplog):
    model = build_model(tokenizer, hidden_size=256, num_layers=12)  # 12M parameters: past the toy threshold
    assert sum(p.numel() for p in model.parameters()) > 10_000_000
    args = config(tmp_path, learning_rate=5e-5)
    with caplog.at_level(logging.WARNING, logger="hf_dpo.training.selfcheck"):
        tiny_trainer(args, tokenizer=tokenizer, model=model)
    warnings = [r.getMessage() for r in caplog.records if "learning_rate=5e-05" in r.getMessage()]
    assert len(warnings) == 1
