"""The end of a command-line run: the held-out numbers before and after, the closing screen and the curves PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional


def held_out_numbers(metrics: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
    if not metrics:
        return None
    keys = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected")
    return {key[len("eval_") :]: metrics[key] for key in keys if key in metrics}


def first_evaluation(log_history: list[dict]) -> Optional[dict[str, float]]:
    """The evaluation logged at the start of training (``eval_on_start``), kept across resumes in the state."""
    return next((entry for entry in log_history if "eval_loss" in entry), None)


def write_plot(log_history: list[dict], output_dir: Path) -> Optional[Path]:
    try:
        from .plotting import plot_training_curves

        return plot_training_curves(log_history, output_dir / "training_curves.png", title=str(output_dir))
    except ImportError as err:
        print(f"Skipping the training-curve plot: {err}")  # one line on stdout beside the closing screen
        return None


def print_summary(summary: dict[str, Any]) -> None:
    """The run's closing screen on stdout: the command's result, so a print, not a log record."""
    before, after = summary["held_out"]["before"], summary["held_out"]["after"]
    lines = [f"\n==== hf_dpo: finished in {summary['time_s']:.1f} s ===="]
    if before and after:
        lines += [
            f"held-out pairs:   {summary['held_out']['pairs']}",
            f"reward accuracy:  {before['rewards/accuracies']:.3f} -> {after['rewards/accuracies']:.3f}"
            "   (exact ties count 1/2, so no preference = 0.5)",
            f"reward margin:    {before['rewards/margins']:+.4f} -> {after['rewards/margins']:+.4f}",
            f"loss:             {before['loss']:.4f} -> {after['loss']:.4f}",
        ]
    else:
        lines.append("no evaluation data: pass --eval_dataset or --eval_split_size for held-out numbers")
    outputs = summary["outputs"]
    lines += [
        f"outputs in {outputs['output_dir']}:",
        f"  {'adapter' if summary['use_peft'] else 'model'} + tokenizer, README.md (model card), all_results.json, summary.json",
    ]
    if outputs.get("plot"):
        lines.append(f"  curves: {outputs['plot']}")
    print("\n".join(lines), flush=True)
