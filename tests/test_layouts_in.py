"""The layouts users bring, read on real rows: LLaMA-Factory's sharegpt and alpaca rows, typed content parts,
a string prompt beside full conversations.

LLaMA-Factory's sharegpt file is read as published; the other layouts are built from the same
real pairs, and each must give exactly the canonical pair the sharegpt row gives
(:func:`real_rows.expected`, derived from LLaMA-Factory's role tags).
"""

import json
from pathlib import Path

import datasets
import pytest
from real_rows import DATA, ROWS, SAMPLE, SE_COLUMNS, TAGS, expected, messages_of, refused

from hf_dpo import load_preference_dataset, tokenize_dataset
from hf_dpo.data import data_report, read_preference_rows, validate_row
from hf_dpo.data.report import format_data_report

datasets.disable_progress_bars()

# ---------------------------------------------------------------- sharegpt


def test_llamafactory_sharegpt_file_as_published_reads_every_row():
    """All 24 rows (13 single-turn, 6 with a system turn, 4 of five turns, 1 of seven), in order, none skipped."""
    shapes = [tuple(m["from"] for m in row["conversations"]) for row in ROWS]
    counts = [
        shapes.count(("human",)),
        shapes.count(("system", "human")),
        shapes.count(("human", "gpt") * 2 + ("human",)),
    ]
    assert counts == [13, 6, 4] and [len(s) for s in shapes].count(7) == 1 and len(shapes) == 24
    dataset = load_preference_dataset(str(SAMPLE), on_bad_row="skip")
    assert len(dataset) == 24 and list(dataset["row_id"]) == list(range(1, 25))
    assert set(dataset["layout"]) == {"sharegpt"}
    for row, canonical in zip(ROWS, dataset):
        assert messages_of(canonical) == expected(row)
        assert canonical["prompt_text"] == canonical["chosen_text"] == canonical["rejected_text"] == ""
    report = data_report(dataset)
    assert (report.rows_read, report.rows_kept, report.rows_skipped) == (24, 24, 0)
    assert "  layouts     sharegpt 24 (detected per row)" in format_data_report(report).splitlines()


def test_sharegpt_pairs_tokenize_with_the_answer_and_end_of_turn_scored():
    """Every pair tokenizes untruncated; each side's scored tokens are exactly answer + '<|im_end|>\\n'."""
    from hf_dpo.cli.demo import build_tokenizer

    tokenizer = build_tokenizer("chatml")
    tokenized, report = tokenize_dataset(load_preference_dataset(str(SAMPLE)), tokenizer)
    assert len(tokenized) == 24 and report.counters["prompts_truncated"] == 0
    for row, pair in zip(ROWS, tokenized):
        for side in ("chosen", "rejected"):
            ids, mask = pair[f"{side}_input_ids"], pair[f"{side}_response_mask"]
            scored = [t for t, m in zip(ids, mask) if m]
            assert tokenizer.decode(scored) == row[side]["value"] + "<|im_end|>\n"
            assert mask == [0] * mask.index(1) + [1] * len(scored)


def test_system_column_and_system_turn():
    """A 'system' column is the system turn of a row without one; a leading system turn wins over the column."""
    no_system, with_system = ROWS[0], ROWS[1]
    system_text = with_system["conversations"][0]["value"]
    canonical = validate_row({**no_system, "system": system_text})
    assert canonical["prompt"] == [{"role": "system", "content": system_text}] + expected(no_system)["prompt"]
    canonical = validate_row({**with_system, "system": "Answer in French."})
    assert messages_of(canonical) == expected(with_system)


def test_openai_tagged_rows_read_with_a_column_mapping():
    """LLaMA-Factory's "openai" tags (role/content in a 'messages' column): mapped onto 'conversations'."""
    for row in ROWS[:6]:
        tagged = {
            "messages": [{"role": TAGS[m["from"]], "content": m["value"]} for m in row["conversations"]],
            "chosen": {"role": "assistant", "content": row["chosen"]["value"]},
            "rejected": {"role": "assistant", "content": row["rejected"]["value"]},
        }
        canonical = validate_row(tagged, columns={"conversations": "messages"})
        assert canonical["layout"] == "sharegpt" and messages_of(canonical) == expected(row)


def tool_row():
    """The real glaive tool-call conversation as a preference pair: its last answer chosen, its second rejected."""
    row = json.loads((DATA / "llamafactory_glaive_toolcall_row.json").read_text(encoding="utf-8"))[0]
    return {
        "conversations": row["conversations"][:-1],
        "chosen": row["conversations"][-1],
        "rejected": row["conversations"][7],
        "tools": row["tools"],
    }


