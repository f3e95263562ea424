"""Builds typed dataclasses from plain YAML values, with errors that name the key path at fault.

One validator serves our own configs and TRL's (which are dataclasses too), so every error reads the
same way: where (file and key path), what was found, what is expected, and the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any, Literal, Union


class RecipeError(ValueError):
    """A recipe problem, located by file and key path."""

    def __init__(self, path: str, message: str, file: str | None = None):
        self.path, self.message, self.file = path, message, file
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.file}: " if self.file else ""
        return f"{where}{self.path or '<top level>'}: {self.message}"

    def in_file(self, file: str) -> RecipeError:
        return RecipeError(self.path, self.message, file)


def closest(name: str, options: typing.Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_key_message(key: str, valid: list[str], what: str) -> str:
    suggestion = closest(key, valid)
    hint = f" Did you mean '{suggestion}'?" if suggestion else ""
    return f"unknown {what} '{key}'.{hint} Valid keys: {', '.join(sorted(valid))}"


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(value) for value in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 60 else text[:57] + '...'}"


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Checks `value` against the type hint `tp`, converting where YAML is ambiguous (e.g. '1e-4')."""
    if tp is Any or tp is typing.Any or isinstance(tp, (str, typing.TypeVar)):
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        candidates = [option for option in sorted(options, key=_union_order) if option is not type(None)]
        errors = []
        for option in candidates:
            try:
                return coerce(value, option, path)
            except RecipeError as error:
                errors.append((option, error))
        # A mapping meant for a nested config: its own error says more than "expected X | Y".
        for option, error in errors:
            if len(candidates) == 1 or (isinstance(value, dict) and dataclasses.is_dataclass(option)):
                raise error
        raise RecipeError(path, f"expected {_type_name(tp)}, got {_describe(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        hint = closest(str(value), [str(choice) for choice in choices])
        extra = f" Did you mean '{hint}'?" if hint else ""
        raise RecipeError(path, f"expected one of {', '.join(map(repr, choices))}, got {value!r}.{extra}")
    if origin in (list, tuple, typing.get_origin(typing.Sequence[int])):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(path, f"expected {_type_name(tp)}, got {_describe(value)}")
        args = typing.get_args(tp)
        item_type = args[0] if args else Any
        return [coerce(item, item_type, join(path, index)) for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(path, f"expected a mapping, got {_describe(value)}")
        args = typing.get_args(tp)
        value_type = args[1] if len(args) == 2 else Any
        return {key: coerce(item, value_type, join(path, str(key))) for key, item in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            tp(value)
            return value  # validated; configs accept the plain value, and it stays printable
        except ValueError:
            choices = [member.value for member in tp]
            raise RecipeError(path, f"expected one of {choices}, got {value!r}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(path, f"expected true or false, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(path, f"expected an integer, got {_describe(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(path, f"expected a number, got {_describe(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(path, f"expected a string, got {_describe(value)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise RecipeError(path, f"expected {_type_name(tp)}, got {_describe(value)}")
    return value


def _union_order(tp: Any) -> int:
    """Try exact scalar types before looser ones, so `int | str` keeps 5 an int and `float | str` parses '1e-4'."""
    order = {bool: 0, int: 1, float: 2, str: 9}
    return order.get(tp, 5)


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {field.name: hints.get(field.name, Any) for field in dataclasses.fields(cls) if field.init}


def check_keys(cls: type, data: dict, path: str, what: str = "key") -> None:
    """Every key is a field of `cls`; a key the class lists in `RENAMED_KEYS` is refused with its new name."""
    valid = list(field_types(cls))
    renamed = getattr(cls, "RENAMED_KEYS", {})
    for key in data:
        if key in renamed:
            raise RecipeError(join(path, str(key)), f"'{key}' is now spelled '{renamed[key]}' (same value)")
        if key not in valid:
            raise RecipeError(join(path, str(key)), unknown_key_message(str(key), valid, what))


def build(cls: type, data: Any, path: str, what: str = "key") -> Any:
    """Instantiates dataclass `cls` from `data`, raising RecipeError at the first problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(path, f"expected a mapping, got {_describe(data)}")
    check_keys(cls, data, path, what)
    types_by_name = field_types(cls)
    kwargs = {}
    for name, tp in types_by_name.items():
        if name in data:
            kwargs[name] = coerce(data[name], tp, join(path, name))
    missing = [
        field.name
        for field in dataclasses.fields(cls)
        if field.init
        and field.name not in kwargs
        and field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RecipeError(join(path, missing[0]), f"required key '{missing[0]}' is missing")
    try:
        return cls(**kwargs)
    except RecipeError as error:
        raise RecipeError(join(path, error.path) if error.path else path, error.message) from None
    except (ValueError, TypeError) as error:
        raise RecipeError(path, f"invalid {cls.__name__}: {error}") from None


def check_args(cls: type, args: dict, path: str) -> dict:
    """Checks a stage's pass-through `args` against a (TRL) config dataclass without instantiating it.

    Instantiating TRL configs has side effects (device set-up, output folders), so the stage builds
    them at run time; here every key and value type is checked, which is what validation owes.
    """
    valid = list(field_types(cls))
    for key in args:
        if key not in valid:
            raise RecipeError(join(path, str(key)), unknown_key_message(str(key), valid, f"{cls.__name__} field"))
    types_by_name = field_types(cls)
    return {key: coerce(value, types_by_name[key], join(path, key)) for key, value in args.items()}
