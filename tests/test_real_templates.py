"""The scoring rule on the eleven real chat templates of tests/data/chat_templates/.

For every template and every case: the unscored ids are exactly the tokenized
inference-time prompt (``apply_chat_template(prompt, add_generation_prompt=True)``),
the scored text is the answer as written plus the template's end-of-turn text (written
out below per template, independently of hf_dpo.tokenization.templates, which discovers it), and any
rewrite the template made is reported under the kind listed here. With
``completion_turns="all"`` every scored span ends with the end-of-turn text.
"""

import pytest
from real_templates import NAMES, TEMPLATE_DIR, build_template_tokenizer

from hf_dpo.data import DataError, load_preference_dataset
from hf_dpo.tokenization import tokenize_dataset, tokenize_row


def test_the_eleven_templates_live_in_the_repository():
    """A fresh clone runs every template test: the files are in tests/data, so none is skipped for a missing folder."""
    assert len(NAMES) == 11 and all((TEMPLATE_DIR / f"{name}.tokens.json").is_file() for name in NAMES)


END_OF_TURN = {
    "deepseek-v3": "<｜end▁of▁sentence｜>",
    "gemma3-it": "<end_of_turn>\n",
    "llama3-instruct-orig": "<|eot_id|>",
    "llama3.1-instruct": "<|eot_id|>",
    "llama3.2-instruct": "<|eot_id|>",
    "mistral-nemo-instruct": "</s>",
    "phi3.5-mini-instruct": "<|end|>\n",
    "qwen2.5-instruct": "<|im_end|>\n",
    "qwen3": "<|im_end|>\n",
    "r1-distill-qwen": "<｜end▁of▁sentence｜>",
    "r1-distill-qwen-origtpl": "<｜end▁of▁sentence｜>",
}

THINK = "<think>\nHot is a temperature word.\n</think>\n\nCold."
CASES = {
    "single": ([{"role": "user", "content": "What is the opposite of hot?"}], "Cold.", "Hot."),
    "multi": (
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! Ask me for the opposite of any word."},
            {"role": "user", "content": "What is the opposite of hot?"},
        ],
        "Cold.",
        "Warm.",
    ),
    "system": (
        [{"role": "system", "content": "You answer with one word."}, {"role": "user", "content": "Opposite of big?"}],
        "Small.",
        "Large.",
    ),
    "system_multi": (
        [
            {"role": "system", "content": "You answer with one word."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! Ask me for the opposite of any word."},
            {"role": "user", "content": "Opposite of big?"},
        ],
        "Small.",
        "Large.",
    ),
    "think": ([{"role": "user", "content": "What is the opposite of hot?"}], THINK, "Warm."),
    "cjk": ([{"role": "user", "content": "你好"}], "你好，世界", "世界你好"),
    "special": ([{"role": "user", "content": "Say a marker."}], "SPECIAL", "No."),
    "spaces": ([{"role": "user", "content": "Opposite of wet?"}], " Dry. ", "Damp."),
}

# The rewrite each template makes on each case ("" = the full render is prompt + answer + end-of-turn).
TRAILING = {"llama3-instruct-orig": "trailing_text_dropped", "phi3.5-mini-instruct": "trailing_text_dropped"}
EXPECTED_REWRITE = {name: {case: TRAILING.get(name, "") for case in CASES} for name in END_OF_TURN}
for case in CASES:
    # Qwen3 inserts an empty think block before every answer without one (in "think", the rejected one).
    EXPECTED_REWRITE["qwen3"][case] = "text_inserted_before_answer"
    EXPECTED_REWRITE["r1-distill-qwen"][case] = "generation_prompt_not_prefix"
EXPECTED_REWRITE["r1-distill-qwen-origtpl"]["think"] = "reasoning_removed"
EXPECTED_REWRITE["mistral-nemo-instruct"]["system"] = "prompt_rendered_differently"
EXPECTED_REWRITE["mistral-nemo-instruct"]["system_multi"] = "prompt_rendered_differently"
# Llama-3.x and Gemma-3 trim the answer; it is scored as written, spaces included.
for name in ("gemma3-it", "llama3-instruct-orig", "llama3.1-instruct", "llama3.2-instruct"):
    EXPECTED_REWRITE[name]["spaces"] = "answer_trimmed"

# The earlier answer as the template renders it inside the prompt (for completion_turns="all").
EARLIER = "Hello! Ask me for the opposite of any word."


