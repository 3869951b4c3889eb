"""The offline demo: a tiny tokenizer, a tiny random-init model and preference data.

Everything is built locally and deterministically, so tests and ``examples/train.py``
run without a model hub. The data task is *bilingual antonyms*: the user asks for the
opposite of an English or Chinese word; the chosen answer names the antonym, the
rejected answer makes the same systematic mistake every time (it echoes the word).
A 2-layer, 64-wide random-init model learns this with length-normalized DPO in well
under a minute on CPU and keeps the preference on held-out prompts.
"""

from __future__ import annotations

import functools
import json
import logging
import random
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

__all__ = [
    "CHATML_TEMPLATE",
    "LLAMA3_TEMPLATE",
    "BOS_TEMPLATE",
    "build_tokenizer",
    "build_model",
    "make_preference_rows",
    "write_demo_dataset",
    "build_demo",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Llama-2 style. The generation prompt is empty: a prompt already ends with "[/INST]",
# and the answer starts with a space, so it is the template whose EOS equals PAD.
BOS_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('the bos template supports user and assistant roles only') }}"
    "{% endif %}"
    "{% endfor %}"
)

# template name -> (chat template, special tokens, bos, eos, pad)
_TEMPLATES = {
    "chatml": (CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>", "<|pad|>"], None, "<|im_end|>", "<|pad|>"),
    "llama3": (
        LLAMA3_TEMPLATE,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
        "<|pad|>",
    ),
    # pad == eos on purpose: masks must never be derived from `input_ids != pad_token_id`.
    "bos": (BOS_TEMPLATE, ["<s>", "</s>"], "<s>", "</s>", "</s>"),
}

_VOCAB_SIZE = 1024

# Antonym pairs; every word occurs in exactly one pair so that the answer is a function.
_EN_PAIRS = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("up", "down"),
    ("left", "right"),
    ("open", "closed"),
    ("light", "dark"),
    ("happy", "sad"),
    ("old", "new"),
    ("early", "late"),
    ("full", "empty"),
    ("hard", "soft"),
    ("high", "low"),
    ("long", "short"),
    ("rich", "poor"),
    ("strong", "weak"),
    ("wet", "dry"),
    ("clean", "dirty"),
    ("loud", "quiet"),
    ("near", "far"),
    ("thick", "thin"),
    ("first", "last"),
    ("true", "false"),
    ("win", "lose"),
    ("push", "pull"),
    ("buy", "sell"),
    ("give", "take"),
    ("good", "bad"),
    ("day", "night"),
    ("black", "white"),
    ("in", "out"),
    ("on", "off"),
    ("yes", "no"),
    ("begin", "end"),
    ("love", "hate"),
    ("cheap", "expensive"),
    ("safe", "dangerous"),
    ("simple", "complex"),
    ("sweet", "sour"),
    ("warm", "cool"),
    ("inside", "outside"),
    ("above", "below"),
    ("before", "after"),
    ("always", "never"),
    ("more", "less"),
    ("friend", "enemy"),
    ("question", "answer"),
    ("laugh", "cry"),
    ("arrive", "leave"),
    ("accept", "refuse"),
    ("remember", "forget"),
    ("wide", "narrow"),
    ("deep", "shallow"),
    ("north", "south"),
    ("east", "west"),
    ("rise", "fall"),
    ("start", "stop"),
    ("easy", "difficult"),
]
_ZH_PAIRS = [
    ("大", "小"),
    ("多", "少"),
    ("上", "下"),
    ("左", "右"),
    ("高", "矮"),
    ("长", "短"),
    ("快", "慢"),
    ("冷", "热"),
    ("黑", "白"),
    ("新", "旧"),
    ("好", "坏"),
    ("远", "近"),
    ("前", "后"),
    ("开", "关"),
    ("来", "去"),
    ("买", "卖"),
    ("早", "晚"),
    ("胖", "瘦"),
    ("深", "浅"),
    ("轻", "重"),
    ("真", "假"),
    ("对", "错"),
    ("东", "西"),
    ("南", "北"),
    ("进", "出"),
    ("哭", "笑"),
    ("甜", "苦"),
    ("明", "暗"),
    ("美", "丑"),
    ("爱", "恨"),
    ("强", "弱"),
    ("胜", "败"),
    ("软", "硬"),
    ("宽", "窄"),
    ("开心", "难过"),
    ("安全", "危险"),
    ("简单", "复杂"),
    ("干净", "肮脏"),
    ("成功", "失败"),
    ("便宜", "昂贵"),
]
_EN_QUESTIONS = [
    "What is the opposite of {w}?",
    'Give me the antonym of "{w}".',
    "Opposite of {w}, please.",
    "Tell me a word that means the opposite of {w}.",
    "What's the antonym for {w}?",
    "Which word is the opposite of {w}?",
]
_ZH_QUESTIONS = ["“{w}”的反义词是什么？", "请说出“{w}”的反义词。", "{w}的反义词？", "和“{w}”意思相反的词是什么？"]
# (chosen, rejected) answer forms: the rejected one is sloppy and echoes the word.
_EN_ANSWERS = ("The opposite of {w} is {a}.", "{w}, I guess.")
_ZH_ANSWERS = ("“{w}”的反义词是“{a}”。", "{w}吧。")
# Earlier turns for multi-turn rows; identical on both sides of a pair.
_HISTORY = [
    ("Hi!", "Hello! Ask me for the opposite of any word."),
    ("你好", "你好！我可以告诉你一个词的反义词。"),
    ("Can you help me with words?", "Sure, I know many antonyms."),
    ("我们来玩反义词游戏吧。", "好的，请出题。"),
]
# Plain text so that common English and Chinese words get their own merges.
_GENERAL_TEXT = [
    "The quick brown fox jumps over the lazy dog. A language model predicts the next token.",
    "Direct preference optimization trains a policy on pairs of chosen and rejected answers.",
    "The user asks a question and the assistant answers it. The system sets the rules.",
    "[INST] Hello, who are you? [/INST] I am a small assistant.",
    "你好，世界。你好吗？我很好，谢谢。今天天气很好，我们去公园吧。",
    "语言模型根据上文预测下一个词。直接偏好优化用成对的回答训练模型。",
    "中文和英文都可以。这个问题的答案是什么？请回答这个问题。",
]


