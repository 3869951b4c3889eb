"""Loading preference rows: the three layouts, the source kinds, and the error format.

The exhaustive bad-input cases live in test_data_errors.py.
"""

import json

import datasets
import pytest

from hf_dpo.data import DataError, data_report, load_preference_dataset


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


MINIMIND = {
    "chosen": [user("Opposite of hot?"), assistant("cold")],
    "rejected": [user("Opposite of hot?"), assistant("hot")],
}
CONVERSATIONAL = {"prompt": [user("大的反义词？")], "chosen": [assistant("小")], "rejected": [assistant("大")]}
STRINGS = {"prompt": "Opposite of up:", "chosen": " down", "rejected": " up"}

# The canonical row each layout becomes (row_id aside): message layouts fill the lists, strings the texts.
CANONICAL_MINIMIND = {
    "layout": "minimind",
    "prompt": [user("Opposite of hot?")],
    "chosen": [assistant("cold")],
    "rejected": [assistant("hot")],
    "prompt_text": "",
    "chosen_text": "",
    "rejected_text": "",
}
CANONICAL_CONVERSATIONAL = {
    "layout": "conversational",
    "prompt": [user("大的反义词？")],
    "chosen": [assistant("小")],
    "rejected": [assistant("大")],
    "prompt_text": "",
    "chosen_text": "",
    "rejected_text": "",
}
CANONICAL_STRINGS = {
    "layout": "string",
    "prompt": [],
    "chosen": [],
    "rejected": [],
    "prompt_text": "Opposite of up:",
    "chosen_text": " down",
    "rejected_text": " up",
}


def write_jsonl(path, lines):
    """Each item is a row (dumped as JSON) or a raw string written as is."""
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n" for line in lines),
        encoding="utf-8",
    )
    return path


def test_message_layouts_from_jsonl(tmp_path):
    """MiniMind and conversational rows may share a file; row_id is the physical line (the blank line 2 counts).

    Line 4 is a MiniMind multi-turn row: the shared turns become the prompt, only the final answers differ.
    """
    history = [user("Hi!"), assistant("Hello!"), user("Opposite of hot?")]
    multi = {"chosen": history + [assistant("cold")], "rejected": history + [assistant("hot")]}
    path = write_jsonl(tmp_path / "prefs.jsonl", [MINIMIND, "", CONVERSATIONAL, multi])
    ds = load_preference_dataset(str(path))
    rows = ds.to_list()
    assert rows[0] == {"row_id": 1, **CANONICAL_MINIMIND}
    assert rows[1] == {"row_id": 3, **CANONICAL_CONVERSATIONAL}
    assert rows[2] == {"row_id": 4, **CANONICAL_MINIMIND, "prompt": history}
    report = data_report(ds)
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (3, 3, 0)
    assert report.sources == [str(path)]


def test_string_layout_from_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "strings.jsonl", [STRINGS, {**STRINGS, "chosen": " below", "rejected": " above"}])
    rows = load_preference_dataset(path).to_list()
    assert rows[0] == {"row_id": 1, **CANONICAL_STRINGS}
    assert rows[1]["row_id"] == 2 and (rows[1]["chosen_text"], rows[1]["rejected_text"]) == (" below", " above")


def test_conversational_with_prompt_repeated_inside_answers(tmp_path):
    """Some exports repeat the prompt inside chosen/rejected; an exact repeat is accepted and stripped."""
    row = {
        "prompt": CONVERSATIONAL["prompt"],
        "chosen": CONVERSATIONAL["prompt"] + CONVERSATIONAL["chosen"],
        "rejected": CONVERSATIONAL["prompt"] + CONVERSATIONAL["rejected"],
    }
    rows = load_preference_dataset(write_jsonl(tmp_path / "p.jsonl", [row])).to_list()
    assert rows == [{"row_id": 1, **CANONICAL_CONVERSATIONAL}]


def test_list_and_dataset_inputs():
    """In-memory sources: row_id is the 0-based index; a Dataset and a list give the same rows."""
    rows = [MINIMIND, {"chosen": MINIMIND["chosen"], "rejected": [user("Opposite of hot?"), assistant("warm")]}]
    from_list = load_preference_dataset(rows)
    from_dataset = load_preference_dataset(datasets.Dataset.from_list(rows))
    assert from_list.to_list() == from_dataset.to_list()
    assert from_list[0] == {"row_id": 0, **CANONICAL_MINIMIND}
    assert from_list[1]["row_id"] == 1 and from_list[1]["rejected"] == [assistant("warm")]
    assert data_report(from_list).sources == ["<rows>"] and data_report(from_dataset).sources == ["<dataset>"]
    strings = load_preference_dataset(datasets.Dataset.from_list([STRINGS]))
    assert strings[0] == {"row_id": 0, **CANONICAL_STRINGS}


