"""Loss registry: hand-derived values, finite-difference gradients, sum vs mean, errors.

Notation: ``sp(x) = log(1 + e^x)`` (softplus), so ``-logsigmoid(x) = sp(-x)`` and
``sp(x) - sp(-x) = x``. ``m = (pi_c - pi_r) - (ref_c - ref_r)`` is the log-ratio margin.
"""

import math

import pytest
import torch

from hf_dpo.losses import LOSS_REGISTRY, get_loss, preference_loss, sft_nll
from hf_dpo.scoring.logprobs import sequence_logps

LN2 = math.log(2.0)
SP_NEG_1 = math.log1p(math.exp(-1.0))  # sp(-1) = 0.31326168751822286
SP_2 = math.log1p(math.exp(2.0))  # sp(2) = 2.1269280110429727
SP_NEG_1_5 = math.log1p(math.exp(-1.5))  # sp(-1.5) = 0.20141327798275246


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# Three pairs shared by the reference-based losses; ref_c = ref_r = -1, so m = pi_c - pi_r.
#   pair 0: pi_c = -1.0,  pi_r = -1.5  -> m = 0.5
#   pair 1: pi_c = -2.0,  pi_r = -1.0  -> m = -1.0
#   pair 2: pi_c = -1.0,  pi_r = -1.0  -> m = 0 (the policy equals the reference)
POLICY_CHOSEN = (-1.0, -2.0, -1.0)
POLICY_REJECTED = (-1.5, -1.0, -1.0)
REF_CHOSEN = (-1.0, -1.0, -1.0)
REF_REJECTED = (-1.0, -1.0, -1.0)


def _losses(loss_type, **kwargs):
    return preference_loss(
        t(*POLICY_CHOSEN), t(*POLICY_REJECTED), t(*REF_CHOSEN), t(*REF_REJECTED), loss_type=loss_type, **kwargs
    )


