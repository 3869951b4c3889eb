"""Response masks of the three demo chat templates, boundary merges and truncation.

Expected ids are built independently of tokenization.py: the rendered conversation
is written out as pieces (template markers as single special-token ids, plain text
encoded on its own; byte-level pre-tokenization never merges across these
pieces), and the mask is 0 on the prompt pieces and 1 on the response pieces.
"""

import pytest

from hf_dpo.cli.demo import build_tokenizer
from hf_dpo.data import DataError, load_preference_dataset, validate_row
from hf_dpo.layouts.padded import DPOCollator
from hf_dpo.tokenization import tokenize_dataset, tokenize_row

QUESTION = "What is the opposite of hot?"
CHOSEN = "The opposite of hot is cold."
REJECTED = "The opposite of hot is hot."
HISTORY_USER = "Hi!"
HISTORY_ANSWER = "Hello! Ask me for the opposite of any word."


def prompt_pieces(template, turns):
    """The rendered prompt (with the generation prompt) of ``turns``, as pieces."""
    pieces = ["<|begin_of_text|>"] if template == "llama3" else ["<s>"] if template == "bos" else []
    for role, content in turns:
        if template == "chatml":
            pieces += ["<|im_start|>", f"{role}\n{content}", "<|im_end|>", "\n"]
        elif template == "llama3":
            pieces += ["<|start_header_id|>", role, "<|end_header_id|>", f"\n\n{content}", "<|eot_id|>"]
        elif role == "user":
            pieces += [f"[INST] {content} [/INST]"]
        else:
            pieces += [f" {content}", "</s>"]
    if template == "chatml":
        pieces += ["<|im_start|>", "assistant\n"]
    elif template == "llama3":
        pieces += ["<|start_header_id|>", "assistant", "<|end_header_id|>", "\n\n"]
    return pieces


def response_pieces(template, answer):
    """The rendered final answer including the template's end-of-turn tokens."""
    return {"chatml": [answer, "<|im_end|>", "\n"], "llama3": [answer, "<|eot_id|>"], "bos": [f" {answer}", "</s>"]}[
        template
    ]


def ids_of(tokenizer, pieces):
    ids = []
    for piece in pieces:
        if piece in tokenizer.all_special_tokens:
            ids.append(tokenizer.convert_tokens_to_ids(piece))
        else:
            ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids


def masked_runs(tokenizer, ids, mask):
    """Decoded text of each contiguous run of scored tokens."""
    runs, current = [], []
    for token, on in zip(ids, mask):
        if on:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def minimind_row(history=False):
    prompt = [{"role": "user", "content": QUESTION}]
    if history:
        prompt = [{"role": "user", "content": HISTORY_USER}, {"role": "assistant", "content": HISTORY_ANSWER}] + prompt
    return {
        "chosen": prompt + [{"role": "assistant", "content": CHOSEN}],
        "rejected": prompt + [{"role": "assistant", "content": REJECTED}],
    }


@pytest.fixture(scope="module")
def tokenizers():
    return {name: build_tokenizer(name) for name in ("chatml", "llama3", "bos")}


# The exact scored text per template: the answer plus the template's end-of-turn tokens.
DECODED_RESPONSE = {
    "chatml": ("The opposite of hot is cold.<|im_end|>\n", "The opposite of hot is hot.<|im_end|>\n"),
    "llama3": ("The opposite of hot is cold.<|eot_id|>", "The opposite of hot is hot.<|eot_id|>"),
    "bos": (" The opposite of hot is cold.</s>", " The opposite of hot is hot.</s>"),
}


