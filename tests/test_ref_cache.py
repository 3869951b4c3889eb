"""Precomputed reference log-probs: equal to on-the-fly scoring, cached and reused, keyed, sharded, released."""

import datasets
import pytest
import torch
from cpu_run import cpu_args
from test_packing import random_features

from hf_dpo import DPOConfig, NormalizedDPOTrainer
from hf_dpo.cli.demo import build_model, build_tokenizer
from hf_dpo.reference import cache as ref_cache


def pairs(n, seed=0):
    return datasets.Dataset.from_list([dict(f, row_id=i) for i, f in enumerate(random_features(n, seed=seed))])


def make_trainer(tmp_path, train, eval_=None, ref_seed=1, cache="cache", **options):
    tokenizer = build_tokenizer("chatml")
    args = cpu_args(
        tmp_path / "out",
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        ref_logps_cache_dir=str(tmp_path / cache),
        **options,
    )
    policy = build_model(tokenizer, hidden_size=32, seed=0)
    ref_model = build_model(tokenizer, hidden_size=32, seed=ref_seed)
    return NormalizedDPOTrainer(
        policy, ref_model, args=args, train_dataset=train, eval_dataset=eval_, processing_class=tokenizer
    )


def on_the_fly_sums(trainer, dataset):
    batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        sums, _ = trainer.score(trainer.ref_model, batch)
    n = len(dataset)
    return sums[:n], sums[n:]


def test_precomputed_sums_equal_on_the_fly_reference_and_model_is_released(tmp_path):
    train, evaluation = pairs(3), pairs(2, seed=5)
    plain = make_trainer(tmp_path, train, evaluation, cache="unused")
    chosen, rejected = on_the_fly_sums(plain, train)
    eval_chosen, _ = on_the_fly_sums(plain, evaluation)

    trainer = make_trainer(tmp_path, train, evaluation, precompute_ref_logps=True)
    torch.testing.assert_close(
        torch.tensor(trainer.train_dataset["ref_chosen_logp_sums"], dtype=torch.float64), chosen, rtol=1e-6, atol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(trainer.train_dataset["ref_rejected_logp_sums"], dtype=torch.float64),
        rejected,
        rtol=1e-6,
        atol=1e-5,
    )
    torch.testing.assert_close(
        torch.tensor(trainer.eval_dataset["ref_chosen_logp_sums"], dtype=torch.float64),
        eval_chosen,
        rtol=1e-6,
        atol=1e-5,
    )
    assert trainer.ref_model is None and len(trainer.accelerator._models) == 0

    # The loss of a batch is the same as with the live reference, and evaluation runs on the cached columns.
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    plain_batch = plain.data_collator([train[i] for i in range(3)])
    torch.testing.assert_close(
        trainer.compute_loss(trainer.model, batch), plain.compute_loss(plain.model, plain_batch), rtol=1e-6, atol=1e-5
    )
    assert "eval_loss" in trainer.evaluate()
    with pytest.raises(ValueError, match="reference model was released"):
        trainer.evaluate(pairs(2, seed=9))


def test_cache_is_reused_and_keyed(tmp_path, monkeypatch):
    train = pairs(3)
    first = make_trainer(tmp_path, train, precompute_ref_logps=True)
    files = list((tmp_path / "cache").glob("*.pt"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("recomputed despite a cache hit")

    monkeypatch.setattr(ref_cache, "compute_reference_sums", fail)
    second = make_trainer(tmp_path, train, precompute_ref_logps=True)  # same data, weights, tokenizer, settings
    assert list(second.train_dataset["ref_chosen_logp_sums"]) == list(first.train_dataset["ref_chosen_logp_sums"])
    monkeypatch.undo()

    make_trainer(tmp_path, train, precompute_ref_logps=True, ref_seed=2)  # other reference weights
    make_trainer(tmp_path, train, precompute_ref_logps=True, max_length=2048)  # other truncation settings
    make_trainer(tmp_path, pairs(3, seed=7), precompute_ref_logps=True)  # other data
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4


def test_lora_reference_is_the_adapter_disabled_base(tmp_path):
    peft = pytest.importorskip("peft")
    tokenizer = build_tokenizer("chatml")
    train = pairs(2)
    args = cpu_args(
        tmp_path / "out",
        per_device_eval_batch_size=2,
        precompute_ref_logps=True,
        ref_logps_cache_dir=str(tmp_path / "cache"),
    )
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # adapter != identity
    trainer = NormalizedDPOTrainer(
        build_model(tokenizer, hidden_size=32),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=lora,
    )
    assert trainer.reference_mode == "adapter"
    base = build_model(tokenizer, hidden_size=32)  # the same seed: the weights under the adapter
    batch = trainer.data_collator([train[i] for i in range(2)])
    with torch.no_grad():
        expected, _ = trainer.score(base, batch)
        adapted, _ = trainer.score(trainer.model, batch)
    got = torch.tensor(
        list(trainer.train_dataset["ref_chosen_logp_sums"]) + list(trainer.train_dataset["ref_rejected_logp_sums"]),
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-5)
    assert (adapted - expected).abs().max() > 1e-4  # the adapter really changes the scores


def test_shards_cover_every_row_once_with_equal_counts():
    assert ref_cache._shard(5, 0, 2) == [0, 2, 4]
    assert ref_cache._shard(5, 1, 2) == [1, 3, 3]  # padded with its last row: both ranks run 3 rows
    assert ref_cache._shard(1, 1, 2) == [0]


def test_two_ranks_gather_into_row_order(tmp_path):
    """Simulated 2-process run: each rank scores its strided shard; the gather puts every row back in place."""
    train = pairs(5)
    trainer = make_trainer(tmp_path, train, cache="unused")
    expected = on_the_fly_sums(trainer, train)
    sent_by_rank_1 = []

    class FakeAccelerator:
        """Rank 1 runs first and records what it sends; rank 0's gather returns [rank 0, rank 1] like accelerate."""

        num_processes, is_local_main_process, device = 2, True, torch.device("cpu")

        def __init__(self, rank):
            self.process_index = rank
            self.calls = 0

        def gather(self, tensor):
            self.calls += 1
            if self.process_index == 1:
                sent_by_rank_1.append(tensor)
                return tensor
            return torch.cat([tensor, sent_by_rank_1[self.calls - 1]])

    def scored_by(rank):
        accelerator = FakeAccelerator(rank)
        score, collate = trainer._reference_scores, trainer.data_collator
        return ref_cache.compute_reference_sums(train, score, collate, accelerator, 2, f"rank {rank}")

    scored_by(1)
    values = scored_by(0)
    torch.testing.assert_close(values["ref_chosen_logp_sums"], expected[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(values["ref_rejected_logp_sums"], expected[1], rtol=1e-6, atol=1e-5)
    assert values["chosen_lengths"].tolist() == [len(f) - f.count(0) for f in train["chosen_response_mask"]]


def test_config_refuses_precompute_without_a_reference(tmp_path):
    with pytest.raises(ValueError, match="--precompute_ref_logps has no reference to precompute"):
        DPOConfig(output_dir=str(tmp_path), precompute_ref_logps=True, loss_type="simpo")
    with pytest.raises(ValueError, match="--precompute_ref_batch_size must be a positive integer, got 0"):
        DPOConfig(output_dir=str(tmp_path), precompute_ref_batch_size=0)
