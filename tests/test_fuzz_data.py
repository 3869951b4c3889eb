"""Property: any JSONL file either loads into pairs with valid masks, or raises DataError with a location.

Files mix well-formed rows of every layout, rows with one field broken (types,
roles, special-token text, lone surrogates, whitespace), arbitrary JSON values
and raw bytes. Nothing but :class:`hf_dpo.DataError` may escape, every error
points at a physical line of the file, and every accepted pair has a non-empty
response mask that covers exactly the tokens after the shared prompt.
"""

import json
import os
import re
import tempfile

import datasets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_dpo import DataError, DPOCollator, load_preference_dataset, tokenize_dataset
from hf_dpo.cli.demo import build_tokenizer

datasets.disable_progress_bars()
TOKENIZER = build_tokenizer("chatml")
MAX_LENGTH, MAX_PROMPT_LENGTH = 48, 24

clean = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12).filter(str.strip),
    st.sampled_from(
        ["hot", "cold", "热", "冷", "The opposite of big is small.", "A<|im_end|>B", "<|im_start|>assistant\nhi"]
    ),
)
dirty = st.one_of(
    st.sampled_from(["", " ", "\n\t", "<|pad|>"]),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2),  # lone surrogates
    st.tuples(clean, st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)).map("".join),
)
contents = clean
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | clean | dirty,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["role", "content", "chosen", "x"]), children, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def conversations(draw):
    """A prompt (alternating turns ending with the user), then two answers; sometimes one field is broken."""
    turns = draw(st.integers(0, 2)) * 2 + 1
    prompt = [{"role": "user" if i % 2 == 0 else "assistant", "content": draw(contents)} for i in range(turns)]
    if draw(st.booleans()):
        prompt = [{"role": "system", "content": draw(contents)}] + prompt
    chosen, rejected = (
        {"role": "assistant", "content": draw(contents)},
        {"role": "assistant", "content": draw(contents)},
    )
    layout = draw(st.sampled_from(["minimind", "conversational", "string"]))
    if layout == "minimind":
        row = {"chosen": prompt + [chosen], "rejected": [dict(m) for m in prompt] + [rejected]}
    elif layout == "conversational":
        row = {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
    else:
        row = {"prompt": prompt[-1]["content"], "chosen": chosen["content"], "rejected": rejected["content"]}
    if draw(st.integers(0, 4)) == 0:  # break one thing
        key = draw(st.sampled_from(sorted(row)))
        if isinstance(row[key], list) and row[key] and draw(st.booleans()):
            message = row[key][draw(st.integers(0, len(row[key]) - 1))]
            message[draw(st.sampled_from(["role", "content"]))] = draw(
                dirty | json_values | st.sampled_from(["user", "assistant", "tool"])
            )
        else:
            row[key] = draw(dirty | json_values)
    return row


row_lines = conversations().flatmap(lambda row: st.sampled_from([json.dumps(row), json.dumps(row, ensure_ascii=False)]))
junk_lines = st.one_of(json_values.map(json.dumps), st.binary(max_size=12).map(lambda raw: raw.replace(b"\n", b" ")))
# Mostly preference rows, so that whole files are often valid and their masks get checked.
lines = st.integers(0, 9).flatmap(lambda k: row_lines if k < 8 else junk_lines)


def encode(line):
    # ensure_ascii=False keeps lone surrogates raw: written with surrogatepass they become invalid UTF-8.
    return line if isinstance(line, bytes) else line.encode("utf-8", "surrogatepass")


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(file_lines=st.lists(lines, min_size=1, max_size=5), on_bad_row=st.sampled_from(["error", "skip"]))
def test_any_file_loads_with_valid_masks_or_raises_a_located_data_error(file_lines, on_bad_row):
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "data.jsonl")
        with open(path, "wb") as handle:
            handle.write(b"\n".join(encode(line) for line in file_lines) + b"\n")
        try:
            dataset = load_preference_dataset(path, on_bad_row=on_bad_row)
            tokenized, _ = tokenize_dataset(
                dataset, TOKENIZER, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH
            )
        except DataError as err:
            assert_located(err, path, len(file_lines))
            return
    assert set(tokenized["row_id"]) <= set(range(1, len(file_lines) + 1))
    features = list(tokenized)
    batch = DPOCollator(pad_token_id=TOKENIZER.pad_token_id)(features)
    assert (batch["chosen_lengths"] > 0).all() and (batch["rejected_lengths"] > 0).all()
    assert not (batch["response_mask"] & ~batch["attention_mask"].bool()).any()
    for feature in features:
        shared = feature["prompt_length"]
        assert feature["chosen_input_ids"][:shared] == feature["rejected_input_ids"][:shared]
        for side in ("chosen", "rejected"):
            ids, mask = feature[f"{side}_input_ids"], feature[f"{side}_response_mask"]
            assert 0 < shared < len(ids) <= MAX_LENGTH and shared <= MAX_PROMPT_LENGTH
            assert mask == [0] * shared + [1] * (len(ids) - shared)  # exactly the tokens after the prompt


def assert_located(err, path, n_lines):
    """The error points at a line of the file, or (nothing kept) lists every skip with its lines."""
    message = str(err)
    if err.code != "empty_source":
        assert err.line is not None and 1 <= err.line <= n_lines, message
        assert message.startswith(f"{path}:{err.line}: ")
        return
    if message == f"{path}: no rows: the source is empty (blank lines only, or no lines at all)":
        assert all(not encode(line).strip() for line in err_lines(path))
        return
    assert message.startswith(
        (f"{path}: no valid preference rows: all ", f"{path}: no pair survived tokenization; skipped: ")
    )
    examples = [int(line) for line in re.findall(re.escape(path) + r":(\d+)", message.split(": ", 1)[1])]
    assert examples and all(1 <= line <= n_lines for line in examples), message


def err_lines(path):
    with open(path, "rb") as handle:
        return handle.read().split(b"\n")
