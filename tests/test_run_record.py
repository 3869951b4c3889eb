"""Issue 19 (1): two runs never mix in one output folder; the run record says which run a folder and a checkpoint hold.

The sequence of the issue, reproduced with the command in process: an older run left
``checkpoint-9``; a new run into the same folder wrote ``checkpoint-3`` and ``checkpoint-6``
beside it, and ``--resume_from_checkpoint true`` then resumed from the stale ``checkpoint-9``,
trained 0 steps and saved the old run's weights over the new run's final model.
"""

import hashlib
import json
import shutil

import pytest

from hf_dpo.cli import command
from hf_dpo.cli.errors import UsageError
from hf_dpo.cli.main import main
from hf_dpo.cli.run_record import (
    RECORD_NAME,
    check_output_dir,
    data_fingerprint,
    differences,
    read_record,
    write_record,
)


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoints(folder) -> list[str]:
    return sorted((p.name for p in folder.glob("checkpoint-*")), key=lambda name: int(name.split("-")[1]))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from hf_dpo.cli.demo import make_preference_rows

    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_preference_rows(48, seed=4)))
    return path


def flags(pairs, out, steps, save_steps, beta, extra=()):
    return [
        "--model_name_or_path",
        "demo",
        "--dataset",
        str(pairs),
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "4",
        "--max_steps",
        str(steps),
        "--save_strategy",
        "steps",
        "--save_steps",
        str(save_steps),
        "--beta",
        str(beta),
        "--logging_steps",
        "1",
        "--plot",
        "false",
        "--disable_tqdm",
        "true",
        *extra,
    ]


def test_runs_in_one_folder_never_mix(pairs, tmp_path, capsys):
    out = tmp_path / "out"
    main(flags(pairs, out, steps=9, save_steps=9, beta=2.0))  # run A: the older run
    assert checkpoints(out) == ["checkpoint-9"]
    stale = tmp_path / "stale-checkpoint-9"
    shutil.copytree(out / "checkpoint-9", stale)
    record_a = read_record(out)
    assert record_a["finished"]["global_step"] == 9 and read_record(stale)["run_id"] == record_a["run_id"]
    final_a = sha(out / "model.safetensors")

    # A new run into the folder stops, in one line, before it writes anything.
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        command(flags(pairs, out, steps=6, save_steps=3, beta=1.0))
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        f"hf-dpo: error: --output_dir {out} holds the checkpoints of another run (checkpoint-9); pass "
        "--overwrite_output_dir to remove them and start over, or --resume_from_checkpoint true to continue that run\n"
    )
    assert checkpoints(out) == ["checkpoint-9"] and sha(out / "model.safetensors") == final_a

    # --overwrite_output_dir removes the old checkpoints first: run B writes 3 and 6 alone.
    main(flags(pairs, out, steps=6, save_steps=3, beta=1.0, extra=["--overwrite_output_dir"]))
    assert checkpoints(out) == ["checkpoint-3", "checkpoint-6"]
    record_b = read_record(out)
    assert record_b["run_id"] != record_a["run_id"] and record_b["identity"]["loss"]["beta"] == 1.0
    assert read_record(out / "checkpoint-6")["run_id"] == record_b["run_id"]
    final_b = sha(out / "model.safetensors")
    assert final_b == sha(out / "checkpoint-6" / "model.safetensors") != final_a

    # The state: the old run's checkpoint-9 beside the new run's 3 and 6. Resuming refuses it, naming why.
    shutil.copytree(stale, out / "checkpoint-9")
    with pytest.raises(UsageError) as foreign:
        main(flags(pairs, out, steps=6, save_steps=3, beta=1.0, extra=["--resume_from_checkpoint", "true"]))
    assert str(foreign.value) == (
        "--resume_from_checkpoint: checkpoint-9 belongs to another configuration (loss.beta: 2.0 in the checkpoint, "
        "1.0 now); resume with that run's settings, or start over with --overwrite_output_dir"
    )
    assert sha(out / "model.safetensors") == final_b  # the final model was not touched

    # A checkpoint-9 of the same configuration but of another run is stale too.
    other = tmp_path / "other"
    main(flags(pairs, other, steps=9, save_steps=9, beta=1.0))
    shutil.rmtree(out / "checkpoint-9")
    shutil.copytree(other / "checkpoint-9", out / "checkpoint-9")
    with pytest.raises(UsageError, match=r"checkpoint-9 was written by another run \(started .*\), not by the last"):
        main(flags(pairs, out, steps=9, save_steps=3, beta=1.0, extra=["--resume_from_checkpoint", "true"]))
    assert sha(out / "model.safetensors") == final_b

    # Without it, resuming continues run B from its own newest checkpoint.
    shutil.rmtree(out / "checkpoint-9")
    summary = main(flags(pairs, out, steps=9, save_steps=3, beta=1.0, extra=["--resume_from_checkpoint", "true"]))
    assert summary["global_steps"] == 9 and checkpoints(out) == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]
    resumed = read_record(out)
    assert resumed["run_id"] == record_b["run_id"] and resumed["started"] == record_b["started"]
    assert [entry["from"] for entry in resumed["resumed"]] == [str(out / "checkpoint-6")]
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == list(range(1, 10))  # steps 1-6 restored, 7-9 trained


