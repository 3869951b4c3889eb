"""The end of a command-line run: the held-out numbers before and after, the closing screen and the curves PNG.

"Before" is the evaluation at step 0 (``--eval_on_start``, on by default with evaluation
data) or nothing: an evaluation taken later is never shown as the one before training.
"After" is the evaluation at the run's last step, the same entry of the log history that
the model card reads, so the closing screen, ``summary.json`` and the card agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

HELD_OUT_KEYS = (
    "eval_loss",
    "eval_rewards/accuracies",
    "eval_rewards/margins",
    "eval_logps/chosen",
    "eval_logps/rejected",
)


def held_out_numbers(metrics: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
    if not metrics:
        return None
    return {key[len("eval_") :]: metrics[key] for key in HELD_OUT_KEYS if key in metrics}


def evaluation_at(log_history: list[dict], step: int) -> Optional[dict[str, float]]:
    """The last evaluation logged at ``step`` (without its ``step`` key), or None; kept across resumes in the state."""
    found = [entry for entry in log_history if "eval_loss" in entry and entry.get("step") == step]
    return {k: v for k, v in found[-1].items() if k != "step"} if found else None


def write_plot(log_history: list[dict], output_dir: Path) -> Optional[Path]:
    try:
        from .plotting import plot_training_curves

        return plot_training_curves(log_history, output_dir / "training_curves.png", title=str(output_dir))
    except ImportError as err:
        print(f"Skipping the training-curve plot: {err}")  # one line on stdout beside the closing screen
        return None


def print_summary(summary: dict[str, Any]) -> None:
    """The run's closing screen on stdout: the command's result, so a print, not a log record."""
    held_out = summary["held_out"]
    before, after = held_out["before"], held_out["after"]
    lines = [f"\n==== hf_dpo: finished in {summary['time_s']:.1f} s ===="]
    if after and before:
        lines += [
            f"held-out pairs:   {held_out['pairs']} (step 0 -> step {held_out['after_step']})",
            f"reward accuracy:  {before['rewards/accuracies']:.3f} -> {after['rewards/accuracies']:.3f}"
            "   (exact ties count 1/2, so no preference = 0.5)",
            f"reward margin:    {before['rewards/margins']:+.4f} -> {after['rewards/margins']:+.4f}",
            f"loss:             {before['loss']:.4f} -> {after['loss']:.4f}",
        ]
    elif after:
        lines += [
            f"held-out pairs:   {held_out['pairs']} at step {held_out['after_step']} "
            "(not evaluated before training: --eval_on_start false)",
            f"reward accuracy:  {after['rewards/accuracies']:.3f}   (exact ties count 1/2, so no preference = 0.5)",
            f"reward margin:    {after['rewards/margins']:+.4f}",
            f"loss:             {after['loss']:.4f}",
        ]
    else:
        lines.append("no evaluation data: pass --eval_dataset or --eval_split_size for held-out numbers")
    outputs = summary["outputs"]
    lines += [
        f"outputs in {outputs['output_dir']}:",
        f"  {'adapter' if summary['use_peft'] else 'model'} + tokenizer, README.md (model card), all_results.json, "
        "summary.json, hf_dpo_run.json (run record)",
    ]
    if outputs.get("plot"):
        lines.append(f"  curves: {outputs['plot']}")
    print("\n".join(lines), flush=True)
