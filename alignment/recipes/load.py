"""Reading a recipe: YAML → command-line overrides → validated `Recipe`, before anything loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from alignment.plugins import data_source
from alignment.recipes.schema import Recipe
from alignment.recipes.validate import RecipeError, build, closest, join


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise RecipeError("", f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        problem = getattr(error, "problem", None) or str(error)
        raise RecipeError(where, f"malformed YAML: {problem}", file=str(path)) from None
    if not isinstance(data, dict):
        raise RecipeError("", f"a recipe is a YAML mapping, got {type(data).__name__}", file=str(path))
    return data


def _child(node: Any, part: str, path: str) -> tuple[Any, Any]:
    """The container and key that `part` names inside `node`; list items are found by `name` or index."""
    if isinstance(node, list):
        if part.isdigit() and int(part) < len(node):
            return node, int(part)
        for index, item in enumerate(node):
            if isinstance(item, dict) and item.get("name") == part:
                return node, index
        names = [item.get("name") for item in node if isinstance(item, dict)]
        hint = closest(part, [str(name) for name in names])
        raise RecipeError(
            join(path, part), f"no item named '{part}' (items: {names})" + (f"; did you mean '{hint}'?" if hint else "")
        )
    if isinstance(node, dict):
        return node, part
    raise RecipeError(path, f"cannot set a key inside a {type(node).__name__}")


def apply_override(data: dict[str, Any], expression: str) -> None:
    """Applies `a.b.c=value` (value read as YAML), e.g. `stages.sft.args.learning_rate=1e-4`."""
    key, sep, raw_value = expression.partition("=")
    if not sep or not key:
        raise RecipeError("--set", f"expected KEY=VALUE, got {expression!r}")
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError as error:
        raise RecipeError(f"--set {key}", f"value is not valid YAML: {error}") from None
    parts = key.split(".")
    node: Any = data
    path = ""
    for part in parts[:-1]:
        container, slot = _child(node, part, path)
        if isinstance(container, dict) and not isinstance(container.get(slot), (dict, list)):
            container[slot] = {}
        node = container[slot]
        path = join(path, part)
    container, slot = _child(node, parts[-1], path)
    container[slot] = value


def check_datasets(spec: Any, path: str) -> None:
    """Before any model loads: local dataset files exist and a plugin source's options are its keys.
    Hub ids are resolved at run time."""
    from alignment.data.loading import is_local

    data = getattr(spec, "data", None)
    if data is None:
        return
    for group in ("datasets", "eval_datasets"):
        for index, dataset in enumerate(getattr(data, group)):
            where = f"{path}.data.{group}[{index}]"
            source = data_source(dataset.path)
            if source is not None:
                build(source.options, dataset.options, f"{where}.options")
            elif dataset.options:
                raise RecipeError(
                    f"{where}.options", f"options belong to a plugin's data source; {dataset.path!r} is none"
                )
            elif is_local(dataset.path) and not Path(dataset.path).expanduser().exists():
                raise RecipeError(
                    f"{where}.path",
                    f"dataset file not found: {dataset.path} (relative paths are read from {Path.cwd()})",
                )


def validate_recipe(data: dict[str, Any], file: str | None = None) -> Recipe:
    """Checks every key and type, each stage against its type's spec, and its args against its config."""
    from alignment.stages import STAGE_TYPES

    try:
        recipe = build(Recipe, data, "")
        if not isinstance(data.get("stages"), list) or not data["stages"]:
            raise RecipeError("stages", "expected a non-empty list of stages")
        stages, names = [], []
        for index, raw in enumerate(data["stages"]):
            path = f"stages[{index}]"
            if not isinstance(raw, dict):
                raise RecipeError(path, f"expected a stage mapping, got {type(raw).__name__}")
            if isinstance(raw.get("name"), str):
                path = f"stages.{raw['name']}"
            stage_type = raw.get("type")
            if stage_type not in STAGE_TYPES:
                hint = closest(str(stage_type), STAGE_TYPES)
                raise RecipeError(
                    join(path, "type"),
                    f"unknown stage type {stage_type!r}; known types: {', '.join(STAGE_TYPES)}"
                    + (f". Did you mean '{hint}'?" if hint else ""),
                )
            stage_cls = STAGE_TYPES[stage_type]
            spec = build(stage_cls.spec_class, raw, path)
            if spec.name in names:
                raise RecipeError(join(path, "name"), f"stage name '{spec.name}' is used twice")
            for dependency in spec.depends_on():
                if dependency not in names:
                    raise RecipeError(
                        path,
                        f"depends on stage '{dependency}', which is not an earlier stage (earlier: {names or 'none'})",
                    )
            spec.args = stage_cls.check_args(spec.args, join(path, "args"))
            check_datasets(spec, path)
            stages.append(spec)
            names.append(spec.name)
        recipe.stages = stages
        return recipe
    except RecipeError as error:
        raise (error.in_file(file) if file else error) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    data = read_yaml(path)
    try:
        for expression in overrides:
            apply_override(data, expression)
    except RecipeError as error:
        raise error.in_file(str(path)) from None
    return validate_recipe(data, file=str(path))