def _questions() -> list[tuple[str, str, str]]:
    """All (question, chosen answer, rejected answer) triples of the task, in a fixed order.

    Every rejected answer makes the same mistake in the same sloppy form (it echoes
    the asked word), so what DPO learns carries over to unseen prompts. With only the
    word wrong ("The opposite of hot is hot.") the tiny model learns the preference in
    a sudden jump whose timing depends on the learning rate: too fragile for a demo.
    """
    out = []
    tasks = ((_EN_PAIRS, _EN_QUESTIONS, _EN_ANSWERS), (_ZH_PAIRS, _ZH_QUESTIONS, _ZH_ANSWERS))
    for pairs, questions, (good, bad) in tasks:
        for a, b in pairs:
            for word, antonym in ((a, b), (b, a)):
                for q in questions:
                    out.append((q.format(w=word), good.format(w=word, a=antonym), bad.format(w=word)))
    return out


@functools.lru_cache(maxsize=1)
def _base_tokenizer_json() -> str:
    """Train the byte-level BPE once per process; returned as JSON so callers get copies."""
    corpus = list(_GENERAL_TEXT) * 20
    for q, chosen, rejected in _questions():
        corpus += [q, chosen, rejected]
    for user, assistant in _HISTORY:
        corpus += [user, assistant] * 10
    corpus += ["user", "assistant", "system", "\n\n"] * 10
    tok = Tokenizer(models.BPE())
    # GPT-2 pre-tokenization keeps runs of CJK letters together, so "你好" can merge
    # into one token while "你" and "好" tokenized apart stay two.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def build_tokenizer(template: str = "chatml") -> transformers.PreTrainedTokenizerFast:
    """A fresh tiny byte-level BPE tokenizer with the chat template ``template``.

    ``template`` is one of ``"chatml"`` (Qwen), ``"llama3"`` or ``"bos"`` (Llama-2 style,
    ``pad_token == eos_token``). The template's markers are single-id special tokens
    appended after the trained vocabulary, so ordinary tokens have the same ids under
    every template. No BOS is added by ``__call__``: the templates write it themselves.
    """
    if template not in _TEMPLATES:
        raise ValueError(f"template={template!r}: expected one of {sorted(_TEMPLATES)}")
    chat_template, specials, bos, eos, pad = _TEMPLATES[template]
    tok = Tokenizer.from_str(_base_tokenizer_json())
    tok.add_special_tokens(specials)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        chat_template=chat_template,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def build_model(
    tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0, arch: str = "llama"
) -> transformers.PreTrainedModel:
    """A random-init fp32 causal LM (``arch`` "llama" or "qwen2") sized for ``tokenizer``.

    The global torch RNG is left untouched; the same ``seed`` gives the same weights.
    MLP width is ``4 * hidden_size``; key/value heads equal ``num_heads``.
    """
    configs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}
    if arch not in configs:
        raise ValueError(f"arch={arch!r}: expected one of {sorted(configs)}")
    config = configs[arch](
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation="sdpa", dtype=torch.float32
            )
        except (ValueError, ImportError):  # torch builds without SDPA support
            model = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation="eager", dtype=torch.float32
            )
    return model


