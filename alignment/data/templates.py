"""Instruction templates, FLAN-style: each example is phrased through one of several templates.

The template is drawn per example from the seed, so a run is reproducible; the last
`held_out_templates` of a set are never used in training, which evaluates phrasings the model has
not seen.
"""

from __future__ import annotations

import random

PLAIN = "{instruction}\n\n{input}"

BUILTIN_TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "plain": (PLAIN,),
    "flan": (
        "{instruction}\n\n{input}",
        "Instruction: {instruction}\n\n{input}",
        "Here is a task. {instruction}\n\n{input}",
        "{instruction}\nAnswer the request below.\n\n{input}",
        "Please do the following: {instruction}\n\n{input}",
        "Task: {instruction}\n\nRespond to this task.\n\n{input}",
    ),
}


def resolve_template_set(templates: list[str] | str | None) -> tuple[str, ...] | None:
    if templates is None:
        return None
    if isinstance(templates, str):
        if templates not in BUILTIN_TEMPLATE_SETS:
            raise ValueError(
                f"unknown template set '{templates}'; built-in sets: {', '.join(BUILTIN_TEMPLATE_SETS)}, "
                "or give a list of templates"
            )
        return BUILTIN_TEMPLATE_SETS[templates]
    return tuple(templates)


def draw_template(
    templates: tuple[str, ...], held_out: int, row_index: int, seed: int, use_held_out: bool = False
) -> str:
    """The template for one row: from the seen templates, or (for held-out evaluation) the held-out ones."""
    if held_out >= len(templates):
        raise ValueError(f"held_out_templates={held_out} leaves no template for training (only {len(templates)})")
    pool = templates[len(templates) - held_out :] if use_held_out else templates[: len(templates) - held_out]
    return pool[random.Random(f"{seed}:{row_index}").randrange(len(pool))]


def render_instruction(template: str | None, instruction: str, input: str) -> str:
    """Renders an instruction and its optional input; without an input the template's input part is dropped."""
    text = (template or PLAIN).format(instruction=instruction, input=input)
    return text.strip() if input.strip() else text.replace("\n\n\n", "\n\n").strip()
