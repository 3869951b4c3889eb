"""A run's objective: the weighted list of losses, its checks, its step-0 value, and its evaluation on a batch
(WPO weights, LD-DPO log-probs, the per-term metrics), against hand-derived numbers."""

import math

import pytest
import torch

from hf_dpo.losses import LOSS_REGISTRY, LossObjective, ld_logps, objective_losses, wpo_pair_weights

LN2 = math.log(2.0)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"loss_types": ("dpo",)}, "--loss_type: unknown loss 'dpo'"),
        ({"loss_types": ("sigmoid", "sigmoid")}, "--loss_type sigmoid sigmoid: each loss at most once"),
        ({"loss_types": ("sigmoid", "sft"), "loss_weights": (1.0,)}, "--loss_weights: 1 weights for 2 loss types"),
        ({"loss_weights": (-1.0,)}, "--loss_weights must be finite and >= 0, got [-1.0]"),
        ({"beta": 0.0}, "--beta must be > 0, got 0.0"),
        ({"label_smoothing": 0.5}, "--label_smoothing must be in [0, 0.5), got 0.5"),
        (
            {"loss_types": ("hinge",), "label_smoothing": 0.1},
            "--label_smoothing 0.1 has no effect with --loss_type hinge",
        ),
        ({"loss_types": ("exo_pair",), "label_smoothing": 0.0}, "--loss_type exo_pair needs --label_smoothing > 0"),
        ({"discopop_tau": 0.5}, "--discopop_tau 0.5 has no effect with --loss_type sigmoid; remove it (default 0.05)"),
        ({"simpo_gamma": 1.0}, "--simpo_gamma 1.0 has no effect with --loss_type sigmoid"),
        ({"f_divergence_type": "kl"}, "--f_divergence_type: got 'kl'; choose one of reverse_kl, forward_kl"),
        (
            {"loss_types": ("sigmoid", "bco_pair"), "f_divergence_type": "js_divergence"},
            "--f_divergence_type js_divergence is not defined for --loss_type bco_pair",
        ),
        ({"loss_types": ("sft",), "f_divergence_type": "js_divergence"}, "--f_divergence_type js_divergence has no"),
        ({"f_alpha_divergence_coef": 0.3}, "--f_alpha_divergence_coef 0.3 has no effect with --f_divergence_type"),
        ({"loss_types": ("aot",), "use_weighting": True}, "--use_weighting (WPO) cannot be used with --loss_type aot"),
        ({"ld_alpha": 1.5}, "--ld_alpha must be in [0, 1], got 1.5"),
        ({"sft_weight": -1.0}, "--sft_weight must be >= 0, got -1.0"),
        ({"loss_types": ("sigmoid", "sft"), "sft_weight": 0.5}, "--sft_weight and --loss_type sft both add"),
    ],
)
def test_check_names_the_flag(settings, message):
    with pytest.raises(ValueError) as info:
        LossObjective(**settings).check()
    assert message in str(info.value)


def test_ld_alpha_is_refused_with_a_precomputed_reference():
    LossObjective(ld_alpha=0.5).check()
    with pytest.raises(ValueError, match="--ld_alpha cannot be used with --precompute_ref_logps"):
        LossObjective(ld_alpha=0.5).check(precompute_ref_logps=True)


def test_every_loss_alone_passes_the_checks_with_its_defaults():
    for name in LOSS_REGISTRY:
        LossObjective(loss_types=(name,)).check()


@pytest.mark.parametrize(
    "settings,expected",
    [
        ({}, LN2),
        ({"loss_types": ("hinge",)}, 1.0),
        ({"loss_types": ("ipo",), "beta": 0.5}, 1.0),  # (0 - 1/(2 * 0.5))^2
        ({"loss_types": ("sppo_hard",), "beta": 0.5}, 2.0),  # (0 - 1)^2 + (0 + 1)^2
        ({"loss_types": ("nca_pair",)}, 2 * LN2),  # ln 2 + ln 2 / 2 + ln 2 / 2
        ({"loss_types": ("bco_pair",)}, 2 * LN2),
        ({"loss_types": ("apo_zero",)}, 1.0),
        ({"loss_types": ("apo_down",)}, 1.0),
        ({"loss_types": ("discopop",)}, (LN2 + 1) / 2),  # mix 1/2: ln 2 / 2 + e^0 / 2
        ({"loss_types": ("exo_pair",), "label_smoothing": 0.1}, -LN2 - 0.5 * math.log(0.09)),
        ({"loss_types": ("aot",), "label_smoothing": 0.2}, LN2),
        ({"loss_types": ("sigmoid_norm",), "f_divergence_type": "forward_kl"}, LN2),  # psi(0) = 0 for every f
        ({"loss_types": ("sigmoid", "bco_pair"), "loss_weights": (0.8, 0.2)}, 0.8 * LN2 + 0.2 * 2 * LN2),
        ({"ld_alpha": 0.3}, LN2),
        ({"loss_types": ("sigmoid", "sft")}, None),
        ({"sft_weight": 0.5}, None),
        ({"use_weighting": True}, None),
        ({"loss_types": ("simpo",)}, None),
    ],
)
def test_loss_at_zero(settings, expected):
    value, reason = LossObjective(**settings).loss_at_zero()
    if expected is None:
        assert value is None and reason
    else:
        assert value == pytest.approx(expected, abs=1e-12) and reason == ""


# Two pairs, sequences [chosen_1, chosen_2, rejected_1, rejected_2]; counts (2, 4 | 3, 1).
POLICY_SUMS = t(-4.0, -10.0, -6.0, -2.0)
REF_SUMS = t(-4.0, -8.0, -5.0, -3.0)
COUNTS = torch.tensor([2, 4, 3, 1])


