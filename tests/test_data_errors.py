"""Every bad input a new user brings gets one clear error (file:line: field: reason) or a counted skip.

Each bad-row case is a three-line file: a good row, the bad row on line 2, a good
row. With ``on_bad_row="error"`` the load raises exactly ``<file>:2: <field>: <reason>``;
with ``"skip"`` the two good rows (ids 1 and 3) are kept and the bad one is counted
under its code with ``<file>:2`` as the example.
"""

import json

import datasets
import pytest

from hf_dpo import DataError, load_preference_dataset, tokenize_dataset
from hf_dpo.cli.demo import build_tokenizer
from hf_dpo.data import LAYOUTS, data_report, read_preference_rows

datasets.disable_progress_bars()


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


GOOD = {
    "chosen": [user("Opposite of hot?"), assistant("cold")],
    "rejected": [user("Opposite of hot?"), assistant("hot")],
}
Q = user("q")
# The layouts as the unknown-layout error lists them (tests/test_layouts_in.py checks the list itself).
LAYOUT_LIST = "; ".join(f"{name} ({shape})" for name, shape in LAYOUTS.items())

# (case id, line 2 of the file, expected "field: reason" after "<file>:2: ", skip code)
BAD_ROWS = [
    ("malformed_json", '{"chosen": [', "malformed JSON (Expecting value at column 13)", "bad_json"),
    (
        "rejected_missing",
        json.dumps({"chosen": [Q, assistant("a")]}),
        "rejected: is missing (keys present: 'chosen')",
        "missing_field",
    ),
    (
        "content_number",
        json.dumps({"chosen": [Q, assistant(3)], "rejected": [Q, assistant("b")]}),
        "chosen[1].content: expected a string, got int",
        "bad_type",
    ),
    (
        "content_null",
        json.dumps({"chosen": [Q, assistant("a")], "rejected": [Q, assistant(None)]}),
        "rejected[1].content: expected a string, got null",
        "bad_type",
    ),
    (
        "content_bool",
        json.dumps({"chosen": [user(True), assistant("a")], "rejected": [Q, assistant("b")]}),
        "chosen[0].content: expected a string, got bool",
        "bad_type",
    ),
    (
        "content_object",
        json.dumps({"chosen": [Q, assistant({"text": "a"})], "rejected": [Q, assistant("b")]}),
        "chosen[1].content: expected a string or a list of typed parts, got object",
        "bad_type",
    ),
    (
        "message_without_role",
        json.dumps({"chosen": [Q, {"content": "a"}], "rejected": [Q, assistant("b")]}),
        "chosen[1]: missing 'role'",
        "missing_field",
    ),
    (
        "side_not_a_list",
        json.dumps({"chosen": "a", "rejected": [Q, assistant("b")]}),
        "chosen: expected a list of messages, got string",
        "bad_type",
    ),
    (
        "wrong_role_order",
        json.dumps({"chosen": [Q, user("a")], "rejected": [Q, assistant("b")]}),
        "chosen[1].role: expected 'assistant', got 'user'",
        "bad_role_order",
    ),
    (
        "unknown_role",
        json.dumps({"chosen": [Q, {"role": "bot", "content": "a"}], "rejected": [Q, assistant("b")]}),
        "chosen[1].role: unsupported role 'bot'; expected one of ['system', 'user', 'assistant']",
        "bad_role",
    ),
    (
        "prompts_differ",
        json.dumps({"chosen": [user("q1"), assistant("a")], "rejected": [user("q2"), assistant("b")]}),
        "chosen[0]: differs from rejected[0]; only the final assistant turn may differ between chosen and rejected",
        "prompt_mismatch",
    ),
    (
        "last_turn_user",
        json.dumps({"chosen": [Q, assistant("a"), user("and?")], "rejected": [Q, assistant("b")]}),
        "chosen[2].role: the last turn must be the assistant's answer, got 'user'",
        "no_answer",
    ),
    (
        "several_turn_response",
        json.dumps(
            {"prompt": [Q], "chosen": [assistant("a"), user("u"), assistant("a2")], "rejected": [assistant("b")]}
        ),
        "chosen: expected one assistant turn, got 3 turns",
        "multi_turn_answer",
    ),
    (
        "several_turn_response_minimind",
        json.dumps({"chosen": [Q, assistant("a"), user("u"), assistant("a2")], "rejected": [Q, assistant("b")]}),
        "chosen: has 3 turns before its answer, rejected has 1; only the final assistant turn may differ between chosen and rejected",
        "prompt_mismatch",
    ),
    (
        "empty_response",
        json.dumps({"chosen": [Q, assistant("")], "rejected": [Q, assistant("b")]}),
        "chosen[1].content: is empty or whitespace only",
        "empty_content",
    ),
    (
        "whitespace_response",
        json.dumps({"prompt": "q", "chosen": " \n\t", "rejected": "b"}),
        "chosen: is empty or whitespace only",
        "empty_content",
    ),
    (
        "sft_conversations_row",
        json.dumps({"conversations": [Q, assistant("a")]}),
        "no preference layout matches this row (keys present: 'conversations'). hf_dpo reads: {layouts}. For other "
        "column names pass a mapping, e.g. --dataset_columns "
        '\'{{"prompt": "question", "chosen": "response_j", "rejected": "response_k"}}\' '
        "(DPOConfig.dataset_columns, load_preference_dataset(columns=...))",
        "unknown_layout",
    ),
    (
        "string_prompt_message_sides",
        json.dumps({"prompt": "q", "chosen": [assistant("a")], "rejected": [assistant("b")]}),
        "chosen: is a list of messages without a user turn but 'prompt' is a string; use one layout for all three "
        "fields (strings, or lists of messages), or give chosen and rejected as full conversations",
        "mixed_layouts",
    ),
    (
        "lone_surrogate",
        '{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\\ud800"}], "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}',
        "chosen[1].content: contains a lone surrogate (invalid Unicode)",
        "invalid_text",
    ),
    ("not_an_object", "[1, 2]", "expected a JSON object, got list", "not_an_object"),
]