def answer_of(tokenizer, case, side):
    answer = CASES[case][1 if side == "chosen" else 2]
    return answer.replace("SPECIAL", f"Here is one: {tokenizer.eos_token} and more.") if case == "special" else answer


def row_of(tokenizer, case):
    prompt = CASES[case][0]
    return {
        "layout": "conversational",
        "prompt": prompt,
        "prompt_text": "",
        "chosen_text": "",
        "rejected_text": "",
        "chosen": [{"role": "assistant", "content": answer_of(tokenizer, case, "chosen")}],
        "rejected": [{"role": "assistant", "content": answer_of(tokenizer, case, "rejected")}],
    }


def inference_prompt_ids(tokenizer, prompt):
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def scored_runs(ids, mask):
    runs, current = [], []
    for token, on in zip(ids, mask):
        if on:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.fixture(scope="module", params=NAMES)
def template(request):
    return request.param, build_template_tokenizer(request.param)


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_is_inference_prompt_and_answer_plus_end_of_turn_is_scored(template, case):
    name, tokenizer = template
    out = tokenize_row(row_of(tokenizer, case), tokenizer)
    assert out["skip_reason"] == ""
    prompt_ids = inference_prompt_ids(tokenizer, CASES[case][0])
    n = out["prompt_length"]
    assert n == len(prompt_ids)
    eot = END_OF_TURN[name]
    for side in ("chosen", "rejected"):
        ids, mask = out[f"{side}_input_ids"], out[f"{side}_response_mask"]
        assert ids[:n] == prompt_ids and mask[:n] == [0] * n and mask[n:] == [1] * (len(ids) - n)
        answer = answer_of(tokenizer, case, side)
        if name == "r1-distill-qwen":
            # The generation prompt already opens the think block; the model generates what follows it.
            assert tokenizer.decode(prompt_ids).endswith("<think>\n")
            answer = answer.removeprefix("<think>\n")
        assert tokenizer.decode(ids[n:]) == answer + eot
    assert out["template_rewrite"] == EXPECTED_REWRITE[name][case]


@pytest.mark.parametrize("case", ["multi", "single", "system", "system_multi"])
def test_all_turns_spans_end_at_end_of_turn(template, case):
    name, tokenizer = template
    row = row_of(tokenizer, case)
    out = tokenize_row(row, tokenizer, completion_turns="all")
    eot = END_OF_TURN[name]
    runs = scored_runs(out["chosen_input_ids"], out["chosen_response_mask"])
    texts = [tokenizer.decode(run) for run in runs]
    assert all(text.endswith(eot) for text in texts), texts
    prompt_ids = inference_prompt_ids(tokenizer, CASES[case][0])
    n = len(prompt_ids)
    assert out["chosen_input_ids"][:n] == prompt_ids
    expected = ([EARLIER + eot] if "multi" in case else []) + [answer_of(tokenizer, case, "chosen") + eot]
    assert texts == expected
    # Nothing of the next turn is scored: the token after each earlier span is unscored.
    assert sum(out["chosen_response_mask"][:n]) == (len(runs[0]) if "multi" in case else 0)


