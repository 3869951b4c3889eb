"""One process's failure is every process's, within a bounded time.

A multi-process run fails in three ways, and each gets a bound (docs/reliability.md):

* A check that every process runs on shared numbers (the non-finite loss and gradient
  guards of :mod:`hf_dpo.training.guards`): every process raises the same error at the
  same micro-batch; nothing waits.
* An exception on one process (:func:`relay_failures`, around the trainer's construction
  and ``train()``): that process posts one line, ``rank R failed at step S (rows of the
  step: ...): Error: text``, to the process group's key-value store and waits for the
  others to acknowledge it (at most :data:`FAILURE_GRACE_S`) before it re-raises. Every
  other process reads the line within :data:`FAILURE_POLL_S` (a watcher thread), logs
  it at ERROR and acknowledges; its main thread, usually blocked in a collective with the
  failed process, gets that collective's error once the failed process exits and raises
  :class:`RankFailure` with the same line. A process still running :data:`FAILURE_GRACE_S`
  after reading the line (an NCCL collective does not notice a dead peer) exits with code 1.
* A process that dies without a word (SIGKILL, the OOM killer, a lost node): the others'
  collectives fail after ``step_timeout`` during a training step (:class:`StepTimeouts`)
  and after ``ddp_timeout`` outside one; gloo fails at once when the peer's sockets close,
  and torchrun/``accelerate launch`` stop the other processes as soon as one exits with
  an error (they check every 0.1 s).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from typing import Optional

from transformers import TrainerCallback

from .checkpoints import CheckpointProcesses

logger = logging.getLogger(__name__)

# torchrun gives each restart of the workers a new store; the attempt in the key guards against any that does not.
_ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
FAILURE_KEY = f"hf_dpo/failure/{_ATTEMPT}"
SEEN_KEY = f"hf_dpo/failure_seen/{_ATTEMPT}"
FAILURE_POLL_S = 1.0  # how often each process looks for a failure posted by another
FAILURE_GRACE_S = 5.0  # how long a failed process waits for acknowledgements, and the others for their main thread
MAX_TEXT = 400


class RankFailure(RuntimeError):
    """Another process failed; the message is the line it posted (the one every process logs)."""


def failure_line(rank: int, position: str, error: BaseException) -> str:
    """``rank R failed <position>: ErrorType: first line of the message`` (one line, at most ~500 characters)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."
    if "timed out" in text.lower() or "timeout" in text.lower():
        text += " (a collective operation timed out: another process did not join it in time, see its log)"
    return f"rank {rank} failed {position}: {type(error).__name__}: {text}"


def _default_store():
    """The default process group's store, or None without a process group of several processes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


class _Watcher:
    """This process's one watcher thread: reads a failure that another process posted to the store."""

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        self.seen: Optional[str] = None  # the posted line, once read
        self.handled = False  # the main thread took over: this process is failing on its own
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hf_dpo-failure-watcher", daemon=True)
        self._thread.start()
        # A daemon thread that returns from a store call while the interpreter finalizes is ended inside pybind11's
        # GIL guard, which aborts the process ("terminate called without an active exception") after a run
        # that succeeded; so the thread is stopped and joined before finalization.
        atexit.register(self.stop)

    def stop(self) -> None:
        """End the thread (it finishes its current store call, at most one poll)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * FAILURE_POLL_S + 5.0)

    def read(self) -> Optional[str]:
        """The posted line, or None (also when the store is gone)."""
        if self.seen is None:
            try:
                if self.store.check([FAILURE_KEY]):
                    self.seen = self.store.get(FAILURE_KEY).decode()
            except Exception:  # noqa: BLE001 - a store that is gone means the process hosting it ended
                return None
        return self.seen

    def _acknowledge(self) -> None:
        try:
            self.store.add(SEEN_KEY, 1)
        except Exception:  # noqa: BLE001
            pass

    def _run(self) -> None:
        while not self.handled and not self._stop.wait(FAILURE_POLL_S):
            if self.handled or self.read() is None:
                continue
            logger.error(self.seen)
            self._acknowledge()
            deadline = time.monotonic() + FAILURE_GRACE_S
            while time.monotonic() < deadline:
                if self.handled:
                    return
                time.sleep(0.1)
            logger.error("stopping this process (rank %d): another process failed (above)", self.rank)
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)

    def post(self, line: str) -> Optional[str]:
        """Post this process's failure, or read the one posted first; returns the line of another process, if any."""
        self.handled = True
        try:
            current = self.store.compare_set(FAILURE_KEY, "", line).decode()
        except Exception:  # noqa: BLE001
            logger.error(line)
            return None
        if current != line:
            logger.error(current)
            self._acknowledge()
            return current
        logger.error(line)
        deadline = time.monotonic() + FAILURE_GRACE_S
        try:
            while self.store.add(SEEN_KEY, 0) < self.world - 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        except Exception:  # noqa: BLE001
            pass
        return None


_WATCHER: Optional[_Watcher] = None


