"""Real preference rows for the tests of the layouts users bring (tests/data/README.md names every source).

LLaMA-Factory's sharegpt rows as published, and the canonical pair each must give, derived here
on its own from LLaMA-Factory's role tags; other layouts are built from the same rows.
"""

import json
import re
import shlex
from pathlib import Path

import pytest

from hf_dpo import DataError
from hf_dpo.data import validate_row

DATA = Path(__file__).resolve().parent / "data"
SAMPLE = DATA / "llamafactory_dpo_en_sample.json"
ROWS = json.loads(SAMPLE.read_text(encoding="utf-8"))
TAGS = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaMA-Factory's default role tags
SE_COLUMNS = '{"prompt": "question", "chosen": "response_j", "rejected": "response_k"}'


def expected(row):
    """The canonical prompt / chosen / rejected of a sharegpt row, from LLaMA-Factory's tags."""
    return {
        "prompt": [{"role": TAGS[m["from"]], "content": m["value"]} for m in row["conversations"]],
        "chosen": [{"role": "assistant", "content": row["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": row["rejected"]["value"]}],
    }


def messages_of(canonical):
    return {k: canonical[k] for k in ("prompt", "chosen", "rejected")}


def refused(row, **kwargs):
    with pytest.raises(DataError) as caught:
        validate_row(row, **kwargs)
    return caught.value


def as_stack_exchange(row):
    """StackExchange-paired's columns (question, response_j better than response_k), raw text."""
    return {
        "qid": 1,
        "question": "Question: " + row["conversations"][-1]["value"] + "\n\nAnswer: ",
        "response_j": row["chosen"]["value"],
        "response_k": row["rejected"]["value"],
    }


def documented_command(data_file):
    """The arguments of the one docs/data.md command that names ``data_file``."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    lines = [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.splitlines()
        if f"--dataset {data_file}" in line
    ]
    assert len(lines) == 1, lines
    return shlex.split(lines[0])[1:]
