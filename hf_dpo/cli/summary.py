"""The end of a command-line run: the held-out numbers before and after, the closing screen and the curves PNG.

"Before" is the evaluation at step 0 (``--eval_on_start``, on by default with evaluation
data) or nothing: an evaluation taken later is never shown as the one before training.
"After" is the evaluation at the run's last step, the same entry of the log history that
the model card reads, so the closing screen, ``summary.json`` and the card agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..training.generation_records import RECORDS_NAME, before_after, read_records, records_path

SHOWN_CHARACTERS = 160  # of a prompt (its end) or a completion (its start) on the closing screen

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


def generation_change(output_dir: Path, log_history: list[dict]) -> Optional[dict[str, Any]]:
    """``--eval_generations``: the first and last evaluation's generations (:func:`before_after`), and their total time."""
    view = before_after(read_records(records_path(output_dir)))
    if view is not None:
        view["seconds"] = sum(e.get("eval_generation/runtime", 0.0) for e in log_history)
    return view


def _one_line(text: str, keep_end: bool = False) -> str:
    """``text`` on one line for a terminal: newlines and control characters escaped, cut to SHOWN_CHARACTERS."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) <= SHOWN_CHARACTERS:
        return text
    return "..." + text[-SHOWN_CHARACTERS:] if keep_end else text[:SHOWN_CHARACTERS] + "..."


def generation_lines(view: dict[str, Any], run_seconds: float) -> list[str]:
    """The closing screen's block on what the model writes: length, end of turn and log-ratio, one prompt before/after."""
    before, after = view["before"], view["after"]
    share = f" ({view['seconds'] / run_seconds:.0%} of the run)" if run_seconds > 0 else ""
    lines = [
        f"generations ({RECORDS_NAME}):",
        f"  length:           {before['length_mean']:.1f} -> {after['length_mean']:.1f} tokens"
        f"   (ended with end of turn: {before['finished_fraction']:.0%} -> {after['finished_fraction']:.0%})",
    ]
    if after["kl"] is not None:
        lines.append(
            f"  KL estimate:      {before['kl']:+.4f} -> {after['kl']:+.4f} (log-ratio to the reference per token)"
        )
    lines += [
        f"  time:             {view['seconds']:.1f} s{share}",
        f"  prompt:           {view['source']}: {_one_line(view['prompt'], keep_end=True)}",
    ]
    for side in ("before", "after"):
        label = "step {}:".format(view[side]["step"])
        lines.append(f'  {label:<18}"{_one_line(view["completion_" + side])}"')
    return lines


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
    if summary.get("generations"):
        lines += generation_lines(summary["generations"], summary["time_s"])
    outputs = summary["outputs"]
    lines += [
        f"outputs in {outputs['output_dir']}:",
        f"  {'adapter' if summary['use_peft'] else 'model'} + tokenizer, README.md (model card), all_results.json, "
        "summary.json, hf_dpo_run.json (run record)",
    ]
    if outputs.get("plot"):
        lines.append(f"  curves: {outputs['plot']}")
    print("\n".join(lines), flush=True)
