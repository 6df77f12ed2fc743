"""Read raw rows from local files, saved datasets, or the Hugging Face hub.

Every row keeps where it came from (`Row.source`, `Row.index`) so that a bad row can be reported by file and
1-based row number (the line number for jsonl) long after it was read.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
import os
from pathlib import Path
from typing import Any

from posttrain.errors import DataError

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass(frozen=True)
class Row:
    """One raw row: `index` is the 1-based line (jsonl) or row (json list, csv data row, parquet, dataset)."""

    source: str
    index: int
    data: dict[str, Any]


def load_rows(sources: list[str] | str) -> list[Row]:
    """Read every row of every source, in order. Each source is a local file (json, jsonl, csv, parquet), a
    folder written by `datasets.Dataset.save_to_disk`, or — only when no such local path exists — a Hugging Face
    dataset name `name` or `name:split` (split defaults to `train`)."""
    if isinstance(sources, (str, Path)):
        sources = [str(sources)]
    rows: list[Row] = []
    for source in sources:
        rows.extend(_load_source(str(source)))
    return rows


def task_file(source: str) -> Path:
    """`task:NAME/FILE` -> the file of a built-in task (default settings, seed 0), generated on first use under
    `$POSTTRAIN_CACHE` (default `~/.cache/posttrain`). Lets example configs run with no data on disk."""
    from posttrain.tasks import get_task

    spec = source[len("task:"):]
    name, _, file = spec.partition("/")
    if not file:
        raise DataError("a task source is `task:NAME/FILE`, e.g. `task:arithmetic/sft.jsonl`", source=source)
    folder = Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain")) / "tasks" / f"{name}-seed0"
    path = folder / file
    if not path.is_file():
        get_task(name).generate(folder, seed=0)
    if not path.is_file():
        raise DataError(f"task {name!r} writes no file {file!r}", source=source)
    return path


def _load_source(source: str) -> list[Row]:
    if source.startswith("task:"):
        return [Row(source, r.index, r.data) for r in _load_source(str(task_file(source)))]
    path = Path(source).expanduser()
    if path.is_dir():
        rows = _read_saved_dataset(path, source)
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = _read_jsonl(path, source)
        elif suffix == ".json":
            rows = _read_json(path, source)
        elif suffix == ".csv":
            rows = _read_csv(path, source)
        elif suffix == ".parquet":
            rows = _read_parquet(path, source)
        else:
            raise DataError(f"unknown file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}", source=source)
    elif _looks_local(source):
        raise DataError("no such file or folder", source=source)
    else:
        rows = _read_hub_dataset(source)
    if not rows:
        raise DataError("the file has no rows (empty, or only blank lines)", source=source)
    return rows


def fingerprint_sources(sources: list[str]) -> dict[str, str]:
    """source -> sha256 of its contents (a folder: of its files' paths and contents, in order; a built-in task: of
    its generated file); a hub dataset name is recorded by name and split alone, as its contents are not read
    here. What a checkpoint's manifest records of the training data."""
    out = {}
    for source in sources:
        path = task_file(source) if source.startswith("task:") else Path(source).expanduser()
        h = hashlib.sha256()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        else:
            out[source] = hashlib.sha256(f"hub:{source}".encode()).hexdigest()
            continue
        for f in files:
            h.update(f.relative_to(path).as_posix().encode() if f != path else b"")
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        out[source] = h.hexdigest()
    return out


def _looks_local(source: str) -> bool:
    """A missing path that is clearly meant to be local must not be sent to the hub (a typo would then turn
    into a confusing network error)."""
    return source.lower().endswith(LOCAL_SUFFIXES) or source.startswith((".", "/", "~")) or "\\" in source


def _as_object(value: Any, source: str, index: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"a row must be a JSON object, got {type(value).__name__}", source=source, row=index)
    return value


# utf-8-sig: a UTF-8 byte-order mark (as Windows editors write) is read as nothing, not as part of the first key.
# CRLF line ends need nothing: the \r is JSON whitespace, and csv reads either.
ENCODING = "utf-8-sig"
_ARRAY_HINT = ("the file holds a JSON array, not one object per line (JSONL): rename it to .json, or write one "
               "row per line")


def _read_jsonl(path: Path, source: str) -> list[Row]:
    rows = []
    with path.open(encoding=ENCODING) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                if not rows and line.lstrip().startswith("["):
                    raise DataError(_ARRAY_HINT, source=source, row=lineno) from None
                raise DataError(f"invalid JSON on line {lineno}: {exc.msg} (column {exc.colno})",
                                source=source, row=lineno) from None
            if isinstance(value, list) and not rows:
                raise DataError(_ARRAY_HINT, source=source, row=lineno)
            rows.append(Row(source, lineno, _as_object(value, source, lineno)))
    return rows


def _read_json(path: Path, source: str) -> list[Row]:
    text = path.read_text(encoding=ENCODING)
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "; the file looks like JSONL (one object per line): rename it to .jsonl" if exc.msg == "Extra data" else ""
        raise DataError(f"invalid JSON on line {exc.lineno}: {exc.msg} (column {exc.colno}){hint}",
                        source=source, row=exc.lineno) from None
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise DataError("a .json file must hold a list of rows or {\"data\": [rows]}", source=source)
    return [Row(source, i, _as_object(v, source, i)) for i, v in enumerate(value, start=1)]


def _decode_cell(cell: str) -> Any:
    """CSV has only strings; a cell holding a JSON list or object (a `messages` column, say) is decoded."""
    stripped = cell.strip()
    if stripped[:1] in ("[", "{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return cell
        if isinstance(value, (list, dict)):
            return value
    return cell


def _read_csv(path: Path, source: str) -> list[Row]:
    with path.open(encoding=ENCODING, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = []
        for i, record in enumerate(reader, start=1):
            if None in record:
                raise DataError("the row has more cells than the header", source=source, row=i)
            rows.append(Row(source, i, {k: _decode_cell(v) if isinstance(v, str) else v for k, v in record.items()}))
    return rows


def _read_parquet(path: Path, source: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise DataError(f"cannot read parquet: {exc}", source=source) from None
    return [Row(source, i, r) for i, r in enumerate(records, start=1)]


def _dataset_rows(ds: Any, source: str) -> list[Row]:
    return [Row(source, i, dict(r)) for i, r in enumerate(ds.to_list(), start=1)]


def _read_saved_dataset(path: Path, source: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # not a save_to_disk folder
        raise DataError(f"not a dataset saved with `save_to_disk`: {exc}", source=source) from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) == 1:
            ds = next(iter(ds.values()))
        elif "train" in ds:
            ds = ds["train"]
        else:
            raise DataError(f"the saved dataset has splits {sorted(ds)}; point at one split's folder", source=source)
    return _dataset_rows(ds, source)


def _read_hub_dataset(source: str) -> list[Row]:
    import datasets

    name, _, split = source.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as exc:  # offline, unknown name, unknown split: all the user can act on is the message
        raise DataError(f"not a local file, and loading it as a Hugging Face dataset failed: {exc}",
                        source=source) from None
    return _dataset_rows(ds, source)
