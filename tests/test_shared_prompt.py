"""Shared-prompt forward: expected layout and mask, equivalence with the unshared path, errors, trainer wiring."""

import pytest
import torch
from test_packing import FEATURES, assert_equivalent, random_features, sums_and_grads

from hf_dpo.cli.demo import build_model, build_tokenizer
from hf_dpo.layouts.attention import attention_mask_4d, model_inputs, require_4d_mask_attention
from hf_dpo.layouts.packed import PackedDPOCollator
from hf_dpo.layouts.padded import DPOCollator


def test_shared_layout_expected_tensors():
    batch = PackedDPOCollator(pad_token_id=0, share_prompt=True)(FEATURES)
    # Row b = [prompt | chosen response | rejected response]; rejected positions continue from the prompt's end.
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 1], [0, 1, 1, 2]]
    assert batch["branch_ids"].tolist() == [[0, 1, 1, 2], [0, 1, 2, 2]]
    # Pair by pair: chosen 6, 7 from positions 0, 1 and rejected 8 from the shared prompt position 0;
    # then chosen 10 from row 1 position 0 (= 4), rejected 11 from 4 and rejected 12 from row 1 position 2 (= 6).
    assert batch["logp_positions"].tolist() == [0, 1, 0, 4, 4, 6]
    assert batch["logp_targets"].tolist() == [6, 7, 8, 10, 11, 12]
    assert batch["logp_sequences"].tolist() == [0, 0, 2, 1, 3, 3]
    assert batch["chosen_lengths"].tolist() == [2, 1] and batch["rejected_lengths"].tolist() == [1, 2]

    mask = attention_mask_4d(batch["segment_ids"], batch["branch_ids"])[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0],  # prompt
            [1, 1, 0, 0],  # chosen
            [1, 1, 1, 0],  # chosen
            [1, 0, 0, 1],  # rejected: the prompt and itself, never the chosen tokens
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_packed_shared_layout_is_one_row():
    batch = PackedDPOCollator(pad_token_id=0, share_prompt=True, padding_free=True)(FEATURES)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1]]
    assert batch["logp_positions"].tolist() == [0, 1, 0, 4, 4, 6]


def test_prompt_tokens_are_computed_once():
    """Tokens computed: sum(|chosen| + |rejected| - prompt) shared, against sum(|chosen| + |rejected|) unshared."""
    features = random_features(3)
    shared = PackedDPOCollator(0, share_prompt=True, padding_free=True)(features)
    unshared = PackedDPOCollator(0, padding_free=True)(features)
    prompts = sum(f["prompt_length"] for f in features)  # 3 + 7 + 11
    assert unshared["input_ids"].numel() - shared["input_ids"].numel() == prompts == 21


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_equals_unshared_fp32(padding_free, attn):
    """Including prompt tokens scored on both sides (completion_turns="all"), gradients included."""
    tokenizer = build_tokenizer("chatml")
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    model.config._attn_implementation = attn
    features = random_features(3, seed=1, prompt_mask=True)
    unshared = sums_and_grads(model, DPOCollator(tokenizer.pad_token_id)(features), response_only=False)
    shared_batch = PackedDPOCollator(tokenizer.pad_token_id, share_prompt=True, padding_free=padding_free)(features)
    assert_equivalent(sums_and_grads(model, shared_batch, response_only=True), unshared)
    assert_equivalent(sums_and_grads(model, shared_batch, response_only=False), unshared)


def test_differing_prompts_are_refused():
    feature = dict(FEATURES[0], rejected_input_ids=[4, 8])
    with pytest.raises(ValueError, match="differ inside the first prompt_length=1"):
        PackedDPOCollator(0, share_prompt=True)([feature])
    without_prompt_length = {k: v for k, v in FEATURES[0].items() if k != "prompt_length"}
    with pytest.raises(ValueError, match="needs the prompt_length column"):
        PackedDPOCollator(0, share_prompt=True)([without_prompt_length])


def test_attention_without_4d_masks_is_refused():
    tokenizer = build_tokenizer("chatml")
    model = build_model(tokenizer)
    require_4d_mask_attention(model)  # sdpa: fine
    model.config._attn_implementation = "flash_attention_2"
    # Padding-free alone works from position_ids: no mask is passed, and nothing is refused.
    packed = PackedDPOCollator(0, padding_free=True)(FEATURES)
    assert set(model_inputs(model, packed)) == {"input_ids", "position_ids"}
    with pytest.raises(ValueError, match="--share_prompt needs attention that takes a custom 4D mask"):
        require_4d_mask_attention(model)


def test_trainer_losses_equal_across_layouts(tmp_path):
    """One batch through compute_loss: plain, padding-free, shared prompt and both give the same loss and gradients."""
    import datasets

    from hf_dpo import DPOConfig, NormalizedDPOTrainer

    tokenizer = build_tokenizer("chatml")
    dataset = datasets.Dataset.from_list([dict(f, row_id=i) for i, f in enumerate(random_features(3, seed=2))])
    results = {}
    for name, options in {
        "plain": {},
        "padding_free": {"padding_free": True},
        "share_prompt": {"share_prompt": True},
        "both": {"padding_free": True, "share_prompt": True},
    }.items():
        model = build_model(tokenizer, hidden_size=32, seed=3)
        ref_model = build_model(tokenizer, hidden_size=32, seed=4)  # differs from the policy: a loss away from ln 2
        args = DPOConfig(output_dir=str(tmp_path / name), report_to=[], per_device_train_batch_size=3, **options)
        trainer = NormalizedDPOTrainer(model, ref_model, args=args, train_dataset=dataset, processing_class=tokenizer)
        batch = trainer.data_collator([dataset[i] for i in range(3)])
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        results[name] = (loss.detach(), model.lm_head.weight.grad.clone())
    for name, (loss, grad) in results.items():
        torch.testing.assert_close(loss, results["plain"][0], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(grad, results["plain"][1], rtol=0, atol=1e-6, msg=name)
    assert abs(results["plain"][0].item() - 0.6931) > 1e-3


def test_layouts_with_flex_attention_equal_padded_fp32():
    """One small case (FlexAttention compiles on its first call): padding-free + shared prompt through a BlockMask."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from hf_dpo.scoring import score_batch

    tokenizer = build_tokenizer("chatml")
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    model.config._attn_implementation = "sdpa"
    features = random_features(3, seed=2, prompt_mask=True)
    with torch.no_grad():
        want, want_counts = score_batch(model, DPOCollator(tokenizer.pad_token_id)(features))
        model.set_attn_implementation("flex_attention")
        got, counts = score_batch(
            model, PackedDPOCollator(tokenizer.pad_token_id, padding_free=True, share_prompt=True)(features)
        )
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
