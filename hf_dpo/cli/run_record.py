"""Which run an output folder and its checkpoints belong to, so that two runs never mix.

Every run writes ``hf_dpo_run.json`` into ``--output_dir`` when it starts (the arguments,
the command, the start time and the run's *identity*), and a copy into every
``checkpoint-<step>`` it saves. The identity is what a resumed run must share with the
checkpoint: the model, tokenizer and reference, the data (a fingerprint of the canonical
pairs the loss sees), every DPO setting that changes the loss, and the global batch.

- A new run into a folder that holds checkpoints stops, offering ``--overwrite_output_dir``
  (which removes them first) or ``--resume_from_checkpoint true``: otherwise the new run
  would write ``checkpoint-3`` and ``checkpoint-6`` beside an older run's ``checkpoint-9``,
  and a later resume would pick the stale one and save the old weights as the final model.
- Resuming checks the checkpoint's record against this run and refuses, naming what
  differs, a checkpoint of another configuration or of an earlier run in that folder.

The record is written atomically (a temporary file, then ``os.replace``), so a run killed
while writing it leaves the previous record whole. It is local: absolute paths are kept
here and nowhere that is published (the model card names models and data relatively).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback, TrainingArguments

from ..common.version import __version__
from ..training.checkpoints import CHECKPOINT_PATTERN, checkpoint_problems
from ..training.config import DPOConfig
from .arguments import ModelArguments, ScriptArguments, is_demo
from .errors import UsageError

logger = logging.getLogger("hf_dpo.cli")

RECORD_NAME = "hf_dpo_run.json"
# DPOConfig's own fields that do not change what the loss computes (speed paths, caches, data handling
# whose effect the data fingerprint already sees). Every other field of its own is part of the identity, so
# a loss option added later is checked on resume without being listed here.
NOT_IN_IDENTITY = frozenset(
    {
        "padding_free",
        "padding_free_max_row_tokens",
        "share_prompt",
        "response_only_logits",
        "logprob_chunk_size",
        "pad_to_multiple_of",
        "dataset_num_proc",
        "precompute_ref_logps",
        "precompute_ref_batch_size",
        "ref_logps_cache_dir",
        "remove_unused_columns",
        "trust_remote_code",
        "on_bad_row",
        "nonfinite_loss",
        # What is generated at evaluation changes no weight: a resume may ask for more or fewer samples.
        "eval_generations",
        "eval_generation_max_new_tokens",
        "eval_generation_kwargs",
    }
)


def checkpoints_in(output_dir: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``output_dir``, by step."""
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))
    ]
    return [path for _, path in sorted(found)]


def check_output_dir(args: DPOConfig, overwrite: bool) -> None:
    """Before anything loads: a new run stops where another run's checkpoints are (see the module docstring)."""
    output_dir = Path(args.output_dir)
    if overwrite and args.resume_from_checkpoint:
        raise UsageError(
            "--overwrite_output_dir removes the checkpoints that --resume_from_checkpoint would continue from; "
            "pass one of them"
        )
    found = checkpoints_in(output_dir)
    if found and not args.resume_from_checkpoint and not overwrite:
        names = ", ".join(p.name for p in found[-3:]) + (" ..." if len(found) > 3 else "")
        raise UsageError(
            f"--output_dir {output_dir} holds the checkpoints of another run ({names}); pass --overwrite_output_dir "
            "to remove them and start over, or --resume_from_checkpoint true to continue that run"
        )


def remove_old_checkpoints(output_dir: Path) -> None:
    """``--overwrite_output_dir``: the old run's checkpoints go before the new run writes its own."""
    for path in checkpoints_in(output_dir):
        shutil.rmtree(path)
        logger.info("--overwrite_output_dir: removed %s", path)
    (output_dir / RECORD_NAME).unlink(missing_ok=True)


def data_fingerprint(dataset) -> Optional[str]:
    """A SHA-256 of the canonical pairs in order (their Arrow record batches; ``row_id`` and metadata left out)."""
    if dataset is None:
        return None
    import pyarrow as pa

    digest = hashlib.sha256()
    columns = [name for name in dataset.column_names if name != "row_id"]
    for table in dataset.select_columns(columns).with_format("arrow").iter(batch_size=4096):
        table = table.replace_schema_metadata(None)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
    return f"sha256:{digest.hexdigest()[:16]} ({len(dataset)} pairs)"


def model_identity(name: Optional[str], revision: Optional[str] = None) -> Optional[str]:
    """``demo``, a local folder's absolute path, or a hub name (``@revision`` when given)."""
    if name is None or is_demo(name):
        return "demo" if name is not None else None
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name + (f"@{revision}" if revision else "")


def loss_settings(args: DPOConfig) -> dict[str, Any]:
    """Every DPOConfig field of its own that changes the loss, JSON-safe."""
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    names = [f.name for f in dataclasses.fields(DPOConfig) if f.name not in trainer_fields | NOT_IN_IDENTITY]
    return json.loads(json.dumps({name: getattr(args, name) for name in names}, default=str))


