"""Data sources, row formats and models that a recipe names instead of a path (`path: toy`,
`name_or_path: toy`). A plugin registers them; general modules look them up here and name no plugin.
The built-in plugins are listed below; other packages add theirs under the `alignment.plugins` entry point.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

BUILTIN_PLUGINS = ("alignment.toy.plugin",)  # the embedded tiny model and task suite
ENTRY_POINT_GROUP = "alignment.plugins"


@dataclass(frozen=True)
class DataSource:
    """Rows made by code: `make_rows(options, seed)` returns plain dicts in the source's `format`."""

    name: str
    options: type  # a dataclass: the keys a dataset's `options:` may set
    make_rows: Callable[[Any, int], list[dict]]
    format: str


SOURCES: dict[str, DataSource] = {}
MODELS: dict[str, Callable[[], Path]] = {}
_loaded = False


def load_plugins() -> None:
    """Imports the built-in plugins and those of installed packages, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_PLUGINS:
        importlib.import_module(module)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def register_source(source: DataSource) -> None:
    SOURCES[source.name] = source


def register_model(name: str, folder: Callable[[], Path]) -> None:
    MODELS[name] = folder


def data_source(name: str | None) -> DataSource | None:
    """The registered source called `name`, or None when it names a file or a hub dataset."""
    load_plugins()
    return SOURCES.get(name) if name else None


def model_folder(name: str) -> Path | None:
    """The weights folder of the registered model called `name`, or None for a path or a hub id."""
    load_plugins()
    return MODELS[name]() if name in MODELS else None
