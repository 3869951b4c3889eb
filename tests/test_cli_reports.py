"""Issue 19 (6, 7, 8, 9, 10, 11): what a short run with an eval split prints and writes, read as a user reads it.

One run of the installed command in a pipe: the tiny demo model on the user's own pairs (with
rows the reader skips, rows that spell a special token, and one prompt longer than the
tokenizer's model_max_length), 3 steps logged every 2, an eval split, no evaluation before
training. Each test checks one defect of the issue against that run's stderr, stdout, summary,
model card and output folder.
"""

import json
import os
import re
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def short_run(hf_dpo_command, tmp_path_factory):
    from hf_dpo.cli.demo import make_preference_rows

    folder = tmp_path_factory.mktemp("reports")
    rows = make_preference_rows(120, seed=9)
    for row in rows[::12]:  # ten rows whose question spells the chat template's end-of-turn marker
        row["chosen"][-2]["content"] += " <|im_end|>"
        row["rejected"][-2]["content"] += " <|im_end|>"
    long_question = " ".join(["tell me the opposite of every word here"] * 200)  # > 1024 tokens, cut to 96
    rows[5]["chosen"][-2]["content"] = rows[5]["rejected"][-2]["content"] = long_question
    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    lines.insert(40, '{"chosen": [}')  # line 41: bad JSON, skipped with --on_bad_row skip
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    output_dir = folder / "out"
    proc = subprocess.run(
        [
            hf_dpo_command,
            "--model_name_or_path",
            "demo",
            "--dataset",
            "pairs.jsonl",
            "--eval_split_size",
            "0.25",
            "--on_bad_row",
            "skip",
            "--max_steps",
            "3",
            "--logging_steps",
            "2",
            "--eval_on_start",
            "false",
            "--per_device_train_batch_size",
            "8",
            "--output_dir",
            str(output_dir),
        ],
        cwd=folder,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return folder, output_dir, proc


def test_eval_on_start_false_shows_no_before_numbers(short_run):
    """Defect 11: the first evaluation was taken as the one before training whatever its step (0.550 -> 0.550)."""
    _, output_dir, proc = short_run
    summary = json.loads((output_dir / "summary.json").read_text())
    held_out = summary["held_out"]
    assert held_out["before"] is None and held_out["after_step"] == 3 and held_out["pairs"] == 30  # 25% of 120
    assert "not evaluated before training: --eval_on_start false" in proc.stdout and " -> " not in proc.stdout
    assert f"loss:             {held_out['after']['loss']:.4f}" in proc.stdout


def test_closing_screen_summary_and_card_agree_and_name_their_steps(short_run):
    """Defect 6: with --max_steps 3 the card printed step 2's metrics under "step 3 of 3"."""
    _, output_dir, _ = short_run
    card = (output_dir / "README.md").read_text()
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    last_loss = [e for e in history if "loss" in e][-1]
    summary_entry = next(e for e in history if "train_loss" in e)
    after = json.loads((output_dir / "summary.json").read_text())["held_out"]["after"]
    assert last_loss["step"] == 2 and summary_entry["step"] == 3  # logged every 2 steps: step 3's arrive at the end
    assert "| metric | train (step 3) | eval (step 3) |" in card
    assert f"| loss | {last_loss['loss']:.4g} (step 2) | {after['loss']:.4g} |" in card
    margins = summary_entry["rewards/margins"]
    assert f"| rewards/margins | {margins:.4g} | {after['rewards/margins']:.4g} |" in card
    assert f"Training loss averaged over the run: {summary_entry['train_loss']:.4g}" in card


def test_a_card_fit_to_publish(short_run):
    """Defect 9: absolute local paths, a relative link to docs/metrics.md, rows named 'train train_loss'."""
    folder, output_dir, _ = short_run
    card = (output_dir / "README.md").read_text()
    assert str(folder) not in card and "/tmp" not in card
    assert "trained from `demo_assets/model`" in card and "- `pairs.jsonl`" in card
    assert re.findall(r"\]\(([^)]*)\)", card) == ["training_curves.png"]  # the only link: the picture beside it
    assert "train train_loss" not in card and not re.search(r"^\| (train|eval) ", card, re.M)  # clean metric names
    assert str(folder) in (output_dir / "hf_dpo_run.json").read_text()  # the local paths live in the run record


def test_the_users_data_writes_no_demo_pairs(short_run):
    """Defect 8: the demo's 640 pairs were written even when the user brought data; only the model asked for is."""
    _, output_dir, _ = short_run
    assert sorted(p.name for p in (output_dir / "demo_assets").iterdir()) == ["model", "tokenizer"]


def test_the_data_reports_name_file_and_line_for_both_splits(short_run):
    """Defect 7: with --eval_split_size the report said 'in-memory rows' and named rows row:231, row:97."""
    _, _, proc = short_run
    err = proc.stderr
    source = "pairs.jsonl"  # as the user named it (the run's working folder holds it)
    assert f"data report (train): {source}\n" in err and f"data report (eval): {source}\n" in err
    assert "in-memory rows" not in err and "row:" not in err
    assert "skipped     bad_json" in err and f"e.g. {source}:41" in err  # the line of the file, not an index
    # Rows 0, 12, ..., 108 spell <|im_end|>; the bad line 41 pushes the later ones down one physical line.
    marked_lines = {i + 1 if i < 40 else i + 2 for i in range(0, 120, 12)}
    per_split = {}
    for split, report in re.findall(r"data report \((train|eval)\): (.*?)(?=\n\S|\Z)", err, re.S):
        per_split[split] = [int(n) for n in re.findall(re.escape(source) + r":(\d+) <\|im_end\|>", report)]
    assert set(per_split) == {"train", "eval"} and all(per_split.values())  # both splits name their rows
    assert set(per_split["train"] + per_split["eval"]) <= marked_lines  # physical lines, not indices after the split
    assert "taken       30 pairs held out (--eval_split_size 0.25, seed 42)" in err
    assert "taken       held out from the 120 training pairs (--eval_split_size 0.25, seed 42)" in err


def test_quiet_logs(short_run):
    """Defect 10 and 11: DeepSpeed's accelerator warning at every run, the tokenizer's length warning for rows we cut
    anyway, an empty 'Dropping untrainable pairs' bar, the data report glued onto a progress bar, pin_memory on CPU."""
    _, _, proc = short_run
    err = proc.stderr
    for noise in (
        "Setting accelerator to CPU",
        "Token indices sequence length",
        "Dropping untrainable pairs",
        "pin_memory",
        "Traceback",
    ):
        assert noise not in err, noise
    checks = [line for line in err.splitlines() if "layout self-check" in line]
    assert len(checks) == 1 and "policy (" in checks[0] and "reference (" in checks[0]
    lines = err.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("data report ("):
            assert lines[i - 1].endswith("hf_dpo.data.report: ") and "%|" not in lines[i - 1], lines[i - 1]


def test_deepspeed_is_imported_only_when_asked_for():
    """Defect 10: accelerate's unwrap (from save_pretrained) imported deepspeed, which warned, at every run."""
    code = (
        "import sys, torch\n"
        "from accelerate.utils.other import extract_model_from_parallel\n"
        "from hf_dpo import DPOConfig\n"
        "from hf_dpo.cli.main import deepspeed_unimported\n"
        "model = torch.nn.Linear(2, 2)\n"
        "with deepspeed_unimported(DPOConfig(output_dir='unused', report_to='none')):\n"
        "    assert extract_model_from_parallel(model) is model\n"
        "print('deepspeed' in sys.modules)\n"
        "extract_model_from_parallel(model)  # outside the run: accelerate's own check again\n"
        "print('deepspeed' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()  # deepspeed is installed (dev extras): only the patch kept it out
    assert lines[0] == "False" and lines[-1] == "True" and "Setting accelerator" not in lines[0]