def make_preference_rows(n: int, seed: int) -> list[dict]:
    """``n`` MiniMind-style rows ``{"chosen": [messages], "rejected": [messages]}``.

    Final questions are drawn without replacement (with replacement only when ``n``
    exceeds the question pool), so a prefix/suffix split has disjoint prompts. About
    20% of rows start with an earlier exchange that both sides share.
    """
    rng = random.Random(seed)
    pool = _questions()
    picks = rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]
    rows = []
    for question, chosen, rejected in picks:
        prompt = [{"role": "user", "content": question}]
        if rng.random() < 0.2:
            user, assistant = rng.choice(_HISTORY)
            prompt = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}] + prompt
        rows.append(
            {
                "chosen": prompt + [{"role": "assistant", "content": chosen}],
                "rejected": [dict(m) for m in prompt] + [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_demo_dataset(directory, n_train: int = 512, n_eval: int = 128, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (disjoint final questions) into ``directory``."""
    if n_train + n_eval > len(_questions()):
        raise ValueError(f"n_train + n_eval = {n_train + n_eval}: at most {len(_questions())} distinct prompts")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rows = make_preference_rows(n_train + n_eval, seed)
    train_path, eval_path = directory / "train.jsonl", directory / "eval.jsonl"
    _write_jsonl(train_path, rows[:n_train])
    _write_jsonl(eval_path, rows[n_train:])
    logger.info("wrote %d train and %d eval pairs to %s", n_train, n_eval, directory)
    return train_path, eval_path


def build_demo(directory, template: str = "chatml") -> dict:
    """Save a tokenizer, a tiny model and the data set under ``directory``.

    Returns ``{"tokenizer": dir, "model": dir, "train": file, "eval": file}``; load them
    with ``from_pretrained`` so the demo goes through the same code as a real model.
    """
    directory = Path(directory)
    tokenizer = build_tokenizer(template)
    paths = {"tokenizer": directory / "tokenizer", "model": directory / "model"}
    tokenizer.save_pretrained(paths["tokenizer"])
    build_model(tokenizer).save_pretrained(paths["model"])
    paths["train"], paths["eval"] = write_demo_dataset(directory)
    return paths
