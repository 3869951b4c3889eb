"""The trainer's loss against two independent computations, on a policy that differs from its reference.

At step 0 the policy equals the reference and every DPO loss is ln 2 whatever the code
does, so the policy here is the reference plus seeded Gaussian noise (std 0.02 on every
weight): the per-pair losses then range over about (0.55, 0.85), away from ln 2.

1. A float64 recomputation from raw logits: one forward per unpadded sequence, full
   ``log_softmax`` in float64, the response tokens picked with the data set's own
   (unshifted) token mask, sum or mean per response, the DPO loss in float64.
2. TRL's ``DPOTrainer`` (when installed) on the same models and conversational rows:
   ``loss_type="sigmoid"`` is our ``length_normalize=False``; TRL's length-normalized
   variant ``"sigmoid_norm"`` divides each side's summed log-ratio by its completion
   length, which is our default ``length_normalize=True`` (mean log-prob per response
   token). Both sides are fed the same token ids, checked first: TRL tokenizes the
   prompt with ``add_generation_prompt=True`` and the prompt + answer conversation
   with the chat template, and takes the completion as what follows the common prefix;
   ours compares token ids the same way. With the ChatML template no BOS is added and
   the answer ends with the template's ``<|im_end|>\\n``, so nothing had to be aligned
   beyond using the conversational layout and no truncation (``max_length`` above the
   longest pair on both sides).

Run with ``-s`` to see the measured differences.
"""

from __future__ import annotations

import copy
import math

import datasets
import pytest
import torch
import torch.nn.functional as F
from cpu_run import conversational_rows, cpu_args, noisy_policy_and_reference, trl_cpu_args

from hf_dpo import NormalizedDPOTrainer
from hf_dpo.cli.demo import build_tokenizer

N_PAIRS = 8
MAX_LENGTH = 128

datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture(scope="module")
def rows():
    return conversational_rows(N_PAIRS)


@pytest.fixture(scope="module")
def models(tokenizer):
    """``(policy, reference)``: the reference is the demo init, the policy the same plus N(0, 0.02^2) noise."""
    return noisy_policy_and_reference(tokenizer, 0.02)


def our_trainer(models, tokenizer, rows, output_dir, length_normalize: bool) -> NormalizedDPOTrainer:
    policy, reference = models
    args = cpu_args(
        output_dir,
        length_normalize=length_normalize,
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_LENGTH - 1,
        per_device_train_batch_size=N_PAIRS,
    )
    return NormalizedDPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
    )


def our_pair_losses(trainer: NormalizedDPOTrainer):
    """Per-pair losses and metrics of the first ``N_PAIRS`` pairs, in data set order."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N_PAIRS)])
    with torch.no_grad():
        losses, _, metrics = trainer.pair_losses(trainer.model, batch)  # no MoE router term on these models
    return losses, metrics


def float64_logp_sum(model, input_ids: list[int], token_mask: list[int]) -> tuple[float, int]:
    """Naive float64 ``(sum, count)`` of the log-probs of the masked tokens of one unpadded sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids]), use_cache=False).logits[0].double()  # (T, V)
    logps = torch.log_softmax(logits, dim=-1)  # (T, V)
    # Token t is predicted by the logits at t - 1; token 0 has no prediction and is never in a response.
    picked = [logps[t - 1, input_ids[t]] for t in range(1, len(input_ids)) if token_mask[t]]
    assert len(picked) == sum(token_mask) > 0
    return torch.stack(picked).sum().item(), len(picked)


# The bound for both forms. It holds because per-sequence sums are accumulated in float64
# (hf_dpo.scoring.logprobs.per_sequence_sums): in fp32 a partial sum near 60 has a 3.8e-6 step, which put
# the mean form with beta 2 at 1.8e-6.
LOSS_TOLERANCE = {False: 1e-6, True: 1e-6}


