"""Registers the embedded default: the `toy` data source and row format and the `toy` model.

The one place the general modules learn of the toy suite (listed in `alignment.plugins`).
"""

from __future__ import annotations

from dataclasses import dataclass

from alignment.data.formats import (
    Format,
    RowContext,
    RowError,
    preference_example,
    prompt_example,
    register_format,
    require_text,
    sft_example,
    user,
    with_system,
)
from alignment.plugins import DataSource, register_model, register_source
from alignment.toy.base import TOY_MODEL_NAME, shipped_toy_base
from alignment.toy.tasks import FAMILIES, toy_rows, wrong_answer


@dataclass
class ToyOptions:
    """A dataset's `options:` for `path: toy`: how many instances, of which task families."""

    rows: int = 2000
    families: list[str] | None = None
    seed: int | None = None  # defaults to the data's seed


def _rows(options: ToyOptions, seed: int) -> list[dict]:
    return toy_rows(options.rows, options.seed if options.seed is not None else seed, options.families)


def _prompt(row: dict, ctx: RowContext) -> tuple[list[dict], str, str]:
    family = require_text(row, "family")
    if family not in FAMILIES:
        raise RowError("family", f"unknown toy task family {family!r}; valid: {sorted(FAMILIES)}")
    x = require_text(row, "input")
    template = ctx.template if ctx.template is not None else FAMILIES[family].templates[0]
    return with_system(user(template.format(x=x)), ctx.system), FAMILIES[family].solve(x), family


def _sft(row: dict, ctx: RowContext) -> dict:
    prompt, answer, family = _prompt(row, ctx)
    return sft_example(prompt, answer, ctx, group=family)


def _prompt_only(row: dict, ctx: RowContext) -> dict:
    prompt, answer, family = _prompt(row, ctx)
    return prompt_example(prompt, answer, ctx, group=family)


def _preference(row: dict, ctx: RowContext) -> dict:
    prompt, answer, family = _prompt(row, ctx)
    return preference_example(prompt, answer, wrong_answer(family, row["input"], ctx.seed), group=family)


register_format(
    Format(
        "toy",
        ("family", "input"),
        {"sft": _sft, "prompt": _prompt_only, "preference": _preference},
        uses_templates=True,
        default_checker="exact",
        row_templates=lambda row: FAMILIES[row["family"]].templates if row.get("family") in FAMILIES else None,
    )
)
register_source(DataSource("toy", ToyOptions, _rows, format="toy"))
register_model(TOY_MODEL_NAME, shipped_toy_base)
