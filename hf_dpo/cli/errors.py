"""Which failures are the user's to fix (one line, exit status 2) and which are ours (the traceback).

A user error names the flag or file and the fix in its message; printing Python's
traceback above it only hides that line. Our own bugs keep their traceback, always, and
``--debug`` (or ``HF_DPO_DEBUG=1``) shows it for user errors too. Only the standard
library is imported here: the command's entry point uses it before torch is loaded.
"""

from __future__ import annotations

import linecache
import os
from pathlib import Path

EXIT_USAGE = 2  # what argparse and most Unix commands return for a bad invocation
DEBUG_FLAG = "--debug"
DEBUG_ENV = "HF_DPO_DEBUG"
PACKAGE_DIR = Path(__file__).resolve().parents[1]


class UsageError(ValueError):
    """A mistake in the command's flags, files or folders; the message names the flag or file and the fix."""


def raised_on_purpose(err: BaseException) -> bool:
    """Whether hf_dpo's own code raised ``err`` with a ``raise`` statement (a refusal written for the user).

    The innermost frame of the traceback is in the package and its line is a ``raise``. A
    ValueError from ``int("x")`` inside our code, or one raised deep in a library, is not.
    """
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    try:
        inside = Path(filename).resolve().is_relative_to(PACKAGE_DIR)
    except (OSError, ValueError):
        return False
    return inside and linecache.getline(filename, tb.tb_lineno).strip().startswith("raise")


def is_user_error(err: BaseException) -> bool:
    """A :class:`UsageError`, a data error (``DataError`` is a ValueError we raise), or a ValueError / OSError
    that our code raised on purpose (``--flag: got x; choose ...``, a missing data file)."""
    # A DataError re-raised from a datasets.map worker has the worker pool's frames innermost: known by its class.
    if isinstance(err, UsageError) or type(err).__module__.startswith("hf_dpo.data."):
        return True
    return isinstance(err, (ValueError, OSError)) and raised_on_purpose(err)


def one_line(err: BaseException) -> str:
    """The message on one line (a message of several lines is joined with ``; ``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def debug_requested(argv: list[str]) -> bool:
    value = os.environ.get(DEBUG_ENV, "").strip().lower()
    return DEBUG_FLAG in argv or value in ("1", "true", "yes", "y")