def test_directory_of_jsonl_files(tmp_path):
    """Files are read in name order; ids stay unique across files and map back to (file, line)."""
    directory = tmp_path / "data"
    directory.mkdir()
    a = write_jsonl(directory / "a.jsonl", [MINIMIND, CONVERSATIONAL])
    b = write_jsonl(directory / "b.jsonl", ["", MINIMIND])
    (directory / "notes.txt").write_text("not data")
    ds = load_preference_dataset(str(directory))
    rows = ds.to_list()
    assert [r["layout"] for r in rows] == ["minimind", "conversational", "minimind"]
    assert len({r["row_id"] for r in rows}) == 3
    report = data_report(ds)
    assert report.sources == [str(a), str(b)] and report.rows_read == 3
    assert [report.locate(r["row_id"]) for r in rows] == [(str(a), 1), (str(a), 2), (str(b), 2)]
    assert report.where(rows[2]["row_id"]) == f"{b}:2"


def test_error_names_file_line_field_reason(tmp_path, monkeypatch):
    """Line 3: a MiniMind row whose rejected side, after the identical prompt, has a user turn where the answer goes."""
    monkeypatch.chdir(tmp_path)
    bad = {
        "chosen": [user("Opposite of hot?"), assistant("cold")],
        "rejected": [user("Opposite of hot?"), user("again")],
    }
    write_jsonl(
        tmp_path / "prefs.jsonl",
        [MINIMIND, MINIMIND | {"rejected": [user("Opposite of hot?"), assistant("warm")]}, bad],
    )
    with pytest.raises(DataError) as info:
        load_preference_dataset("prefs.jsonl")
    assert str(info.value) == "prefs.jsonl:3: rejected[1].role: expected 'assistant', got 'user'"
    assert (info.value.source, info.value.line, info.value.field) == ("prefs.jsonl", 3, "rejected[1].role")
    assert isinstance(info.value, ValueError)

    # Skipping instead: the row is counted under its code with its location as the example.
    ds = load_preference_dataset("prefs.jsonl", on_bad_row="skip")
    report = data_report(ds)
    assert len(ds) == 2 and report.rows_skipped == 1
    assert report.skipped == {info.value.code: 1} and report.skip_examples[info.value.code] == ["prefs.jsonl:3"]


def test_the_readme_layouts_pasted_into_one_file_load_and_tokenize(tmp_path):
    """README's Data block says 'detected per row': its three lines in one file are three rows, each in its own layout."""
    from pathlib import Path

    from hf_dpo import tokenize_dataset
    from hf_dpo.cli.demo import build_tokenizer
    from hf_dpo.data.report import format_data_report

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    data_section = readme[readme.index("## Data") :]
    block = data_section[data_section.index("```jsonl\n") + len("```jsonl\n") :]
    block = block[: block.index("```")]
    assert "detected per row" in data_section[: data_section.index("```jsonl")]
    path = tmp_path / "readme.jsonl"
    path.write_text(block, encoding="utf-8")
    ds = load_preference_dataset(str(path))
    assert [r["layout"] for r in ds] == ["minimind", "conversational", "string"]
    report = data_report(ds)
    assert {k: v for k, v in report.counters.items() if k.startswith("layout_")} == {
        "layout_minimind": 1,
        "layout_conversational": 1,
        "layout_string": 1,
    }
    assert (
        "  layouts     conversational 1, minimind 1, string 1 (detected per row)"
        in format_data_report(report).splitlines()
    )

    tokenizer = build_tokenizer("chatml")
    tokenized, _ = tokenize_dataset(ds, tokenizer, max_length=128, max_prompt_length=64)
    # Message rows go through the chat template, the string row is concatenated raw with EOS appended.
    chosen = [
        tokenizer.decode([t for t, m in zip(ids, mask) if m])
        for ids, mask in zip(tokenized["chosen_input_ids"], tokenized["chosen_response_mask"])
    ]
    prompts = [tokenizer.decode(ids[:n]) for ids, n in zip(tokenized["chosen_input_ids"], tokenized["prompt_length"])]
    assert (
        prompts[0]
        == prompts[1]
        == tokenizer.apply_chat_template([user("Opposite of hot?")], tokenize=False, add_generation_prompt=True)
    )
    assert prompts[2] == "Opposite of hot?"
    assert chosen[2] == " Cold." + tokenizer.eos_token
    assert chosen[0] == chosen[1] and chosen[0].startswith("Cold.")