def write_lines(path, lines, ending=b"\n"):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode("utf-8")) + ending for line in lines))
    return path


@pytest.mark.parametrize(
    "bad_line, expected, code", [case[1:] for case in BAD_ROWS], ids=[case[0] for case in BAD_ROWS]
)
def test_bad_row_raises_with_location_or_is_counted(tmp_path, bad_line, expected, code):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD), bad_line, json.dumps(GOOD)])
    with pytest.raises(DataError) as caught:
        load_preference_dataset(str(path))
    assert str(caught.value) == f"{path}:2: " + expected.format(path=path, layouts=LAYOUT_LIST)
    assert (caught.value.line, caught.value.code) == (2, code)

    rows, report = read_preference_rows(str(path), on_bad_row="skip")
    assert [row["row_id"] for row in rows] == [1, 3]
    assert (report.rows_read, report.rows_kept, dict(report.skipped)) == (3, 2, {code: 1})
    assert report.skip_examples == {code: [f"{path}:2"]}


def test_invalid_utf8_names_line_and_byte(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD), json.dumps(GOOD), b'{"chosen": "caf\xe9"}'])
    with pytest.raises(DataError, match=r"^.*data\.jsonl:3: invalid UTF-8 at byte 15$"):
        load_preference_dataset(str(path))
    _, report = read_preference_rows(str(path), on_bad_row="skip")
    assert dict(report.skipped) == {"invalid_utf8": 1}


def test_bom_crlf_and_blank_lines_are_accepted_with_physical_line_ids(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n\r\n   \r\n" + json.dumps(GOOD).encode() + b"\r\n\n"
    )
    dataset = load_preference_dataset(str(path))
    assert list(dataset["row_id"]) == [1, 4]  # the physical lines; 2 and 3 are blank
    assert dataset[0]["chosen"] == [assistant("cold")]
    report = data_report(dataset)
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (2, 2, 0)


def test_empty_file_is_an_error(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError) as caught:
        load_preference_dataset(str(path))
    assert str(caught.value) == f"{path}: no rows: the source is empty (blank lines only, or no lines at all)"
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    with pytest.raises(DataError, match="no rows: the source is empty"):
        load_preference_dataset(str(tmp_path / "blank.jsonl"), on_bad_row="skip")


