"""Answer checkers: `checker(response, reference) -> bool`, by built-in name or `module:function`."""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

Checker = Callable[[str, str], bool]


def exact(response: str, reference: str) -> bool:
    """Exact match, surrounding whitespace ignored (for answers with one right spelling)."""
    return response.strip() == reference.strip()


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def final_number(text: str) -> str | None:
    """The answer of a GSM8K-style solution: what follows '####', else the last number in the text."""
    if "####" in text:
        text = text.split("####")[-1]
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def gsm8k(response: str, reference: str) -> bool:
    predicted, gold = final_number(response), final_number(reference)
    return predicted is not None and gold is not None and float(predicted) == float(gold)


BUILTIN_CHECKERS: dict[str, Checker] = {"exact": exact, "gsm8k": gsm8k}


def resolve_checker(name: str) -> Checker:
    if name in BUILTIN_CHECKERS:
        return BUILTIN_CHECKERS[name]
    module_name, _, function_name = name.partition(":")
    if not function_name:
        raise ValueError(f"unknown checker '{name}'; built-in: {', '.join(BUILTIN_CHECKERS)}, or module:function")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"checker '{name}' cannot be imported: {error}") from None


def exact_match_reward(prompts: list, responses: list[str], references: list[str]) -> list[float]:
    """A PPO reward function for tasks with checkable answers: 1 for an exact answer, else 0."""
    return [
        1.0 if exact(response, reference) else 0.0 for response, reference in zip(responses, references, strict=True)
    ]


def gsm8k_reward(prompts: list, responses: list[str], references: list[str]) -> list[float]:
    """A reward function for GSM8K-style maths: 1 when the final number equals the reference's, else 0."""
    return [
        1.0 if gsm8k(response, reference) else 0.0 for response, reference in zip(responses, references, strict=True)
    ]
