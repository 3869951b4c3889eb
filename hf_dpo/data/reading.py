"""Preference rows from files, data sets or the hub, validated into one canonical layout.

Accepted layouts, detected per row (:data:`hf_dpo.data.rows.LAYOUTS`, docs/data.md): MiniMind
``{"chosen": [messages], "rejected": [messages]}``; conversational ``{"prompt": [messages], ...}``;
strings ``{"prompt": str, "chosen": str, "rejected": str}``; a string prompt beside full
conversations (UltraFeedback-binarized); LLaMA-Factory's sharegpt and alpaca preference rows;
and any of them under other column names through a column mapping.

Every row becomes ``{"row_id", "layout", "prompt", "chosen", "rejected",
"prompt_text", "chosen_text", "rejected_text"}``: message layouts fill the three
message lists (``chosen``/``rejected`` hold the single final assistant turn) and
leave the texts empty; the string layout does the opposite. ``row_id`` is the
physical line number of a JSONL file (1-based) or the index in a data set; when
a directory holds several files, each file's ids are shifted past the previous
file's, and :meth:`~hf_dpo.data.report.DataReport.locate` turns an id back into ``(file, line)``.

Every rule (what raises, what is skipped, what is counted) is in docs/data.md.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

import datasets

from .columns import parse_columns
from .errors import UNTRAINABLE, DataError, place
from .report import DataReport
from .rows import canonicalise
from .sources import open_with_datasets, source_kind

logger = logging.getLogger(__name__)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield ``(physical line, parsed JSON)``; raise :class:`DataError` for undecodable lines."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_number, DataError(f"invalid UTF-8 at byte {err.start}", code="invalid_utf8")
                continue
            if not text.strip():
                continue
            try:
                # Without its line end, so that error columns count within this line.
                yield line_number, json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                hint = ""
                if line_number == 1 and text.strip() in ("[", "{"):
                    hint = "; this looks like a pretty-printed JSON document, not JSON Lines: name it .json, one array of rows"
                yield line_number, DataError(f"malformed JSON ({err.msg} at column {err.colno}){hint}", code="bad_json")
            except (ValueError, RecursionError) as err:  # integers over Python's digit limit, absurd nesting
                yield line_number, DataError(f"malformed JSON ({type(err).__name__}: {str(err)[:80]})", code="bad_json")


def _json_document_rows(path: Path) -> Optional[list]:
    """The rows of a ``.json`` file holding one array (or ``{"data": [...]}``), else None (read it as JSON Lines)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return data["data"]
    return data if isinstance(data, list) else None


def _iter_file(path: Path) -> tuple[Iterator[tuple[int, Any]], str]:
    """The file's ``(row number, row)`` pairs and what the number counts (``"line"``, or ``"item"``)."""
    if path.suffix == ".json":
        rows = _json_document_rows(path)
        if rows is not None:
            # A JSON array has no useful physical lines; rows are numbered from 1 in order: file:item N.
            return enumerate(rows, start=1), "item"
    return _iter_jsonl(path), "line"


def _files_in(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.suffix in (".jsonl", ".json") and p.is_file())
    if not files:
        raise DataError("no .jsonl or .json files in this directory", source=str(directory), code="empty_source")
    return files


def _rows_of(
    source: Any, split: Optional[str], hub_options: Optional[dict] = None
) -> Iterable[tuple[str, Iterable[tuple[int, Any]], str]]:
    """Yield ``(source label, iterator of (row id, raw row), unit)`` for every part of ``source``; ``unit`` says
    what the row id counts in messages (``"line"``, or ``"item"`` in a JSON array).

    ``hub_options`` (``name``, ``data_files``, ``revision``) go to ``datasets.load_dataset``;
    which reader a string source goes to is decided in :func:`hf_dpo.data.sources.source_kind`.
    """
    hub_options = {k: v for k, v in (hub_options or {}).items() if v is not None}
    if isinstance(source, (datasets.Dataset, list)):
        label = "<dataset>" if isinstance(source, datasets.Dataset) else "<rows>"
        yield label, enumerate(source), "line"
        return
    if isinstance(source, datasets.DatasetDict):
        if split is None and "train" not in source:
            raise ValueError(f"a DatasetDict needs split=; available: {list(source)}")
        yield f"<dataset:{split or 'train'}>", enumerate(source[split or "train"]), "line"
        return
    text = os.fspath(source)
    kind = source_kind(text)
    if kind in ("rows_file", "rows_dir"):
        if hub_options:
            # Never silently ignored: these options mean nothing to a JSON Lines file.
            raise ValueError(
                f"{text}: {', '.join(sorted(hub_options))} apply to hub names and data set folders, not to .jsonl/.json files"
            )
        path = Path(text).expanduser()
        for file in _files_in(path) if kind == "rows_dir" else [path]:
            yield str(file), *_iter_file(file)
        return
    label, data = open_with_datasets(kind, text, split, **hub_options)
    yield label, enumerate(data), "line"