@pytest.mark.parametrize("length_normalize", [True, False], ids=["mean", "sum"])
def test_loss_matches_float64_recomputation(models, tokenizer, rows, tmp_path, length_normalize):
    trainer = our_trainer(models, tokenizer, rows, tmp_path, length_normalize)
    losses, metrics = our_pair_losses(trainer)
    policy, reference = models
    beta = trainer.args.beta
    assert beta == (2.0 if length_normalize else 0.1)

    # (2, 2B) float64 sums and (2B,) counts, sequences in the collator's order [chosen_1..B, rejected_1..B].
    sums = torch.zeros(2, 2 * N_PAIRS, dtype=torch.float64)
    counts = torch.zeros(2 * N_PAIRS, dtype=torch.float64)
    for k, side in enumerate(("chosen", "rejected")):
        for i in range(N_PAIRS):
            pair = trainer.train_dataset[i]
            for m, model in enumerate((policy, reference)):
                total, count = float64_logp_sum(model, pair[f"{side}_input_ids"], pair[f"{side}_response_mask"])
                sums[m, k * N_PAIRS + i] = total
                counts[k * N_PAIRS + i] = count
    logps = sums / counts if length_normalize else sums  # (2, 2B)
    log_ratios = logps[0] - logps[1]  # (2B,)
    expected = -F.logsigmoid(beta * (log_ratios[:N_PAIRS] - log_ratios[N_PAIRS:]))  # (B,)

    # The per-sequence sums first: fp32 token log-probs summed in float64, within a few fp32 ulps.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(N_PAIRS)])
    with torch.no_grad():
        our_sums, our_counts = trainer.score(trainer.model, batch)
    assert our_counts.tolist() == counts.long().tolist()
    sum_error = ((our_sums.double() - sums[0]).abs() / sums[0].abs()).max().item()

    diff = (losses.double() - expected).abs().max().item()
    print(
        f"\n[parity] ours vs float64 ({'mean' if length_normalize else 'sum'}, beta {beta}): "
        f"max |loss diff| = {diff:.3e}, max relative sum error = {sum_error:.1e}; "
        f"losses {[round(x, 4) for x in expected.tolist()]}"
    )
    assert (expected - math.log(2)).abs().max().item() > 0.02  # informative: away from the step-0 value
    assert sum_error < 5e-7
    assert diff < LOSS_TOLERANCE[length_normalize]
    assert metrics["rewards/chosen"].item() == pytest.approx(beta * log_ratios[:N_PAIRS].mean().item(), abs=1e-5)
    assert metrics["rewards/margins"].item() == pytest.approx(
        beta * (log_ratios[:N_PAIRS] - log_ratios[N_PAIRS:]).mean().item(), abs=1e-5
    )


@pytest.mark.parametrize(
    "trl_loss_type, length_normalize", [("sigmoid", False), ("sigmoid_norm", True)], ids=["sum", "mean"]
)
def test_loss_matches_trl(models, tokenizer, rows, tmp_path, trl_loss_type, length_normalize):
    trl = pytest.importorskip("trl")
    policy, reference = models
    ours = our_trainer(models, tokenizer, rows, tmp_path / "ours", length_normalize)
    beta = ours.args.beta

    trl_args = trl_cpu_args(
        tmp_path / "trl",
        loss_type=[trl_loss_type],
        beta=beta,
        max_length=MAX_LENGTH,
        per_device_train_batch_size=N_PAIRS,
        pad_to_multiple_of=None,
    )
    # TRL patches the forward of the models it is given, so it gets copies.
    theirs = trl.DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(reference),
        args=trl_args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )

    # Same token ids and the same scored span on both sides.
    assert len(theirs.train_dataset) == len(ours.train_dataset) == N_PAIRS
    for i in range(N_PAIRS):
        t, o = theirs.train_dataset[i], ours.train_dataset[i]
        for side in ("chosen", "rejected"):
            assert t["prompt_ids"] + t[f"{side}_ids"] == o[f"{side}_input_ids"], (i, side)
            assert o[f"{side}_response_mask"] == [0] * len(t["prompt_ids"]) + [1] * len(t[f"{side}_ids"]), (i, side)

    our_losses, our_metrics = our_pair_losses(ours)
    trl_batch = theirs.data_collator([theirs.train_dataset[i] for i in range(N_PAIRS)])
    with torch.no_grad():
        trl_loss = theirs.compute_loss(theirs.model, trl_batch).item()
    diff = abs(our_losses.mean().item() - trl_loss)
    print(
        f"\n[parity] ours vs TRL {trl_loss_type} (beta {beta}): loss {our_losses.mean().item():.6f} vs {trl_loss:.6f}, "
        f"|diff| = {diff:.3e}"
    )
    assert abs(trl_loss - math.log(2)) > 0.01  # informative: away from the step-0 value
    assert diff < 1e-5
    if not length_normalize:
        # TRL's rewards are beta * summed log-ratios: the same quantity as ours in the sum form.
        mode = "train" if theirs.model.training else "eval"  # where TRL's compute_loss files its metrics
        trl_metrics = {key: values[-1] for key, values in theirs._metrics[mode].items()}
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert our_metrics[key].item() == pytest.approx(trl_metrics[key], abs=1e-4), key
