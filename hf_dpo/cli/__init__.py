"""Stage 8, the command line: ``hf-dpo`` and ``python -m hf_dpo``.

``command`` (the entry point: help, version, one-line user errors), ``arguments`` (flags,
config files, defaults), ``checks`` (every flag and path checked before anything loads),
``loading`` (models, tokenizer, data, the demo's assets), ``run_record`` (which run an
output folder and its checkpoints belong to), ``main`` (the run), ``summary`` (the closing
screen), ``plotting`` (the curves PNG) and ``demo`` (the offline demo's tokenizer, model and
data). Only ``command`` is imported with the package: the rest loads torch; the run itself is
``hf_dpo.cli.main.main(argv)``.
"""

from .command import command

__all__ = ["command"]
