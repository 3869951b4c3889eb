"""The plain PyTorch loop of ``benchmarks/bench.py``'s ``minimind`` contestant, following MiniMind's DPO recipe.

[chosen; rejected] padded to max_length as its dataset does (``minimind+dyn``: per batch), full logits,
``log_softmax``, ``gather``, the response mask, per-sequence mean, sigmoid loss with beta 0.1 on the means,
AdamW, clip 1.0, bf16 autocast.
"""

from __future__ import annotations

from bench_flops import batch_work


def minimind_pairs(rows: list[dict], tokenizer) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, chosen ids, rejected ids) per row, EOS after each response, as TRL and hf_dpo tokenize them."""
    eos = tokenizer.eos_token_id
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [(encode(r["prompt"]), encode(r["chosen"]) + [eos], encode(r["rejected"]) + [eos]) for r in rows]


def minimind_batch(pairs, pad_id: int, pad_to: int | None):
    """The MiniMind recipe's batch: [chosen; rejected] stacked, inputs and labels shifted by one, a response mask.

    Returns ``x``, ``y``, ``mask`` and ``attention_mask``, each ``(2B, T-1)``, and the number of real tokens.
    ``T`` is ``pad_to`` (the recipe pads every sequence to max_length in its dataset) or, with ``pad_to=None``,
    the batch's longest sequence. The masks come from the lengths, never from comparing ids with the pad id.
    """
    import torch

    sequences = [(p + c, [0] * len(p) + [1] * len(c)) for p, c, _ in pairs]
    sequences += [(p + r, [0] * len(p) + [1] * len(r)) for p, _, r in pairs]
    width = pad_to or max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)  # (2B, T)
    scored = torch.zeros((len(sequences), width), dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (seq, response) in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        scored[row, : len(seq)] = torch.tensor(response)
        attention[row, : len(seq)] = 1
    # Position t predicts token t+1; the mask follows the label (a response token is scored where it is predicted).
    return ids[:, :-1], ids[:, 1:], scored[:, 1:], attention[:, :-1], int(attention.sum())


def minimind_sequence_logps(logits, labels, mask):
    """Per-sequence mean log-prob the recipe's way: full-vocabulary log_softmax, gather, mask, mean. ``(2B,)``."""
    import torch

    logps = torch.log_softmax(logits, dim=-1)  # (2B, T-1, V), fp32 under autocast: the tensor hf_dpo never builds
    token_logps = torch.gather(logps, 2, labels.unsqueeze(2)).squeeze(2)  # (2B, T-1)
    return (token_logps * mask).sum(1) / mask.sum(1).clamp_min(1)


def train_minimind(case, model, ref_model, rows, tokenizer, device, on_step_end):
    """A plain PyTorch loop following MiniMind's DPO recipe (policy and frozen reference on [chosen; rejected],
    length-normalized sigmoid loss, AdamW, clip 1.0, bf16 autocast). Returns (per-step losses, per-step batches:
    ``{"logical", "computed", "work"}`` as the trainer contestants' are recorded)."""
    import torch
    import torch.nn.functional as F

    batch_size, beta = case["batch"], 0.1
    pad_to = None if "dyn" in case["impl"].split("+") else case["max_length"]
    pairs = minimind_pairs(rows, tokenizer)
    model.to(device).train()
    ref_model.to(device).eval().requires_grad_(False)
    if case["gc"]:
        model.gradient_checkpointing_enable()
    # Trainer's defaults on the other side: AdamW, no weight decay, max_grad_norm 1.0; a constant rate here.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=case["dtype"] == "bf16")
    losses, tokens = [], []
    on_step_end(None)  # the start mark
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        *tensors, real_tokens = minimind_batch(chunk, tokenizer.pad_token_id, pad_to)
        x, y, mask, attention = (t.to(device) for t in tensors)
        work = batch_work({"attention_mask": attention, "response_mask": mask}, full_logits=True)
        tokens.append(
            {"logical": sum(2 * len(p) + len(c) + len(r) for p, c, r in chunk), "computed": real_tokens, "work": work}
        )
        with autocast:
            with torch.no_grad():
                ref_logps = minimind_sequence_logps(ref_model(input_ids=x, attention_mask=attention).logits, y, mask)
            policy_logps = minimind_sequence_logps(model(input_ids=x, attention_mask=attention).logits, y, mask)
        half = len(chunk)
        logits = (policy_logps[:half] - policy_logps[half:]) - (ref_logps[:half] - ref_logps[half:])  # (B,)
        loss = -F.logsigmoid(beta * logits).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        on_step_end(len(losses))
    return losses, tokens
