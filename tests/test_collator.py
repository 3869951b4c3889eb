"""DPOCollator on hand-written pairs: explicit expected tensors."""

import math

import pytest
import torch

from hf_dpo.layouts.padded import DPOCollator

PAD = 8  # also used as a real token (an EOS), as with the pad == eos templates


def features():
    """Two pairs; token masks are token-aligned (1 on scored tokens), as tokenization emits them.

    pair 0 (row 3): prompt [5, 6]; chosen answer [7, 8], rejected answer [9]
    pair 1 (row 7): prompt [11]; chosen answer [12, 13, 14, 8] (ends with token 8 == PAD), rejected answer [16]
    """
    return [
        {
            "row_id": 3,
            "chosen_input_ids": [5, 6, 7, 8],
            "chosen_response_mask": [0, 0, 1, 1],
            "rejected_input_ids": [5, 6, 9],
            "rejected_response_mask": [0, 0, 1],
            "ref_chosen_logp_sums": -1.5,
            "ref_rejected_logp_sums": -0.25,
        },
        {
            "row_id": 7,
            "chosen_input_ids": [11, 12, 13, 14, 8],
            "chosen_response_mask": [0, 1, 1, 1, 1],
            "rejected_input_ids": [11, 16],
            "rejected_response_mask": [0, 1],
            "ref_chosen_logp_sums": -3.0,
            "ref_rejected_logp_sums": -2.0,
        },
    ]


def test_expected_tensors():
    batch = DPOCollator(pad_token_id=PAD)(features())
    expected_input_ids = torch.tensor(
        [
            [5, 6, 7, 8, PAD],  # chosen 0, one pad
            [11, 12, 13, 14, 8],  # chosen 1, the longest row sets T = 5
            [5, 6, 9, PAD, PAD],  # rejected 0
            [11, 16, PAD, PAD, PAD],  # rejected 1
        ]
    )
    expected_attention_mask = torch.tensor(
        [
            [1, 1, 1, 1, 0],  # chosen 0: 4 real tokens; its real token 8 == PAD is attended
            [1, 1, 1, 1, 1],  # chosen 1
            [1, 1, 1, 0, 0],  # rejected 0
            [1, 1, 0, 0, 0],  # rejected 1
        ]
    )
    expected_response_mask = torch.tensor(
        [
            [0, 1, 1, 0, 0],  # chosen 0: logits at 1 and 2 predict the answer tokens 7, 8 at 2 and 3
            [1, 1, 1, 1, 0],  # chosen 1: logits at 0..3 predict 12, 13, 14, 8 (the final 8 is scored, not padding)
            [0, 1, 0, 0, 0],  # rejected 0: logits at 1 predict 9
            [1, 0, 0, 0, 0],  # rejected 1: logits at 0 predict 16
        ],
        dtype=torch.bool,
    )
    assert torch.equal(batch["input_ids"], expected_input_ids)
    assert torch.equal(batch["attention_mask"], expected_attention_mask)
    assert torch.equal(batch["response_mask"], expected_response_mask)
    assert batch["chosen_lengths"].tolist() == [2, 4]
    assert batch["rejected_lengths"].tolist() == [1, 1]
    assert batch["row_ids"].tolist() == [3, 7]
    assert batch["ref_chosen_logp_sums"].dtype == torch.float64
    assert batch["ref_chosen_logp_sums"].tolist() == [-1.5, -3.0]
    assert batch["ref_rejected_logp_sums"].tolist() == [-0.25, -2.0]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long


def test_no_labels_key():
    """Trainer would treat a `labels` batch as token-normalized and rescale accumulated losses."""
    batch = DPOCollator(pad_token_id=PAD)(features())
    assert "labels" not in batch
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "response_mask",
        "chosen_lengths",
        "rejected_lengths",
        "row_ids",
        "ref_chosen_logp_sums",
        "ref_rejected_logp_sums",
    }


