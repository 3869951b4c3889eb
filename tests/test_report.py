"""The one-screen data report, checked against a file whose every count is known by construction."""

import json
import logging
from pathlib import Path

import datasets
import pytest
from cpu_run import cpu_args

from hf_dpo import load_preference_dataset, tokenize_dataset
from hf_dpo.cli.demo import build_tokenizer
from hf_dpo.data import DataReport
from hf_dpo.data.report import format_data_report, length_stats, log_data_reports

datasets.disable_progress_bars()
MAX_LENGTH, MAX_PROMPT_LENGTH = 16, 12

# String layout (raw concatenation, EOS appended), BOM and CRLF line ends. Physical lines:
KNOWN_LINES = [
    {"prompt": "What is the opposite of hot?", "chosen": " cold", "rejected": " hot"},  # 1 kept
    "",  # 2 blank: not a row
    {"prompt": "Opposite of big: sm", "chosen": "all", "rejected": "aller"},  # 3 kept; "sm"+"all" merge into "Ġsmall"
    '{"prompt": "q", "chosen": ',  # 4 bad_json
    {"prompt": "q", "chosen": " same", "rejected": " same"},  # 5 identical_responses
    {"prompt": "word " * 30 + "?", "chosen": " yes", "rejected": " no"},  # 6 kept; 33-token prompt cut to 12
    {"prompt": "q", "chosen": " x"},  # 7 missing_field
    {
        "prompt": "Why?",
        "chosen": " because the quick brown fox jumps over the lazy dog",
        "rejected": " no",
    },  # 8 kept; 14-token answer cut to 12
    {"prompt": "Hi", "chosen": " A<|im_end|>B", "rejected": " no"},  # 9 kept; spells the special token <|im_end|>
    "garbage",  # 10 bad_json
    {"prompt": "q2", "chosen": "  ", "rejected": " no"},  # 11 empty_content
]


@pytest.fixture()
def known_file(tmp_path):
    path = tmp_path / "known.jsonl"
    lines = [line if isinstance(line, str) else json.dumps(line) for line in KNOWN_LINES]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    return path


def expected_report(path):
    """Token counts before truncation (response = its tokens + EOS), from the token lists:

    prompt:   7 (What Ġis Ġthe Ġopposite Ġof Ġhot ?), 6 (Opposite Ġof Ġbig : Ġs m), 33, 4 (W h y ?), 2 (H i)
              -> sorted 2 4 6 7 33: mean 10.4, p50 = 3rd = 6, p95 = 5th = 33
    chosen:   2 (Ġcold EOS), 2 (all EOS, tokenized apart after the merge), 2, 14, 4 (ĠA <|im_end|> B EOS)
              -> sorted 2 2 2 4 14: mean 4.8, p50 2, p95 14
    rejected: 2, 3 (all er EOS), 2, 2, 2 -> mean 2.2, p50 2, p95 3
    """
    return "\n".join(
        [
            f"data report (train): {path}",
            "  rows        10 read, 5 kept, 5 skipped",
            f"  skipped     bad_json                 2  e.g. {path}:4, {path}:10",
            f"  skipped     empty_content            1  e.g. {path}:11",
            f"  skipped     identical_responses      1  e.g. {path}:5",
            f"  skipped     missing_field            1  e.g. {path}:7",
            "  truncated   prompts 1 (oldest tokens dropped), responses 1 (cut from the right)",
            "  merges      1 prompt/response token-boundary merge(s), response tokenized apart",
            f"  special     1 row(s) spell a special token in their text, kept (e.g. {path}:9 <|im_end|>)",
            "  tokens           min    mean     p50     p95     max  (before truncation)",
            "  prompt             2    10.4       6      33      33",
            "  chosen             2     4.8       2      14      14",
            "  rejected           2     2.2       2       3       3",
        ]
    )


