"""Find the checkpoint to resume from, skipping checkpoints that were only partly written.

``Trainer`` writes a checkpoint file by file into ``checkpoint-<step>/`` (weights,
optimizer, scheduler, RNG state, then ``trainer_state.json``), with no atomic
rename, and ``transformers.trainer_utils.get_last_checkpoint`` picks the highest
step number whatever its contents. A run killed while saving therefore leaves a
newest checkpoint that cannot be resumed. :func:`latest_complete_checkpoint`
checks what each checkpoint holds, newest first, and returns the first complete one.

Under several processes each one writes its own files (its RNG state; under DeepSpeed its
optimizer partition), and the main process may write ``trainer_state.json`` while another
process is still writing, or after it died. :class:`CheckpointProcesses` records in
``trainer_state.json`` how many processes wrote the checkpoint, so that every process's
files can be required.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Optional, Union

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")
DEEPSPEED_PARTITION = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


class CheckpointProcesses(TrainerCallback, ExportableState):
    """Saved in each checkpoint's ``trainer_state.json`` (``stateful_callbacks``): the number of processes that wrote it.

    Trainer rebuilds it from ``args`` when ``restore_callback_states_from_checkpoint`` is set; it does nothing else.
    """

    def __init__(self, processes: int = 1):
        self.processes = int(processes)

    def state(self) -> dict:
        return {"args": {"processes": self.processes}, "attributes": {}}


def saved_processes(trainer_state: dict) -> int:
    """How many processes wrote a checkpoint, from its ``trainer_state.json`` (1 when it does not say)."""
    saved = (trainer_state.get("stateful_callbacks") or {}).get(CheckpointProcesses.__name__) or {}
    if isinstance(saved, list):
        saved = saved[-1] if saved else {}
    return int((saved.get("args") or {}).get("processes", 1))


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why a ``.safetensors`` file is unreadable (cut short, or a header that does not parse), or None.

    The format is an 8-byte little-endian header size, a JSON header whose
    ``data_offsets`` give every tensor's byte range, then the data.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (header_size,) = struct.unpack("<Q", head)
        if size < 8 + header_size:
            return f"{path.name} is truncated ({size} of at least {8 + header_size} bytes)"
        try:
            header = json.loads(handle.read(header_size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"{path.name} has an unreadable header"
    if size < 8 + header_size + end:
        return f"{path.name} is truncated ({size} of {8 + header_size + end} bytes)"
    return None


def _torch_file_problem(path: Path) -> Optional[str]:
    # torch.save writes a zip archive; a cut-off file has no central directory at its end.
    return None if zipfile.is_zipfile(path) else f"{path.name} is truncated or not a torch.save archive"


def _file_problem(path: Path) -> Optional[str]:
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _torch_file_problem(path)
    return None


def _weights_problems(directory: Path) -> list[str]:
    for name in INDEX_FILES:
        index = directory / name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError):
                return [f"{name} is unreadable"]
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                return [f"weight shard {missing[0]} is missing"]
            return [p for p in (_file_problem(directory / s) for s in shards) if p]
    present = [directory / name for name in WEIGHT_FILES if (directory / name).is_file()]
    if present:
        return [p for p in (_file_problem(path) for path in present) if p]
    # FSDP and DeepSpeed keep their sharded states in sub-directories.
    if any(
        child.is_dir() and (child.name.startswith("pytorch_model_fsdp") or child.name.startswith("global_step"))
        for child in directory.iterdir()
    ):
        return []
    return ["no model weights"]


def checkpoint_problems(
    directory: Union[str, os.PathLike], require_optimizer: bool = True, required_files: tuple[str, ...] = ()
) -> list[str]:
    """Everything that keeps ``directory`` from being resumed; empty for a complete checkpoint.

    Complete means: ``trainer_state.json`` parses, the model (or adapter) weights
    are all there and not truncated, and, unless ``require_optimizer=False``
    (``save_only_model``), ``optimizer.pt`` and ``scheduler.pt`` are intact. Any
    RNG state file present must be intact too, and so must ``required_files``
    (what a callback saves after ``trainer_state.json``, e.g. TR-DPO's synced reference).
    """
    directory = Path(directory)
    problems = []
    state = directory / "trainer_state.json"
    processes = 1
    try:
        trainer_state = json.loads(state.read_text())
        trainer_state["global_step"]
        processes = saved_processes(trainer_state)
    except FileNotFoundError:
        problems.append("trainer_state.json is missing")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        problems.append("trainer_state.json is unreadable")
    problems += _weights_problems(directory)
    sharded_optimizer = any(
        child.is_dir() and child.name.startswith(("global_step", "optimizer_")) for child in directory.iterdir()
    )
    if require_optimizer and not sharded_optimizer:
        for name in OPTIMIZER_FILES:
            path = directory / name
            if name == "optimizer.pt" and not path.is_file() and (directory / "optimizer.bin").is_file():
                path = directory / "optimizer.bin"  # FSDP's full optimizer state (accelerate's save_fsdp_optimizer)
            problem = f"{name} is missing" if not path.is_file() else _file_problem(path)
            if problem:
                problems.append(problem)
    for name in required_files:
        path = directory / name
        problem = f"{name} is missing" if not path.is_file() else _file_problem(path)
        if problem:
            problems.append(problem)
    if require_optimizer and processes > 1:
        problems += [
            f"rng_state_{r}.pth is missing"
            for r in range(processes)
            if not (directory / f"rng_state_{r}.pth").is_file()
        ]
    for path in sorted(directory.glob("rng_state*.pth")):
        problem = _file_problem(path)
        if problem:
            problems.append(problem)
    problems += _engine_state_problems(directory, processes if require_optimizer else 0)
    return problems


def _engine_state_problems(directory: Path, processes: int) -> list[str]:
    """DeepSpeed's ``global_step*/`` (every file whole, its ``latest`` tag, one optimizer partition per process) and
    torch.distributed.checkpoint directories (``.metadata``, written once every process has written its part)."""
    problems = []
    for child in sorted(p for p in directory.iterdir() if p.is_dir()):
        if child.name.startswith("global_step"):
            if not (directory / "latest").is_file():
                problems.append(f"{child.name} has no 'latest' tag next to it (DeepSpeed writes it last)")
            files = sorted(child.glob("*.pt"))
            problems += [f"{child.name}/{p}" for p in (_file_problem(f) for f in files) if p]
            ranks = {int(m.group(1)) for f in files if (m := DEEPSPEED_PARTITION.search(f.name))}
            problems += [
                f"{child.name} has no optimizer partition of rank {r}"
                for r in range(processes)
                if ranks and r not in ranks
            ]
        elif child.name.startswith(("pytorch_model_fsdp", "optimizer_")) and not (child / ".metadata").is_file():
            problems.append(f"{child.name}/.metadata is missing (the sharded state was not finished)")
    return problems


def latest_complete_checkpoint(
    output_dir: Union[str, os.PathLike], require_optimizer: bool = True, required_files: tuple[str, ...] = ()
) -> Optional[str]:
    """The highest-step ``checkpoint-<step>`` under ``output_dir`` with no :func:`checkpoint_problems`, or None.

    Skipped incomplete checkpoints are logged with their problems.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    candidates = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))
    ]
    for _, path in sorted(candidates, reverse=True):
        problems = checkpoint_problems(path, require_optimizer, required_files)
        if not problems:
            return str(path)
        logger.warning("not resuming from %s, which is incomplete: %s", path, "; ".join(problems))
    return None