def run_identity(
    script_args: ScriptArguments, model_args: ModelArguments, args: DPOConfig, train, evaluation
) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed by it."""
    model = model_args.model_name_or_path or "demo"
    lora = None
    if model_args.use_peft:
        lora = {k: getattr(model_args, k) for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")}
    return {
        "model": model_identity(model, model_args.model_revision),
        "tokenizer": model_identity(model_args.tokenizer_name_or_path or model, model_args.model_revision),
        "ref_model": model_identity(model_args.ref_model_name_or_path),
        "lora": lora,
        "train data": data_fingerprint(train),
        "eval data": data_fingerprint(evaluation),
        "loss": loss_settings(args),
        "global batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
    }


def differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``name: X in the checkpoint, Y now`` for every entry of the identities that differs."""
    found = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found += differences(old, new, f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {old} in the checkpoint, {new} now")
    return found


def read_record(directory: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads((Path(directory) / RECORD_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None


def write_record(directory: Path, record: dict[str, Any]) -> Path:
    """``directory/hf_dpo_run.json``, atomically: a reader sees the old record or the new one, never half of one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RECORD_NAME
    temporary = directory / f".{RECORD_NAME}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    return path


def _newest_recorded_checkpoint(output_dir: Path, require_optimizer: bool) -> Optional[Path]:
    """The newest complete checkpoint that carries a run record; others are passed over with a warning.

    A checkpoint without a record was cut off between Trainer's save and the record (a kill in that
    moment), or was not written by this command: it is never resumed unchecked.
    """
    for path in reversed(checkpoints_in(output_dir)):
        problems = checkpoint_problems(path, require_optimizer)
        if not problems and read_record(path) is None:
            problems = [f"it has no run record ({RECORD_NAME}), so nothing shows it belongs to this run"]
        if not problems:
            return path
        logger.warning("not resuming from %s: %s", path, "; ".join(problems))
    return None


def resume_checkpoint(args: DPOConfig, identity: dict[str, Any]) -> tuple[Optional[str], Optional[dict]]:
    """The checkpoint to resume from (``None`` for a new run) and its record, checked against ``identity``.

    ``true`` takes the newest complete checkpoint with a run record; a checkpoint of another
    configuration is refused naming what differs, and with ``true`` one written by another run
    than the folder's last (a stale ``checkpoint-9`` beside a newer run's) is refused too.
    """
    resume = args.resume_from_checkpoint
    if not resume:
        return None, None
    output_dir = Path(args.output_dir)
    if resume is True:
        path = _newest_recorded_checkpoint(output_dir, require_optimizer=not getattr(args, "save_only_model", False))
        if path is None:
            raise UsageError(
                f"--resume_from_checkpoint true: no complete checkpoint-<step> folder with a run record in {output_dir} "
                "(see the warnings above); start a new run, or pass a checkpoint's path to resume from it unchecked"
            )
    else:
        path = Path(resume)
    saved = read_record(path)
    if saved is None:  # an explicit path: the user's choice, said aloud
        logger.warning("resuming from %s, which has no run record: its configuration is not checked", path)
        return str(path), None
    differing = differences(saved.get("identity", {}), identity)
    if differing:
        raise UsageError(
            f"--resume_from_checkpoint: {path.name} belongs to another configuration ({'; '.join(differing)}); resume "
            "with that run's settings, or start over with --overwrite_output_dir"
        )
    folder = read_record(output_dir)
    if resume is True and folder is not None and folder.get("run_id") != saved.get("run_id"):
        raise UsageError(
            f"--resume_from_checkpoint true: {path.name} was written by another run (started {saved.get('started')}), "
            f"not by the last run in {output_dir} (started {folder.get('started')}); remove it, or pass "
            "--overwrite_output_dir to start over"
        )
    return str(path), saved


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_record(
    script_args: ScriptArguments,
    model_args: ModelArguments,
    args: DPOConfig,
    identity: dict[str, Any],
    resumed: Optional[dict] = None,
    resumed_from: Optional[str] = None,
) -> dict[str, Any]:
    """The record of this run; a resumed run keeps the run id and start time of the run it continues."""
    record = {
        "run_id": resumed.get("run_id") if resumed else uuid.uuid4().hex[:12],
        "started": resumed.get("started") if resumed else _now(),
        "hf_dpo": __version__,
        "command": sys.argv,
        "cwd": os.getcwd(),
        "identity": identity,
        "arguments": {
            "script": dataclasses.asdict(script_args),
            "model": dataclasses.asdict(model_args),
            "training": json.loads(json.dumps(args.to_dict(), default=str)),
        },
    }
    if resumed_from:
        record["resumed"] = [*(resumed or {}).get("resumed", []), {"at": _now(), "from": str(resumed_from)}]
    return record


class RunRecordCallback(TrainerCallback):
    """Puts the run's record into every checkpoint it saves (main process), so a resume can check it."""

    def __init__(self, record: dict[str, Any]):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            write_record(checkpoint, {**self.record, "checkpoint_step": state.global_step})


def finish_record(output_dir: Path, record: dict[str, Any], global_step: int) -> None:
    """The record in ``output_dir`` says which step the final model there is from."""
    write_record(output_dir, {**record, "finished": {"at": _now(), "global_step": global_step}})
