"""Training curves from a Trainer's log history, drawn into one PNG.

``Trainer.state.log_history`` is a list of dicts: training logs (``loss``,
``rewards/accuracies``, ... and ``step``), evaluation logs (the same keys with an
``eval_`` prefix) and a final summary (``train_runtime``, ``train_loss``, ...).
:func:`curves_from_log_history` turns it into per-metric series;
:func:`plot_training_curves` draws them. matplotlib is an optional dependency
(``pip install hf-dpo[plot]``): without it :func:`plot_training_curves` raises
``ImportError`` and the caller decides how loudly to skip.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Union

logger = logging.getLogger(__name__)

# One panel per entry: (title, y label, metric keys drawn in it). A metric key
# ``k`` is read from training logs as ``k`` and from evaluation logs as ``eval_k``.
PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss", "loss", ("loss",)),
    ("reward accuracy", "rewards/accuracies", ("rewards/accuracies",)),
    ("reward margin", "rewards/margins", ("rewards/margins",)),
    ("log-probs", "logps (per token when length-normalized)", ("logps/chosen", "logps/rejected")),
)
# Drawn below the others when the run logged them (--eval_generations): evaluation points only.
GENERATION_PANELS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("generated length", "tokens per completion", ("generation/length_mean",)),
    ("generation KL estimate", "log-ratio to the reference per token", ("generation/kl",)),
)

Series = tuple[list[int], list[float]]


def curves_from_log_history(log_history: Iterable[dict], keys: Iterable[str]) -> dict[str, dict[str, Series]]:
    """Per metric key, the training and evaluation series as ``(steps, values)``.

    Returns ``{key: {"train": (steps, values), "eval": (steps, values)}}``; a split
    without any point is left out, and non-finite values are dropped (a NaN would
    break the line). Entries without a ``step`` are ignored.
    """
    keys = list(keys)
    curves: dict[str, dict[str, Series]] = {key: {} for key in keys}
    for entry in log_history:
        if "step" not in entry:
            continue
        for key in keys:
            for split, name in (("train", key), ("eval", f"eval_{key}")):
                value = entry.get(name)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    steps, values = curves[key].setdefault(split, ([], []))
                    steps.append(int(entry["step"]))
                    values.append(float(value))
    return curves


def _label(name: str, split: str, steps: list[int], values: list[float]) -> str:
    """The legend entry: the series and its last logged value with its step, as the model card names them."""
    return f"{name} {split}".strip() + f", step {steps[-1]}: {values[-1]:.4g}"


def plot_training_curves(log_history: Iterable[dict], path: Union[str, os.PathLike], title: str = "") -> Path:
    """Draw :func:`draw_training_curves` into the PNG ``path``; returns the path. Raises ``ImportError`` when
    matplotlib is not installed."""
    figure = draw_training_curves(log_history, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    logger.info("wrote training curves to %s", path)
    return path


def draw_training_curves(log_history: Iterable[dict], title: str = ""):
    """A matplotlib ``Figure`` of :data:`PANELS` (and :data:`GENERATION_PANELS` when logged) drawn from
    ``log_history``, one axes per panel.

    Training series are solid lines, evaluation series dashed with markers (the
    evaluation before training sits at step 0); a series of one or two points has
    markers, and each legend entry names the series' last value and its step. Without
    a per-step training loss (fewer steps than ``logging_steps``) the loss panel shows
    train()'s mean over the run at the last step. Raises ``ImportError`` when
    matplotlib is not installed.
    """
    try:
        # The object-oriented API needs no display and leaves pyplot's global state alone.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ImportError(
            "matplotlib is not installed: pip install matplotlib (or hf-dpo[plot]) to draw training curves"
        ) from None

    log_history = list(log_history)
    panels = PANELS
    if any(f"eval_{keys[0]}" in entry for _, _, keys in GENERATION_PANELS for entry in log_history):
        panels = PANELS + GENERATION_PANELS
    curves = curves_from_log_history(log_history, [key for _, _, keys in panels for key in keys])
    summary = next((e for e in reversed(log_history) if "train_loss" in e and "step" in e), {})
    rows = len(panels) // 2
    figure = Figure(figsize=(10, 3.5 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 2).flatten()
    for ax, (panel_title, ylabel, keys) in zip(axes, panels):
        drawn = False
        for i, key in enumerate(keys):
            color = f"C{i}"
            label = key.split("/")[-1] if len(keys) > 1 else ""
            if "train" in curves[key]:
                steps, values = curves[key]["train"]
                # A lone point drawn as a line is invisible: points get a marker (a one-step run, a short run).
                marker = "o" if len(steps) <= 2 else None
                ax.plot(
                    steps,
                    values,
                    color=color,
                    linewidth=1.2,
                    marker=marker,
                    label=_label(label, "train", steps, values),
                )
                drawn = True
            elif key == "loss" and "train_loss" in summary:
                # Fewer steps than --logging_steps: no per-step loss, only train()'s mean over the run.
                ax.plot(
                    [summary["step"]],
                    [summary["train_loss"]],
                    color=color,
                    marker="s",
                    linestyle="none",
                    label=f"train, mean of steps 1-{summary['step']}: {summary['train_loss']:.4g}",
                )
                drawn = True
            if "eval" in curves[key]:
                steps, values = curves[key]["eval"]
                ax.plot(
                    steps, values, color=color, linestyle="--", marker="o", label=_label(label, "eval", steps, values)
                )
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        else:
            ax.legend(fontsize=8)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    return figure
