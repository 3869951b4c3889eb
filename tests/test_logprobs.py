"""Chunked response log-probs against a naive full log_softmax + gather."""

import pytest
import torch

from hf_dpo.layouts.padded import DPOCollator
from hf_dpo.scoring.logprobs import next_token_targets, response_logp_sums, token_logps_from_logits

V = 11


def naive_logp_sums(logits, input_ids, response_mask):
    """Full ``(N, T, V)`` log_softmax, gather the next token, sum where the (already shifted) mask is on."""
    logps = torch.log_softmax(logits.float(), dim=-1)[:, :-1]  # (N, T-1, V)
    token_logps = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (N, T-1)
    mask = response_mask[:, :-1].float()
    return (token_logps * mask).sum(-1), response_mask.long().sum(-1)


def make_batch(seed=0):
    """Three rows of length 9 with right padding; masks aligned for next-token prediction.

    row 0: 7 real tokens, mask on positions 3..5 (predicting tokens 4..6)   -> 3 scored
    row 1: 9 real tokens, mask on positions 1..7 (predicting tokens 2..8)   -> 7 scored
    row 2: 4 real tokens, mask on position 2 (predicting token 3)           -> 1 scored
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 9, V, generator=gen) * 3
    input_ids = torch.randint(0, V, (3, 9), generator=gen)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[0, 3:6] = True
    mask[1, 1:8] = True
    mask[2, 2:3] = True
    return logits, input_ids, mask


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7])
def test_equals_naive_log_softmax(chunk_size):
    logits, input_ids, mask = make_batch()
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    sums, counts = response_logp_sums(logits, input_ids, mask, **kwargs)
    expected_sums, expected_counts = naive_logp_sums(logits, input_ids, mask)
    assert sums.dtype == torch.float64 and sums.shape == (3,)  # accumulated in float64, see per_sequence_sums
    torch.testing.assert_close(sums, expected_sums.double(), rtol=0, atol=1e-5)
    assert counts.tolist() == [3, 7, 1] == expected_counts.tolist()


def test_single_token_value_by_hand():
    """Logits (0, ln 3) over a 2-token vocabulary: p(token 1) = 3 / (1 + 3) = 0.75, log = -0.287682."""
    logits = torch.tensor([[[0.0, 1.0986122886681098], [5.0, -5.0]]])  # (1, 2, 2)
    input_ids = torch.tensor([[0, 1]])
    mask = torch.tensor([[1, 0]])
    sums, counts = response_logp_sums(logits, input_ids, mask)
    torch.testing.assert_close(sums, torch.tensor([-0.2876820724517809], dtype=torch.float64), rtol=0, atol=1e-6)
    assert counts.tolist() == [1]


def test_next_token_targets():
    assert next_token_targets(torch.tensor([[4, 5, 6], [7, 8, 9]])).tolist() == [[5, 6, 0], [8, 9, 0]]


def test_padding_is_ignored_whatever_its_logits():
    """A row alone and the same row inside a wider batch (garbage logits and ids at padding) give the same sum."""
    logits, input_ids, mask = make_batch()
    alone_sums, alone_counts = response_logp_sums(logits[2:, :4], input_ids[2:, :4], mask[2:, :4], chunk_size=2)
    padded_logits = logits.clone()
    padded_logits[2, 4:] = 1e4  # padding positions: huge logits that would dominate any sum they leaked into
    padded_ids = input_ids.clone()
    padded_ids[2, 4:] = 0
    batch_sums, batch_counts = response_logp_sums(padded_logits, padded_ids, mask, chunk_size=2)
    torch.testing.assert_close(batch_sums[2:], alone_sums, rtol=0, atol=1e-6)
    assert alone_counts.tolist() == [1] and batch_counts[2].item() == 1


def test_row_alone_equals_row_padded_through_a_model():
    """Through a tiny causal LM and the collator: right padding changes no response log-prob (fp32, 1e-5)."""
    from hf_dpo.cli.demo import build_model, build_tokenizer

    tokenizer = build_tokenizer("chatml")
    model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2).eval()
    short = {
        "chosen_input_ids": [5, 6, 7, 8],
        "chosen_response_mask": [0, 0, 1, 1],
        "rejected_input_ids": [5, 6, 9],
        "rejected_response_mask": [0, 0, 1],
    }
    long = {
        "chosen_input_ids": list(range(20, 32)),
        "chosen_response_mask": [0] * 4 + [1] * 8,
        "rejected_input_ids": list(range(40, 50)),
        "rejected_response_mask": [0] * 4 + [1] * 6,
    }
    collate = DPOCollator(pad_token_id=tokenizer.pad_token_id)

    def score(features):
        batch = collate(features)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return response_logp_sums(logits, batch["input_ids"], batch["response_mask"], chunk_size=3)

    alone_sums, alone_counts = score([short])  # (chosen, rejected) of the short pair, no padding but rejected's 1
    batch_sums, batch_counts = score([short, long])  # [chosen_short, chosen_long, rejected_short, rejected_long]
    torch.testing.assert_close(batch_sums[[0, 2]], alone_sums, rtol=0, atol=1e-5)
    assert alone_counts.tolist() == [2, 1] and batch_counts.tolist() == [2, 8, 1, 6]
    assert (alone_sums < 0).all()


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_gradients_equal_naive(chunk_size):
    """d(sum of weighted sums)/d(logits) of the chunked path equals the naive full log_softmax path."""
    logits, input_ids, mask = make_batch(seed=1)
    weights = torch.tensor([0.5, -1.0, 2.0])
    chunked = logits.clone().requires_grad_()
    (response_logp_sums(chunked, input_ids, mask, chunk_size=chunk_size)[0] * weights).sum().backward()
    naive = logits.clone().requires_grad_()
    (naive_logp_sums(naive, input_ids, mask)[0] * weights).sum().backward()
    torch.testing.assert_close(chunked.grad, naive.grad, rtol=0, atol=1e-6)
    # Unmasked positions get exactly zero gradient.
    assert chunked.grad[~mask].abs().max().item() == 0.0


def test_bf16_logits_give_float64_sums():
    """bf16 logits are upcast per chunk (fp32 log-sum-exp) and summed in float64; equal to the naive fp32 path on the same (rounded) logits."""
    logits, input_ids, mask = make_batch(seed=2)
    logits_bf16 = logits.to(torch.bfloat16)
    sums, counts = response_logp_sums(logits_bf16, input_ids, mask, chunk_size=3)
    assert sums.dtype == torch.float64
    expected, _ = naive_logp_sums(logits_bf16.float(), input_ids, mask)
    torch.testing.assert_close(sums, expected.double(), rtol=0, atol=1e-5)
    assert counts.tolist() == [3, 7, 1]


def test_empty_mask_gives_zero_sums_and_counts():
    logits, input_ids, _ = make_batch()
    sums, counts = response_logp_sums(logits, input_ids, torch.zeros(3, 9, dtype=torch.bool))
    assert sums.tolist() == [0.0, 0.0, 0.0] and counts.tolist() == [0, 0, 0]
    assert token_logps_from_logits(logits[0, :0], input_ids[0, :0]).shape == (0,)
