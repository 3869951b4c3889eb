"""Stage 2, tokenization: canonical rows -> token ids and the mask of the scored tokens.

``templates`` knows what a chat template does to a conversation (the inference prompt, the
answer's span, its end of turn, rewrites), ``pairs`` tokenizes and truncates each pair as
one, ``special_tokens`` counts rows that spell a special token in their text.
"""

from ..common.columns import TOKENIZED_COLUMNS
from .pairs import tokenize_dataset, tokenize_row

__all__ = ["TOKENIZED_COLUMNS", "tokenize_dataset", "tokenize_row"]