def test_length_stats_by_nearest_rank():
    """[1, 2, 3, 4, 100]: mean 110 / 5 = 22; p50 = ceil(2.5) = 3rd = 3; p95 = ceil(4.75) = 5th = 100."""
    assert length_stats([4, 100, 1, 3, 2]) == {"min": 1, "mean": 22.0, "p50": 3, "p95": 100, "max": 100}
    assert length_stats([7]) == {"min": 7, "mean": 7.0, "p50": 7, "p95": 7, "max": 7}
    assert length_stats(list(range(1, 21)))["p95"] == 19  # ceil(0.95 * 20) = 19th


def test_report_of_a_file_with_known_counts(known_file):
    chatml = build_tokenizer("chatml")
    dataset = load_preference_dataset(str(known_file), on_bad_row="skip")
    tokenized, report = tokenize_dataset(dataset, chatml, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH)
    assert list(tokenized["row_id"]) == [1, 3, 6, 8, 9]
    assert format_data_report(report, "train", tokenized) == expected_report(known_file)


def test_trainer_logs_the_report_once_when_training_starts(known_file, tmp_path, caplog, tiny_trainer):
    args = cpu_args(
        tmp_path / "out",
        max_steps=1,
        per_device_train_batch_size=2,
        on_bad_row="skip",
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT_LENGTH,
    )
    trainer = tiny_trainer(args, str(known_file))
    with caplog.at_level(logging.INFO, logger="hf_dpo.data.report"):
        trainer.train()
        trainer.train()  # a second call does not repeat it
    records = [r for r in caplog.records if r.name == "hf_dpo.data.report"]
    # Lines 6 (prompt 33 > 12 tokens) and 8 (14-token answer) are cut: 2 of the 5 kept pairs, over 5%, so a warning too.
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "\n" + expected_report(known_file)),
        (
            logging.WARNING,
            f"train data: truncation touched 2 of 5 pairs (40%) at max_length={MAX_LENGTH}, max_prompt_length="
            f"{MAX_PROMPT_LENGTH}; the loss sees cut prompts and answers: raise the limits if this is not intended",
        ),
    ]


def test_clean_data_is_reported_at_info_level(caplog):
    clean = DataReport(sources=["clean.jsonl"], rows_read=3, rows_kept=3)
    with caplog.at_level(logging.INFO, logger="hf_dpo.data.report"):
        log_data_reports({"eval": (clean, None)})
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.INFO,
            "\ndata report (eval): clean.jsonl\n"
            "  rows        3 read, 3 kept, 0 skipped\n"
            "  skipped     none\n"
            "  truncated   prompts 0 (oldest tokens dropped), responses 0 (cut from the right)\n"
            "  merges      0 prompt/response token-boundary merge(s), response tokenized apart",
        )
    ]


VISIBILITY_SCRIPT = """
import logging, sys
from cpu_run import cpu_args, tiny_trainer
from hf_dpo.cli.demo import build_tokenizer
if sys.argv[2] == "configured":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="CONFIGURED %(name)s %(levelname)s %(message)s")
tokenizer = build_tokenizer("chatml")
for limits in sys.argv[3:]:  # "max_length,max_prompt_length" per run
    max_length, max_prompt_length = map(int, limits.split(","))
    print("RUN", limits, file=sys.stderr, flush=True)
    args = cpu_args(sys.argv[1], max_steps=1, per_device_train_batch_size=2, max_length=max_length,
                    max_prompt_length=max_prompt_length)
    trainer = tiny_trainer(args, 8, tokenizer=tokenizer)
    trainer.train()
    trainer.train()
"""