def test_a_weighted_list_is_the_weighted_sum_of_its_terms_and_logs_each():
    """Summed: lr_w = (0, -2), lr_l = (-1, 1), beta 0.5. sigmoid: sp(-0.5 * (1, -3)) = (sp(-0.5), sp(1.5));
    sft: -(-4 - 10) / (2 + 4) = 7/3 for both pairs. loss = mean(sigmoid) + 0.5 * 7/3."""
    objective = LossObjective(("sigmoid", "sft"), (1.0, 0.5), beta=0.5, length_normalize=False)
    out = objective_losses(objective, POLICY_SUMS, COUNTS, REF_SUMS)
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    sigmoid = (sp(-0.5) + sp(1.5)) / 2
    assert out.metrics["loss/sigmoid"].item() == pytest.approx(sigmoid, abs=1e-12)
    assert out.metrics["loss/sft"].item() == pytest.approx(7 / 3, abs=1e-12)
    assert out.losses.mean().item() == pytest.approx(sigmoid + 0.5 * 7 / 3, abs=1e-12)
    assert out.metrics["rewards/margins"].item() == pytest.approx(0.5 * ((0 + 1) + (-2 - 1)) / 2, abs=1e-12)
    single = objective_losses(LossObjective(beta=0.5, length_normalize=False), POLICY_SUMS, COUNTS, REF_SUMS)
    assert not any(key.startswith("loss/") for key in single.metrics)  # one term: it is the loss


def test_length_normalized_rewards_and_logps_are_per_token():
    """Per token: lr_w = (0/2, -2/4), lr_l = (-1/3, 1/1); policy means (-2, -2.5 | -2, -2)."""
    out = objective_losses(LossObjective(beta=2.0), POLICY_SUMS, COUNTS, REF_SUMS)
    torch.testing.assert_close(out.chosen_rewards, t(0.0, -1.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.rejected_rewards, t(-2 / 3, 2.0), rtol=0, atol=1e-12)
    assert out.metrics["logps/chosen"].item() == pytest.approx(-2.25, abs=1e-12)
    assert out.metrics["lengths/rejected"].item() == pytest.approx(2.0, abs=0)


def test_ld_logps_and_sft_on_plain_sums():
    """Prefix sums over l_s = min(n_w, n_l) = (2, 1) tokens. ld_alpha 0.5: P + 0.5 (S - P). sft keeps the plain
    sums: with ld_alpha = 0 its value is still -(-14) / 6."""
    prefix = t(-4.0, -3.0, -5.0, -2.0)
    torch.testing.assert_close(ld_logps(POLICY_SUMS, prefix, 0.5), t(-4.0, -6.5, -5.5, -2.0), rtol=0, atol=0)
    objective = LossObjective(("sigmoid", "sft"), ld_alpha=0.0, length_normalize=False)
    out = objective_losses(objective, POLICY_SUMS, COUNTS, REF_SUMS, {"prefix_sums": prefix})
    assert out.metrics["loss/sft"].item() == pytest.approx(14 / 6, abs=1e-12)
    assert out.metrics["logps/chosen"].item() == pytest.approx((-4.0 - 3.0) / 2, abs=1e-12)  # LD-weighted


def test_wpo_weights_hand_values_and_gradients_through_hinge_and_sft():
    """w(y) = exp((S - Q) / n): S - Q = (-2, -4, -3, -1) over (2, 4, 3, 1) -> exp(-1) each, so both pairs weigh
    e^-2. The product is out of place: hinge and sft train (TRL 1.16 raises in both), with gradients e^-2 times
    the unweighted ones."""
    log_sum_sq = POLICY_SUMS + t(2.0, 4.0, 3.0, 1.0)
    torch.testing.assert_close(wpo_pair_weights(POLICY_SUMS, log_sum_sq, COUNTS), t(math.exp(-2), math.exp(-2)))
    grads = {}
    for weighting in (False, True):
        policy = POLICY_SUMS.clone().requires_grad_()
        objective = LossObjective(("hinge", "sft"), beta=0.5, length_normalize=False, use_weighting=weighting)
        out = objective_losses(objective, policy, COUNTS, REF_SUMS, {"log_sum_sq": log_sum_sq})
        out.losses.mean().backward()
        grads[weighting] = policy.grad
    torch.testing.assert_close(grads[True], math.exp(-2) * grads[False], rtol=1e-12, atol=0)
    assert grads[False].abs().sum() > 0


def test_sft_weight_adds_the_per_pair_nll():
    """sft_nll = (-(-4)/2, -(-10)/4) = (2, 2.5): loss = sigmoid + 0.5 * 2.25, logged as loss/sft_nll."""
    objective = LossObjective(beta=0.5, length_normalize=False, sft_weight=0.5)
    out = objective_losses(objective, POLICY_SUMS, COUNTS, REF_SUMS)
    assert out.metrics["loss/sft_nll"].item() == pytest.approx(2.25, abs=1e-12)
    assert out.losses.mean().item() == pytest.approx(out.metrics["loss/sigmoid"].item() + 0.5 * 2.25, abs=1e-12)


def test_card_rows_and_description():
    objective = LossObjective(("sigmoid", "sft"), (1.0, 0.5), label_smoothing=0.1, use_weighting=True)
    rows = dict(objective.card_rows())
    assert rows["loss_type"].startswith("sigmoid: DPO -logsigmoid(beta*m)") and "sft: NLL" in rows["loss_type"]
    assert rows["loss_weights"] == "1, 0.5" and rows["label_smoothing"] == 0.1 and "WPO" in rows["use_weighting"]
    assert objective.describe() == "sigmoid + sft (weights 1, 0.5)"
    assert "cDPO" in objective.notes()[0] and "TRL 1.16's sigmoid ignores" in objective.notes()[0]