def test_tool_calls_are_refused_with_the_reason():
    err = refused(tool_row())
    assert (str(err), err.code) == (
        "tools: tool descriptions are not supported (hf_dpo renders plain chat with the model's chat template, "
        "without tools); drop the column or the row",
        "tool_turn",
    )
    row = tool_row()
    del row["tools"]
    err = refused(row)
    assert (str(err), err.code) == (
        "conversations[1].from: a 'function_call' turn: tool calls and tool results are not supported (hf_dpo "
        "renders plain chat with the model's chat template, without tools); drop the row or its tool turns",
        "tool_turn",
    )
    del row["conversations"][1]  # without its call, the result turn is refused too
    assert str(refused(row)).startswith("conversations[1].from: a 'observation' turn: tool calls")
    _, report = read_preference_rows([tool_row(), ROWS[0]], on_bad_row="skip")
    assert (report.rows_kept, dict(report.skipped)) == (1, {"tool_turn": 1})


def test_llamafactory_media_columns_are_refused_as_multimodal():
    err = refused({**ROWS[0], "images": ["mllm_demo_data/1.jpg"]})
    assert (str(err), err.code) == (
        "images: LLaMA-Factory 'images': multimodal pairs are not supported (hf_dpo trains text-only causal "
        "language models); keep text only or drop the row",
        "multimodal",
    )
    assert validate_row({**ROWS[0], "images": []})["layout"] == "sharegpt"  # an empty media column is no media


def test_sharegpt_answer_must_be_one_gpt_message():
    row = ROWS[0]
    err = refused({**row, "chosen": [row["chosen"]]})
    assert (str(err), err.code) == (
        "chosen: expected one message object {'from': 'gpt', 'value': ...} (sharegpt), got list",
        "bad_type",
    )
    err = refused({**row, "rejected": {"from": "human", "value": row["rejected"]["value"]}})
    assert (str(err), err.code) == ("rejected: the answer must be the assistant's ('gpt'), got 'human'", "no_answer")
    err = refused({**row, "conversations": row["conversations"] + [{"from": "gpt", "value": "Sure."}]})
    assert (str(err), err.code) == (
        "conversations[1]: the prompt must end with a human turn, got 'assistant'",
        "bad_role_order",
    )


# ---------------------------------------------------------------- alpaca


def as_alpaca(row):
    """LLaMA-Factory's alpaca preference form of a sharegpt row: system, history pairs, the last instruction."""
    turns = [m for m in row["conversations"] if m["from"] != "system"]
    alpaca = {
        "instruction": turns[-1]["value"],
        "input": "",
        "chosen": row["chosen"]["value"],
        "rejected": row["rejected"]["value"],
    }
    if row["conversations"][0]["from"] == "system":
        alpaca["system"] = row["conversations"][0]["value"]
    if len(turns) > 1:
        alpaca["history"] = [[turns[i]["value"], turns[i + 1]["value"]] for i in range(0, len(turns) - 1, 2)]
    return alpaca


def test_alpaca_rows_give_the_sharegpt_rows_canonical_pairs():
    dataset = load_preference_dataset([as_alpaca(row) for row in ROWS])
    assert set(dataset["layout"]) == {"alpaca"}
    for row, canonical in zip(ROWS, dataset):
        assert messages_of(canonical) == expected(row)


def test_alpaca_input_is_appended_to_the_instruction_after_a_newline():
    """LLaMA-Factory joins instruction and input with '\\n' and leaves an empty one out."""
    row = next(r for r in ROWS if len(r["conversations"]) == 1 and "\n" in r["conversations"][0]["value"])
    text = row["conversations"][0]["value"]
    instruction, rest = text.split("\n", 1)
    base = {"chosen": row["chosen"]["value"], "rejected": row["rejected"]["value"]}
    assert validate_row({**base, "instruction": instruction, "input": rest})["prompt"] == [
        {"role": "user", "content": text}
    ]
    assert validate_row({**base, "instruction": text, "input": ""})["prompt"][0]["content"] == text
    assert validate_row({**base, "instruction": "", "input": text})["prompt"][0]["content"] == text
    err = refused({**base, "instruction": "", "input": ""})
    assert (str(err), err.code) == ("instruction: is empty or whitespace only", "empty_content")


# ---------------------------------------------------------------- typed content parts


def typed(content):
    return [{"type": "text", "text": content}]


def as_typed(row, parts=typed):
    """The conversational (OpenAI) form of a sharegpt row with every content a list of typed parts."""
    canonical = expected(row)
    return {
        side: [{"role": m["role"], "content": parts(m["content"])} for m in canonical[side]]
        for side in ("prompt", "chosen", "rejected")
    }


