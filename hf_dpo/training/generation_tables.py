"""The generation records of one evaluation, as a table in the trackers that ``--report_to`` started.

The trackers are reached through the objects of transformers' own integration callbacks (the
run they opened), under the key ``eval/generations`` that ``rewrite_logs`` gives ``eval_`` keys:
TensorBoard as a Markdown table (``add_text``), W&B and Trackio as their ``Table`` logged with
``train/global_step`` like the scalars, MLflow as ``log_table`` artifacts, one JSON file per
step. A tracker that has not started (or a callback of another kind) is left alone.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

COLUMNS = ("step", "source", "prompt", "completion", "tokens", "finished", "logratio")


def table_key(eval_set: str) -> str:
    """``eval`` -> ``eval/generations``; ``eval_<name>`` -> ``eval/<name>_generations``, as ``rewrite_logs`` would."""
    return "eval/" + (eval_set[len("eval_") :] + "_" if eval_set.startswith("eval_") else "") + "generations"


def rows(records: list[dict[str, Any]]) -> list[list[Any]]:
    return [[record[column] for column in COLUMNS] for record in records]


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The records as a Markdown table (TensorBoard renders text summaries as Markdown)."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows(records)]
    return "\n".join(lines)


def log_tables(callbacks: list, records: list[dict[str, Any]], eval_set: str, step: int) -> list[str]:
    """Send ``records`` to every started tracker among ``callbacks``; returns the trackers written to."""
    from transformers.integrations import MLflowCallback, TensorBoardCallback, TrackioCallback, WandbCallback

    key = table_key(eval_set)
    written = []
    for callback in callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is not None:
            callback.tb_writer.add_text(key, markdown_table(records), step)
            callback.tb_writer.flush()
            written.append("tensorboard")
        elif isinstance(callback, WandbCallback) and callback._initialized:
            wandb = callback._wandb
            wandb.log({key: wandb.Table(columns=list(COLUMNS), data=rows(records)), "train/global_step": step})
            written.append("wandb")
        elif isinstance(callback, TrackioCallback) and callback._initialized:
            import pandas as pd

            trackio = callback._trackio
            table = trackio.Table(dataframe=pd.DataFrame(rows(records), columns=list(COLUMNS)))
            trackio.log({key: table, "train/global_step": step})
            written.append("trackio")
        elif isinstance(callback, MLflowCallback) and callback._initialized:
            columns = {column: [record[column] for record in records] for column in COLUMNS}
            callback._ml_flow.log_table(data=columns, artifact_file=f"{key}/step_{step:07d}.json")
            written.append("mlflow")
    return written
