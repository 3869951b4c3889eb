"""Mixture-of-experts policies: the router load-balancing loss is added to the DPO loss, the policy's only.

Pinned down with numbers, on tiny random-init Mixtral and Qwen2-MoE models (fp32, CPU):
- ``aux_loss`` equals transformers' own ``load_balancing_loss_func`` (the model's ``outputs.aux_loss`` with
  ``output_router_logits=True`` on the padded batch, padding excluded) within 1e-6;
- the per-pair training loss equals the plain DPO loss (coef 0) plus ``coef * aux_loss`` within 1e-6;
- with coef 0 the loss is the plain DPO loss of a model that outputs no router logits, and ``aux_loss`` is still logged;
- the reference's forwards never return router logits; packed and shared-prompt layouts are refused.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cpu_run import cpu_args
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from hf_dpo import NormalizedDPOTrainer
from hf_dpo.cli.demo import build_tokenizer, make_preference_rows

COEF = 0.3  # large, so that a dropped or doubled aux term shows far above 1e-6


def mixtral(vocab_size: int) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        output_router_logits=True,
        router_aux_loss_coef=COEF,
        attn_implementation="sdpa",
    )
    return MixtralForCausalLM(config)


def qwen2_moe(vocab_size: int) -> Qwen2MoeForCausalLM:
    config = Qwen2MoeConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        output_router_logits=True,
        router_aux_loss_coef=COEF,
        attn_implementation="sdpa",
    )
    return Qwen2MoeForCausalLM(config)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("chatml")


def make_trainer(tmp_path, tokenizer, policy, reference, **overrides):
    values = dict(max_length=64, per_device_train_batch_size=4, padding_free=False, share_prompt=False, seed=0)
    return NormalizedDPOTrainer(
        model=policy,
        ref_model=reference,
        args=cpu_args(tmp_path, **{**values, **overrides}),
        processing_class=tokenizer,
        train_dataset=make_preference_rows(8, seed=1),
    )


def first_batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.model.device) if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.mark.parametrize("build", [mixtral, qwen2_moe], ids=["mixtral", "qwen2_moe"])
def test_aux_loss_is_added_to_the_policy_loss_only(build, tokenizer, tmp_path):
    torch.manual_seed(0)
    policy = build(len(tokenizer))
    torch.manual_seed(1)
    reference = build(len(tokenizer))  # a different model, so that the DPO term is not ln 2 everywhere
    reference_routers = []
    reference.register_forward_hook(lambda module, args, output: reference_routers.append(output.router_logits))

    trainer = make_trainer(tmp_path / "coef", tokenizer, policy, reference)
    assert trainer.router_aux.coef == pytest.approx(COEF)  # taken from the model config
    batch = first_batch(trainer)
    with torch.no_grad():
        losses, aux_term, metrics = trainer.pair_losses(trainer.model, batch)
        expected_aux = policy(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
        ).aux_loss  # transformers' load_balancing_loss_func, padding excluded through attention_mask
    assert abs(float(metrics["aux_loss"]) - float(expected_aux)) < 1e-6
    assert reference_routers and all(r is None for r in reference_routers)  # the reference computed none

    zero = make_trainer(tmp_path / "zero", tokenizer, policy, reference, router_aux_loss_coef=0.0)
    with torch.no_grad():
        zero_losses, zero_aux_term, zero_metrics = zero.pair_losses(zero.model, batch)
    assert abs(float(zero_metrics["aux_loss"]) - float(expected_aux)) < 1e-6  # logged, not trained on
    # pair_losses returns the DPO losses and the batch's router term apart; the loss is their mean plus the term.
    assert float(zero_aux_term) == 0.0 and abs(float(aux_term) - COEF * float(expected_aux)) < 1e-6
    assert torch.allclose(losses + aux_term, zero_losses + COEF * expected_aux, atol=1e-6, rtol=0)
    assert float((losses + aux_term - zero_losses).abs().min()) > 1e-3  # the term is really there

    plain_policy, plain_reference = copy.deepcopy(policy), copy.deepcopy(reference)
    for model in (plain_policy, plain_reference):
        model.config.output_router_logits = False
    plain = make_trainer(tmp_path / "plain", tokenizer, plain_policy, plain_reference)
    assert plain.router_aux.coef is None
    with torch.no_grad():
        plain_losses, plain_aux_term, plain_metrics = plain.pair_losses(plain.model, batch)
    assert "aux_loss" not in plain_metrics and plain_aux_term is None
    assert torch.allclose(zero_losses, plain_losses, atol=1e-6, rtol=0)


@pytest.mark.parametrize("flag", ["padding_free", "share_prompt"])
def test_packed_layouts_are_refused(flag, tokenizer, tmp_path):
    """The model's forward computes its aux loss from a 2D attention_mask; a 4D block mask would break it."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=f"--{flag} true is not supported with a mixture-of-experts"):
        make_trainer(tmp_path, tokenizer, mixtral(len(tokenizer)), None, **{flag: True})


def test_trains_and_logs_aux_loss(tokenizer, tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, tokenizer, mixtral(len(tokenizer)), None, max_steps=2, logging_steps=1)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "aux_loss" in entry]
    assert len(logged) == 2 and all(entry["aux_loss"] > 0 for entry in logged)
    assert abs(trainer.state.log_history[0]["loss"] - (0.6931472 + COEF * logged[0]["aux_loss"])) < 1e-4


def test_router_aux_loss_coef_needs_a_router(tokenizer, tmp_path):
    from hf_dpo.cli.demo import build_model

    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        make_trainer(tmp_path, tokenizer, build_model(tokenizer), None, router_aux_loss_coef=0.01)
