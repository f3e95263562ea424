"""Loading raw datasets: hub ids and local Parquet/CSV/Arrow through `datasets`, and plugins' sources.

Local JSON and JSONL (optionally gzipped) are read with Python's `json`: `datasets`' JSON loader falls
back to pandas when a column has mixed types and then silently coerces values (the string "5" becomes
the integer 5), so a row with a wrong type could not be named. Plain rows keep every value as
written; the checked examples become a `datasets.Dataset` right after.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from datasets import load_dataset

from alignment.plugins import data_source
from alignment.recipes.schema import DatasetSpec
from alignment.recipes.validate import build

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


class DataError(ValueError):
    """A data problem: names the dataset (file or hub id), and the row and field where there is one."""


def _builder_for(path: Path) -> str | None:
    suffixes = [suffix for suffix in path.suffixes if suffix not in COMPRESSIONS]
    return LOCAL_BUILDERS.get(suffixes[-1].lower()) if suffixes else None


def is_local(path: str) -> bool:
    """A path on disk (or one meant to be: it starts like a path or has a data file's extension)."""
    candidate = Path(path).expanduser()
    return (
        candidate.exists()
        or path.startswith((".", "/", "~"))
        or _builder_for(candidate) is not None
        or candidate.suffix in COMPRESSIONS
    )


def _local_files(path: Path) -> tuple[str, list[str]]:
    if path.is_dir():
        files = sorted(str(file) for file in path.rglob("*") if file.is_file() and _builder_for(file))
        builders = {_builder_for(Path(file)) for file in files}
        if not files or len(builders) != 1:
            raise DataError(
                f"{path}: a dataset folder needs data files of one kind ({', '.join(LOCAL_BUILDERS)}), "
                f"found {len(files)} files of kinds {sorted(b for b in builders if b)}"
            )
        return builders.pop(), files
    builder = _builder_for(path)
    if builder is None:
        raise DataError(f"{path}: unknown data file type; expected one of {', '.join(LOCAL_BUILDERS)} (optionally .gz)")
    return builder, [str(path)]


def read_json_rows(path: str) -> list[dict]:
    """Plain-Python JSON/JSONL reader, used to name the row at fault when arrow cannot load a file."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        text = handle.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    rows = []
    for number, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number + 1} is not valid JSON: {error}") from None
    return rows


def load_raw(spec: DatasetSpec, seed: int) -> tuple[list[dict], list[str]]:
    """One dataset's rows as plain dicts (column mapping applied), and its column names."""
    source = data_source(spec.path)
    if source is not None:
        try:
            rows = source.make_rows(build(source.options, spec.options, "options"), seed)
        except ValueError as error:
            raise DataError(f"{spec.path} dataset: {error}") from None
        return rows, sorted({key for row in rows for key in row})
    if is_local(spec.path):
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise DataError(f"dataset file not found: {spec.path} (relative paths are read from {Path.cwd()})")
        builder, files = _local_files(path)
        if builder == "json":
            rows = [row for file in files for row in read_json_rows(file)]
            columns = sorted({key for row in rows if isinstance(row, dict) for key in row})
            return apply_column_mapping(rows, columns, spec)
        try:
            dataset = load_dataset(builder, data_files=files, split="train")
        except Exception as error:
            raise DataError(f"{spec.path}: cannot load: {error}") from error
    else:
        try:
            dataset = load_dataset(
                spec.path, spec.name, data_dir=spec.data_dir, revision=spec.revision, split=spec.split
            )
        except Exception as error:
            given = {"data_dir": spec.data_dir, "revision": spec.revision, "split": spec.split}
            where = ", ".join(f"{key} {value!r}" for key, value in given.items() if value)
            raise DataError(f"{spec.path}: cannot load from the hub ({where}): {error}") from error
    return apply_column_mapping(dataset.to_list(), list(dataset.column_names), spec)


def apply_column_mapping(rows: list[dict], columns: list[str], spec: DatasetSpec) -> tuple[list[dict], list[str]]:
    """Renames the dataset's columns to the format's canonical fields, as the recipe's `columns` says."""
    missing = {canonical: column for canonical, column in spec.columns.items() if column not in columns}
    if missing:
        canonical, column = next(iter(missing.items()))
        raise DataError(
            f"{spec.path}: columns.{canonical} names column '{column}', which the dataset lacks; "
            f"its columns are {columns}"
        )
    renames = {column: canonical for canonical, column in spec.columns.items() if column != canonical}
    if not renames:
        return rows, columns
    rows = [
        {renames.get(key, key): value for key, value in row.items() if key not in renames.values() or key in renames}
        if isinstance(row, dict)
        else row
        for row in rows
    ]
    return rows, sorted({renames.get(column, column) for column in columns})
