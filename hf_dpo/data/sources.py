"""Which reader a preference data source goes to: our line reader, ``load_from_disk`` or ``datasets.load_dataset``.

The rule (docs/data.md, "Sources and row ids"):

- An existing local path always wins over a hub name of the same spelling.
  - A ``.jsonl``/``.json`` file, or a folder with such files at its top level: our
    reader (physical line numbers, located errors).
  - A folder written by ``save_to_disk``: ``datasets.load_from_disk``.
  - A ``.parquet`` file, or any other folder (the hub layout, e.g.
    ``data/train-00000-of-00001.parquet``): ``datasets.load_dataset`` on it.
- A path that does not exist and looks like a file (suffix ``.jsonl``/``.json``/``.parquet``,
  or starting with ``./``, ``../``, ``/`` or ``~``) is a ``FileNotFoundError`` naming it.
- Anything else that is a valid hub id (``name`` or ``org/name``) goes to
  ``datasets.load_dataset(name, name=config, split=..., data_files=..., revision=...)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import datasets

ROW_FILE_SUFFIXES = (".jsonl", ".json")
FILE_SUFFIXES = (*ROW_FILE_SUFFIXES, ".parquet")
PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")
# The hub's repo id: an optional namespace and a name, of letters, digits, '-', '_' and '.'.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
DEFAULT_SPLIT = "train"


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def source_kind(source: str) -> str:
    """``"rows_file"``, ``"rows_dir"``, ``"saved"``, ``"local_dataset"`` or ``"hub"`` for ``source``; see the module docstring.

    Raises ``FileNotFoundError`` naming ``source`` when it does not exist and looks like a file path.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return "local_dataset" if path.suffix == ".parquet" else "rows_file"
    if path.is_dir():
        if is_saved_dataset(path):
            return "saved"
        if any(p.is_file() and p.suffix in ROW_FILE_SUFFIXES for p in path.iterdir()):
            return "rows_dir"
        return "local_dataset"
    if source.startswith(PATH_PREFIXES) or path.suffix in FILE_SUFFIXES or not HUB_ID.match(source):
        raise FileNotFoundError(
            f"preference data not found: {source} (no such file or folder; a hub data set is named 'name' or 'org/name')"
        )
    return "hub"


def _pick_split(data: Any, split: Optional[str], where: str) -> datasets.Dataset:
    """One split of a ``DatasetDict`` (``split`` or ``"train"``), or the ``Dataset`` itself if it has that split."""
    if isinstance(data, datasets.DatasetDict):
        chosen = split or DEFAULT_SPLIT
        if chosen not in data:
            raise ValueError(f"{where}: no split {chosen!r}; available: {list(data)} (pass split=)")
        return data[chosen]
    own = None if data.split is None else str(data.split)
    if split not in (None, DEFAULT_SPLIT, own):
        raise ValueError(f"{where}: is one data set (split {own!r}), not a DatasetDict with a split {split!r}")
    return data


def open_with_datasets(
    kind: str,
    source: str,
    split: Optional[str] = None,
    name: Optional[str] = None,
    data_files: Any = None,
    revision: Optional[str] = None,
) -> tuple[str, datasets.Dataset]:
    """``(label, Dataset)`` for a source of kind ``saved``, ``local_dataset`` or ``hub``; the label names it in messages."""
    if kind == "saved":
        if name is not None or data_files is not None or revision is not None:
            raise ValueError(f"{source}: a save_to_disk folder takes no name, data_files or revision")
        data = _pick_split(datasets.load_from_disk(str(Path(source).expanduser())), split, source)
        return f"{source}:{split or DEFAULT_SPLIT}", data
    path = str(Path(source).expanduser()) if kind == "local_dataset" else source
    if kind == "local_dataset" and Path(path).is_file():
        # One parquet file: the packaged builder reads it as its only split, "train".
        if split not in (None, DEFAULT_SPLIT) or data_files is not None:
            raise ValueError(
                f"{source}: one parquet file has one split ('train') and no data_files; got split={split!r}"
            )
        path, data_files = "parquet", path
    kwargs = {"name": name, "data_files": data_files, "revision": revision}
    data = datasets.load_dataset(
        path, split=split or DEFAULT_SPLIT, **{k: v for k, v in kwargs.items() if v is not None}
    )
    return f"{source}:{split or DEFAULT_SPLIT}", data