@pytest.mark.parametrize("template", ["chatml", "llama3", "bos"])
def test_mask_token_by_token(tokenizers, template):
    tokenizer = tokenizers[template]
    out = tokenize_row(validate_row(minimind_row()), tokenizer)
    prompt_ids = ids_of(tokenizer, prompt_pieces(template, [("user", QUESTION)]))
    assert out["prompt_length"] == len(prompt_ids) and out["skip_reason"] == "" and out["boundary_merges"] == 0
    for side, answer, decoded in (
        ("chosen", CHOSEN, DECODED_RESPONSE[template][0]),
        ("rejected", REJECTED, DECODED_RESPONSE[template][1]),
    ):
        response_ids = ids_of(tokenizer, response_pieces(template, answer))
        assert out[f"{side}_input_ids"] == prompt_ids + response_ids
        assert out[f"{side}_response_mask"] == [0] * len(prompt_ids) + [1] * len(response_ids)
        scored = [t for t, on in zip(out[f"{side}_input_ids"], out[f"{side}_response_mask"]) if on]
        assert tokenizer.decode(scored) == decoded
        assert out[f"{side}_tokens"] == len(response_ids)
    # Both sides share the exact same prompt tokens.
    assert (
        out["chosen_input_ids"][: out["prompt_length"]]
        == out["rejected_input_ids"][: out["prompt_length"]]
        == prompt_ids
    )


def test_pad_equals_eos_template_scores_the_eos(tokenizers):
    """bos template: pad == eos == '</s>'. The final '</s>' is scored even though its id is the pad id,
    and the collated response_mask still counts it (masks never come from input_ids != pad)."""
    tokenizer = tokenizers["bos"]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    out = tokenize_row(validate_row(minimind_row()), tokenizer)
    assert out["chosen_input_ids"][-1] == tokenizer.pad_token_id and out["chosen_response_mask"][-1] == 1
    batch = DPOCollator(pad_token_id=tokenizer.pad_token_id)([out])
    assert batch["chosen_lengths"].tolist() == [sum(out["chosen_response_mask"])]
    assert batch["rejected_lengths"].tolist() == [sum(out["rejected_response_mask"])]
    n = len(out["chosen_input_ids"])
    # The last scored logit position (n - 2) predicts the final '</s>' == pad.
    assert batch["response_mask"][0, n - 2].item() and batch["input_ids"][0, n - 1].item() == tokenizer.pad_token_id


MULTI_TURN_RUNS = {
    "chatml": ("Hello! Ask me for the opposite of any word.<|im_end|>\n", "The opposite of hot is cold.<|im_end|>\n"),
    "llama3": ("Hello! Ask me for the opposite of any word.<|eot_id|>", "The opposite of hot is cold.<|eot_id|>"),
    "bos": (" Hello! Ask me for the opposite of any word.</s>", " The opposite of hot is cold.</s>"),
}


@pytest.mark.parametrize("template", ["chatml", "llama3", "bos"])
def test_multi_turn_completion_turns(tokenizers, template):
    """'last' scores only the final answer; 'all' also the earlier assistant turn (shared by both sides)."""
    tokenizer = tokenizers[template]
    row = validate_row(minimind_row(history=True))
    earlier, final = MULTI_TURN_RUNS[template]
    last = tokenize_row(row, tokenizer, completion_turns="last")
    every = tokenize_row(row, tokenizer, completion_turns="all")
    assert masked_runs(tokenizer, last["chosen_input_ids"], last["chosen_response_mask"]) == [final]
    assert masked_runs(tokenizer, every["chosen_input_ids"], every["chosen_response_mask"]) == [earlier, final]
    assert masked_runs(tokenizer, every["rejected_input_ids"], every["rejected_response_mask"]) == [
        earlier,
        final.replace("cold", "hot"),
    ]
    # Same tokens either way; only the mask differs, and only inside the prompt.
    assert every["chosen_input_ids"] == last["chosen_input_ids"]
    expected_prompt = ids_of(
        tokenizer, prompt_pieces(template, [("user", HISTORY_USER), ("assistant", HISTORY_ANSWER), ("user", QUESTION)])
    )
    assert last["chosen_input_ids"][: last["prompt_length"]] == expected_prompt
    assert (
        every["chosen_response_mask"][every["prompt_length"] :] == last["chosen_response_mask"][last["prompt_length"] :]
    )