def test_true_passes_over_a_checkpoint_without_a_record(pairs, tmp_path, caplog):
    """A kill between Trainer's save and the record leaves a checkpoint nothing vouches for: never resumed unchecked."""
    out = tmp_path / "out"
    main(flags(pairs, out, steps=4, save_steps=2, beta=1.0))
    (out / "checkpoint-4" / RECORD_NAME).unlink()
    summary = main(flags(pairs, out, steps=5, save_steps=2, beta=1.0, extra=["--resume_from_checkpoint", "true"]))
    assert summary["global_steps"] == 5
    assert read_record(out)["resumed"][-1]["from"] == str(out / "checkpoint-2")
    assert f"not resuming from {out / 'checkpoint-4'}: it has no run record" in caplog.text
    for name in checkpoints(out):  # checkpoint-2 and the rewritten checkpoint-4
        (out / name / RECORD_NAME).unlink()
    with pytest.raises(UsageError, match="no complete checkpoint-<step> folder with a run record"):
        main(flags(pairs, out, steps=6, save_steps=2, beta=1.0, extra=["--resume_from_checkpoint", "true"]))


def test_the_record_is_replaced_atomically(tmp_path, monkeypatch):
    write_record(tmp_path, {"run_id": "first"})

    def interrupted(src, dst):
        raise OSError("killed while renaming")

    monkeypatch.setattr("hf_dpo.cli.run_record.os.replace", interrupted)
    with pytest.raises(OSError):
        write_record(tmp_path, {"run_id": "second"})
    assert read_record(tmp_path) == {"run_id": "first"}  # the old record whole, never half of a new one
    monkeypatch.undo()
    write_record(tmp_path, {"run_id": "third"})
    assert read_record(tmp_path) == {"run_id": "third"}


def test_the_data_fingerprint_follows_the_pairs_not_the_file_name(tmp_path, pairs):
    from hf_dpo import load_preference_dataset

    copy = tmp_path / "copy.jsonl"
    shutil.copy(pairs, copy)
    lines = pairs.read_text().splitlines(keepends=True)
    changed = tmp_path / "changed.jsonl"
    last = json.loads(lines[-1])
    last["chosen"][-1]["content"] += "!"
    changed.write_text("".join(lines[:-1]) + json.dumps(last, ensure_ascii=False) + "\n")
    reordered = tmp_path / "reordered.jsonl"
    reordered.write_text("".join(lines[1:] + lines[:1]))
    first, second = (data_fingerprint(load_preference_dataset(p)) for p in (pairs, copy))
    assert first == second and first.startswith("sha256:") and first.endswith("(48 pairs)")
    assert data_fingerprint(load_preference_dataset(changed)) != first  # one character of one answer
    assert data_fingerprint(load_preference_dataset(reordered)) != first  # the same pairs in another order


def test_differences_name_each_setting_and_the_folder_check_offers_both_ways_out(tmp_path):
    saved = {"model": "demo", "loss": {"beta": 2.0, "loss_type": "sigmoid"}, "global batch": 16}
    now = {"model": "demo", "loss": {"beta": 2.0, "loss_type": "ipo"}, "global batch": 8}
    assert differences(saved, now) == [
        "global batch: 16 in the checkpoint, 8 now",
        "loss.loss_type: sigmoid in the checkpoint, ipo now",
    ]
    from hf_dpo import DPOConfig

    (tmp_path / "checkpoint-4").mkdir()
    args = DPOConfig(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(UsageError, match="holds the checkpoints of another run \\(checkpoint-4\\)"):
        check_output_dir(args, overwrite=False)
    check_output_dir(args, overwrite=True)  # removed later, once the inputs passed their checks
    args.resume_from_checkpoint = True
    check_output_dir(args, overwrite=False)
