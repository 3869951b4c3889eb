"""Numerical checks to run next to the GPU benchmark: the fast paths give the plain path's numbers on the device.

    python benchmarks/gpu_checks.py                         # CUDA when available, the Qwen2.5-0.5B shape
    python benchmarks/gpu_checks.py --size tiny --device cpu --json /tmp/checks.json   # the test suite's dry run

On a random-init Qwen2 model (``--size gpu``: Qwen2.5-0.5B's shape, vocabulary 151,936; ``--size tiny``: 2
layers, vocabulary 1024), on one batch of pairs of different lengths:

(a) bf16 autocast loss against the fp32 loss (length-normalized sigmoid DPO against a second random model);
(b) the response-only projection against the full logits: per-sequence log-prob sums and gradients, fp32;
(c) every layout (padding-free, padding-free in bounded rows, shared prompt) against the plain padded path:
    per-sequence sums and gradients, fp32, for attention sdpa and eager, and flex_attention where it builds.

Prints one table (check, measured, tolerance, verdict), writes ``--json``, exits 1 when a check fails.
Uses hf_dpo's collators and :func:`hf_dpo.scoring.score_batch`, the code the trainer runs; layouts are
passed as explicit True/False so the result does not depend on the library's defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's hf_dpo, also when run as a script

from hf_dpo.layouts.packed import PackedDPOCollator  # noqa: E402
from hf_dpo.layouts.padded import DPOCollator  # noqa: E402
from hf_dpo.losses import sigmoid_loss  # noqa: E402
from hf_dpo.scoring import score_batch  # noqa: E402
from hf_dpo.scoring.head import projection_verdict  # noqa: E402
from hf_dpo.scoring.logprobs import sequence_logps  # noqa: E402

# Same shapes as bench.py's "gpu" and "gpu_tiny" sizes (tied embeddings, grouped key-value heads).
SIZES = {
    "gpu": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
        pairs=4,
        prompt=(32, 256),
        response=(16, 256),
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        vocab_size=1024,
        pairs=3,
        prompt=(3, 12),
        response=(2, 10),
    ),
}

# fp32 paths differ only in summation order (other kernels, other masks, other row widths): float32 rounding is
# 6e-8 relative, and a few thousand accumulated terms stay far below 1e-5 of the result.
FP32_RTOL = 1e-5
# bf16 keeps 8 significant bits, about 3 decimal digits (2^-8 = 0.4% per rounding). A loss near ln 2 ~ 0.69 is
# then known to ~0.003 from one rounding; the log-probs it is made of pass through every layer in bf16, so we
# allow a few such steps: 1e-2 absolute (1.4% of ln 2). A real bug (a wrong mask, a dropped token, a wrong
# dtype on the head) moves the loss by the size of beta x a log-prob difference, far more than this.
BF16_LOSS_ATOL = 1e-2
BETA = 0.1


def build_model(size: dict, attn: str, seed: int, device: torch.device):
    """A random-init fp32 Qwen2 of ``size`` on ``device``; the same seed gives the same weights on any attention."""
    import transformers

    config = transformers.Qwen2Config(
        **{
            k: size[k]
            for k in (
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
                "vocab_size",
            )
        },
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    # Initialised on the device itself: 494M parameters initialise in seconds on a GPU, not a minute on its CPUs.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return model.train()


def random_features(size: dict, seed: int = 0) -> list[dict]:
    """Pairs with different prompt and response lengths (so rows pad and pack differently), prompt unscored."""
    generator = torch.Generator().manual_seed(seed)
    (p_lo, p_hi), (r_lo, r_hi), vocab = size["prompt"], size["response"], size["vocab_size"]
    features = []
    for _ in range(size["pairs"]):
        n_prompt = int(torch.randint(p_lo, p_hi + 1, (1,), generator=generator))
        prompt = torch.randint(3, vocab, (n_prompt,), generator=generator).tolist()
        sides = {}
        for side in ("chosen", "rejected"):
            n = int(torch.randint(r_lo, r_hi + 1, (1,), generator=generator))
            sides[side] = torch.randint(3, vocab, (n,), generator=generator).tolist()
        features.append(
            {
                "chosen_input_ids": prompt + sides["chosen"],
                "chosen_response_mask": [0] * n_prompt + [1] * len(sides["chosen"]),
                "rejected_input_ids": prompt + sides["rejected"],
                "rejected_response_mask": [0] * n_prompt + [1] * len(sides["rejected"]),
                "prompt_length": n_prompt,
            }
        )
    return features


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def sums_and_grads(model, batch: dict, response_only: bool):
    """Per-sequence sums ``(2B,)`` and every parameter's gradient of a fixed weighting of them."""
    model.zero_grad(set_to_none=True)
    sums, counts = score_batch(model, batch, response_only=response_only)
    weights = torch.linspace(-1, 2, sums.shape[0], device=sums.device, dtype=sums.dtype)  # every sequence counts
    (sums * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return sums.detach(), counts, grads


def relative_diff(got, want) -> float:
    """max |got - want| / max |want| over sums, and over each parameter's gradient; inf when counts differ."""
    if not torch.equal(got[1].cpu(), want[1].cpu()) or set(got[2]) != set(want[2]):
        return float("inf")
    diffs = [((got[0] - want[0]).abs().max() / want[0].abs().max()).item()]
    for name, grad in want[2].items():
        scale = grad.abs().max().clamp_min(torch.finfo(grad.dtype).tiny)
        diffs.append(((got[2][name] - grad).abs().max() / scale).item())
    return max(diffs)


def dpo_loss(policy, ref, batch: dict) -> torch.Tensor:
    """Length-normalized sigmoid DPO (the library's default loss) of one batch, response-only projection."""
    n_pairs = batch["chosen_lengths"].shape[0]
    sums, counts = score_batch(policy, batch, response_only=True)
    with torch.no_grad():
        ref_sums, _ = score_batch(ref, batch, response_only=True)
    logps, ref_logps = sequence_logps(sums, counts, True), sequence_logps(ref_sums, counts, True)
    losses = sigmoid_loss(logps[:n_pairs], logps[n_pairs:], ref_logps[:n_pairs], ref_logps[n_pairs:], beta=BETA)[0]
    return losses.mean()


def flex_problem(device: torch.device):
    """Why flex_attention is not checked here, or None."""
    if device.type != "cuda":
        return "flex_attention skipped on cpu: torch's FlexAttention has no backward on CPU"
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError as error:
        return f"flex_attention skipped: {error}"
    return None


def run_checks(size_name: str, device: torch.device) -> dict:
    size = SIZES[size_name]
    if device.type == "cuda":
        # The fp32 comparisons need true fp32 matmuls: TF32 keeps 10 mantissa bits and would swamp 1e-5.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    features = random_features(size)
    padded = to_device(DPOCollator(pad_token_id=0)(features), device)
    longest = max(len(f[k]) for f in features for k in ("chosen_input_ids", "rejected_input_ids"))
    layouts = {
        "padding_free": dict(padding_free=True, share_prompt=False),
        "padding_free_rows": dict(padding_free=True, share_prompt=False, max_row_tokens=longest),
        "share_prompt": dict(padding_free=False, share_prompt=True),
    }
    rows, skipped = [], []

    def add(check, measured, tolerance):
        rows.append(dict(check=check, measured=measured, tolerance=tolerance, passed=bool(measured <= tolerance)))

    def fail(check, tolerance, error):
        rows.append(
            dict(
                check=check,
                measured=float("inf"),
                tolerance=tolerance,
                passed=False,
                error=f"{type(error).__name__}: {str(error)[:300]}",
            )
        )

    # (a) bf16 autocast against fp32, same weights, same batch.
    policy, ref = build_model(size, "sdpa", 0, device), build_model(size, "sdpa", 1, device)
    with torch.no_grad():
        fp32 = dpo_loss(policy, ref, padded).item()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = dpo_loss(policy, ref, padded).item()
    add(f"bf16 autocast loss vs fp32 (fp32 loss {fp32:.6f})", abs(bf16 - fp32), BF16_LOSS_ATOL)
    del ref

    # (b) response-only projection against full logits, padded layout, fp32.
    full = sums_and_grads(policy, padded, response_only=False)
    projected = sums_and_grads(policy, padded, response_only=True)
    # score_batch falls back to the full logits when the model fails its projection check: that would compare the
    # full logits with themselves, so a fallback fails this check.
    measured = relative_diff(projected, full) if projection_verdict(policy) is True else float("inf")
    add("response_only_logits vs full logits (sums, grads; sdpa)", measured, FP32_RTOL)
    del policy

    # (c) each layout against the padded path, per attention implementation.
    attns = ["sdpa", "eager"]
    problem = flex_problem(device)
    if problem is None:
        attns.append("flex_attention")
    else:
        skipped.append(problem)
    for attn in attns:
        try:
            model = build_model(size, attn, 0, device)
        except (ImportError, ValueError, RuntimeError) as error:
            skipped.append(f"{attn} skipped: the model does not build ({type(error).__name__}: {error})")
            continue
        try:
            want = sums_and_grads(model, padded, response_only=True)
        except Exception as error:  # noqa: BLE001 - reported as failures, so the rest of the table still prints
            for name, options in layouts.items():
                refused = options["share_prompt"] and attn not in ("sdpa", "eager")
                fail(
                    f"{name} on {attn} refused loudly" if refused else f"{name} vs padded (sums, grads; {attn})",
                    0.0 if refused else FP32_RTOL,
                    error,
                )
            continue
        for name, options in layouts.items():
            batch = to_device(PackedDPOCollator(pad_token_id=0, **options)(features), device)
            if options["share_prompt"] and attn not in ("sdpa", "eager"):
                # No custom 4D mask on this attention: the library must refuse, never score silently wrong.
                try:
                    score_batch(model, batch, response_only=True)
                except ValueError:
                    add(f"{name} on {attn} refused loudly", 0.0, 0.0)
                else:
                    add(f"{name} on {attn} refused loudly", float("inf"), 0.0)
                continue
            check = f"{name} vs padded (sums, grads; {attn})"
            try:
                add(check, relative_diff(sums_and_grads(model, batch, True), want), FP32_RTOL)
            except Exception as error:  # noqa: BLE001 - a crash is a failed check, named with its error
                fail(check, FP32_RTOL, error)
        del model
    return dict(
        size=size_name,
        device=str(device),
        device_name=device_name(device),
        torch=torch.__version__,
        checks=rows,
        skipped=skipped,
        passed=all(r["passed"] for r in rows),
    )


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def table(report: dict) -> str:
    lines = [
        f"GPU checks: size {report['size']}, device {report['device_name']}, torch {report['torch']}",
        "",
        "| check | measured | tolerance | verdict |",
        "|---|---:|---:|---|",
    ]
    for row in report["checks"]:
        verdict = "pass" if row["passed"] else "FAIL"
        lines.append(f"| {row['check']} | {row['measured']:.3g} | {row['tolerance']:.3g} | {verdict} |")
    lines += [f"Error in '{row['check']}': {row['error']}" for row in report["checks"] if "error" in row]
    lines += [f"Skipped: {reason}" for reason in report["skipped"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="gpu", choices=list(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="write the report here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report = run_checks(args.size, torch.device(args.device))
    report["wall_s"] = round(time.perf_counter() - started, 2)
    print(table(report))
    print(f"\n{'all checks passed' if report['passed'] else 'SOME CHECKS FAILED'} in {report['wall_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
