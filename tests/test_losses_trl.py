"""The loss types hf_dpo took over from TRL 1.16: hand-derived values, the normalized form, gradients.

The pairs are test_losses.py's: ``ref_c = ref_r = -1``, ``pi_c = (-1, -2, -1)``, ``pi_r = (-1.5, -1, -1)``, so the
log-ratios are ``lr_w = (0, -1, 0)``, ``lr_l = (-0.5, 0, 0)`` and the margins ``m = (0.5, -1, 0)``. Notation:
``sp(x) = log(1 + e^x)``, so ``-logsigmoid(x) = sp(-x)``; ``s(x)`` is the sigmoid.
"""

import math

import pytest
import torch

from hf_dpo.losses import LOSS_REGISTRY, f_divergence_score, preference_loss
from hf_dpo.losses.registry import BY_FLAG

LN2 = math.log(2.0)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def sp(x):
    return math.log1p(math.exp(x))


def s(x):
    return 1 / (1 + math.exp(-x))


PC, PR, RC, RR = t(-1.0, -2.0, -1.0), t(-1.5, -1.0, -1.0), t(-1.0, -1.0, -1.0), t(-1.0, -1.0, -1.0)


def losses_of(loss_type, **kwargs):
    return preference_loss(PC, PR, RC, RR, loss_type=loss_type, **kwargs)


