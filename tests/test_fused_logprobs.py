"""Response-only chunked projection: values, gradients, saved memory, and the fallback detection."""

import logging
import math

import pytest
import torch
from torch import nn

from hf_dpo.cli.demo import build_model, build_tokenizer
from hf_dpo.layouts.padded import DPOCollator
from hf_dpo.scoring import score_batch
from hf_dpo.scoring.head import plain_projection_problem, projection_verdict
from hf_dpo.scoring.projection import linear_token_logps


def naive_logps(hidden, weight, bias, targets):
    logits = hidden @ weight.T + (0 if bias is None else bias)  # (M, V)
    return torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).squeeze(-1)


def test_hand_value_from_bias_only_logits():
    """hidden = 0 -> logits = bias = [0, ln 3]: p = [1/4, 3/4], so log p(1) = ln(3/4) and log p(0) = ln(1/4)."""
    hidden = torch.zeros(2, 3)
    weight = torch.randn(2, 3)
    bias = torch.tensor([0.0, math.log(3.0)])
    logps = linear_token_logps(hidden, weight, bias, torch.tensor([1, 0]), chunk_size=1)
    torch.testing.assert_close(logps, torch.tensor([math.log(0.75), math.log(0.25)]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_equal_full_log_softmax(with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    bias = torch.randn(50, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (10,))
    upstream = torch.randn(10)

    fused = linear_token_logps(hidden, weight, bias, targets, chunk_size=3)  # 4 chunks, the last one short
    expected = naive_logps(hidden, weight, bias, targets)
    torch.testing.assert_close(fused.double(), expected, rtol=0, atol=1e-5)

    inputs = [hidden, weight] + ([bias] if with_bias else [])
    fused_grads = torch.autograd.grad((fused * upstream).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * upstream.double()).sum(), inputs)
    for got, want in zip(fused_grads, expected_grads):
        torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-5)


def test_gradcheck_against_finite_differences():
    torch.manual_seed(1)
    hidden = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    # fp64 inputs keep fp64 accumulators, so finite differences are meaningful.
    assert torch.autograd.gradcheck(lambda h, w, b: linear_token_logps(h, w, b, targets, 2), (hidden, weight, bias))


def test_backward_keeps_no_logits():
    """The plain path saves an (M, V) tensor for backward; the fused one saves inputs and an (M,) log-sum-exp only."""
    hidden = torch.randn(64, 16, requires_grad=True)
    weight = torch.randn(1000, 16, requires_grad=True)
    targets = torch.randint(0, 1000, (64,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        linear_token_logps(hidden, weight, None, targets, chunk_size=8)
    assert all(64 * 1000 not in (shape.numel(),) for shape in saved)
    assert max(shape.numel() for shape in saved) == 1000 * 16  # the weight itself
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        naive_logps(hidden, weight, None, targets)
    assert max(shape.numel() for shape in saved) == 64 * 1000


def _batch(tokenizer, n_pairs=3):
    torch.manual_seed(0)
    features = []
    for i in range(n_pairs):
        prompt = torch.randint(3, 900, (4 + i,)).tolist()
        chosen, rejected = torch.randint(3, 900, (3 + 2 * i,)).tolist(), torch.randint(3, 900, (5 - i,)).tolist()
        features.append(
            {
                "chosen_input_ids": prompt + chosen,
                "chosen_response_mask": [0] * len(prompt) + [1] * len(chosen),
                "rejected_input_ids": prompt + rejected,
                "rejected_response_mask": [0] * len(prompt) + [1] * len(rejected),
                "prompt_length": len(prompt),
            }
        )
    return DPOCollator(tokenizer.pad_token_id)(features), features


def _sums_and_grads(model, batch, response_only):
    model.zero_grad()
    sums, counts = score_batch(model, batch, chunk_size=5, response_only=response_only)
    (sums * torch.linspace(-1, 1, sums.shape[0])).sum().backward()
    return sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_response_only_scores_equal_full_logits_with_gradients():
    tokenizer = build_tokenizer("chatml")
    model = build_model(tokenizer, hidden_size=32, num_layers=2)
    batch, _ = _batch(tokenizer)
    plain = _sums_and_grads(model, batch, response_only=False)
    fused = _sums_and_grads(model, batch, response_only=True)
    assert projection_verdict(model) is True
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=1e-5)
    assert torch.equal(fused[1], plain[1])
    assert fused[2].keys() == plain[2].keys() and "lm_head.weight" in fused[2]
    for name, grad in plain[2].items():
        torch.testing.assert_close(fused[2][name], grad, rtol=0, atol=1e-5, msg=name)


def test_lora_policy_uses_fused_path_and_frozen_head_gets_no_gradient():
    peft = pytest.importorskip("peft")
    tokenizer = build_tokenizer("chatml")
    model = peft.get_peft_model(
        build_model(tokenizer, hidden_size=32),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    batch, _ = _batch(tokenizer)
    assert plain_projection_problem(model) is None
    plain = _sums_and_grads(model, batch, response_only=False)
    fused = _sums_and_grads(model, batch, response_only=True)
    assert projection_verdict(model) is True
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=1e-5)
    assert not any("lm_head" in name for name in fused[2])
    for name, grad in plain[2].items():
        torch.testing.assert_close(fused[2][name], grad, rtol=0, atol=1e-5, msg=name)


def test_lora_on_the_head_falls_back_structurally():
    peft = pytest.importorskip("peft")
    tokenizer = build_tokenizer("chatml")
    model = peft.get_peft_model(
        build_model(tokenizer, hidden_size=32), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    )
    assert "not a plain nn.Linear" in plain_projection_problem(model)


def test_softcapping_config_is_detected_and_falls_back():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=120,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=3.0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    assert "final_logit_softcapping=3.0" in plain_projection_problem(model)
    features = [
        {
            "chosen_input_ids": [5, 6, 7, 8],
            "chosen_response_mask": [0, 0, 1, 1],
            "rejected_input_ids": [5, 6, 9],
            "rejected_response_mask": [0, 0, 1],
        }
    ]
    batch = DPOCollator(0)(features)
    fused, _ = score_batch(model, batch, response_only=True)
    plain, _ = score_batch(model, batch, response_only=False)
    assert torch.equal(fused, plain)
    assert projection_verdict(model) is False


class ScaledLlama(nn.Module):
    """A causal LM whose forward halves the logits without any config attribute saying so."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def get_decoder(self):
        return self.inner.get_decoder()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        out = self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )
        out.logits = out.logits * 0.5
        return out


def test_undeclared_logit_transformation_is_detected_numerically(caplog):
    tokenizer = build_tokenizer("chatml")
    model = ScaledLlama(build_model(tokenizer, hidden_size=32))
    batch, _ = _batch(tokenizer)
    assert plain_projection_problem(model) is None  # nothing structural gives it away
    plain, _ = score_batch(model, batch, response_only=False)
    with caplog.at_level(logging.WARNING, logger="hf_dpo.scoring.head"):
        fused, _ = score_batch(model, batch, response_only=True)
    assert projection_verdict(model) is False
    assert "logits differ" in caplog.text
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
    # The halved logits really change the scores: the check is not vacuous.
    unscaled, _ = score_batch(model.inner, batch, response_only=False)
    assert (unscaled - plain).abs().max() > 1e-2
