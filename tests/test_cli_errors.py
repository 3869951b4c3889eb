"""Issue 19 (2, 3, 4, 8): every user mistake is one line on stderr and exit status 2, before anything loads or is written.

The command is called in process (``hf_dpo.cli.command``) with the user's argv, as the console
script calls it; one test runs the installed script itself. Each case names the defect it
reproduces: the message used to be a traceback of 25 to 114 lines with the useful line last.
"""

import json
import os
import subprocess
import sys

import pytest

from hf_dpo.cli import command
from hf_dpo.cli.errors import UsageError, is_user_error, raised_on_purpose

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def user_error(argv, capsys) -> str:
    """The one line ``hf-dpo argv`` prints for a user error (it must exit 2 and print nothing else)."""
    with pytest.raises(SystemExit) as exit_info:
        command([str(a) for a in argv])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("hf-dpo: error: "), err
    return err[len("hf-dpo: error: ") :].strip()


@pytest.fixture
def pairs(tmp_path):
    """300 valid demo pairs in a JSONL file."""
    from hf_dpo.cli.demo import make_preference_rows

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_preference_rows(300, seed=3)))
    return path


def test_a_missing_local_model_folder_says_so_before_anything_is_built(tmp_path, pairs, capsys, monkeypatch):
    """Defect 3 and 8: /no/such/dir ended 46 lines later in a hub repo-id error, after the demo model and 640 demo
    pairs had been built and written."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    message = user_error(["--model_name_or_path", "/no/such/dir", "--dataset", pairs, "--output_dir", out], capsys)
    assert message.startswith("--model_name_or_path /no/such/dir: no such folder")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # nothing written


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be at least 1"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be at least 1"),
        (["--per_device_eval_batch_size", "-2"], "--per_device_eval_batch_size -2: must be at least 1"),
        (["--max_train_samples", "0"], "--max_train_samples 0: must be at least 1"),
        (["--eval_split_size", "-0.1"], "--eval_split_size -0.1: must not be negative"),
        (["--eval_split_size", "2.5"], "--eval_split_size 2.5: a count of pairs must be whole"),
        (["--max_steps", "0"], "--max_steps 0 with --num_train_epochs 1 trains nothing"),
        (["--lora_r", "0"], "--lora_r 0: must be at least 1"),
        (["--beta", "0"], "--beta must be > 0, got 0.0"),
        (["--beta", "abc"], "argument --beta: invalid float value: 'abc'"),
        (["--loss_type", "dpo"], "invalid choice: 'dpo'"),
    ],
)
def test_numeric_flags_are_refused_by_name_before_any_model_or_data_loads(flags, expected, tmp_path, capsys):
    """Defect 3: batch size 0 failed after model load and tokenization (range() arg 3 must not be zero),
    accumulation 0 as a bare ZeroDivisionError."""
    out = tmp_path / "out"
    message = user_error([*flags, "--output_dir", out], capsys)
    assert expected in message
    assert not out.exists()


def test_an_eval_split_larger_than_the_data_names_the_flag_and_the_size(tmp_path, pairs, capsys):
    """Defect 3: --eval_split_size 1000 on 300 rows gave datasets' message about test_size."""
    out = tmp_path / "out"
    message = user_error(
        ["--model_name_or_path", "demo", "--dataset", pairs, "--eval_split_size", "1000", "--output_dir", out], capsys
    )
    assert message == (
        "--eval_split_size 1000: the training data has 300 pairs, so holding out 1000 pairs leaves no pair to train "
        "on; give a count below 300 or a fraction below 1"
    )
    assert not out.exists()  # the demo model asked for is built only after the data passed its checks


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--betta", "2"], "unknown argument --betta (did you mean --beta?)"),  # ours
        (["--lerning_rate", "1e-5"], "unknown argument --lerning_rate (did you mean --learning_rate?)"),  # Trainer's
        (["--eval-split_size=0.1x"], "unknown argument --eval-split_size (did you mean --eval_split_size?)"),
        (["--dataset_nme", "x"], "unknown argument --dataset_nme (did you mean --dataset_name?)"),  # TRL's name
        (["--zzz"], "unknown argument --zzz; hf-dpo --help lists the options"),
    ],
)
def test_unknown_flags_get_the_closest_known_names(argv, expected, capsys):
    """Defect 4: --betta 2 got 'Some specified arguments are not used by the HfArgumentParser'."""
    assert expected in user_error(argv, capsys)