def _watcher() -> Optional[_Watcher]:
    global _WATCHER
    store = _default_store()
    if store is None:
        return None
    if _WATCHER is None or _WATCHER.store is not store:
        import torch.distributed as dist

        if _WATCHER is not None:
            _WATCHER.handled = True  # a new process group: the old watcher's store is gone
            _WATCHER.stop()
        _WATCHER = _Watcher(store, dist.get_rank(), dist.get_world_size())
    return _WATCHER


@contextmanager
def failures_relayed(position: Callable[[], str]):
    """Run the body so that an exception in it on one process stops every process with the same line.

    ``position()`` says where the process is (``at step 3 (rows of the step: ...)``). Errors that every process
    raises together (``raised_on_every_rank``, e.g. :class:`~hf_dpo.training.guards.NonFiniteLossError`) are not
    posted. Without a process group of several processes the body runs as it is.
    """
    watcher = _watcher()
    if watcher is None:
        yield
        return
    try:
        yield
    except (Exception, KeyboardInterrupt) as error:
        other = watcher.read()
        if other is not None and not watcher.handled:
            watcher.handled = True  # this error is the consequence of another process's failure
            raise RankFailure(other) from error
        if getattr(error, "raised_on_every_rank", False) or watcher.handled:
            raise
        other = watcher.post(failure_line(watcher.rank, position(), error))
        if other is not None:  # another process posted first: its line is the one every process reports
            raise RankFailure(other) from error
        raise


def relay_failures(*methods: str):
    """Class decorator: run ``methods`` under :func:`failures_relayed`; ``self.guards.position()`` says where
    training is (``before training`` until the guards exist)."""

    def decorate(cls):
        for name in methods:
            setattr(cls, name, _relayed(getattr(cls, name)))
        return cls

    return decorate


def _relayed(method):
    @functools.wraps(method)
    def relayed(self, *args, **kwargs):
        def position() -> str:
            guards = getattr(self, "guards", None)
            return guards.position() if guards is not None else "before training"

        with failures_relayed(position):
            return method(self, *args, **kwargs)

    return relayed


# --------------------------------------------------------------------------- timeouts


def process_groups() -> list:
    """Every process group this process belongs to: the default one, DeepSpeed's, FSDP's device mesh, ..."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if not (dist.is_available() and dist.is_initialized()):
        return []
    return [group for group in list(c10d._world.pg_map) if not c10d._rank_not_in_group(group)]


def set_timeout(seconds: float) -> int:
    """Set the collective timeout of every process group of this process; returns how many took it.

    torch sets a group's timeout when it creates the group (``ddp_timeout`` reaches only the default group, and
    only when TrainingArguments creates it; ``new_group`` uses 30 minutes for gloo, 10 for NCCL) and offers
    ``_set_pg_timeout`` to change it later, for the operations started after the call.
    """
    from torch.distributed import distributed_c10d as c10d

    changed = 0
    for group in process_groups():
        try:
            c10d._set_pg_timeout(timedelta(seconds=seconds), group)
            changed += 1
        except (ValueError, RuntimeError, AttributeError, TypeError):  # a backend without settable timeouts
            continue
    return changed


class StepTimeouts(TrainerCallback):
    """``step_timeout`` for the collectives of each training step (from the run's second step on), ``ddp_timeout``
    for everything else.

    Every process enters a step together (a barrier under ``ddp_timeout``, so that a long save or log on one process
    does not count against the step), then the short timeout holds until the step's end.
    """

    def __init__(self, step_timeout: float, ddp_timeout: float):
        self.step_timeout, self.ddp_timeout = float(step_timeout), float(ddp_timeout)
        self._first_step: Optional[int] = None
        self._short = False

    def _active(self) -> bool:
        import torch.distributed as dist

        return bool(self.step_timeout) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def on_train_begin(self, args, state, control, **kwargs):
        self._first_step = state.global_step
        if self._active():
            set_timeout(self.ddp_timeout)

    def on_step_begin(self, args, state, control, **kwargs):
        # The first step of a run compiles, allocates and checks layouts, and may be much slower on one process.
        if not self._active() or state.global_step == self._first_step:
            return
        import torch
        import torch.distributed as dist

        # NCCL's barrier otherwise guesses the device (and warns); gloo and the others need none.
        nccl = dist.get_backend() == "nccl" and torch.cuda.is_available()
        dist.barrier(**({"device_ids": [torch.cuda.current_device()]} if nccl else {}))
        set_timeout(self.step_timeout)
        self._short = True

    def on_step_end(self, args, state, control, **kwargs):
        if self._short:
            set_timeout(self.ddp_timeout)
            self._short = False


def process_callbacks(args) -> list[TrainerCallback]:
    """The callbacks a trainer adds for its processes: :class:`StepTimeouts` from ``args`` (a DPOConfig) and
    :class:`~hf_dpo.training.checkpoints.CheckpointProcesses`, which lets a resume require every process's files."""
    return [StepTimeouts(args.step_timeout, args.ddp_timeout), CheckpointProcesses(args.world_size)]