def _run_visibility_script(tmp_path, mode, *limits):
    """stderr of each run of the script, one per ``"max_length,max_prompt_length"``."""
    import os
    import subprocess
    import sys

    tests = Path(__file__).resolve().parent  # the repository for hf_dpo, tests/ for cpu_run
    path = os.pathsep.join(filter(None, [str(tests.parent), str(tests), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", VISIBILITY_SCRIPT, str(tmp_path / mode), mode, *limits],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = done.stderr.split("RUN ")[1:]
    assert [run.split("\n", 1)[0] for run in runs] == list(limits)
    return runs


def test_report_is_visible_without_logging_setup_and_warns_on_heavy_truncation(tmp_path):
    """No logging configured: the report reaches stderr once anyway (Python would drop an INFO record);
    max_length=8 / max_prompt_length=4 cuts every pair, which is a WARNING of its own."""
    clean, cut = _run_visibility_script(tmp_path, "bare", "256,128", "8,4")
    assert clean.count("data report (train): <rows>") == 1
    assert "[hf_dpo.data.report] INFO: \ndata report (train): <rows>\n  rows        8 read, 8 kept, 0 skipped" in clean
    assert "truncation touched" not in clean

    assert cut.count("data report (train): <rows>") == 1
    assert "[hf_dpo.data.report] WARNING: \ndata report (train)" in cut
    assert "[hf_dpo.data.report] WARNING: train data: truncation touched all of " in cut
    assert "(100%) at max_length=8, max_prompt_length=4" in cut


def test_report_goes_through_configured_logging_only_once(tmp_path):
    (err,) = _run_visibility_script(tmp_path, "configured", "256,128")
    assert err.count("data report (train): <rows>") == 1
    assert "CONFIGURED hf_dpo.data.report INFO \ndata report (train): <rows>" in err
    assert "[hf_dpo.data.report]" not in err  # our own stderr handler stayed out of it


def test_a_json_array_names_its_rows_by_item_and_a_subset_keeps_file_lines(tmp_path):
    """Issue 19 (7): a JSON array has no useful lines (its rows are file:item N), and a split or selection of the
    loaded pairs used to lose the sources: the report said 'in-memory rows' and named rows row:231."""
    from hf_dpo.data import with_report
    from hf_dpo.data.reading import data_report

    rows = [KNOWN_LINES[0], {"prompt": "q", "chosen": " same", "rejected": " same"}, KNOWN_LINES[8], KNOWN_LINES[5]]
    array = tmp_path / "pairs.json"
    array.write_text(json.dumps(rows, indent=2))  # pretty-printed: physical lines mean nothing here
    dataset = load_preference_dataset(array)
    report = data_report(dataset)
    assert report.skip_examples == {"identical_responses": [f"{array}:item 2"]}
    assert [report.where(r) for r in dataset["row_id"]] == [f"{array}:item 1", f"{array}:item 3", f"{array}:item 4"]
    from hf_dpo.data import DataError, read_preference_rows

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([rows[0], {"prompt": "q", "chosen": " x", "rejected": ""}]))
    with pytest.raises(DataError, match=rf"^{bad}:item 2: rejected: is empty or whitespace only$"):
        read_preference_rows(bad)
    # A selection keeps the rows' locations; the counts say how the pairs were taken.
    subset = with_report(dataset.select([1, 2]), report.subset(2, "the last 2 of 3 pairs"))
    tokenized, sub_report = tokenize_dataset(subset, build_tokenizer("chatml"), max_length=MAX_LENGTH)
    text = format_data_report(sub_report, "eval", tokenized)
    # Without max_prompt_length, item 4's 33-token prompt leaves no room for an answer at max_length 16: skipped in
    # tokenization, where the old report (rebuilt without sources for a subset) named it row:4.
    assert text.startswith(f"data report (eval): {array}\n  rows        4 read, 1 kept, 2 skipped\n")
    assert "  taken       the last 2 of 3 pairs\n" in text
    assert f"response_truncated_away      1  e.g. {array}:item 4\n" in text
    assert f"(e.g. {array}:item 3 <|im_end|>)" in text and "in-memory rows" not in text
    # Without with_report (a plain Dataset.select in Python) the locations still hold; only the counts are new.
    _, plain = tokenize_dataset(dataset.select([1]), build_tokenizer("chatml"), max_length=MAX_LENGTH)
    assert plain.sources == [str(array)] and plain.where(dataset["row_id"][1]) == f"{array}:item 3"