def test_pad_to_multiple_of():
    """T = 5 rounds up to 8: three more pad columns, masks zero there; T = 8 stays 8."""
    plain = DPOCollator(pad_token_id=PAD)(features())
    batch = DPOCollator(pad_token_id=PAD, pad_to_multiple_of=8)(features())
    assert batch["input_ids"].shape == (4, 8)
    assert torch.equal(batch["input_ids"][:, :5], plain["input_ids"])
    assert (batch["input_ids"][:, 5:] == PAD).all()
    assert torch.equal(batch["attention_mask"][:, :5], plain["attention_mask"])
    assert batch["attention_mask"][:, 5:].sum().item() == 0
    assert torch.equal(batch["response_mask"][:, :5], plain["response_mask"])
    assert batch["response_mask"][:, 5:].sum().item() == 0
    assert batch["chosen_lengths"].tolist() == [2, 4] and batch["rejected_lengths"].tolist() == [1, 1]
    assert DPOCollator(pad_token_id=PAD, pad_to_multiple_of=5)(features())["input_ids"].shape == (4, 5)
    assert DPOCollator(pad_token_id=PAD, pad_to_multiple_of=3)(features())["input_ids"].shape == (4, 6)


def test_without_optional_columns():
    """Features without row_id or cached reference sums give a batch without those keys."""
    bare = [{k: v for k, v in f.items() if k.endswith(("input_ids", "response_mask"))} for f in features()]
    batch = DPOCollator(pad_token_id=0)(bare)
    assert set(batch) == {"input_ids", "attention_mask", "response_mask", "chosen_lengths", "rejected_lengths"}
    assert batch["input_ids"][2].tolist() == [5, 6, 9, 0, 0]


def test_mismatched_mask_length_raises():
    bad = features()
    bad[1]["rejected_response_mask"] = [0, 1, 1]
    # Row 3 of the stacked batch is pair 1's rejected side.
    with pytest.raises(ValueError, match="row 3: input_ids has 2 tokens but its response mask has 3"):
        DPOCollator(pad_token_id=PAD)(bad)


@pytest.mark.parametrize("pad", [None, "0", 1.0, True])
def test_missing_pad_token_id_is_refused_at_construction_naming_the_fix(pad):
    """A tokenizer without a pad token gives pad_token_id=None: refused here, not at the first step inside torch.full."""
    from hf_dpo.layouts.packed import PackedDPOCollator

    with pytest.raises(ValueError, match=r"DPOCollator\(pad_token_id=.*pass pad_token_id=tokenizer.eos_token_id"):
        DPOCollator(pad_token_id=pad)
    for options in ({"padding_free": True}, {"share_prompt": True}):
        with pytest.raises(ValueError, match=r"PackedDPOCollator\(pad_token_id=.*tokenizer.eos_token_id"):
            PackedDPOCollator(pad_token_id=pad, **options)


def test_trainer_pads_with_eos_when_the_tokenizer_has_no_pad_token(tmp_path, caplog, tiny_trainer):
    """The default collator falls back to EOS and says so once; the run trains and pads with the EOS id."""
    import logging

    from cpu_run import cpu_args

    from hf_dpo.cli.demo import build_tokenizer

    tokenizer = build_tokenizer("chatml")
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None
    args = cpu_args(
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=3,
        max_length=64,
        learning_rate=1e-3,
        padding_free=False,
        share_prompt=False,  # the padded layout, whose pad positions are checked below
    )
    with caplog.at_level(logging.WARNING, logger="hf_dpo.layouts.padded"):
        trainer = tiny_trainer(args, 6, tokenizer=tokenizer)
    messages = [r.getMessage() for r in caplog.records if r.name == "hf_dpo.layouts.padded"]
    assert messages == [
        f"the tokenizer has no pad token: padding with its EOS token (id {tokenizer.eos_token_id}); padding is never scored"
    ]
    assert trainer.data_collator.pad_token_id == tokenizer.eos_token_id
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert (batch["attention_mask"] == 0).any()  # the batch has padding, and it is the EOS id
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.eos_token_id).all()
    output = trainer.train()
    assert output.global_step == 2 and math.isfinite(output.training_loss)
