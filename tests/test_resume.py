"""Kill a training run for real (SIGKILL) after a checkpoint, resume it, and get the uninterrupted run's losses.

The run: 8 pairs, batch 2 (4 steps per epoch), 6 steps, a checkpoint every 2 steps,
fp32 on CPU. It is killed after checkpoint-2, in the middle of the first epoch, so
resuming must skip the batches already seen and then reshuffle the second epoch
exactly as the uninterrupted run did. Before resuming, a partly written
checkpoint-3 (what a kill during saving leaves) is planted: resuming must pass
over it and use checkpoint-2.

This file is also the training script: ``python tests/test_resume.py OUTPUT_DIR DATA [--resume] [--pause-after-save MARKER]``.
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


def run_training(output_dir, data_path, resume=False, pause_marker=None):
    """Train the tiny demo model; returns the trainer. ``pause_marker``: after the first save, write it and sleep."""
    import datasets
    import torch
    from transformers import TrainerCallback

    from hf_dpo import DPOConfig, NormalizedDPOTrainer
    from hf_dpo.cli.demo import build_model, build_tokenizer

    datasets.disable_progress_bars()
    torch.set_num_threads(1)  # the same kernels in the test process and the subprocesses

    class PauseAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            Path(pause_marker).write_text(str(state.global_step))
            time.sleep(600)  # the test kills the process here

    tokenizer = build_tokenizer("chatml")
    model = build_model(tokenizer, hidden_size=16, num_layers=1, num_heads=2, seed=0)
    args = DPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=MAX_STEPS,
        save_steps=SAVE_STEPS,
        logging_steps=1,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = NormalizedDPOTrainer(model=model, args=args, train_dataset=str(data_path), processing_class=tokenizer)
    if pause_marker:
        trainer.add_callback(PauseAfterSave())
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


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path, data_path):
    output_dir, marker = tmp_path / "run", tmp_path / "saved"
    killed = launch(output_dir, data_path, "--pause-after-save", marker)
    try:
        # The uninterrupted run, in this process, while the other one starts up.
        expected = step_losses(run_training(tmp_path / "uninterrupted", data_path).state.log_history)
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert killed.poll() is None, killed.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        if killed.poll() is None:
            os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert marker.read_text() == "2" and sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-2"]

    # What a kill while saving checkpoint-3 leaves: weights cut short, no optimizer, no trainer state.
    partial = output_dir / "checkpoint-3"
    partial.mkdir()
    weights = (output_dir / "checkpoint-2" / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    shutil.copy(output_dir / "checkpoint-2" / "config.json", partial)

    resumed = launch(output_dir, data_path, "--resume")
    out = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, out[-3000:]
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


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    arguments = sys.argv[1:]
    pause = arguments[arguments.index("--pause-after-save") + 1] if "--pause-after-save" in arguments else None
    run_training(arguments[0], arguments[1], resume="--resume" in arguments, pause_marker=pause)
