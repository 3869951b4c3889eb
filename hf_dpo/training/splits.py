"""The train split and the eval split(s) a trainer holds, walked in one place, and the data reports logged for them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback

from ..data.report import log_data_reports


def map_eval_sets(fn: Callable[[Any, str], Any], evaluation):
    """``fn(dataset, name)`` applied to the eval set (``"eval"``) or to each of several named eval sets (``"eval_<key>"``)."""
    if isinstance(evaluation, dict):
        return {key: fn(value, f"eval_{key}") for key, value in evaluation.items()}
    return fn(evaluation, "eval")


def map_splits(fn: Callable[[Any, str], Any], train, evaluation) -> tuple[Any, Any]:
    """``fn(dataset, name)`` applied to the train set (``"train"``) and to the eval sets; returns ``(train, evaluation)``."""
    return fn(train, "train"), map_eval_sets(fn, evaluation)


class DataReportCallback(TrainerCallback):
    """Logs the data reports once, on the main process, when training begins.

    The trainer puts it first among its callbacks, so that the reports print before the progress
    bar starts: after it, in a pipe, they would be glued onto the bar's unfinished line.
    """

    def __init__(self, splits: Callable[[], dict], args):
        self.splits = splits
        self.args = args
        self.done = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.done and state.is_world_process_zero:
            log_data_reports(self.splits(), self.args.max_length, self.args.max_prompt_length)
        self.done = True
