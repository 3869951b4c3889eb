"""What one DPO step computes, in FLOPs, and the machine's matmul peak to hold it against (``benchmarks/bench.py``).

Counted per step, from the batches each contestant actually ran (model FLOPs: work the step needs, not
recomputation, not padding):

* the body (every parameter but the input embedding and the output head, N_body): ``2 N_body`` per computed
  token, a token being a non-padding position of the forward (the shared prompt's tokens once, padding never);
* the output head (vocabulary x hidden, N_head, counted even when tied to the input embedding): ``2 N_head`` per
  position it projects: every computed token with full logits (TRL, ``hf_dpo+full``), only the positions that
  predict a scored token with hf_dpo's response-only projection;
* attention: ``4 d`` per layer per (query, visible key) pair (``Q K^T`` and ``A V``, d = heads x head_dim),
  counting the keys the layout's mask lets each computed token see (causal, its own sequence, the prompt and its
  own branch under the shared prompt), not the full ``L x L`` square SDPA computes on CPU;
* the policy's forward and backward: 3x its forward; the reference's forward: 1x, when it runs every step.

Recomputation (the response-only projection's backward, gradient checkpointing) is not counted: it is time the
step spends, so it shows as a lower fraction of the peak. The peak is the best of dense matmuls measured in the
same process, on the same threads, on square matrices and on the model's own MLP shapes.
"""

from __future__ import annotations

import time


def model_shape(model) -> dict:
    """Parameter counts and attention size of ``model``: ``n_body``, ``n_head``, ``layers``, ``attention_width``."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    n_head = head.weight.numel() + (head.bias.numel() if getattr(head, "bias", None) is not None else 0)
    total = sum(p.numel() for p in model.parameters())  # a tied head is one tensor, counted once
    tied = head.weight is embedding
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {
        "n_body": total - embedding.numel() - (0 if tied else n_head),
        "n_head": n_head,
        "layers": config.num_hidden_layers,
        "attention_width": config.num_attention_heads * head_dim,
        "hidden": config.hidden_size,
        "intermediate": config.intermediate_size,
        "vocab": config.vocab_size,
    }


def batch_work(batch: dict, full_logits: bool) -> dict:
    """What a forward over ``batch`` computes: ``computed`` tokens, ``padding`` positions, ``head`` positions
    (projected through the output head) and ``attention_pairs`` (query, visible key) over computed tokens.

    Reads TRL's and hf_dpo's padded batches (``attention_mask``, right padding) and hf_dpo's packed and
    shared-prompt batches (``segment_ids``, ``branch_ids``, ``logp_positions``).
    """
    if "segment_ids" in batch:
        from hf_dpo.layouts.attention import attention_mask_4d

        real = batch["segment_ids"] >= 0  # (R, L)
        visible = attention_mask_4d(batch["segment_ids"], batch["branch_ids"])[:, 0]  # (R, L, L)
        pairs = int((visible.sum(-1) * real).sum())
        scored = batch["logp_positions"].numel()
    else:
        real = batch["attention_mask"].bool()  # (2B, T)
        lengths = real.sum(1)
        pairs = int((lengths * (lengths + 1) // 2).sum())
        # hf_dpo's response_mask marks the predicting positions; TRL's completion_mask the predicted tokens.
        scored = (
            int(batch["response_mask"].sum())
            if "response_mask" in batch
            else int(batch["completion_mask"][:, 1:].sum())
        )
    computed = int(real.sum())
    return {
        "computed": computed,
        "padding": real.numel() - computed,
        "head": computed if full_logits else scored,
        "attention_pairs": pairs,
        "scored": scored,
    }


def forward_flops(shape: dict, work: dict) -> float:
    """FLOPs of one forward over a batch whose ``work`` is :func:`batch_work`'s."""
    return (
        2 * shape["n_body"] * work["computed"]
        + 2 * shape["n_head"] * work["head"]
        + 4 * shape["attention_width"] * shape["layers"] * work["attention_pairs"]
    )


def step_flops(shape: dict, work: dict, reference_every_step: bool) -> dict:
    """``{"total", "attention"}`` FLOPs of a step: the policy's forward and backward, and the reference's forward."""
    passes = 3 + (1 if reference_every_step else 0)
    return {
        "total": passes * forward_flops(shape, work),
        "attention": passes * 4 * shape["attention_width"] * shape["layers"] * work["attention_pairs"],
    }


def matmul_peak_flops(device: str, dtype, shape: dict | None = None) -> float:
    """The best dense matmul FLOP/s measured on ``device`` in ``dtype``, on this process's threads.

    CPU: square 1024 and 2048 matrices and, given the model's ``shape``, its MLP matmuls over 2048 tokens
    (hidden -> intermediate and back); CUDA: square 8192 (large enough to fill an H100/H200).
    """
    import torch

    if device == "cuda":
        sizes = [(8192, 8192, 8192)]
    else:
        sizes = [(1024, 1024, 1024), (2048, 2048, 2048)]
        if shape is not None:
            sizes += [(2048, shape["hidden"], shape["intermediate"]), (2048, shape["intermediate"], shape["hidden"])]
    best = 0.0
    for m, k, n in sizes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        # A fixed count on CUDA; on CPU as many as fit in 0.2 s (bf16 matmuls are slow on many CPUs).
        repeats, start = 0, time.perf_counter()
        while (repeats < 20) if device == "cuda" else (repeats < 1 or time.perf_counter() - start < 0.2):
            a @ b
            repeats += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - start))
    return best