def test_file_with_no_valid_row_is_an_error_not_an_empty_run(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["{oops", json.dumps({"chosen": [Q, assistant("a")]}), "{oops"])
    with pytest.raises(DataError) as caught:
        load_preference_dataset(str(path), on_bad_row="skip")
    assert str(caught.value) == (
        f"{path}: no valid preference rows: all 3 rows were skipped: "
        f"bad_json x2 (e.g. {path}:1, {path}:3); missing_field x1 (e.g. {path}:2)"
    )
    assert caught.value.code == "empty_source"


def test_identical_responses_are_skipped_and_counted_even_when_errors_raise(tmp_path):
    same = {"chosen": [Q, assistant("same")], "rejected": [Q, assistant("same")]}
    same_text = {"prompt": "q", "chosen": "x", "rejected": "x"}
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD), json.dumps(same), json.dumps(GOOD)])
    dataset = load_preference_dataset(str(path))  # on_bad_row="error"
    report = data_report(dataset)
    assert list(dataset["row_id"]) == [1, 3]
    assert dict(report.skipped) == {"identical_responses": 1}
    assert report.skip_examples["identical_responses"] == [f"{path}:2"]
    rows, report = read_preference_rows([same_text, {"prompt": "q", "chosen": "x", "rejected": "y"}])
    assert dict(report.skipped) == {"identical_responses": 1} and len(rows) == 1


def test_pretty_printed_json_in_a_jsonl_file_gets_a_hint(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps([GOOD], indent=2))
    with pytest.raises(DataError) as caught:
        load_preference_dataset(str(path))
    assert str(caught.value) == (
        f"{path}:1: malformed JSON (Expecting value at column 2); this looks like a pretty-printed JSON document, "
        "not JSON Lines: name it .json, one array of rows"
    )
    as_json = tmp_path / "data.json"
    as_json.write_text(json.dumps({"data": [GOOD, GOOD]}, indent=2))
    assert list(load_preference_dataset(str(as_json))["row_id"]) == [1, 2]


def test_absurd_json_is_a_bad_json_row_not_a_crash(tmp_path):
    path = write_lines(
        tmp_path / "data.jsonl", [json.dumps(GOOD), "[" * 100_000 + "]" * 100_000, '{"chosen": ' + "9" * 5000 + "}"]
    )
    _, report = read_preference_rows(str(path), on_bad_row="skip")
    assert dict(report.skipped) == {"bad_json": 2}
    with pytest.raises(DataError, match=r"data\.jsonl:2: malformed JSON \(RecursionError"):
        load_preference_dataset(str(path))


def test_directory_rows_get_unique_ids_that_locate_back_to_file_and_line(tmp_path):
    write_lines(tmp_path / "a.jsonl", [json.dumps(GOOD), "", json.dumps(GOOD)])
    write_lines(tmp_path / "b.jsonl", ["{bad", json.dumps(GOOD)])
    dataset = load_preference_dataset(str(tmp_path), on_bad_row="skip")
    report = data_report(dataset)
    assert list(dataset["row_id"]) == [1, 3, 5]  # b.jsonl starts after a.jsonl's last line (3)
    assert [report.where(i) for i in list(dataset["row_id"])] == [
        f"{tmp_path / 'a.jsonl'}:1",
        f"{tmp_path / 'a.jsonl'}:3",
        f"{tmp_path / 'b.jsonl'}:2",
    ]
    assert report.skip_examples == {"bad_json": [f"{tmp_path / 'b.jsonl'}:1"]}


def test_message_keys_other_than_role_and_content_are_counted(tmp_path):
    named = {"chosen": [dict(Q, name="bob"), assistant("a")], "rejected": [Q, assistant("b")]}
    report = data_report(load_preference_dataset([GOOD, named, named]))
    assert report.counters["ignored_message_keys"] == 2


# --------------------------------------------------------------------------- tokenization-level cases


@pytest.fixture(scope="module")
def chatml():
    return build_tokenizer("chatml")