def test_completion_turns_all_mask_follows_prompt_truncation(tokenizers):
    """The earlier-turn mask is cut with the prompt: the template's head ('<|im_start|>' 'user\\n', before the
    first message's text, 3 tokens) is kept, then the last 20 - 3 entries."""
    tokenizer = tokenizers["chatml"]
    row = validate_row(minimind_row(history=True))
    full = tokenize_row(row, tokenizer, completion_turns="all")
    cut = tokenize_row(row, tokenizer, max_length=200, max_prompt_length=20, completion_turns="all")
    p, head = full["prompt_length"], len(ids_of(tokenizer, ["<|im_start|>", "user\n"]))
    assert head == 3 and cut["prompt_length"] == 20
    assert (
        cut["chosen_response_mask"][:20]
        == full["chosen_response_mask"][:head] + full["chosen_response_mask"][p - 17 : p]
    )
    assert cut["chosen_input_ids"] == full["chosen_input_ids"][:head] + full["chosen_input_ids"][p - 17 :]


def test_cjk_boundary_merge(tokenizers, tmp_path):
    """String layout: prompt '请回答：你' + chosen '好。'. The demo BPE has the merge '你'+'好' -> '你好',
    so the full text's tokens do not start with the prompt's tokens. The response is then tokenized on its own:
    the mask covers exactly '好。' + EOS, the prompt tokens are unchanged, and the pair is counted.
    The rejected '坏。' does not merge; the second pair merges on both sides and counts once."""
    tokenizer = tokenizers["chatml"]

    def enc(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # Premise (fails loudly if the demo vocabulary changes): one merged token, not the two characters' tokens.
    assert len(enc("你好")) == 1 and enc("你好") != enc("你") + enc("好")
    rows = [
        {"prompt": "请回答：你", "chosen": "好。", "rejected": "坏。"},
        {"prompt": "请回答：你", "chosen": "好。", "rejected": "好吗？"},
    ]
    out = tokenize_row(validate_row(rows[0]), tokenizer)
    prompt_ids = enc("请回答：你")
    eos = tokenizer.eos_token_id
    assert out["boundary_merges"] == 1
    assert out["chosen_input_ids"] == prompt_ids + enc("好。") + [eos]
    assert out["rejected_input_ids"] == prompt_ids + enc("坏。") + [eos]
    for side, text in (("chosen", "好。<|im_end|>"), ("rejected", "坏。<|im_end|>")):
        assert out[f"{side}_response_mask"] == [0] * len(prompt_ids) + [1] * (
            len(out[f"{side}_input_ids"]) - len(prompt_ids)
        )
        assert masked_runs(tokenizer, out[f"{side}_input_ids"], out[f"{side}_response_mask"]) == [text]
        assert tokenizer.decode(out[f"{side}_input_ids"][: out["prompt_length"]]) == "请回答：你"

    tokenized, report = tokenize_dataset(load_preference_dataset(rows), tokenizer)
    assert report.counters["boundary_merges"] == 2  # pairs, not sides
    assert tokenized["chosen_input_ids"][1] == prompt_ids + enc("好。") + [eos]
    assert tokenized["rejected_input_ids"][1] == prompt_ids + enc("好吗？") + [eos]


def test_truncation_keeps_last_prompt_tokens_and_cuts_responses_right(tokenizers):
    """max_prompt_length 5, max_length 11: the prompt keeps the template's head ('<|im_start|>' 'user\\n', 3 tokens,
    cut to half the limit: 2 tokens) and its last 3 tokens, each response its first 6
    ('The opposite of hot is' + ' cold' / ' hot', the first token where the answers differ)."""
    tokenizer = tokenizers["chatml"]
    prompt_ids = ids_of(tokenizer, prompt_pieces("chatml", [("user", QUESTION)]))
    chosen_ids = ids_of(tokenizer, response_pieces("chatml", CHOSEN))
    rejected_ids = ids_of(tokenizer, response_pieces("chatml", REJECTED))
    assert chosen_ids[:5] == rejected_ids[:5] and chosen_ids[5] != rejected_ids[5] and len(chosen_ids) > 6
    out = tokenize_row(validate_row(minimind_row()), tokenizer, max_length=11, max_prompt_length=5)
    assert out["prompt_length"] == 5 and out["prompt_tokens"] == len(prompt_ids) and out["prompt_truncated"]
    kept = prompt_ids[:2] + prompt_ids[-3:]
    assert tokenizer.decode(kept[:2]) == "<|im_start|>user"
    assert out["chosen_input_ids"] == kept + chosen_ids[:6]
    assert out["rejected_input_ids"] == kept + rejected_ids[:6]
    assert out["chosen_response_mask"] == [0] * 5 + [1] * 6
    assert tokenizer.decode(out["chosen_input_ids"][5:]) == "The opposite of hot is cold"
    assert out["responses_truncated"] == 2 and out["skip_reason"] == ""
    # Lengths before truncation are kept for the report.
    assert out["chosen_tokens"] == len(chosen_ids)
    # A budget that fits everything truncates nothing.
    whole = tokenize_row(
        validate_row(minimind_row()),
        tokenizer,
        max_length=len(prompt_ids) + len(chosen_ids),
        max_prompt_length=len(prompt_ids),
    )
    assert (
        whole["chosen_input_ids"] == prompt_ids + chosen_ids
        and whole["responses_truncated"] == 0
        and not whole["prompt_truncated"]
    )


def test_pair_with_response_truncated_away_is_skipped_and_counted(tokenizers):
    """Row 1's prompt fills max_length, so its responses would be empty: skipped, counted, never collated."""
    tokenizer = tokenizers["bos"]
    long_question = "Tell me a word that means the opposite of hot. " * 6
    rows = [minimind_row(), minimind_row()]
    for side in ("chosen", "rejected"):
        rows[1][side] = [{"role": "user", "content": long_question}] + rows[1][side][1:]
    prompt_1 = ids_of(tokenizer, prompt_pieces("bos", [("user", long_question)]))
    max_length = len(prompt_1)
    single = tokenize_row(validate_row(rows[1]), tokenizer, max_length=max_length)
    assert single["skip_reason"] == "response_truncated_away"

    tokenized, report = tokenize_dataset(load_preference_dataset(rows), tokenizer, max_length=max_length)
    assert tokenized["row_id"] == [0]
    assert report.skipped["response_truncated_away"] == 1 and report.skip_examples["response_truncated_away"] == [
        "<rows>:1"
    ]
    assert report.counters["pairs_tokenized"] == 1 and report.counters["responses_truncated"] == 2
    assert "skip_reason" not in tokenized.column_names

    with pytest.raises(DataError, match="no pair survived tokenization"):
        tokenize_dataset(load_preference_dataset(rows[1:]), tokenizer, max_length=max_length)


def test_tokenize_dataset_columns_and_prompt_sharing(tokenizers):
    tokenizer = tokenizers["llama3"]
    tokenized, report = tokenize_dataset(
        load_preference_dataset([minimind_row(), minimind_row(history=True)]), tokenizer
    )
    assert set(tokenized.column_names) == {
        "row_id",
        "chosen_input_ids",
        "chosen_response_mask",
        "rejected_input_ids",
        "rejected_response_mask",
        "prompt_length",
        "prompt_tokens",
        "chosen_tokens",
        "rejected_tokens",
    }
    for row in tokenized:
        p = row["prompt_length"]
        assert row["chosen_input_ids"][:p] == row["rejected_input_ids"][:p]
        assert sum(row["chosen_response_mask"]) == row["chosen_tokens"]
    assert report.rows_kept == 2 and report.counters["pairs_tokenized"] == 2 and report.counters["boundary_merges"] == 0
    with pytest.raises(ValueError, match="completion_turns: expected 'last' or 'all', got 'first'"):
        tokenize_dataset(load_preference_dataset([minimind_row()]), tokenizer, completion_turns="first")
