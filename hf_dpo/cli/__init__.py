"""Stage 8, the command line: ``hf-dpo`` and ``python -m hf_dpo``.

``arguments`` (flags, config files, defaults), ``loading`` (models, tokenizer, data, the
demo's assets), ``main`` (the run), ``summary`` (the closing screen), ``plotting`` (the
curves PNG) and ``demo`` (the offline demo's tokenizer, model and data).
"""

from .main import command, main

__all__ = ["command", "main"]