def test_typed_text_parts_read_as_their_text():
    dataset = load_preference_dataset([as_typed(row) for row in ROWS])
    for row, canonical in zip(ROWS, dataset):
        assert messages_of(canonical) == expected(row)
    assert "content_parts_joined" not in data_report(dataset).counters  # one part each: nothing was joined


def test_several_text_parts_are_joined_with_a_newline_and_counted():
    """Each text split at its newlines into parts: joined with '\\n' it is the text again."""
    dataset = load_preference_dataset([as_typed(row, lambda text: typed_lines(text)) for row in ROWS])
    for row, canonical in zip(ROWS, dataset):
        assert messages_of(canonical) == expected(row)
    with_newline = sum(any("\n" in m["content"] for side in expected(r).values() for m in side) for r in ROWS)
    assert with_newline == 23  # row 22's texts hold no newline
    report = data_report(dataset)
    assert report.counters["content_parts_joined"] == with_newline
    assert f"  joined      {with_newline} row(s) have a message of several text parts, joined with '\\n'" in (
        format_data_report(report).splitlines()
    )


def typed_lines(text):
    return [{"type": "text", "text": line} for line in text.split("\n")]


@pytest.mark.parametrize("part", [{"type": "image"}, {"type": "image_url", "image_url": {"url": "cat.png"}}])
def test_non_text_parts_are_refused_as_multimodal(part):
    row = as_typed(ROWS[0])
    row["prompt"][0]["content"].insert(0, part)
    err = refused(row)
    assert (str(err), err.code) == (
        f"prompt[0].content[0].type: a {part['type']!r} part: multimodal pairs are not supported (hf_dpo trains "
        "text-only causal language models); keep text only or drop the row",
        "multimodal",
    )


# ---------------------------------------------------------------- a string prompt beside full conversations


def as_ultrafeedback(row, prompt=None):
    """The UltraFeedback-binarized form: prompt string, full conversations, messages and scores beside them."""
    canonical = expected(row)
    chosen, rejected = canonical["prompt"] + canonical["chosen"], canonical["prompt"] + canonical["rejected"]
    user = [m for m in canonical["prompt"] if m["role"] == "user"][-1]["content"]
    return {
        "prompt": user if prompt is None else prompt,
        "prompt_id": "0" * 64,
        "chosen": chosen,
        "rejected": rejected,
        "messages": chosen,
        "score_chosen": 8.0,
        "score_rejected": 5.0,
    }


def test_string_prompt_beside_full_conversations_reads_the_conversations():
    dataset = load_preference_dataset([as_ultrafeedback(row) for row in ROWS])
    assert set(dataset["layout"]) == {"prompt_and_conversations"}
    for row, canonical in zip(ROWS, dataset):
        assert messages_of(canonical) == expected(row)
    first_turn = validate_row(as_ultrafeedback(ROWS[4], prompt=ROWS[4]["conversations"][0]["value"]))
    assert messages_of(first_turn) == expected(ROWS[4])  # any of the user turns may be the string


def test_string_prompt_that_is_no_user_turn_is_an_error():
    err = refused(as_ultrafeedback(ROWS[0], prompt=ROWS[2]["conversations"][0]["value"]))
    assert err.code == "prompt_mismatch" and err.field == "prompt"
    assert str(err) == (
        f"prompt: the string {ROWS[2]['conversations'][0]['value'][:50]!r} is none of the user turns of chosen and "
        f"rejected (the last one is {ROWS[0]['conversations'][0]['value'][:50]!r}); the conversations are the "
        "prompt, so the string must repeat one of their user turns"
    )


def test_the_example_rows_of_docs_data_md_read_as_their_layouts():
    """Every JSON row of docs/data.md's "Row layouts" section, in order; the last one with the documented mapping."""
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    section = text[text.index("## Row layouts") : text.index("### What a valid message row is")]
    rows = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", section, re.S)]
    layouts = [validate_row(row)["layout"] for row in rows[:-1]]
    assert layouts == [
        "minimind",
        "conversational",
        "string",
        "prompt_and_conversations",
        "sharegpt",
        "alpaca",
        "conversational",
    ]
    assert validate_row(rows[-1], columns=json.loads(SE_COLUMNS))["layout"] == "string"
    pairs = [json.dumps(messages_of(validate_row(row))) for row in rows[:-1]]
    # One pair in several layouts: MiniMind, the prompt string beside conversations, typed parts; and with a system turn.
    assert pairs[0] == pairs[3] == pairs[6] and pairs[1] == pairs[4]
