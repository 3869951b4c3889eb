"""Stage 1, data in: preference rows from files, data sets or the hub, checked into one canonical layout.

``sources`` decides which reader a source goes to, ``rows`` turns one raw row into the
canonical row (or a :class:`DataError`) with ``columns`` (the column mapping), ``messages``
(message checks, typed content parts) and ``llamafactory`` (LLaMA-Factory's layouts), ``reading`` reads whole sources and keeps the
:class:`DataReport` (``report``) of what happened to every row.
"""

from .errors import UNTRAINABLE, DataError
from .reading import data_report, is_canonical, load_preference_dataset, read_preference_rows, with_report
from .report import DataReport
from .rows import LAYOUTS, MESSAGE_LAYOUTS, ROLES, detect_layout, validate_row

__all__ = [
    "DataError",
    "DataReport",
    "LAYOUTS",
    "MESSAGE_LAYOUTS",
    "ROLES",
    "UNTRAINABLE",
    "data_report",
    "detect_layout",
    "is_canonical",
    "load_preference_dataset",
    "read_preference_rows",
    "validate_row",
    "with_report",
]
