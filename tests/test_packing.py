"""Padding-free layout: explicit collated tensors, the 4D mask, equivalence with the padded path, length grouping."""

import pytest
import torch

from hf_dpo.cli.demo import build_model, build_tokenizer
from hf_dpo.layouts.attention import attention_mask_4d
from hf_dpo.layouts.choice import LayoutChoice, build_collator
from hf_dpo.layouts.grouping import add_length_column, pair_widths
from hf_dpo.layouts.packed import PackedDPOCollator
from hf_dpo.layouts.padded import DPOCollator
from hf_dpo.scoring import score_batch

# Two pairs; prompt = first token. Pair 0: chosen 5 6 7, rejected 5 8. Pair 1: chosen 9 10, rejected 9 11 12.
FEATURES = [
    {
        "chosen_input_ids": [5, 6, 7],
        "chosen_response_mask": [0, 1, 1],
        "rejected_input_ids": [5, 8],
        "rejected_response_mask": [0, 1],
        "prompt_length": 1,
        "row_id": 10,
    },
    {
        "chosen_input_ids": [9, 10],
        "chosen_response_mask": [0, 1],
        "rejected_input_ids": [9, 11, 12],
        "rejected_response_mask": [0, 1, 1],
        "prompt_length": 1,
        "row_id": 11,
    },
]


def test_padding_free_collator_expected_tensors():
    batch = PackedDPOCollator(pad_token_id=0, padding_free=True, pad_to_multiple_of=4)(FEATURES)
    # Sequences in [chosen_1, chosen_2, rejected_1, rejected_2] order, then 2 pads up to 12.
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 10, 5, 8, 9, 11, 12, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0, 1, 2, 0, 1]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 3, 3, 3, -1, -1]]
    assert batch["branch_ids"].tolist() == [[0] * 12]
    # Token 6 is predicted at 0, 7 at 1 (sequence 0); 10 at 3 (sequence 1); 8 at 5 (sequence 2); 11, 12 at 7, 8 (3).
    assert batch["logp_positions"].tolist() == [0, 1, 3, 5, 7, 8]
    assert batch["logp_targets"].tolist() == [6, 7, 10, 8, 11, 12]
    assert batch["logp_sequences"].tolist() == [0, 0, 1, 2, 3, 3]
    assert batch["chosen_lengths"].tolist() == [2, 1] and batch["rejected_lengths"].tolist() == [1, 2]
    assert batch["row_ids"].tolist() == [10, 11]


