"""The column mapping (--dataset_columns, DPOConfig.dataset_columns, load_preference_dataset(columns=...)) and the
one error of a row in no layout, on real rows; docs/data.md's commands run as written."""

import json
import os
import subprocess

import datasets
import pytest
from real_rows import ROWS, SAMPLE, SE_COLUMNS, as_stack_exchange, documented_command, refused

from hf_dpo import DPOConfig, load_preference_dataset
from hf_dpo.data import data_report, read_preference_rows
from hf_dpo.data.report import format_data_report

datasets.disable_progress_bars()


def run_documented(hf_dpo_command, data_file, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = [hf_dpo_command, *documented_command(data_file)]
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((cwd / "outputs" / "demo" / "summary.json").read_text())


def test_the_documented_commands_read_llamafactory_and_mapped_files(hf_dpo_command, tmp_path):
    """docs/data.md's commands, as written, with the demo model: the sharegpt file as published, and mapped columns."""
    (tmp_path / "dpo_en_demo.json").write_bytes(SAMPLE.read_bytes())
    proc, summary = run_documented(hf_dpo_command, "dpo_en_demo.json", tmp_path)
    assert "  layouts     sharegpt 24 (detected per row)" in proc.stderr
    assert summary["global_steps"] == 2  # 24 pairs, 16 per step, one epoch: the demo's defaults

    rows = [as_stack_exchange(row) for row in ROWS[:4]]
    (tmp_path / "stack_exchange.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    proc, summary = run_documented(hf_dpo_command, "stack_exchange.jsonl", tmp_path)
    assert "  columns     prompt <- question, chosen <- response_j, rejected <- response_k" in proc.stderr
    assert summary["global_steps"] == 1


def test_column_mapping_reads_other_names():
    rows = [as_stack_exchange(row) for row in ROWS if len(row["conversations"]) == 1]
    dataset = load_preference_dataset(rows, columns=json.loads(SE_COLUMNS))
    assert set(dataset["layout"]) == {"string"}
    assert [(c["prompt_text"], c["chosen_text"], c["rejected_text"]) for c in dataset] == [
        (r["question"], r["response_j"], r["response_k"]) for r in rows
    ]
    lines = format_data_report(data_report(dataset)).splitlines()
    assert "  columns     prompt <- question, chosen <- response_j, rejected <- response_k" in lines
    assert not any(line.startswith("  layouts") for line in lines)  # one plain layout: nothing to point out


def test_column_mapping_from_the_command_line_and_the_config():
    from hf_dpo.cli.arguments import parse_args

    _, _, args = parse_args(documented_command("stack_exchange.jsonl"))
    assert args.dataset_columns == {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    assert DPOConfig(output_dir="out", dataset_columns={"prompt": "q"}).dataset_columns == {"prompt": "q"}
    for value, message in (
        ("{bad", "--dataset_columns: not valid JSON"),
        ('["prompt"]', '--dataset_columns: expected a JSON object such as {"prompt": "question"}, got list'),
        ('{"question": "prompt"}', "--dataset_columns: 'question' is not a column hf_dpo reads; the keys are"),
        ('{"prompt": ""}', "--dataset_columns: the values must be your data's column names"),
    ):
        with pytest.raises(ValueError) as caught:
            DPOConfig(output_dir="out", dataset_columns=value)
        assert str(caught.value).startswith(message)


def test_trainer_reads_raw_rows_with_the_configs_mapping(tmp_path):
    from hf_dpo import NormalizedDPOTrainer
    from hf_dpo.cli.demo import build_model, build_tokenizer

    tokenizer = build_tokenizer("chatml")
    rows = [as_stack_exchange(row) for row in ROWS[:4]]
    args = DPOConfig(output_dir=str(tmp_path), dataset_columns=SE_COLUMNS, max_length=64, report_to="none")
    trainer = NormalizedDPOTrainer(
        model=build_model(tokenizer), args=args, train_dataset=rows, processing_class=tokenizer
    )
    report = trainer.data_reports["train"]
    assert (report.rows_kept, report.counters["layout_string"], report.columns) == (
        4,
        4,
        {"prompt": "question", "chosen": "response_j", "rejected": "response_k"},
    )


def test_a_mapped_column_the_row_lacks_is_named():
    err = refused({"question": "q", "response_j": "a"}, columns=json.loads(SE_COLUMNS))
    assert (str(err), err.code) == (
        "--dataset_columns names 'response_k' (for 'rejected'), which this row does not have "
        "(keys present: 'question', 'response_j')",
        "missing_field",
    )


UNKNOWN = (
    "no preference layout matches this row (keys present: {keys}). hf_dpo reads: "
    "minimind (chosen, rejected: two message lists identical up to the final assistant answer); "
    "conversational (prompt, chosen, rejected: message lists, one assistant message per answer); "
    "string (prompt, chosen, rejected: strings, concatenated without a chat template); "
    "prompt_and_conversations (prompt: a string; chosen, rejected: full conversations (UltraFeedback-binarized)); "
    "sharegpt (conversations: {{from, value}} messages; chosen, rejected: one {{from: gpt, value}} each "
    "(LLaMA-Factory)); "
    "alpaca (instruction, optional input, system, history; chosen, rejected: strings (LLaMA-Factory)). "
    "For other column names pass a mapping, e.g. --dataset_columns "
    '\'{{"prompt": "question", "chosen": "response_j", "rejected": "response_k"}}\' '
    "(DPOConfig.dataset_columns, load_preference_dataset(columns=...))"
)


@pytest.mark.parametrize(
    "row, keys",
    [
        (as_stack_exchange(ROWS[0]), "'qid', 'question', 'response_j', 'response_k'"),
        (
            {"dialog": ROWS[0]["conversations"], "chosen": ROWS[0]["chosen"], "rejected": ROWS[0]["rejected"]},
            "'chosen', 'dialog', 'rejected'",
        ),
    ],
    ids=["stack_exchange_columns", "sharegpt_renamed_messages"],
)
def test_a_row_in_no_layout_gets_one_error_naming_keys_layouts_and_the_mapping(row, keys):
    err = refused(row)
    assert (str(err), err.code) == (UNKNOWN.format(keys=keys), "unknown_layout")


def test_every_row_in_no_layout_is_skipped_under_that_code():
    rows = [as_stack_exchange(row) for row in ROWS[:3]] + [ROWS[0]]
    _, report = read_preference_rows(rows, on_bad_row="skip")
    assert (report.rows_kept, dict(report.skipped)) == (1, {"unknown_layout": 3})