def test_mistakes_in_files_and_combinations_are_one_line(tmp_path, pairs, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(pairs.read_text().splitlines()[0] + '\n{"chosen": "only one side"}\n')
    out = str(tmp_path / "out")
    cases = {
        # A data error names file:line (defect 2: DataError arrived as a traceback).
        (
            "--model_name_or_path",
            "demo",
            "--dataset",
            str(bad),
            "--output_dir",
            out,
        ): f"{bad}:2: ",
        (
            "--model_name_or_path",
            "demo",
            "--dataset",
            str(tmp_path / "none.jsonl"),
        ): "--dataset: preference data not found",
        (str(tmp_path / "missing.yaml"),): "missing.yaml: no such config file",
        ("--model_name_or_path", "org/model"): "--model_name_or_path org/model needs --dataset",
        ("--dataset", str(pairs)): "needs --model_name_or_path (your model, or demo for the tiny demo model)",
        ("--resume_from_checkpoint", str(tmp_path / "nope")): "no such directory (or pass true",
        ("--resume_from_checkpoint", "true", "--overwrite_output_dir", "--output_dir", out): "--overwrite_output_dir",
    }
    for argv, expected in cases.items():
        assert expected in user_error(argv, capsys), argv
    (tmp_path / "run.yaml").write_text("beta: [1\n")
    assert "run.yaml: not valid YAML" in user_error([tmp_path / "run.yaml"], capsys)


def test_debug_shows_the_traceback_and_our_bugs_always_do(tmp_path, monkeypatch, capsys):
    with pytest.raises(UsageError, match="--per_device_train_batch_size 0"):
        command(["--per_device_train_batch_size", "0", "--debug"])
    monkeypatch.setenv("HF_DPO_DEBUG", "1")
    with pytest.raises(UsageError):
        command(["--per_device_train_batch_size", "0"])
    monkeypatch.delenv("HF_DPO_DEBUG")

    import hf_dpo.cli.main

    def broken(argv):
        return {}["a bug of ours"]

    monkeypatch.setattr(hf_dpo.cli.main, "main", broken)
    with pytest.raises(KeyError):  # not a user error: the traceback stays
        command([])


def _raise_value_error_on_purpose():
    raise ValueError(
        "--flag: a refusal"  # a raise statement over several lines, as most of ours are
    )


def test_only_refusals_we_raise_count_as_user_errors():
    with pytest.raises(ValueError) as ours:
        _raise_value_error_on_purpose()
    assert not raised_on_purpose(ours.value)  # raised in tests/, not in the hf_dpo package
    from hf_dpo.common.flags import parse_auto_bool

    with pytest.raises(ValueError) as refusal:
        parse_auto_bool("padding_free", "maybe")
    assert raised_on_purpose(refusal.value) and is_user_error(refusal.value)
    with pytest.raises(ValueError) as library:
        int("x")
    assert not is_user_error(library.value)  # a ValueError we did not mean: a bug, with its traceback
    assert is_user_error(UsageError("--x 1: bad"))


def test_the_console_script_prints_one_line_and_exits_2(hf_dpo_command, tmp_path):
    proc = subprocess.run(
        [hf_dpo_command, "--model_name_or_path", "./my-model", "--dataset", "pairs.jsonl"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "hf-dpo: error: --model_name_or_path ./my-model: no such folder (a hub model is named 'name' or 'org/name', "
        "e.g. Qwen/Qwen2.5-0.5B-Instruct)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_the_module_entry_point_is_the_same_command():
    proc = subprocess.run(
        [sys.executable, "-m", "hf_dpo", "--gradient_accumulation_steps", "0"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "hf-dpo: error: --gradient_accumulation_steps 0: must be at least 1 (batches per optimizer step)"
    )


def documented_mistakes():
    """``$ hf-dpo ...`` lines of docs/usage.md's plain code blocks, each with the line the docs say it prints."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text(encoding="utf-8")
    found = []
    for block in re.findall(r"```\n(.*?)```", text, re.S):
        lines = block.splitlines()
        for command_line, printed in zip(lines, lines[1:]):
            if command_line.startswith("$ hf-dpo "):
                found.append(pytest.param(shlex.split(command_line)[2:], printed, id=command_line[2:60]))
    return found


def test_the_docs_show_mistakes():
    assert len(documented_mistakes()) >= 2


@pytest.mark.parametrize("argv, printed", documented_mistakes())
def test_documented_mistakes_print_what_the_docs_show(argv, printed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text("")  # the file the documented command names
    assert "hf-dpo: error: " + user_error(argv, capsys) == printed
