"""hf_dpo.training.faults on a bare 2-process gloo group (no Trainer): the relay of one process's exception to the
other, and the per-step collective timeout. The same mechanisms under a Trainer and every engine are exercised by
tests/test_distributed.py.

This file is also the worker script: ``python tests/test_faults.py SCENARIO RANK PORT OUT``.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_dpo.training.faults import (
    FAILURE_GRACE_S,
    FAILURE_POLL_S,
    StepTimeouts,
    failure_line,
    failures_relayed,
    set_timeout,
)


def test_failure_line_is_one_line_naming_rank_position_and_error():
    error = ValueError("bad row\nsecond line of detail")
    assert failure_line(1, "at step 3 (rows of the step: a.jsonl:4)", error) == (
        "rank 1 failed at step 3 (rows of the step: a.jsonl:4): ValueError: bad row"
    )
    long = failure_line(0, "before training", RuntimeError("x" * 1000))
    assert long == "rank 0 failed before training: RuntimeError: " + "x" * 400 + "..."
    timed_out = failure_line(0, "at step 5 (rows of the step: a:1)", RuntimeError("Timed out waiting 3000ms for recv"))
    assert timed_out.endswith(
        "Timed out waiting 3000ms for recv (a collective operation timed out: another process did not join it in "
        "time, see its log)"
    )


def test_without_a_process_group_nothing_changes():
    with pytest.raises(KeyError, match="plain"):
        with failures_relayed(lambda: "at step 1"):
            raise KeyError("plain")
    assert set_timeout(5.0) == 0
    StepTimeouts(3, 1800).on_step_begin(None, type("State", (), {"global_step": 4})(), None)  # no group: no barrier


def test_the_failure_watcher_is_stopped_before_the_interpreter_ends():
    """A daemon thread still polling the store while the interpreter finalizes is ended inside pybind11's GIL guard,
    which aborts a run that succeeded ("terminate called without an active exception", seen once in CI after a DDP
    run). The watcher stops and joins its thread at exit; here over a real TCPStore, in a process of its own that
    exits while the thread polls."""
    script = (
        "import time, datetime, torch.distributed as dist\n"
        "from hf_dpo.training import faults\n"
        "store = dist.TCPStore('127.0.0.1', 0, 2, True, timeout=datetime.timedelta(seconds=5), wait_for_workers=False)\n"
        "watcher = faults._Watcher(store, 0, 2)\n"
        "time.sleep(1.5 * faults.FAILURE_POLL_S)\n"
        "watcher.stop()\n"
        "assert not watcher._thread.is_alive()\n"
        "faults._Watcher(store, 0, 2)  # left running: atexit stops it\n"
        "print('exiting')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "exiting" in done.stdout and "terminate called" not in done.stderr


# Both processes gone within this many seconds of the failure: the relay's poll and grace, then interpreter teardown,
# which takes 2-10 s on a loaded 2-core machine (against ddp_timeout's 1800 s without the relay).
STOP_BOUND_S = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_pair(scenario, tmp_path, timeout=400):
    """Start the two worker processes (plain ``python``, no launcher: nothing else stops them); returns their
    outputs and exit codes, and each one's OUT/<rank>.json."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, scenario, str(rank), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [proc.communicate(timeout=timeout)[0] for proc in procs]
    ended = time.time()
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    return [proc.returncode for proc in procs], outputs, results, ended


def test_an_exception_on_one_process_stops_the_other_with_the_same_line(tmp_path):
    """Rank 1 raises while rank 0 waits in a barrier: rank 0 logs rank 1's line within the poll interval and raises
    RankFailure with it; both exit non-zero within poll + grace (+ interpreter start and teardown)."""
    codes, outputs, results, ended = run_pair("raise", tmp_path)
    line = "rank 1 failed at step 7 (rows of the step: a.jsonl:3): ValueError: injected"
    assert codes[0] != 0 and codes[1] != 0, outputs
    assert results[1]["error"] == ["ValueError", "injected"]
    assert results[0]["error"] == ["RankFailure", line]
    for output in outputs:
        assert f"ERROR hf_dpo.training.faults: {line}" in output
    # Rank 0's barrier fails once rank 1 has exited (after rank 0 acknowledged the line, within one poll).
    assert results[0]["stopped_at"] - results[1]["failed_at"] < FAILURE_POLL_S + FAILURE_GRACE_S + 10, results
    assert ended - results[1]["failed_at"] < STOP_BOUND_S, outputs


def test_a_hung_process_fails_the_step_after_step_timeout_not_ddp_timeout(tmp_path):
    """Rank 1 stops answering during a step (sleeps): with step_timeout 2 s (ddp_timeout 1800 s), rank 0's all-reduce
    fails after 2 s; rank 0's line reaches rank 1, whose watcher ends it (exit code 1) after the grace period."""
    codes, outputs, results, ended = run_pair("hang", tmp_path)
    assert codes == [1, 1], outputs
    assert 2 <= results[0]["waited"] < 2 + 10, results  # the step's timeout, not the 30 minutes of ddp_timeout
    assert results[0]["timeout_before_step"] == 1800.0 and results[0]["timeout_in_step"] == 2.0
    assert "Timed out" in results[0]["error"][1]
    assert results[0]["error"][0] == "RuntimeError"
    line = outputs[0].split("ERROR hf_dpo.training.faults: ", 1)[1].splitlines()[0]
    assert line.startswith("rank 0 failed at step 2: RuntimeError: ")
    assert f"ERROR hf_dpo.training.faults: {line}" in outputs[1]
    assert "stopping this process (rank 1): another process failed (above)" in outputs[1]


# --------------------------------------------------------------------------- the worker


def _default_group_timeout() -> float:
    import torch
    import torch.distributed as dist

    group = dist.distributed_c10d._get_default_group()
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def worker(scenario, rank, port, out):
    import logging
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=1800)
    )
    result = {}
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    try:
        if scenario == "raise":
            with failures_relayed(lambda: "at step 7 (rows of the step: a.jsonl:3)"):
                if rank == 1:
                    time.sleep(0.5)  # rank 0 is in the barrier by then
                    result["failed_at"] = time.time()
                    Path(out, f"{rank}.json").write_text(json.dumps(result))
                    raise ValueError("injected")
                try:
                    dist.barrier()
                finally:
                    result["stopped_at"] = time.time()
        else:
            timeouts = StepTimeouts(step_timeout=2, ddp_timeout=1800)
            state = type("State", (), {"global_step": 0})()
            timeouts.on_train_begin(None, state, None)
            result["timeout_before_step"] = _default_group_timeout()
            state.global_step = 1  # the run's second step: the short timeout applies
            with failures_relayed(lambda: "at step 2"):
                timeouts.on_step_begin(None, state, None)
                result["timeout_in_step"] = _default_group_timeout()
                if rank == 1:
                    time.sleep(60)
                started = time.time()
                try:
                    dist.all_reduce(torch.ones(4))
                finally:
                    result["waited"] = time.time() - started
    except BaseException as error:
        result["error"] = [type(error).__name__, str(error)]
        raise
    finally:
        Path(out, f"{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