def test_sigmoid_hand_values():
    """beta = 2: logits = 2m = (1, -2, 0).

    loss = sp(-logits) = (sp(-1), sp(2), ln 2) = (0.313262, 2.126928, 0.693147).
    rewards = beta * (pi - ref): chosen (0, -2, 0), rejected (-1, 0, 0).
    """
    losses, chosen_rewards, rejected_rewards = _losses("sigmoid", beta=2.0)
    torch.testing.assert_close(losses, t(0.31326168751822286, 2.1269280110429727, LN2), rtol=0, atol=1e-12)
    torch.testing.assert_close(losses, t(SP_NEG_1, SP_2, LN2), rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, t(0.0, -2.0, 0.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, t(-1.0, 0.0, 0.0), rtol=0, atol=1e-12)


def test_sigmoid_label_smoothing_hand_values():
    """cDPO, eps = 0.1, beta = 2, logits x = (1, -2, 0).

    loss = (1 - eps) sp(-x) + eps sp(x) = sp(-x) + eps * x  (as sp(x) = sp(-x) + x)
         = (0.313262 + 0.1, 2.126928 - 0.2, ln 2) = (0.413262, 1.926928, 0.693147).
    """
    losses, _, _ = _losses("sigmoid", beta=2.0, label_smoothing=0.1)
    torch.testing.assert_close(losses, t(SP_NEG_1 + 0.1, SP_2 - 0.2, LN2), rtol=0, atol=1e-12)
    torch.testing.assert_close(losses, t(0.41326168751822286, 1.9269280110429727, LN2), rtol=0, atol=1e-12)


def test_robust_hand_values():
    """Robust DPO, eps = 0.1, beta = 2, logits x = (1, -2, 0).

    loss = ((1 - eps) sp(-x) - eps sp(x)) / (1 - 2 eps) = sp(-x) - eps x / (1 - 2 eps)
         = (0.313262 - 0.125, 2.126928 + 0.25, ln 2) = (0.188262, 2.376928, 0.693147).
    With eps = 0 it is plain DPO.
    """
    losses, chosen_rewards, rejected_rewards = _losses("robust", beta=2.0, label_smoothing=0.1)
    torch.testing.assert_close(losses, t(SP_NEG_1 - 0.125, SP_2 + 0.25, LN2), rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, t(0.0, -2.0, 0.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, t(-1.0, 0.0, 0.0), rtol=0, atol=1e-12)
    plain, _, _ = _losses("robust", beta=2.0)
    torch.testing.assert_close(plain, t(SP_NEG_1, SP_2, LN2), rtol=0, atol=1e-12)


def test_ipo_hand_values():
    """IPO, beta = 0.5: target margin 1 / (2 beta) = 1; m = (0.5, -1, 0).

    loss = (m - 1)^2 = (0.25, 4, 1); rewards = 0.5 (pi - ref): chosen (0, -0.5, 0), rejected (-0.25, 0, 0).
    """
    losses, chosen_rewards, rejected_rewards = _losses("ipo", beta=0.5)
    torch.testing.assert_close(losses, t(0.25, 4.0, 1.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, t(0.0, -0.5, 0.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, t(-0.25, 0.0, 0.0), rtol=0, atol=1e-12)


def test_hinge_hand_values():
    """SLiC hinge, beta = 2: 1 - 2m = (0, 3, 1), relu -> (0, 3, 1); beta = 1: 1 - m = (0.5, 2, 1)."""
    losses, _, _ = _losses("hinge", beta=2.0)
    torch.testing.assert_close(losses, t(0.0, 3.0, 1.0), rtol=0, atol=1e-12)
    losses, _, _ = _losses("hinge", beta=1.0)
    torch.testing.assert_close(losses, t(0.5, 2.0, 1.0), rtol=0, atol=1e-12)
    # Beyond the margin the loss is exactly zero: beta = 4 gives 1 - 4 * 0.5 = -1 -> 0.
    losses, _, _ = _losses("hinge", beta=4.0)
    assert losses[0].item() == 0.0


def test_simpo_hand_values():
    """SimPO, beta = 2, gamma = 0.5, no reference; logits = 2 (pi_c - pi_r) - 0.5.

    pair 0: pi_c = -1, pi_r = -1.25 -> 2 * 0.25 - 0.5 = 0    -> ln 2
    pair 1: pi_c = -1, pi_r = -2    -> 2 * 1 - 0.5    = 1.5  -> sp(-1.5) = 0.201413
    pair 2: pi_c = -2, pi_r = -1    -> -2 - 0.5       = -2.5 -> sp(2.5) = 2.578889
    rewards = beta * pi: chosen (-2, -2, -4), rejected (-2.5, -4, -2).
    """
    losses, chosen_rewards, rejected_rewards = preference_loss(
        t(-1.0, -1.0, -2.0), t(-1.25, -2.0, -1.0), None, None, loss_type="simpo", beta=2.0, simpo_gamma=0.5
    )
    torch.testing.assert_close(losses, t(LN2, SP_NEG_1_5, math.log1p(math.exp(2.5))), rtol=0, atol=1e-12)
    torch.testing.assert_close(losses[1], torch.tensor(0.20141327798275246, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, t(-2.0, -2.0, -4.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, t(-2.5, -4.0, -2.0), rtol=0, atol=1e-12)
    # The reference is ignored when given.
    with_ref, _, _ = preference_loss(
        t(-1.0, -1.0, -2.0),
        t(-1.25, -2.0, -1.0),
        t(5.0, 5.0, 5.0),
        t(-5.0, -5.0, -5.0),
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=0.5,
    )
    torch.testing.assert_close(with_ref, losses, rtol=0, atol=0)


def test_every_registered_loss_has_a_hand_value_test():
    """A loss added to the registry without a hand-value test (here or in test_losses_trl.py) fails here."""
    here = {"sigmoid", "robust", "ipo", "hinge", "simpo"}
    in_trl_file = {"exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down"}
    in_trl_file |= {"discopop", "sft", "sigmoid_norm"}
    assert set(LOSS_REGISTRY) == here | in_trl_file
    assert {name for name, spec in LOSS_REGISTRY.items() if not spec.needs_reference} == {"simpo", "sft"}


def test_sft_nll_hand_values():
    """Per-token NLL of the chosen answer: -sum / count = (6/4, 2/1) = (1.5, 2.0)."""
    torch.testing.assert_close(sft_nll(t(-6.0, -2.0), torch.tensor([4, 1])), t(1.5, 2.0), rtol=0, atol=1e-12)


def test_step_zero_is_ln2_with_zero_rewards():
    """Policy == reference: m = 0, so DPO gives ln 2 and rewards 0 for any beta."""
    logps = t(-0.7, -3.2)
    for beta in (0.1, 2.0, 10.0):
        losses, chosen_rewards, rejected_rewards = preference_loss(
            logps, logps - 1, logps, logps - 1, "sigmoid", beta=beta
        )
        torch.testing.assert_close(losses, t(LN2, LN2), rtol=0, atol=1e-12)
        assert chosen_rewards.abs().max().item() == 0.0 and rejected_rewards.abs().max().item() == 0.0


@pytest.mark.parametrize(
    "loss_type,kwargs",
    [
        ("sigmoid", {"beta": 2.0}),
        ("sigmoid", {"beta": 2.0, "label_smoothing": 0.2}),
        ("robust", {"beta": 2.0, "label_smoothing": 0.2}),
        ("ipo", {"beta": 0.5}),
        ("hinge", {"beta": 0.5}),
        ("simpo", {"beta": 2.0, "simpo_gamma": 0.3}),
    ],
)
def test_gradcheck_wrt_policy_logps(loss_type, kwargs):
    """Analytic gradients of every loss w.r.t. both policy log-probs equal central finite differences (float64).

    The hinge points are chosen with 1 - beta m in (0.4, 1.6), away from its kink at 0.
    """
    ref_chosen, ref_rejected = t(-1.1, -0.4, -2.0, -0.9), t(-1.3, -0.8, -1.5, -1.2)

    def fn(policy_chosen, policy_rejected):
        ref = (None, None) if loss_type == "simpo" else (ref_chosen, ref_rejected)
        return preference_loss(policy_chosen, policy_rejected, *ref, loss_type=loss_type, **kwargs)[0]

    policy_chosen = t(-0.9, -0.5, -1.2, -1.6).requires_grad_()
    policy_rejected = t(-1.4, -0.7, -1.9, -0.8).requires_grad_()
    assert torch.autograd.gradcheck(fn, (policy_chosen, policy_rejected), eps=1e-6, atol=1e-7)


def test_gradcheck_sft_nll():
    """d(-s / n)/ds = -1/n, checked by finite differences."""
    counts = torch.tensor([3, 5, 1])
    sums = t(-2.0, -7.5, -0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: sft_nll(s, counts), (sums,), eps=1e-6, atol=1e-7)


def test_rewards_carry_no_gradient():
    """Rewards are for logging: detached, so they can never leak into the loss's graph."""
    policy_chosen, policy_rejected = t(-1.0).requires_grad_(), t(-2.0).requires_grad_()
    for name in LOSS_REGISTRY:
        _, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen,
            policy_rejected,
            t(-1.0),
            t(-1.0),
            name,
            beta=1.0,
            chosen_lengths=torch.tensor([2]),
            rejected_lengths=torch.tensor([3]),
            chosen_token_counts=torch.tensor([2]),
        )
        assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_sequence_logps_sum_and_mean():
    """sums (-6, -2, -4.5) over counts (3, 4, 9): sum form returns them as is, mean form (-2, -0.5, -0.5)."""
    sums, counts = torch.tensor([-6.0, -2.0, -4.5]), torch.tensor([3, 4, 9])
    torch.testing.assert_close(sequence_logps(sums, counts, length_normalize=False), sums, rtol=0, atol=0)
    torch.testing.assert_close(
        sequence_logps(sums, counts, length_normalize=True), torch.tensor([-2.0, -0.5, -0.5]), rtol=0, atol=0
    )


def test_sequence_logps_mean_feeds_the_loss():
    """The same pair in mean and sum form. Counts: chosen 3, rejected 4.

    Mean: policy (-6/3, -10/4) = (-2, -2.5), ref (-6/3, -8/4) = (-2, -2) -> m = 0.5;
          beta = 2 -> loss = sp(-1) = 0.313262.
    Sum:  m = (-6 + 10) - (-6 + 8) = 2; beta = 0.1 -> loss = sp(-0.2) = 0.598139.
    """
    counts_c, counts_r = torch.tensor([3]), torch.tensor([4])
    policy = (torch.tensor([-6.0]), torch.tensor([-10.0]))
    ref = (torch.tensor([-6.0]), torch.tensor([-8.0]))
    mean = [sequence_logps(s, n, True) for s, n in zip(policy + ref, (counts_c, counts_r) * 2)]
    loss, _, _ = preference_loss(*mean, "sigmoid", beta=2.0)
    torch.testing.assert_close(loss, torch.tensor([SP_NEG_1]), rtol=0, atol=1e-6)
    summed = [sequence_logps(s, n, False) for s, n in zip(policy + ref, (counts_c, counts_r) * 2)]
    loss, _, _ = preference_loss(*summed, "sigmoid", beta=0.1)
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-0.2))]), rtol=0, atol=1e-6)


