"""Local tokenizers carrying the eleven real chat templates of tests/data/chat_templates/ (sources in its README).

Each pairs the demo's tiny byte-level BPE vocabulary with the template text and the
special tokens of that model's published tokenizer (``NAME.tokens.json``), so a test
sees what the template really renders, tokenized with the same special-token ids
behaviour (one id per marker) as the real tokenizer.
"""

import json
from pathlib import Path

import transformers
from tokenizers import AddedToken, Tokenizer

from hf_dpo.cli.demo import _base_tokenizer_json

TEMPLATE_DIR = Path(__file__).resolve().parent / "data" / "chat_templates"
NAMES = sorted(p.name[: -len(".jinja")] for p in TEMPLATE_DIR.glob("*.jinja"))


def build_template_tokenizer(name: str) -> transformers.PreTrainedTokenizerFast:
    spec = json.loads((TEMPLATE_DIR / f"{name}.tokens.json").read_text())
    special = spec["special_tokens"]
    tokens = list(spec["added_special_tokens"])
    for key in ("bos_token", "eos_token", "pad_token"):
        if special.get(key) and special[key] not in tokens:
            tokens.append(special[key])
    tok = Tokenizer.from_str(_base_tokenizer_json())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special.get("bos_token"),
        eos_token=special.get("eos_token"),
        pad_token=special.get("pad_token"),
        chat_template=(TEMPLATE_DIR / f"{name}.jinja").read_text(),
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
