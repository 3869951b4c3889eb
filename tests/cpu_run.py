"""The settings every test run shares, so that a test states only the settings it is about.

``cpu_args(output_dir, max_steps=2, ...)`` is ``DPOConfig`` with :data:`CPU_RUN` underneath. It leaves DPOConfig's
own defaults alone (learning rate 1e-6, a 10 percent warmup, logging every 10 steps, TrainingArguments' seed 42): a
test that depends on one of them passes it. ``tiny_trainer`` builds the demo tokenizer, a tiny Llama and a trainer over demo rows;
``trl_cpu_args`` is TRL's DPOConfig with the same settings, for the parity tests.
"""

from hf_dpo import DPOConfig, NormalizedDPOTrainer
from hf_dpo.cli.demo import build_model, build_tokenizer, make_preference_rows

CPU_RUN = dict(
    use_cpu=True,  # fp32 CPU kernels on every machine, a GPU runner's included: the tolerances are set for them
    report_to=[],  # no wandb or tensorboard run from a test, whatever happens to be installed
    save_strategy="no",  # no checkpoint written that the test does not read; the resume tests save and say so
    disable_tqdm=True,  # progress bars only clutter pytest's captured output
)

# 37k parameters with the demo vocabulary: a training step takes milliseconds.
TINY_LLAMA = dict(hidden_size=16, num_layers=1, num_heads=2)


def cpu_args(output_dir, **overrides) -> DPOConfig:
    """``DPOConfig(output_dir, **CPU_RUN, **overrides)``; an override wins over a shared setting."""
    return DPOConfig(output_dir=str(output_dir), **{**CPU_RUN, **overrides})


def trl_cpu_args(output_dir, **overrides):
    """TRL's DPOConfig with :data:`CPU_RUN`, in fp32 without gradient checkpointing (TRL's defaults turn both on)."""
    import trl

    fp32 = dict(bf16=False, fp16=False, gradient_checkpointing=False)
    return trl.DPOConfig(output_dir=str(output_dir), **{**CPU_RUN, **fp32, **overrides})


def tiny_trainer(
    args, rows=4, *, tokenizer=None, model=None, trainer_class=NormalizedDPOTrainer, **trainer_kwargs
) -> NormalizedDPOTrainer:
    """A ``trainer_class`` over ``rows`` (a count of demo rows, seed 0, or a data set) with the demo's chatml tokenizer
    and a :data:`TINY_LLAMA` policy (seed 0) unless ``tokenizer`` or ``model`` is given; ``args`` from ``cpu_args``.

    ``trainer_kwargs`` (``ref_model``, ``peft_config``, ...) go to the trainer as they are.
    """
    tokenizer = build_tokenizer("chatml") if tokenizer is None else tokenizer
    model = build_model(tokenizer, **TINY_LLAMA) if model is None else model
    rows = make_preference_rows(rows, seed=0) if isinstance(rows, int) else rows
    return trainer_class(model=model, args=args, train_dataset=rows, processing_class=tokenizer, **trainer_kwargs)


def conversational_rows(n: int, seed: int = 3) -> list[dict]:
    """``n`` demo rows as TRL's conversational layout has them: an explicit prompt (some with an earlier exchange)
    and one-message answers, so that TRL and hf_dpo read the same conversation."""
    return [
        {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}
        for row in make_preference_rows(n, seed=seed)
    ]


def noisy_policy_and_reference(tokenizer, noise_std: float):
    """``(policy, reference)`` in eval mode: the demo init (hidden 32, 2 layers), and the same plus seeded Gaussian
    noise of ``noise_std`` on every weight, so that log-ratios are away from 0 (at step 0 every loss is ln 2)."""
    import copy

    import torch

    reference = build_model(tokenizer, hidden_size=32, num_layers=2)
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(noise_std * torch.randn(param.shape, generator=generator))
    return policy.eval(), reference.eval()