def test_sequence_logps_zero_count_raises():
    """0/0 has no mean: the batch position of the empty response is named; the sum form does not divide."""
    sums, counts = torch.tensor([-1.0, 0.0, -2.0]), torch.tensor([2, 0, 1])
    with pytest.raises(ValueError, match=r"sequences \[1\] of the batch have no response token"):
        sequence_logps(sums, counts, length_normalize=True)
    torch.testing.assert_close(sequence_logps(sums, counts, length_normalize=False), sums, rtol=0, atol=0)


@pytest.mark.parametrize("loss_type", sorted(n for n, spec in LOSS_REGISTRY.items() if spec.needs_reference))
def test_reference_losses_refuse_missing_reference(loss_type):
    with pytest.raises(ValueError, match=f"loss_type='{loss_type}' needs reference log-probs"):
        preference_loss(t(-1.0), t(-2.0), None, None, loss_type=loss_type)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(t(-1.0), t(-2.0), t(-1.0), None, loss_type=loss_type)


def test_get_loss_error_lists_the_registry_names():
    with pytest.raises(ValueError) as info:
        get_loss("dpo")
    message = str(info.value)
    assert message.startswith("--loss_type: unknown loss 'dpo'")
    for name in LOSS_REGISTRY:
        assert repr(name) in message
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        preference_loss(t(-1.0), t(-2.0), t(-1.0), t(-1.0), loss_type="kto")
    assert get_loss("ipo") is LOSS_REGISTRY["ipo"]
