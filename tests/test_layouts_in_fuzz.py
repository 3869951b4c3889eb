"""Property: a row of any layout users bring, with one value anywhere replaced by arbitrary JSON, is either a
canonical pair or a DataError; nothing else escapes the data layer (test_fuzz_data.py covers the three plain ones)."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from real_rows import ROWS, SE_COLUMNS, as_stack_exchange, expected

from hf_dpo import DataError
from hf_dpo.data import validate_row


def base_rows(row):
    """The same real pair as sharegpt, alpaca, typed parts, UltraFeedback and mapped columns (with its mapping)."""
    pair = expected(row)
    user = [m for m in pair["prompt"] if m["role"] == "user"][-1]["content"]
    typed = {
        side: [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in pair[side]]
        for side in pair
    }
    return [
        (row, None),
        (
            {"instruction": user, "input": "", "chosen": row["chosen"]["value"], "rejected": row["rejected"]["value"]},
            None,
        ),
        (typed, None),
        (
            {"prompt": user, "chosen": pair["prompt"] + pair["chosen"], "rejected": pair["prompt"] + pair["rejected"]},
            None,
        ),
        (as_stack_exchange(row), json.loads(SE_COLUMNS)),
    ]


BASES = [base for row in ROWS[:6] for base in base_rows(row)]
KEYS = ["from", "value", "role", "content", "type", "text", "conversations", "chosen", "system", "tools", "images"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6) | st.sampled_from(["gpt", "human", "observation"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(KEYS), children, max_size=3),
    max_leaves=8,
)


def paths(value, prefix=()):
    """Every path to a value inside a row (dict keys and list indices)."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from paths(child, (*prefix, key))


@st.composite
def broken_rows(draw):
    row, columns = draw(st.sampled_from(BASES))
    row = json.loads(json.dumps(row))
    path = draw(st.sampled_from([p for p in paths(row) if p]))
    parent = row
    for key in path[:-1]:
        parent = parent[key]
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values)
    return row, columns


@settings(
    max_examples=250, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(case=broken_rows())
def test_a_broken_row_is_a_canonical_pair_or_a_data_error(case):
    row, columns = case
    try:
        canonical = validate_row(row, columns=columns)
    except DataError as err:
        assert err.code and str(err)
        return
    if canonical["layout"] == "string":
        assert all(isinstance(canonical[k], str) and canonical[k].strip() for k in ("prompt_text", "chosen_text"))
        return
    prompt = canonical["prompt"]
    assert prompt and prompt[-1]["role"] == "user"
    assert all(isinstance(m["content"], str) and m["content"].strip() for m in prompt)
    for side in ("chosen", "rejected"):
        assert [m["role"] for m in canonical[side]] == ["assistant"] and canonical[side][0]["content"].strip()
    assert canonical["chosen"] != canonical["rejected"]
