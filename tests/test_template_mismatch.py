"""template_mismatch is raised only where no consistent construction exists, saying what the template did."""

import pytest

from hf_dpo.cli.demo import build_tokenizer
from hf_dpo.data import DataError, load_preference_dataset
from hf_dpo.data.rows import validate_row
from hf_dpo.tokenization import tokenize_dataset, tokenize_row

ROW = {
    "prompt": [{"role": "user", "content": "hi"}],
    "chosen": [{"role": "assistant", "content": "cold."}],
    "rejected": [{"role": "assistant", "content": "hot."}],
}
# Upper-cases the final answer only: the answer as written never appears, so nothing can be scored faithfully.
SHOUTING = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}"
    "{{ m['content'] | upper }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_template_that_rewrites_the_answer_is_refused_with_what_it_did(tmp_path):
    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = SHOUTING
    with pytest.raises(DataError, match="does not render an assistant answer as written.*QSENTINELQ") as err:
        tokenize_row(validate_row(ROW), tokenizer)
    assert err.value.code == "template_mismatch"
    # Through the data set path the error names the row; with on_bad_row="skip" it is counted instead.
    path = tmp_path / "pairs.jsonl"
    import json

    path.write_text(
        json.dumps(ROW) + "\n" + json.dumps({**ROW, "rejected": [{"role": "assistant", "content": "warm."}]}) + "\n"
    )
    with pytest.raises(DataError, match=r"pairs.jsonl:1: .*template"):
        tokenize_dataset(load_preference_dataset(str(path)), tokenizer)
    with pytest.raises(DataError, match="template_mismatch"):
        tokenize_dataset(load_preference_dataset(str(path)), tokenizer, on_bad_row="skip")  # nothing left: an error


def test_plain_template_has_no_rewrite():
    tokenizer = build_tokenizer("chatml")
    out = tokenize_row(validate_row(ROW), tokenizer, completion_turns="all")
    assert out["template_rewrite"] == "" and out["skip_reason"] == ""
