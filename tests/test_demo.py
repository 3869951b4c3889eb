"""Tests for hf_dpo.cli.demo: templates, special ids, data properties, model size, round trip."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_dpo.cli.demo import (
    BOS_TEMPLATE,
    CHATML_TEMPLATE,
    LLAMA3_TEMPLATE,
    build_demo,
    build_model,
    build_tokenizer,
    make_preference_rows,
    write_demo_dataset,
)

TEMPLATES = ["chatml", "llama3", "bos"]
CONVERSATION = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "你好！"},
]
# template -> (full conversation, first three turns with the generation prompt)
EXPECTED = {
    "chatml": (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n你好！<|im_end|>\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n你好<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n你好！<|eot_id|>",
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n你好<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    ),
    # No generation prompt: the prompt ends with "[/INST]", no trailing newline anywhere.
    "bos": (
        "<s>[INST] Hi [/INST] Hello!</s>[INST] 你好 [/INST] 你好！</s>",
        "<s>[INST] Hi [/INST] Hello!</s>[INST] 你好 [/INST]",
    ),
}
# template -> (bos, eos, pad)
SPECIALS = {
    "chatml": (None, "<|im_end|>", "<|pad|>"),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", "<|pad|>"),
    "bos": ("<s>", "</s>", "</s>"),
}


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_renders_exact_string(template):
    tok = build_tokenizer(template)
    full, prompt = EXPECTED[template]
    assert tok.chat_template == {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE, "bos": BOS_TEMPLATE}[template]
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == full
    assert tok.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=True) == prompt


@pytest.mark.parametrize("template", TEMPLATES)
def test_special_tokens_are_single_ids(template):
    tok = build_tokenizer(template)
    bos, eos, pad = SPECIALS[template]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (bos, eos, pad)
    for token in {t for t in (bos, eos, pad) if t} | {"<|im_start|>", "<|start_header_id|>"} & set(tok.get_vocab()):
        ids = tok(token, add_special_tokens=False)["input_ids"]
        assert ids == [tok.convert_tokens_to_ids(token)], token
    assert tok.eos_token_id == tok.convert_tokens_to_ids(eos)
    assert tok.pad_token_id == tok.convert_tokens_to_ids(pad)
    # pad == eos only for "bos": the case where masks must not come from pad ids.
    assert (tok.pad_token_id == tok.eos_token_id) == (template == "bos")
    assert tok.bos_token_id == (tok.convert_tokens_to_ids(bos) if bos else None)
    # The templates write BOS themselves, so encoding adds nothing.
    assert tok("Hi")["input_ids"] == tok("Hi", add_special_tokens=False)["input_ids"]


def test_tokenizer_is_deterministic_and_a_fresh_copy():
    a, b = build_tokenizer("chatml"), build_tokenizer("chatml")
    assert a is not b and a.get_vocab() == b.get_vocab()
    assert len(a) == 1024 + 3  # trained vocabulary + <|im_start|>, <|im_end|>, <|pad|>
    a.add_tokens(["<extra>"])
    assert len(build_tokenizer("chatml")) == 1027
    # Ordinary tokens keep their ids under every template; specials come after them.
    text = "The opposite of hot is cold."
    assert len({tuple(build_tokenizer(t)(text)["input_ids"]) for t in TEMPLATES}) == 1
    with pytest.raises(ValueError, match="template='zephyr'"):
        build_tokenizer("zephyr")


def test_cjk_merges_across_a_boundary():
    """Byte-level BPE merges "你好" into one token: "你" + "好" tokenized apart are two.

    So a prompt ending in "你" is not a token prefix of prompt + response "好...".
    """
    tok = build_tokenizer("chatml")
    joined = tok("你好", add_special_tokens=False)["input_ids"]
    apart = tok("你", add_special_tokens=False)["input_ids"] + tok("好", add_special_tokens=False)["input_ids"]
    assert len(joined) == 1 and len(apart) == 2
    assert joined != apart
    assert tok.decode(joined) == tok.decode(apart) == "你好"
    prompt = tok("请说你", add_special_tokens=False)["input_ids"]
    full = tok("请说你好。", add_special_tokens=False)["input_ids"]
    assert full[: len(prompt)] != prompt


def test_bos_template_refuses_system_messages():
    tok = build_tokenizer("bos")
    with pytest.raises(Exception, match="user and assistant roles only"):
        tok.apply_chat_template([{"role": "system", "content": "x"}] + CONVERSATION, tokenize=False)


def test_preference_rows_properties():
    rows = make_preference_rows(200, seed=3)
    assert rows == make_preference_rows(200, seed=3)
    assert rows != make_preference_rows(200, seed=4)
    tok = build_tokenizer("chatml")
    multi_turn = 0
    for row in rows:
        chosen, rejected = row["chosen"], row["rejected"]
        assert chosen[:-1] == rejected[:-1]  # identical prompt turns
        assert [m["role"] for m in chosen] in (["user", "assistant"], ["user", "assistant"] * 2)
        assert rejected[-1]["role"] == "assistant" and chosen[-1]["content"] != rejected[-1]["content"]
        multi_turn += len(chosen) == 4
        for side in (chosen, rejected):
            n = len(tok(side[-1]["content"], add_special_tokens=False)["input_ids"])
            assert 2 <= n <= 30, side[-1]
    assert 20 <= multi_turn <= 60  # about 20% of 200
    assert len({row["chosen"][-2]["content"] for row in rows}) == 200  # questions drawn without replacement


@pytest.mark.parametrize("template", TEMPLATES)
def test_demo_prompts_are_token_prefixes(template):
    """The demo data itself never merges across the prompt/response boundary."""
    tok = build_tokenizer(template)
    for row in make_preference_rows(60, seed=0):
        prompt = tok.apply_chat_template(row["chosen"][:-1], tokenize=False, add_generation_prompt=True)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        for side in ("chosen", "rejected"):
            full_ids = tok(tok.apply_chat_template(row[side], tokenize=False), add_special_tokens=False)["input_ids"]
            assert full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids)


def test_write_demo_dataset(tmp_path):
    train_path, eval_path = write_demo_dataset(tmp_path, n_train=100, n_eval=30, seed=1)
    assert (train_path, eval_path) == (tmp_path / "train.jsonl", tmp_path / "eval.jsonl")
    text = train_path.read_text(encoding="utf-8") + eval_path.read_text(encoding="utf-8")
    assert "反义词" in text  # UTF-8, not \u escapes
    train = [json.loads(line) for line in train_path.read_text(encoding="utf-8").splitlines()]
    held_out = [json.loads(line) for line in eval_path.read_text(encoding="utf-8").splitlines()]
    assert (len(train), len(held_out)) == (100, 30)
    questions = lambda rows: {row["chosen"][-2]["content"] for row in rows}  # noqa: E731
    assert not questions(train) & questions(held_out)
    assert train + held_out == make_preference_rows(130, seed=1)


def test_build_model_parameter_count():
    """V = 1027, h = 64, MLP 256, 2 layers, 4 heads = 4 key/value heads.

    Per layer: q, k, v, o 4*64*64 = 16384; gate, up, down 3*64*256 = 49152; 2 norms 128.
    Llama: embeddings + untied head 2*1027*64 = 131456, layers 2*65664 = 131328,
    final norm 64: 262848. Qwen2 adds q, k, v biases 2*3*64 = 384: 263232.
    """
    tok = build_tokenizer("chatml")
    llama, qwen = build_model(tok), build_model(tok, arch="qwen2")
    assert sum(p.numel() for p in llama.parameters()) == 262848
    assert sum(p.numel() for p in qwen.parameters()) == 263232
    assert llama.config.model_type == "llama" and qwen.config.model_type == "qwen2"
    assert llama.lm_head.weight.data_ptr() != llama.model.embed_tokens.weight.data_ptr()
    assert llama.dtype == torch.float32 and llama.config._attn_implementation in ("sdpa", "eager")
    assert (llama.config.pad_token_id, llama.config.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    smaller = build_model(tok, hidden_size=32, num_layers=1, num_heads=2)
    assert sum(p.numel() for p in smaller.parameters()) == 2 * 1027 * 32 + 4 * 32 * 32 + 3 * 32 * 128 + 3 * 32


def test_build_model_is_deterministic_and_leaves_global_rng_alone():
    tok = build_tokenizer("bos")
    state = torch.random.get_rng_state()
    a, b, c = build_model(tok, seed=0), build_model(tok, seed=0), build_model(tok, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    with pytest.raises(ValueError, match="arch='gpt2'"):
        build_model(tok, arch="gpt2")


def test_build_demo_round_trips_through_from_pretrained(tmp_path):
    paths = build_demo(tmp_path, template="bos")
    assert paths["train"].exists() and paths["eval"].exists()
    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(paths["model"]).eval()
    fresh_tok = build_tokenizer("bos")
    assert tok.get_vocab() == fresh_tok.get_vocab()
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (
        fresh_tok.pad_token_id,
        fresh_tok.eos_token_id,
        fresh_tok.bos_token_id,
    )
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == EXPECTED["bos"][0]
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == fresh_tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].tolist()
    with torch.no_grad():
        logits = model(ids).logits
        expected = build_model(fresh_tok).eval()(ids).logits
    assert torch.equal(logits, expected)