def read_preference_rows(
    source: Union[str, os.PathLike, datasets.Dataset, list],
    split: Optional[str] = None,
    on_bad_row: str = "error",
    *,
    name: Optional[str] = None,
    data_files: Any = None,
    revision: Optional[str] = None,
    columns: Optional[dict[str, str]] = None,
) -> tuple[list[dict[str, Any]], DataReport]:
    """Validate every row of ``source``; return the canonical rows and the report.

    ``name`` (the data set's config), ``data_files`` and ``revision`` are passed to
    ``datasets.load_dataset`` for hub names and local data set folders.

    ``columns`` maps hf_dpo's column names to the row's (:mod:`hf_dpo.data.columns`), e.g.
    ``{"prompt": "question"}``; a JSON object string is accepted too.

    ``on_bad_row="error"`` raises the first structural error; ``"skip"`` counts
    it per reason instead. Untrainable pairs are always skipped and counted.
    An empty result is an error.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row: expected 'error' or 'skip', got {on_bad_row!r}")
    columns = parse_columns(columns)
    report = DataReport(columns=dict(columns or {}))
    rows: list[dict[str, Any]] = []
    offset = 0
    for label, items, unit in _rows_of(source, split, {"name": name, "data_files": data_files, "revision": revision}):
        report.sources.append(label)
        report.offsets.append(offset)
        report.units.append(unit)
        last_line = 0
        for line, raw in items:
            last_line = line
            report.rows_read += 1
            try:
                if isinstance(raw, DataError):
                    raise raw
                # Each row is canonicalised on its own, so the layouts may be mixed in one source (counted per layout).
                canonical, notes = canonicalise(raw, columns)
            except DataError as err:
                located = err.at(label, line, unit)
                if on_bad_row == "error" and err.code not in UNTRAINABLE:
                    raise located from None
                report.skip(err.code, f"{label}:{place(line, unit)}")
                logger.debug("skipped %s", located)
                continue
            for note in notes:
                report.counters[note] += 1
            canonical["row_id"] = offset + line
            report.counters[f"layout_{canonical['layout']}"] += 1
            rows.append(canonical)
        # Ids stay unique across the files of a directory: the next file starts past this one's last line.
        offset += last_line
    report.rows_kept = len(rows)
    if not rows:
        raise DataError(_nothing_kept(report), source=", ".join(report.sources), code="empty_source")
    return rows, report


def _nothing_kept(report: DataReport) -> str:
    if not report.rows_read:
        return "no rows: the source is empty (blank lines only, or no lines at all)"
    return f"no valid preference rows: all {report.rows_read} rows were skipped: {report.describe_skips()}"


REPORT_MARKER = "hf_dpo.data_report="


def load_preference_dataset(
    source: Union[str, os.PathLike, datasets.Dataset, list],
    split: Optional[str] = None,
    on_bad_row: str = "error",
    *,
    name: Optional[str] = None,
    data_files: Any = None,
    revision: Optional[str] = None,
    columns: Optional[dict[str, str]] = None,
) -> datasets.Dataset:
    """Load preference rows from a JSONL/JSON file or directory, a ``save_to_disk`` or parquet folder, a
    ``datasets.Dataset``/``DatasetDict``, a list, or a hub name (``org/name``).

    ``split`` (default ``"train"``), ``name`` (the config), ``data_files`` and ``revision`` are
    those of ``datasets.load_dataset``; an existing local path wins over a hub name
    (rules: :mod:`hf_dpo.data.sources`). ``columns`` maps hf_dpo's column names to the
    data's own, e.g. ``{"prompt": "question", "chosen": "response_j", "rejected": "response_k"}``.

    Returns a ``datasets.Dataset`` in the canonical layout (see module docstring).
    Bad rows raise :class:`DataError` naming ``file:line: field: reason``, or are
    counted and skipped with ``on_bad_row="skip"``; the counts travel with the
    data set and are read back by :func:`data_report`.
    """
    rows, report = read_preference_rows(
        source,
        split=split,
        on_bad_row=on_bad_row,
        name=name,
        data_files=data_files,
        revision=revision,
        columns=columns,
    )
    if report.rows_skipped:
        logger.warning(
            "skipped %d of %d rows: %s",
            report.rows_skipped,
            report.rows_read,
            ", ".join(
                f"{code} x{n} (e.g. {', '.join(report.skip_examples[code])})" for code, n in report.skipped.items()
            ),
        )
    features = datasets.Features(
        {
            "row_id": datasets.Value("int64"),
            "layout": datasets.Value("string"),
            **{
                k: [{"role": datasets.Value("string"), "content": datasets.Value("string")}]
                for k in ("prompt", "chosen", "rejected")
            },
            **{k: datasets.Value("string") for k in ("prompt_text", "chosen_text", "rejected_text")},
        }
    )
    if any("chat_template_kwargs" in row for row in rows):
        # Per-row template kwargs (JSON text; None where a row has none), only when some row has them.
        features["chat_template_kwargs"] = datasets.Value("string")
    info = datasets.DatasetInfo(description=REPORT_MARKER + json.dumps(report.to_dict()), features=features)
    return datasets.Dataset.from_list(rows, features=features, info=info)


def data_report(dataset: datasets.Dataset) -> Optional[DataReport]:
    """The :class:`DataReport` a data set was loaded with, if it came from :func:`load_preference_dataset`."""
    description = getattr(dataset.info, "description", "") or ""
    if not description.startswith(REPORT_MARKER):
        return None
    return DataReport.from_dict(json.loads(description[len(REPORT_MARKER) :]))


def with_report(dataset: datasets.Dataset, report: DataReport) -> datasets.Dataset:
    """``dataset`` carrying ``report`` for :func:`data_report`: after a split or a selection, so that the subset's
    report keeps the source's rows located as ``file:line`` (see :meth:`DataReport.subset`)."""
    dataset.info.description = REPORT_MARKER + json.dumps(report.to_dict())
    return dataset


def is_canonical(dataset: datasets.Dataset) -> bool:
    """Whether ``dataset`` is already in the canonical layout."""
    return {"row_id", "layout", "prompt", "chosen", "rejected", "prompt_text"} <= set(dataset.column_names)