def resolve_resume_checkpoint(
    resume_from_checkpoint: Union[str, bool, None], args, required_files: tuple[str, ...] = ()
) -> Union[str, None]:
    """What ``Trainer.train`` should resume from: ``True`` becomes the latest complete checkpoint of ``args.output_dir``.

    Raises ``ValueError`` when ``True`` finds no complete checkpoint, or when an
    explicit path is incomplete, naming what is missing (``required_files``: see :func:`checkpoint_problems`).
    """
    require_optimizer = not getattr(args, "save_only_model", False)
    if resume_from_checkpoint is True:
        found = _main_process_choice(latest_complete_checkpoint(args.output_dir, require_optimizer, required_files))
        if found is None:
            raise ValueError(
                f"resume_from_checkpoint=True: no complete checkpoint-<step> directory in {args.output_dir}"
            )
        logger.info("resuming from %s", found)
        return found
    if isinstance(resume_from_checkpoint, (str, os.PathLike)) and Path(resume_from_checkpoint).is_dir():
        problems = checkpoint_problems(resume_from_checkpoint, require_optimizer, required_files)
        if problems:
            raise ValueError(f"cannot resume from {resume_from_checkpoint}, which is incomplete: {'; '.join(problems)}")
    return resume_from_checkpoint


def _main_process_choice(found: Optional[str]) -> Optional[str]:
    """The main process's choice, on every process: a file system that shows the processes different states of the
    folder (a network file system's cache) must not make them resume from different checkpoints."""
    from accelerate import PartialState

    if PartialState().num_processes == 1:
        return found
    from accelerate.utils import broadcast_object_list

    choice = [found]
    broadcast_object_list(choice)
    return choice[0]