def test_bounded_rows_pack_longest_first():
    """Lengths 3, 2, 2, 3 into rows of at most 5 tokens: first fit, longest first -> [3 + 2], [3 + 2]."""
    batch = PackedDPOCollator(pad_token_id=0, padding_free=True, max_row_tokens=5)(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 10], [9, 11, 12, 5, 8]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 1, 1], [3, 3, 3, 2, 2]]
    # Row 1 starts at flat index 5: rejected 8 is predicted at 5 + 3, rejected 11, 12 at 5 + 0, 5 + 1.
    assert batch["logp_positions"].tolist() == [0, 1, 3, 8, 5, 6]
    assert batch["logp_sequences"].tolist() == [0, 0, 1, 2, 3, 3]
    # A bound below the longest sequence still fits it: rows of 3 -> one sequence per row, tail padding restarts at 0.
    narrow = PackedDPOCollator(pad_token_id=0, padding_free=True, max_row_tokens=1)(FEATURES)
    assert narrow["input_ids"].shape == (4, 3)
    assert narrow["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 0], [0, 1, 0]]


def test_block_diagonal_mask_expected():
    batch = PackedDPOCollator(pad_token_id=0, padding_free=True)(FEATURES[:1])  # 5 6 7 | 5 8
    mask = attention_mask_4d(batch["segment_ids"], batch["branch_ids"])
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 1, 0],  # the rejected sequence restarts: it sees only itself
            [0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert mask.shape == (1, 1, 5, 5) and torch.equal(mask[0, 0], expected)
    additive = attention_mask_4d(batch["segment_ids"], batch["branch_ids"], torch.float32)
    assert torch.equal(additive[0, 0] == 0, expected) and additive.min() == torch.finfo(torch.float32).min


def test_build_collator_picks_the_layout():
    choice = LayoutChoice(
        padding_free=False, share_prompt=False, pad_to_multiple_of=None, padding_free_max_row_tokens=None, explicit=True
    )
    assert isinstance(build_collator(0, choice), DPOCollator)
    choice.padding_free = True
    collator = build_collator(0, choice)
    assert (
        isinstance(collator.packed, PackedDPOCollator)
        and collator.packed.padding_free
        and not collator.packed.share_prompt
    )
    features = random_features(2)
    assert "logp_positions" in collator(features)
    collator.use_padded()  # a failed automatic layout falls back: later batches come padded, not packed
    assert "logp_positions" not in collator(features) and "response_mask" in collator(features)


def random_features(n_pairs, seed=0, prompt_mask=False):
    """Pairs with different prompt and response lengths; with ``prompt_mask`` a few prompt tokens are scored too."""
    generator = torch.Generator().manual_seed(seed)
    features = []
    for i in range(n_pairs):
        n_prompt = 3 + 4 * i
        prompt = torch.randint(3, 900, (n_prompt,), generator=generator).tolist()
        mask = [0] * n_prompt
        if prompt_mask:
            mask[1:3] = [1, 1]  # an earlier assistant turn, scored under completion_turns="all"
        chosen = torch.randint(3, 900, (2 + 3 * i,), generator=generator).tolist()
        rejected = torch.randint(3, 900, (9 - 2 * i,), generator=generator).tolist()
        features.append(
            {
                "chosen_input_ids": prompt + chosen,
                "chosen_response_mask": mask + [1] * len(chosen),
                "rejected_input_ids": prompt + rejected,
                "rejected_response_mask": mask + [1] * len(rejected),
                "prompt_length": n_prompt,
            }
        )
    return features


def sums_and_grads(model, batch, response_only):
    model.zero_grad()
    sums, counts = score_batch(model, batch, chunk_size=6, response_only=response_only)
    (sums * torch.linspace(-1, 2, sums.shape[0])).sum().backward()
    return sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_equivalent(got, want, atol=1e-5):
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=atol)
    assert torch.equal(got[1], want[1])
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("response_only", [False, True])
@pytest.mark.parametrize("max_row_tokens", [None, 16])
def test_padding_free_equals_padded_fp32(attn, response_only, max_row_tokens):
    tokenizer = build_tokenizer("chatml")
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    model.config._attn_implementation = attn
    features = random_features(3)
    padded = sums_and_grads(model, DPOCollator(tokenizer.pad_token_id)(features), response_only=False)
    packed_batch = PackedDPOCollator(
        tokenizer.pad_token_id, padding_free=True, pad_to_multiple_of=8, max_row_tokens=max_row_tokens
    )(features)
    # Lengths 5, 12, 19 | 12, 14, 16 in rows of max(16, 19): [19], [16], [14 + 5], [12], [12].
    assert packed_batch["input_ids"].shape[0] == (1 if max_row_tokens is None else 5)
    assert (packed_batch["segment_ids"] >= 0).sum() == sum(
        len(f["chosen_input_ids"]) + len(f["rejected_input_ids"]) for f in features
    )
    assert_equivalent(sums_and_grads(model, packed_batch, response_only), padded)


def test_length_column_and_trainer_sampler(tmp_path):
    import datasets
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from hf_dpo import DPOConfig, NormalizedDPOTrainer

    features = random_features(4)
    # |chosen| = 5, 12, 19, 26 and |rejected| = 12, 14, 16, 18: widths are the max, or the sum minus the prompt (3, 7, 11, 15).
    assert pair_widths(datasets.Dataset.from_list(features)) == [12, 14, 19, 26]
    assert pair_widths(datasets.Dataset.from_list(features), share_prompt=True) == [14, 19, 24, 29]
    dataset = add_length_column(datasets.Dataset.from_list([dict(f, row_id=i) for i, f in enumerate(features)]))
    assert dataset["length"] == [12, 14, 19, 26]

    tokenizer = build_tokenizer("chatml")
    for share_prompt, widths in (("false", [12, 14, 19, 26]), ("auto", [14, 19, 24, 29])):
        args = DPOConfig(
            output_dir=str(tmp_path),
            train_sampling_strategy="group_by_length",
            per_device_train_batch_size=2,
            report_to=[],
            share_prompt=share_prompt,
        )
        trainer = NormalizedDPOTrainer(
            build_model(tokenizer),
            args=args,
            train_dataset=dataset.remove_columns("length"),
            processing_class=tokenizer,
        )
        # "auto" shares the prompts here (they are 36 of 122 tokens), so the lengths are the shared units' widths.
        assert trainer.layout.share_prompt is (share_prompt == "auto")
        sampler = trainer._get_train_sampler()
        assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == widths
