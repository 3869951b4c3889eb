"""hf_dpo.cli.plotting: series from a Trainer log history, the PNG, and the missing-matplotlib path."""

import math
import struct
import sys

import pytest

from hf_dpo.cli.plotting import (
    GENERATION_PANELS,
    PANELS,
    curves_from_log_history,
    draw_training_curves,
    plot_training_curves,
)

# A log history as Trainer writes it: evaluation before training at step 0, training
# logs every 2 steps, a NaN loss (dropped), an evaluation at step 6, the final summary,
# and an entry without a step (ignored).
HISTORY = [
    {"eval_loss": 0.6931, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.0, "step": 0},
    {
        "loss": 0.69,
        "rewards/accuracies": 0.5,
        "rewards/margins": 0.01,
        "logps/chosen": -7.0,
        "logps/rejected": -7.1,
        "step": 2,
    },
    {"loss": math.nan, "rewards/accuracies": 0.625, "step": 4},
    {
        "loss": 0.5,
        "rewards/accuracies": 0.75,
        "rewards/margins": 0.4,
        "logps/chosen": -6.5,
        "logps/rejected": -7.4,
        "step": 6,
    },
    {"eval_loss": 0.4, "eval_rewards/accuracies": 0.9, "eval_rewards/margins": 0.6, "step": 6},
    {"train_runtime": 1.0, "train_loss": 0.55, "step": 6},
    {"loss": 0.3},
]


def test_curves_from_log_history_exact_series():
    curves = curves_from_log_history(HISTORY, ["loss", "rewards/accuracies", "rewards/margins", "logps/chosen"])
    assert curves["loss"] == {"train": ([2, 6], [0.69, 0.5]), "eval": ([0, 6], [0.6931, 0.4])}  # NaN at 4 dropped
    assert curves["rewards/accuracies"] == {"train": ([2, 4, 6], [0.5, 0.625, 0.75]), "eval": ([0, 6], [0.5, 0.9])}
    assert curves["rewards/margins"] == {"train": ([2, 6], [0.01, 0.4]), "eval": ([0, 6], [0.0, 0.6])}
    assert curves["logps/chosen"] == {"train": ([2, 6], [-7.0, -6.5])}  # never evaluated: no "eval" series


def test_panels_cover_the_issue_metrics():
    keys = {key for _, _, keys in PANELS for key in keys}
    assert keys == {"loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"}


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_of_the_figure_size(tmp_path):
    from matplotlib.image import imread  # matplotlib is a dev dependency: CI has it

    path = plot_training_curves(HISTORY, tmp_path / "sub" / "curves.png", title="run")
    assert path == tmp_path / "sub" / "curves.png"
    assert _png_size(path) == (1000, 700)  # figsize (10, 7) at 100 dpi
    pixels = imread(path)
    assert pixels.std() > 0.05  # lines and text were drawn, not a blank canvas


def test_generation_panels_are_a_third_row_only_when_logged(tmp_path):
    pytest.importorskip("matplotlib")
    generations = [
        {"eval_generation/length_mean": 30.0, "eval_generation/kl": 0.0, "step": 0},
        {"eval_generation/length_mean": 4.0, "eval_generation/kl": 1.3, "step": 6},
    ]
    curves = curves_from_log_history(generations, ["generation/length_mean", "generation/kl"])
    assert curves == {
        "generation/length_mean": {"eval": ([0, 6], [30.0, 4.0])},
        "generation/kl": {"eval": ([0, 6], [0.0, 1.3])},
    }
    assert {keys for _, _, keys in GENERATION_PANELS} == {("generation/length_mean",), ("generation/kl",)}
    path = plot_training_curves(HISTORY + generations, tmp_path / "curves.png")
    assert _png_size(path) == (1000, 1050)  # three rows of 3.5 inches at 100 dpi
    assert _png_size(plot_training_curves(HISTORY, tmp_path / "plain.png")) == (1000, 700)  # not logged: two rows


def test_plot_without_matplotlib_raises_a_clear_import_error(tmp_path, monkeypatch):
    for name in (
        "matplotlib",
        "matplotlib.figure",
        "matplotlib.backends",
        "matplotlib.backends.backend_agg",
        "matplotlib.ticker",
    ):
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import fail
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_training_curves(HISTORY, tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


# A run of one optimizer step with logging_steps above it: evaluations at steps 0 and 1, no per-step training
# log, and train()'s summary at step 1 carrying the DPO metrics of that step and the run's mean loss.
ONE_STEP = [
    {"eval_loss": 0.6931, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.0, "step": 0},
    {"eval_loss": 0.61, "eval_rewards/accuracies": 0.75, "eval_rewards/margins": 0.2, "step": 1},
    {
        "train_runtime": 1.0,
        "train_loss": 0.6931,
        "rewards/accuracies": 0.5,
        "rewards/margins": 0.0,
        "logps/chosen": -7.0,
        "logps/rejected": -7.1,
        "step": 1,
    },
]


def _drawn(ax):
    """``(label, x, y, marker)`` of every line in ``ax`` that has data."""
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_marker())
        for line in ax.get_lines()
        if len(line.get_xdata())
    }


def test_a_one_step_run_plots_points_each_named_with_its_step():
    """Issue 19 (6): a short run drew single points as lines, which are invisible: the loss panel looked empty."""
    loss, accuracy, margin, logps = draw_training_curves(ONE_STEP).axes
    assert _drawn(loss) == {
        "train, mean of steps 1-1: 0.6931": ([1], [0.6931], "s"),  # no per-step loss: the run's mean, at its step
        "eval, step 1: 0.61": ([0, 1], [0.6931, 0.61], "o"),
    }
    assert _drawn(accuracy) == {
        "train, step 1: 0.5": ([1], [0.5], "o"),
        "eval, step 1: 0.75": ([0, 1], [0.5, 0.75], "o"),
    }
    assert _drawn(margin)["train, step 1: 0"] == ([1], [0.0], "o")
    assert set(_drawn(logps)) == {"chosen train, step 1: -7", "rejected train, step 1: -7.1"}
    for ax in (loss, accuracy, margin, logps):
        assert all(marker not in ("None", "", None) for xs, _, marker in _drawn(ax).values() if len(xs) == 1)


def test_long_series_are_plain_lines_and_the_legend_names_the_last_step():
    curves = draw_training_curves(HISTORY).axes[0]
    assert _drawn(curves) == {
        "train, step 6: 0.5": ([2, 6], [0.69, 0.5], "o"),  # two points still get markers
        "eval, step 6: 0.4": ([0, 6], [0.6931, 0.4], "o"),
    }
    many = [{"loss": 0.7 - 0.01 * step, "step": step} for step in range(1, 11)]
    assert _drawn(draw_training_curves(many).axes[0]) == {
        "train, step 10: 0.6": (list(range(1, 11)), [0.7 - 0.01 * s for s in range(1, 11)], "None")
    }
