"""Kill a training run for real (SIGKILL) while it saves a checkpoint, resume it, and get the uninterrupted run's losses.

The run: 8 pairs, batch 2 (4 steps per epoch), 6 steps, a checkpoint every 2 steps,
fp32 on CPU. It is killed while saving checkpoint-4 (its weights written, not its
optimizer, scheduler or trainer state), so resuming must pass over checkpoint-4 with a
WARNING naming it, start from checkpoint-2 in the middle of the first epoch, skip the
batches already seen and then reshuffle the second epoch exactly as the uninterrupted run
did. A truncated checkpoint-3 is planted as well (a kill in the middle of a file).

The reference log-prob cache is written atomically: a process killed in the middle of
writing it leaves no cache file, and a truncated one is ignored.

This file is also the training script: ``python tests/test_resume.py OUTPUT_DIR DATA [--resume] [--pause-in-save MARKER]``
and ``python tests/test_resume.py --kill-while-caching PATH``.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MAX_STEPS, SAVE_STEPS = 6, 2


KILLED_IN_SAVE = 4


def run_training(output_dir, data_path, resume=False, pause_marker=None):
    """Train the tiny demo model; returns the trainer. ``pause_marker``: while saving checkpoint-4, once its weights
    are written and before its optimizer, write the marker and sleep (the test kills the process there)."""
    import datasets
    import torch
    from cpu_run import TINY_LLAMA, cpu_args

    from hf_dpo import NormalizedDPOTrainer
    from hf_dpo.cli.demo import build_model, build_tokenizer

    datasets.disable_progress_bars()
    torch.set_num_threads(1)  # the same kernels in the test process and the subprocesses

    class PausingInSave(NormalizedDPOTrainer):
        def _save_optimizer_and_scheduler(self, output_dir):
            if pause_marker and self.state.global_step == KILLED_IN_SAVE:
                Path(pause_marker).write_text(str(self.state.global_step))
                time.sleep(600)
            return super()._save_optimizer_and_scheduler(output_dir)

    tokenizer = build_tokenizer("chatml")
    model = build_model(tokenizer, **TINY_LLAMA, seed=0)
    args = cpu_args(
        output_dir,
        per_device_train_batch_size=2,
        max_steps=MAX_STEPS,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_steps=1,
        learning_rate=1e-2,
        seed=0,
    )
    trainer = PausingInSave(model=model, args=args, train_dataset=str(data_path), processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer


def step_losses(log_history):
    return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}


def launch(*args):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen(
        [sys.executable, __file__, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    from hf_dpo.cli.demo import make_preference_rows

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in make_preference_rows(8, seed=0)))
    return path


def test_sigkill_while_saving_then_resume_reproduces_the_uninterrupted_losses(tmp_path, data_path):
    from hf_dpo.training.checkpoints import checkpoint_problems

    output_dir, marker = tmp_path / "run", tmp_path / "saving"
    killed = launch(output_dir, data_path, "--pause-in-save", marker)
    try:
        # The uninterrupted run, in this process, while the other one starts up.
        expected = step_losses(run_training(tmp_path / "uninterrupted", data_path).state.log_history)
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert killed.poll() is None, killed.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-4 save within 300 s"
            time.sleep(0.2)
    finally:
        if killed.poll() is None:
            os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert marker.read_text() == str(KILLED_IN_SAVE)
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # What the kill left: the weights, written before the kill, and nothing after them.
    killed_checkpoint = output_dir / "checkpoint-4"
    problems = ["trainer_state.json is missing", "optimizer.pt is missing", "scheduler.pt is missing"]
    assert checkpoint_problems(killed_checkpoint) == problems
    assert (killed_checkpoint / "model.safetensors").is_file()
    saved = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["CheckpointProcesses"] == {"args": {"processes": 1}, "attributes": {}}

    # What a kill in the middle of a file leaves: weights cut short, no optimizer, no trainer state.
    partial = output_dir / "checkpoint-3"
    partial.mkdir()
    weights = (output_dir / "checkpoint-2" / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copy(output_dir / "checkpoint-2" / "config.json", partial)

    resumed = launch(output_dir, data_path, "--resume")
    out = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, out[-3000:]
    assert (
        f"WARNING hf_dpo.training.checkpoints: not resuming from {killed_checkpoint}, which is incomplete: {'; '.join(problems)}"
        in out
    )
    assert (
        f"not resuming from {partial}, which is incomplete: trainer_state.json is missing; model.safetensors is truncated"
        in out
    )

    state = json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    losses = step_losses(state["log_history"])
    assert sorted(losses) == sorted(expected) == list(range(1, MAX_STEPS + 1))
    for step in expected:
        assert losses[step] == pytest.approx(expected[step], abs=1e-6), step
    assert len(set(round(v, 6) for v in expected.values())) > 3  # the losses do move: equality is not trivial


def write_complete_checkpoint(directory):
    """What Trainer saves, in miniature: weights, optimizer, scheduler, RNG state, trainer state."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir()
    save_file({"weight": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, str(directory / "model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"state": torch.ones(16)}, directory / name)
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": []}))
    return directory


def test_latest_complete_checkpoint_passes_over_every_kind_of_partial_checkpoint(tmp_path):
    from hf_dpo import DPOConfig
    from hf_dpo.training.checkpoints import checkpoint_problems, latest_complete_checkpoint, resolve_resume_checkpoint

    complete = write_complete_checkpoint(tmp_path / "checkpoint-2")
    assert checkpoint_problems(complete) == []

    def damaged(step, damage):
        target = tmp_path / f"checkpoint-{step}"
        shutil.copytree(complete, target)
        damage(target)
        return target

    def truncate(name):
        return lambda d: (d / name).write_bytes((d / name).read_bytes()[:100])

    cases = {
        "trainer_state.json is missing": lambda d: (d / "trainer_state.json").unlink(),
        "trainer_state.json is unreadable": lambda d: (d / "trainer_state.json").write_text(
            '{"global_step": 3, "log_hi'
        ),
        "model.safetensors is truncated (100 of 328 bytes)": truncate("model.safetensors"),
        "model.safetensors is truncated (4 bytes)": lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 4),
        "model.safetensors has an unreadable header": lambda d: (d / "model.safetensors").write_bytes(
            b"\x02" + b"\x00" * 7 + b"{x"
        ),
        "no model weights": lambda d: (d / "model.safetensors").unlink(),
        "optimizer.pt is truncated or not a torch.save archive": truncate("optimizer.pt"),
        "scheduler.pt is missing": lambda d: (d / "scheduler.pt").unlink(),
        "rng_state.pth is truncated or not a torch.save archive": truncate("rng_state.pth"),
    }
    for step, (problem, damage) in enumerate(cases.items(), start=10):
        target = damaged(step, damage)
        problems = checkpoint_problems(target)
        assert len(problems) == 1 and problems[0].startswith(problem), (problem, problems)
        assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
        shutil.rmtree(target)

    partial = damaged(99, cases["scheduler.pt is missing"])
    args = DPOConfig(output_dir=str(tmp_path), report_to=[])
    assert resolve_resume_checkpoint(True, args) == str(tmp_path / "checkpoint-2")
    with pytest.raises(
        ValueError, match=r"^cannot resume from .*checkpoint-99, which is incomplete: scheduler\.pt is missing$"
    ):
        resolve_resume_checkpoint(str(partial), args)
    shutil.rmtree(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match=r"^resume_from_checkpoint=True: no complete checkpoint-<step> directory in "):
        resolve_resume_checkpoint(True, args)


def test_multiprocess_checkpoints_need_every_process_files(tmp_path):
    """A checkpoint written by 2 processes (CheckpointProcesses in trainer_state.json) needs both RNG states; a DeepSpeed
    checkpoint its 'latest' tag, one whole optimizer partition per process; a torch.distributed.checkpoint folder
    its .metadata (written once every process has written its part)."""
    import torch

    from hf_dpo.training.checkpoints import CheckpointProcesses, checkpoint_problems, saved_processes

    directory = write_complete_checkpoint(tmp_path / "checkpoint-2")
    (directory / "rng_state.pth").rename(directory / "rng_state_0.pth")
    shutil.copy(directory / "rng_state_0.pth", directory / "rng_state_1.pth")
    state = {"global_step": 2, "stateful_callbacks": {"CheckpointProcesses": CheckpointProcesses(2).state()}}
    (directory / "trainer_state.json").write_text(json.dumps(state))
    assert saved_processes(state) == 2 and saved_processes({"global_step": 2}) == 1
    assert checkpoint_problems(directory) == []
    (directory / "rng_state_1.pth").unlink()
    assert checkpoint_problems(directory) == ["rng_state_1.pth is missing"]
    assert checkpoint_problems(directory, require_optimizer=False) == []  # save_only_model writes no RNG state
    shutil.copy(directory / "rng_state_0.pth", directory / "rng_state_1.pth")

    engine = directory / "global_step2"
    engine.mkdir()
    for rank in (0, 1):
        torch.save({"state": torch.ones(4)}, engine / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    torch.save({"module": torch.ones(4)}, engine / "mp_rank_00_model_states.pt")
    assert checkpoint_problems(directory) == ["global_step2 has no 'latest' tag next to it (DeepSpeed writes it last)"]
    (directory / "latest").write_text("global_step2")
    assert checkpoint_problems(directory) == []
    partition = engine / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    partition.write_bytes(partition.read_bytes()[:50])
    assert checkpoint_problems(directory) == [
        "global_step2/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated or not a torch.save archive"
    ]
    partition.unlink()
    assert checkpoint_problems(directory) == ["global_step2 has no optimizer partition of rank 1"]
    shutil.rmtree(engine)
    (directory / "latest").unlink()

    sharded = directory / "pytorch_model_fsdp_0"
    sharded.mkdir()
    (sharded / "__0_0.distcp").write_bytes(b"x")
    assert checkpoint_problems(directory) == [
        "pytorch_model_fsdp_0/.metadata is missing (the sharded state was not finished)"
    ]
    (sharded / ".metadata").write_bytes(b"x")
    assert checkpoint_problems(directory) == []


def test_a_kill_while_writing_the_reference_cache_leaves_no_cache_file(tmp_path):
    """The writer is SIGKILLed after writing part of the file: the cache path never appears (the next run computes
    the sums again); a truncated file at the path, as a non-atomic writer would leave, is ignored with a warning."""
    import torch

    from hf_dpo.reference.cache import _load

    path = tmp_path / "cache" / "key.pt"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    writer = subprocess.run([sys.executable, __file__, "--kill-while-caching", str(path)], env=env, capture_output=True)
    assert writer.returncode == -signal.SIGKILL, writer.stderr.decode()[-2000:]
    assert not path.exists()
    (leftover,) = path.parent.iterdir()
    assert leftover.name.startswith("key.") and leftover.name.endswith(".tmp") and leftover.stat().st_size > 0

    values = {"ref_chosen_logp_sums": torch.arange(1000, dtype=torch.float64)}
    torch.save(values, path)
    assert torch.equal(_load(path, 1000)["ref_chosen_logp_sums"], values["ref_chosen_logp_sums"])
    path.write_bytes(path.read_bytes()[:200])
    assert _load(path, 1000) is None


def _kill_while_caching(path):
    """Write the cache through hf_dpo's writer, with torch.save cut short by a SIGKILL halfway through the file."""
    import io

    import torch

    from hf_dpo.reference import cache

    save = torch.save

    def save_then_die(values, handle):
        data = io.BytesIO()
        save(values, data)
        handle.write(data.getvalue()[: len(data.getvalue()) // 2])
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    cache.torch.save = save_then_die
    cache._save(Path(path), {"ref_chosen_logp_sums": torch.arange(1000, dtype=torch.float64)})


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    arguments = sys.argv[1:]
    if arguments[0] == "--kill-while-caching":
        _kill_while_caching(arguments[1])
    pause = arguments[arguments.index("--pause-in-save") + 1] if "--pause-in-save" in arguments else None
    run_training(arguments[0], arguments[1], resume="--resume" in arguments, pause_marker=pause)