def test_rewrites_are_counted_in_the_report(tmp_path):
    import json

    tokenizer = build_template_tokenizer("phi3.5-mini-instruct")
    path = tmp_path / "pairs.jsonl"
    rows = [
        {
            "prompt": CASES[c][0],
            "chosen": [{"role": "assistant", "content": CASES[c][1]}],
            "rejected": [{"role": "assistant", "content": CASES[c][2]}],
        }
        for c in ("single", "system", "cjk")
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _, report = tokenize_dataset(load_preference_dataset(str(path)), tokenizer)
    assert report.counters["template_rewrites"] == 3
    assert report.counters["template_rewrites.trailing_text_dropped"] == 3


def test_chat_template_kwargs_reach_every_template_call(tmp_path):
    import json

    from transformers import HfArgumentParser

    from hf_dpo.training.config import DPOConfig

    (config,) = HfArgumentParser(DPOConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--chat_template_kwargs", '{"enable_thinking": false}', "--report_to", "none"]
    )
    assert config.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ValueError, match="chat_template_kwargs"):
        DPOConfig(output_dir=str(tmp_path), chat_template_kwargs="[1]", report_to="none")
    tokenizer = build_template_tokenizer("qwen3")
    prompt = CASES["multi"][0]
    out = tokenize_row(
        row_of(tokenizer, "multi"), tokenizer, completion_turns="all", chat_template_kwargs=config.chat_template_kwargs
    )
    expected_prompt = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert expected_prompt.endswith("<think>\n\n</think>\n\n")
    n = out["prompt_length"]
    assert tokenizer.decode(out["chosen_input_ids"][:n]) == expected_prompt
    # With thinking off, the prompt holds the empty think block: the full render is prompt + answer, no rewrite.
    assert out["template_rewrite"] == "" and tokenizer.decode(out["chosen_input_ids"][n:]) == "Cold.<|im_end|>\n"
    # Per-row kwargs (as TRL allows) update the config's, for that row only.
    rows = [
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "Cold."}],
            "rejected": [{"role": "assistant", "content": "Warm."}],
            "chat_template_kwargs": {"enable_thinking": False},
        },
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "Cold."}],
            "rejected": [{"role": "assistant", "content": "Hot."}],
        },
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenized, report = tokenize_dataset(load_preference_dataset(str(path)), tokenizer)
    assert report.counters["template_rewrites.text_inserted_before_answer"] == 1
    first = tokenizer.decode(tokenized[0]["chosen_input_ids"][: tokenized[0]["prompt_length"]])
    assert first == expected_prompt
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[1], "chat_template_kwargs": [1]}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:1: chat_template_kwargs: expected an object"):
        load_preference_dataset(str(bad))


def test_prompt_truncation_keeps_the_template_head(template):
    """Dropping the oldest prompt tokens keeps what precedes the first message's text (BOS, headers, default
    system text) and the newest tokens (the generation prompt); before, Llama-3.1 started at '.' and Gemma-3 at '5'."""
    name, tokenizer = template
    prompt = [{"role": "user", "content": "Tell me the opposite of hot, please. " * 12}]
    row = {**row_of(tokenizer, "single"), "prompt": prompt}
    full = tokenize_row(row, tokenizer)
    rendered = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    head_text = rendered[: rendered.index("Tell me")]
    head = len(tokenizer(head_text, add_special_tokens=False)["input_ids"])
    limit = 2 * head + 10  # the head is kept up to half the limit
    tail = limit - head
    cut = tokenize_row(row, tokenizer, max_prompt_length=limit)
    p = full["prompt_length"]
    assert cut["prompt_truncated"] and cut["prompt_length"] == limit
    assert cut["chosen_input_ids"][:limit] == full["chosen_input_ids"][:head] + full["chosen_input_ids"][p - tail : p]
    if tokenizer.bos_token and rendered.startswith(tokenizer.bos_token):
        assert cut["chosen_input_ids"][0] == tokenizer.bos_token_id
    assert cut["chosen_input_ids"][limit:] == full["chosen_input_ids"][p:]


DOC_BEGIN, DOC_END = "<!-- template-table:begin -->", "<!-- template-table:end -->"


def compatibility_table():
    """The docs/data.md table, from the same expectations the tests above check against hf_dpo."""
    lines = ["| template | prompt ends with | scored | `template_rewrites` kind per case |", "|---|---|---|---|"]
    for name in sorted(END_OF_TURN):
        tokenizer = build_template_tokenizer(name)
        rendered = tokenizer.apply_chat_template(CASES["single"][0], add_generation_prompt=True, tokenize=False)
        question = CASES["single"][0][-1]["content"]
        tail = rendered[rendered.rindex(question) + len(question) :]
        scored = (
            "answer after `<think>\\n`" if name == "r1-distill-qwen" else "answer"
        ) + f" + `{END_OF_TURN[name]!r}`"
        kinds = EXPECTED_REWRITE[name]
        fired = sorted({k for k in kinds.values() if k})
        cells = "; ".join(f"{k}: {', '.join(c for c, v in kinds.items() if v == k)}" for k in fired) or "none"
        lines.append(f"| `{name}` | `{tail!r}` | {scored} | {cells} |")
    return "\n".join(lines)


def test_docs_compatibility_table_is_current():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    assert DOC_BEGIN in text and DOC_END in text, "docs/data.md lacks the template table markers"
    current = text.split(DOC_BEGIN)[1].split(DOC_END)[0].strip()
    assert current == compatibility_table(), (
        "docs/data.md's template table is stale; paste compatibility_table() from tests/test_real_templates.py"
    )
