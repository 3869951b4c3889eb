"""The data report says when the chat template adds text the rows do not have (a default system turn)."""

import copy
import json

import datasets
import pytest
from real_rows import DATA, ROWS, SAMPLE

from hf_dpo import load_preference_dataset, tokenize_dataset
from hf_dpo.data.report import format_data_report

datasets.disable_progress_bars()


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's chat template and special tokens on the demo's small vocabulary."""
    import transformers
    from tokenizers import AddedToken, Tokenizer

    from hf_dpo.cli.demo import _base_tokenizer_json

    folder = DATA / "smollm2_135m_instruct"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    tok = Tokenizer.from_str(_base_tokenizer_json())
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    tok.add_special_tokens([AddedToken(config[n], special=True, normalized=False) for n in names])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        **{n: config[n] for n in names},
        chat_template=(folder / "chat_template.jinja").read_text(),
        clean_up_tokenization_spaces=False,
    )


SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_the_templates_default_system_turn_is_counted_and_shown():
    """SmolLM2 writes its own system turn into the 18 sample prompts that have none, not into the 6 that have one."""
    tokenizer = smollm2_tokenizer()
    tokenized, report = tokenize_dataset(load_preference_dataset(str(SAMPLE)), tokenizer)
    without_system = [row for row in ROWS if row["conversations"][0]["from"] != "system"]
    assert len(without_system) == 18
    assert report.counters["template_added_system"] == 18
    assert report.counter_examples["template_added_system"] == [repr(SMOLLM_SYSTEM)]
    prompt = tokenizer.decode(tokenized[0]["chosen_input_ids"][: tokenized[0]["prompt_length"]])
    assert prompt == (
        f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n<|im_start|>user\n"
        f"{ROWS[0]['conversations'][0]['value']}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        "  template    18 pair(s) without a system turn get the chat template's default system text, as at "
        f"inference (e.g. {SMOLLM_SYSTEM!r})"
    ) in format_data_report(report, dataset=tokenized).splitlines()


# A ChatML template that writes "Be brief." when there is no system turn, and one that writes a date line always.
DEFAULTING = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
FIXED = (
    "<|im_start|>system\nToday: 1 Jan 2025\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% endif %}<|im_end|>\n{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)


@pytest.mark.parametrize("template, count, text", [(DEFAULTING, 18, "'Be brief.'"), (FIXED, 0, None)])
def test_only_text_the_template_adds_for_a_missing_system_turn_is_counted(template, count, text):
    """Found by rendering, not by the sentence: any default system text counts; text written on every
    conversation alike is markup and does not."""
    from hf_dpo.cli.demo import build_tokenizer

    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = template
    _, report = tokenize_dataset(load_preference_dataset(str(SAMPLE)), tokenizer)
    assert report.counters.get("template_added_system", 0) == count
    assert report.counter_examples.get("template_added_system", [None])[0] == text


def test_a_row_whose_own_text_holds_the_default_is_not_counted():
    row = copy.deepcopy(ROWS[0])
    row["conversations"][0]["value"] = SMOLLM_SYSTEM + ". " + row["conversations"][0]["value"]
    _, report = tokenize_dataset(load_preference_dataset([row, ROWS[2]]), smollm2_tokenizer())
    assert report.counters["template_added_system"] == 1