def test_nca_pair_hand_values():
    """beta = 2: r_w = (0, -2, 0), r_l = (-1, 0, 0); loss = sp(-r_w) + sp(r_w)/2 + sp(r_l)/2:
    (ln 2 + ln 2 / 2 + sp(-1)/2, sp(2) + sp(-2)/2 + ln 2 / 2, 2 ln 2) = (1.196352, 2.536966, 1.386294)."""
    losses, chosen_rewards, rejected_rewards = losses_of("nca_pair", beta=2.0)
    expected = t(1.5 * LN2 + sp(-1) / 2, sp(2) + sp(-2) / 2 + LN2 / 2, 2 * LN2)
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(losses, t(1.1963516, 2.5369656, 1.3862944), rtol=0, atol=1e-7)
    torch.testing.assert_close(chosen_rewards, t(0.0, -2.0, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(rejected_rewards, t(-1.0, 0.0, 0.0), rtol=0, atol=0)


def test_bco_pair_hand_values():
    """beta = 2: sp(-r_w) + sp(r_l) = (ln 2 + sp(-1), sp(2) + ln 2, 2 ln 2) = (1.006409, 2.820075, 1.386294)."""
    losses, _, _ = losses_of("bco_pair", beta=2.0)
    torch.testing.assert_close(losses, t(1.0064089, 2.8200752, 1.3862944), rtol=0, atol=1e-7)


def test_sppo_hard_hand_values():
    """beta = 0.5, targets +-1/(2 beta) = +-1: (lr_w - 1)^2 + (lr_l + 1)^2 = (1 + 0.25, 4 + 1, 1 + 1)."""
    losses, _, _ = losses_of("sppo_hard", beta=0.5)
    torch.testing.assert_close(losses, t(1.25, 5.0, 2.0), rtol=0, atol=1e-12)


def test_apo_hand_values():
    """beta = 2. zero: 1 - s(r_w) + s(r_l) = (0.5 + s(-1), 1 - s(-2) + 0.5, 1) = (0.768941, 1.380797, 1).
    down: s(r_w) + 1 - s(r_w - r_l) = (0.5 + 1 - s(1), s(-2) + 1 - s(-2), 1) = (0.768941, 1, 1)."""
    zero, _, _ = losses_of("apo_zero", beta=2.0)
    torch.testing.assert_close(zero, t(0.5 + s(-1), 1.5 - s(-2), 1.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(zero, t(0.7689414, 1.3807971, 1.0), rtol=0, atol=1e-7)
    down, _, _ = losses_of("apo_down", beta=2.0)
    torch.testing.assert_close(down, t(1.5 - s(1), 1.0, 1.0), rtol=0, atol=1e-12)


def test_exo_pair_is_the_kl_of_the_model_preference_to_the_smoothed_label():
    """beta = 2, eps = 0.1: z = 2m = (1, -2, 0), q = (s(z), s(-z)), p = (0.9, 0.1): KL(q || p) written out.
    At z = 0: ln 0.5 - (ln 0.9 + ln 0.1)/2 = 0.510826."""
    losses, _, _ = losses_of("exo_pair", beta=2.0, label_smoothing=0.1)
    expected = [s(z) * math.log(s(z) / 0.9) + s(-z) * math.log(s(-z) / 0.1) for z in (1.0, -2.0, 0.0)]
    torch.testing.assert_close(losses, t(*expected), rtol=0, atol=1e-12)
    assert losses[2].item() == pytest.approx(0.5108256, abs=1e-7)
    default, _, _ = losses_of("exo_pair", beta=2.0)  # the EXO paper's eps = 1e-3 when unset
    torch.testing.assert_close(default[2], t(-LN2 - 0.5 * math.log(1e-3 * 0.999))[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="exo_pair needs 0 < label_smoothing < 1"):
        losses_of("exo_pair", label_smoothing=0.0)


def test_discopop_hand_values():
    """beta = 2, tau = 0.05: z = (1, -2, 0), mix = s(z / tau) = (s(20), s(-40), 1/2);
    loss = sp(-z)(1 - mix) + exp(-z) mix: (~e^-1, ~sp(2), (ln 2 + 1)/2)."""
    losses, _, _ = losses_of("discopop", beta=2.0)
    expected = [sp(-z) * (1 - s(z / 0.05)) + math.exp(-z) * s(z / 0.05) for z in (1.0, -2.0, 0.0)]
    torch.testing.assert_close(losses, t(*expected), rtol=0, atol=1e-12)
    assert losses[2].item() == pytest.approx((LN2 + 1) / 2, abs=1e-12)


def test_discopop_stays_finite_where_float32_exp_overflows():
    """z = -100: TRL 1.16's exp(100) * s(-2000) is inf * 0 = NaN in float32; the same number, evaluated as
    exp(logsigmoid(z / tau) - z), is exp(-1900) = 0, so the loss is sp(100) = 100."""
    policy, ref = torch.tensor([-1000.0]), torch.tensor([0.0])
    losses, _, _ = preference_loss(policy, ref, ref, ref, "discopop", beta=0.1)
    assert losses.item() == pytest.approx(100.0, abs=1e-4)


def test_aot_sorts_across_the_batch():
    """Policy margins (3, 1, 2) and reference margins (0, 2, 1) sorted separately: (1, 2, 3) - (0, 1, 2) = (1, 1, 1),
    so every rank has loss sp(-beta) although the paired differences are (3, -1, 1). beta = 2, eps = 0.1:
    0.9 sp(-2) + 0.1 sp(2)."""
    pc, pr = t(3.0, 1.0, 2.0), t(0.0, 0.0, 0.0)
    rc, rr = t(0.0, 2.0, 1.0), t(0.0, 0.0, 0.0)
    losses, chosen_rewards, _ = preference_loss(pc, pr, rc, rr, "aot", beta=2.0)
    torch.testing.assert_close(losses, t(sp(-2), sp(-2), sp(-2)), rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, t(6.0, -2.0, 2.0), rtol=0, atol=0)  # rewards stay per pair
    smoothed, _, _ = preference_loss(pc, pr, rc, rr, "aot", beta=2.0, label_smoothing=0.1)
    torch.testing.assert_close(smoothed, t(*[0.9 * sp(-2) + 0.1 * sp(2)] * 3), rtol=0, atol=1e-12)


def test_aot_unpaired_sorts_each_side():
    """Chosen log-ratios (2, 0, 1) and rejected (1, -1, 0) sorted: (0, 1, 2) - (-1, 0, 1) = (1, 1, 1)."""
    losses, _, _ = preference_loss(t(2.0, 0.0, 1.0), t(1.0, -1.0, 0.0), t(0.0, 0.0, 0.0), t(0.0, 0.0, 0.0),
                                   "aot_unpaired", beta=2.0)  # fmt: skip
    torch.testing.assert_close(losses, t(sp(-2), sp(-2), sp(-2)), rtol=0, atol=1e-12)


def test_sft_is_one_token_mean_over_the_batch():
    """Chosen sums (-6, -2) over (4, 1) tokens: -(-8) / 5 = 1.6 for every pair (not the mean of 1.5 and 2)."""
    losses, _, _ = preference_loss(
        t(-6.0, -2.0), t(-1.0, -1.0), None, None, "sft", chosen_token_counts=torch.tensor([4, 1])
    )
    torch.testing.assert_close(losses, t(1.6, 1.6), rtol=0, atol=1e-12)


def test_sigmoid_norm_is_sigmoid_on_per_token_log_ratios():
    """Lengths (2, 4): per-token log-ratios lr_w / 2 = (0, -0.5, 0), lr_l / 4 = (-0.125, 0, 0); beta = 2:
    sp(-2 (0 + 0.125)) = sp(-0.25), sp(1), ln 2. It needs the lengths."""
    lengths = {"chosen_lengths": torch.tensor([2, 2, 2]), "rejected_lengths": torch.tensor([4, 4, 4])}
    losses, chosen_rewards, _ = losses_of("sigmoid_norm", beta=2.0, **lengths)
    torch.testing.assert_close(losses, t(sp(-0.25), sp(1), LN2), rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, t(0.0, -1.0, 0.0), rtol=0, atol=0)  # beta * lr_w / n_w
    with pytest.raises(ValueError, match="sigmoid_norm divides by the response lengths"):
        losses_of("sigmoid_norm")


@pytest.mark.parametrize("loss_type", [n for n, spec in LOSS_REGISTRY.items() if spec.normalization == BY_FLAG])
def test_the_normalized_form_is_the_loss_of_per_token_means(loss_type):
    """Sums with lengths == per-token means without: the normalized form of every loss length_normalize switches."""
    sums = [t(-6.0, -3.0, -8.0), t(-5.0, -9.0, -4.0), t(-4.0, -3.5, -9.0), t(-7.0, -8.0, -3.0)]
    chosen_lengths, rejected_lengths = torch.tensor([3, 2, 4]), torch.tensor([5, 6, 2])
    means = [sums[0] / chosen_lengths, sums[1] / rejected_lengths]
    means += [sums[2] / chosen_lengths, sums[3] / rejected_lengths]
    normalized = preference_loss(
        *sums, loss_type, beta=2.0, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths
    )
    of_means = preference_loss(*means, loss_type, beta=2.0)
    for got, want in zip(normalized, of_means):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_f_divergence_scores_hand_values():
    """r = log u = (0, ln 2, -ln 2): forward KL 1 - 1/u = (0, 1/2, -1); JS log(2u/(1+u)) = (0, ln(4/3), ln(2/3));
    alpha 0.5: (u^-0.5 - 1)/(-0.5) = (0, 2 - sqrt 2, 2 - 2 sqrt 2); alpha 1: log u."""
    r = t(0.0, LN2, -LN2)
    torch.testing.assert_close(f_divergence_score(r, "forward_kl"), t(0.0, 0.5, -1.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        f_divergence_score(r, "js_divergence"), t(0.0, math.log(4 / 3), math.log(2 / 3)), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        f_divergence_score(r, "alpha_divergence", 0.5),
        t(0.0, 2 - math.sqrt(2), 2 - 2 * math.sqrt(2)),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(f_divergence_score(r, "alpha_divergence", 1.0), r, rtol=0, atol=0)
    # forward KL is clamped like alpha: r = -200 gives 1 - e^80 (finite), where float32 exp(200) is inf.
    assert f_divergence_score(torch.tensor([-200.0]), "forward_kl").item() == pytest.approx(1 - math.exp(80), rel=1e-6)
    with pytest.raises(ValueError, match="--f_divergence_type: got 'kl'"):
        f_divergence_score(r, "kl")


def test_f_divergence_changes_the_margin_and_normalizes_after_the_transform():
    """sigmoid with JS: scores psi(lr) = log 2 + logsigmoid(lr), divided by the length after the transform (TRL's
    sigmoid_norm and ipo): pair 0, lr_w = 0, lr_l = -0.5, lengths (2, 4), beta 2:
    m = (ln 2 + ln s(0)) / 2 - (ln 2 + ln s(-0.5)) / 4 = -(ln 2 - sp(0.5)) / 4."""
    losses, _, _ = losses_of(
        "sigmoid",
        beta=2.0,
        f_divergence_type="js_divergence",
        chosen_lengths=torch.tensor([2, 2, 2]),
        rejected_lengths=torch.tensor([4, 4, 4]),
    )
    margin = -(LN2 - sp(0.5)) / 4
    assert losses[0].item() == pytest.approx(sp(-2 * margin), abs=1e-12)


@pytest.mark.parametrize(
    "loss_type,kwargs",
    [
        ("exo_pair", {"label_smoothing": 0.1}),
        ("nca_pair", {}),
        ("bco_pair", {}),
        ("sppo_hard", {}),
        ("apo_zero", {}),
        ("apo_down", {}),
        ("discopop", {"discopop_tau": 0.5}),
        ("aot", {"label_smoothing": 0.1}),
        ("aot_unpaired", {}),
        (
            "sigmoid_norm",
            {"chosen_lengths": torch.tensor([2, 3, 1, 4]), "rejected_lengths": torch.tensor([3, 1, 2, 2])},
        ),
        ("sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3}),
        ("robust", {"f_divergence_type": "forward_kl", "label_smoothing": 0.2}),
        ("ipo", {"f_divergence_type": "js_divergence"}),
    ],
)
def test_gradcheck_wrt_policy_logps(loss_type, kwargs):
    """Analytic gradients equal central finite differences (float64), beta = 1; the sorted pairs are distinct."""
    ref_chosen, ref_rejected = t(-1.1, -0.4, -2.0, -0.9), t(-1.3, -0.8, -1.5, -1.2)

    def fn(policy_chosen, policy_rejected):
        return preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss_type, 1.0, **kwargs)[0]

    policy_chosen = t(-0.9, -0.5, -1.2, -1.6).requires_grad_()
    policy_rejected = t(-1.4, -0.7, -1.9, -0.8).requires_grad_()
    assert torch.autograd.gradcheck(fn, (policy_chosen, policy_rejected), eps=1e-6, atol=1e-7)


def test_docs_table_has_every_registered_loss():
    """docs/loss.md's table: one row per registered loss, named as the registry (TRL's names) names it."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "loss.md").read_text(encoding="utf-8")
    table = text.split("## The variants")[1].split("\n## ")[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| `")][1:]  # not the header
    assert [row.split("`")[1] for row in rows] == list(LOSS_REGISTRY)