def test_special_token_text_is_kept_counted_and_fully_inside_the_response_mask(chatml, caplog):
    """A literal <|im_end|> in an answer becomes the special token; the mask still covers the whole answer.

    Rendered chosen: ``<|im_start|>user\\nq<|im_end|>\\n<|im_start|>assistant\\n`` (the prompt, 11 tokens:
    <|im_start|> user \\n q <|im_end|> \\n <|im_start|> a s sistant \\n), then the answer
    ``A<|im_end|>B`` and the template's ``<|im_end|>\\n``: tokens A, <|im_end|>, B, <|im_end|>, \\n, all scored.
    """
    rows = [
        {"chosen": [Q, assistant("A<|im_end|>B")], "rejected": [Q, assistant("no")]},
        {"chosen": [Q, assistant("yes")], "rejected": [Q, assistant("no")]},
    ]
    dataset = load_preference_dataset(rows)
    with caplog.at_level("WARNING", logger="hf_dpo.tokenization.special_tokens"):
        tokenized, report = tokenize_dataset(dataset, chatml)
    assert report.counters["special_token_text"] == 1
    assert report.counter_examples["special_token_text"] == ["<rows>:0 <|im_end|>"]
    assert "1 rows contain the text of a special token (e.g. <rows>:0 <|im_end|>)" in caplog.text
    row = tokenized[0]
    ids, mask = row["chosen_input_ids"], row["chosen_response_mask"]
    end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert ids[11:] == [
        chatml.convert_tokens_to_ids("A"),
        end,
        chatml.convert_tokens_to_ids("B"),
        end,
        chatml.convert_tokens_to_ids("Ċ"),
    ]
    assert mask == [0] * 11 + [1] * 5


def test_prompt_too_long_for_any_response_token_is_skipped_and_never_fed(chatml):
    long_prompt = user("word " * 100)
    rows = [GOOD, {"chosen": [long_prompt, assistant("a")], "rejected": [long_prompt, assistant("b")]}]
    tokenized, report = tokenize_dataset(load_preference_dataset(rows), chatml, max_length=24, max_prompt_length=None)
    assert list(tokenized["row_id"]) == [0]
    assert dict(report.skipped) == {"response_truncated_away": 1}
    assert report.skip_examples == {"response_truncated_away": ["<rows>:1"]}
    assert all(
        sum(mask) > 0 for mask in list(tokenized["chosen_response_mask"]) + list(tokenized["rejected_response_mask"])
    )


def test_answers_identical_after_truncation_are_skipped(chatml):
    """'The opposite of hot is cold.' vs '... is hot.' share their first tokens; 3 response tokens make them equal."""
    rows = [
        {
            "chosen": [Q, assistant("The opposite of hot is cold.")],
            "rejected": [Q, assistant("The opposite of hot is hot.")],
        },
        {"chosen": [Q, assistant("yes")], "rejected": [Q, assistant("no")]},
    ]
    tokenized, report = tokenize_dataset(
        load_preference_dataset(rows), chatml, max_length=11 + 3, max_prompt_length=None
    )
    assert dict(report.skipped) == {"identical_after_truncation": 1}
    assert list(tokenized["row_id"]) == [1]


def test_template_failure_is_a_located_data_error_not_a_jinja_crash(tmp_path):
    """The Llama-2 style template raises for a system turn; the error names the file and line."""
    bos = build_tokenizer("bos")
    with_system = {
        "chosen": [{"role": "system", "content": "s"}, Q, assistant("a")],
        "rejected": [{"role": "system", "content": "s"}, Q, assistant("b")],
    }
    path = write_lines(tmp_path / "data.jsonl", [json.dumps(GOOD), json.dumps(with_system)])
    with pytest.raises(DataError) as caught:
        tokenize_dataset(load_preference_dataset(str(path)), bos)
    assert str(caught.value) == (
        f"{path}:2: the chat template failed: TemplateError: the bos template supports user and assistant roles only"
    )
    tokenized, report = tokenize_dataset(load_preference_dataset(str(path)), bos, on_bad_row="skip")
    assert list(tokenized["row_id"]) == [1]
    assert dict(report.skipped) == {"template_error": 1} and report.skip_examples == {"template_error": [f"{path}:2"]}
