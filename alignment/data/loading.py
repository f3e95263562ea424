"""Loading raw datasets through `datasets`: hub ids, local files, and the embedded toy suite."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from datasets import Dataset, load_dataset

from alignment.recipes.schema import DatasetSpec
from alignment.toy.tasks import toy_rows

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


def load_raw(spec: DatasetSpec, seed: int) -> Dataset:
    """Loads one dataset's rows as they are (column mapping applied), before any format checks."""
    if spec.toy is not None:
        toy_seed = spec.toy.seed if spec.toy.seed is not None else seed
        try:
            return Dataset.from_list(toy_rows(spec.toy.rows, toy_seed, spec.toy.families))
        except ValueError as error:
            raise DataError(f"toy dataset: {error}") from None
    assert spec.path is not None
    if is_local(spec.path):
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise DataError(f"dataset file not found: {spec.path} (relative paths are read from {Path.cwd()})")
        builder, files = _local_files(path)
        try:
            dataset = load_dataset(builder, data_files=files, split="train")
        except Exception as error:  # arrow refuses mixed types; find the row in plain Python
            if builder != "json":
                raise DataError(f"{spec.path}: cannot load: {error}") from error
            rows = [row for file in files for row in read_json_rows(file)]
            raise _ArrowRefused(rows, error) from error
    else:
        try:
            dataset = load_dataset(spec.path, spec.name, split=spec.split)
        except Exception as error:
            raise DataError(f"{spec.path}: cannot load from the hub (split {spec.split!r}): {error}") from error
    return apply_column_mapping(dataset, spec)


class _ArrowRefused(Exception):
    """Arrow could not type the file's columns; carries the plain rows so the caller can name the bad one."""

    def __init__(self, rows: list[dict], cause: Exception):
        self.rows, self.cause = rows, cause


def apply_column_mapping(dataset: Dataset, spec: DatasetSpec) -> Dataset:
    missing = {canonical: column for canonical, column in spec.columns.items() if column not in dataset.column_names}
    if missing:
        canonical, column = next(iter(missing.items()))
        raise DataError(
            f"{spec.label}: columns.{canonical} names column '{column}', which the dataset lacks; "
            f"its columns are {dataset.column_names}"
        )
    renames = {column: canonical for canonical, column in spec.columns.items() if column != canonical}
    clashes = [canonical for canonical in renames.values() if canonical in dataset.column_names]
    if clashes:
        dataset = dataset.remove_columns(clashes)
    return dataset.rename_columns(renames) if renames else dataset


def raw_rows(spec: DatasetSpec, seed: int) -> tuple[list[dict], list[str]]:
    """The dataset's rows as Python dicts and its column names; plain JSON rows when arrow refused the file."""
    try:
        dataset = load_raw(spec, seed)
    except _ArrowRefused as refused:
        rows = refused.rows
        renames = {column: canonical for canonical, column in spec.columns.items()}
        rows = [{renames.get(key, key): value for key, value in row.items()} for row in rows]
        columns = sorted({key for row in rows if isinstance(row, dict) for key in row})
        return rows, columns
    return dataset.to_list(), list(dataset.column_names)
