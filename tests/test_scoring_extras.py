"""The per-sequence extras some losses ask the scoring stage for (WPO's log sum p^2, LD-DPO's prefix sums), on
every layout and on the response-only projection path, against a float64 recomputation from raw logits.

Asking for extras must not change the sums, the counts or the gradients, and must cost nothing when not asked
(the plain padded path is unchanged: tested by every other scoring test).
"""

import pytest
import torch
from test_packing import random_features

from hf_dpo.cli.demo import build_model, build_tokenizer
from hf_dpo.layouts.packed import PackedDPOCollator
from hf_dpo.layouts.padded import DPOCollator
from hf_dpo.scoring import score_batch
from hf_dpo.scoring.extras import token_ranks


def float64_expected(model, features, prefix_lengths):
    """Per sequence ``[chosen_1..B, rejected_1..B]``: (sum, count, sum of log sum p^2, sum of the first k logps),
    from one unpadded forward per sequence and a float64 log-softmax."""
    sequences = [(f["chosen_input_ids"], f["chosen_response_mask"]) for f in features]
    sequences += [(f["rejected_input_ids"], f["rejected_response_mask"]) for f in features]
    rows = []
    for s, (ids, mask) in enumerate(sequences):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()  # (T, V)
        log_probs = torch.log_softmax(logits, dim=-1)
        scored = [t for t in range(1, len(ids)) if mask[t]]  # token t is predicted at t - 1
        logps = [log_probs[t - 1, ids[t]].item() for t in scored]
        squares = [torch.logsumexp(2 * log_probs[t - 1], dim=-1).item() for t in scored]
        rows.append((sum(logps), len(logps), sum(squares), sum(logps[: int(prefix_lengths[s])])))
    return torch.tensor(rows, dtype=torch.float64)  # (2B, 4)


LAYOUTS = {
    "padded": lambda pad: DPOCollator(pad),
    "packed": lambda pad: PackedDPOCollator(pad, padding_free=True, pad_to_multiple_of=8),
    "packed-rows": lambda pad: PackedDPOCollator(pad, padding_free=True, max_row_tokens=12),
    "shared-prompt": lambda pad: PackedDPOCollator(pad, share_prompt=True),
    "packed-shared-prompt": lambda pad: PackedDPOCollator(pad, padding_free=True, share_prompt=True),
}


@pytest.fixture(scope="module")
def model_and_pad():
    tokenizer = build_tokenizer("chatml")
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    model.config._attn_implementation = "sdpa"
    return model, tokenizer.pad_token_id


@pytest.fixture(scope="module")
def expected_for(model_and_pad):
    """``prompt_mask -> (features, prefix_lengths, float64 expectations)``, computed once per case."""
    model, pad = model_and_pad
    cases = {}
    for prompt_mask in (False, True):
        # Three pairs whose responses differ in length both ways (chosen 2, 5, 8; rejected 9, 7, 5 tokens).
        features = random_features(3, seed=4, prompt_mask=prompt_mask)
        batch = DPOCollator(pad)(features)
        # LD-DPO's split: each pair's shorter length; one sequence cut at 0 and one kept whole as edge cases.
        prefix_lengths = torch.minimum(batch["chosen_lengths"], batch["rejected_lengths"]).repeat(2)
        prefix_lengths[0], prefix_lengths[-1] = 0, 99
        cases[prompt_mask] = features, prefix_lengths, float64_expected(model, features, prefix_lengths)
    return cases


@pytest.mark.parametrize("prompt_mask", [False, True], ids=["last-turn", "all-turns"])
@pytest.mark.parametrize("response_only", [False, True], ids=["logits", "projection"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_extras_equal_float64_on_every_layout(model_and_pad, expected_for, layout, response_only, prompt_mask):
    model, pad = model_and_pad
    features, prefix_lengths, expected = expected_for[prompt_mask]
    batch = LAYOUTS[layout](pad)(features)

    model.zero_grad()
    sums, counts, extras = score_batch(
        model, batch, chunk_size=5, response_only=response_only, log_sum_sq=True, prefix_lengths=prefix_lengths
    )
    (sums * torch.linspace(-1, 2, sums.shape[0])).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert counts.tolist() == expected[:, 1].long().tolist()
    torch.testing.assert_close(sums.detach(), expected[:, 0], rtol=0, atol=2e-5)
    torch.testing.assert_close(extras["log_sum_sq"], expected[:, 2], rtol=0, atol=2e-5)
    torch.testing.assert_close(extras["prefix_sums"].detach(), expected[:, 3], rtol=0, atol=2e-5)
    assert extras["prefix_sums"][0].item() == 0.0 and extras["prefix_sums"][-1].item() == sums[-1].item()
    assert not extras["log_sum_sq"].requires_grad  # WPO's weights carry no gradient
    assert (expected[:, 2] - expected[:, 0]).abs().min() > 1e-2  # informative: not the log-prob sums again

    # The same path without extras: identical sums and gradients (the extras are read off the same chunks).
    model.zero_grad()
    plain_sums, plain_counts = score_batch(model, batch, chunk_size=5, response_only=response_only)
    (plain_sums * torch.linspace(-1, 2, sums.shape[0])).sum().backward()
    assert torch.equal(plain_counts, counts)
    torch.testing.assert_close(plain_sums.detach(), sums.detach(), rtol=0, atol=1e-9)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=0, atol=1e-7, msg=name)


def test_token_ranks_follow_each_sequences_own_order():
    """Tokens of sequences 2, 0, 2, 1, 0, 2 (interleaved): ranks count each sequence's tokens in list order."""
    sequences = torch.tensor([2, 0, 2, 1, 0, 2])
    assert token_ranks(sequences, 4).tolist() == [0, 0, 1, 0, 1, 2]
    assert token_ranks(torch.tensor([], dtype=torch.long), 2).tolist() == []
