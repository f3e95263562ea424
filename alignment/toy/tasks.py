"""The synthetic instruction task suite of the embedded default.

Each family has an input generator, an exact solver (the gold answer and its checker), several
instruction templates (so phrasings can be held out), and a corruption that gives a plausible
wrong answer (for preference pairs and reward models). Everything is a pure function of a seed.

The wrong answers mix the family's own mistake (partly reversed, partly upper case, off by one)
with the mistakes a small model makes on every string task (two letters swapped, one dropped,
doubled or replaced, the answer cut short). A reward model trained only on the family's own mistake
learns a shortcut (for upper case: "all capitals wins") and then scores a policy's scrambled
capitals as right, which PPO exploits.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase[:10]  # a-j: few symbols, so a tiny model learns to copy and map them


@dataclass(frozen=True)
class TaskFamily:
    name: str
    templates: tuple[str, ...]
    make_input: Callable[[random.Random], str]
    solve: Callable[[str], str]
    corrupt: Callable[[str, str, random.Random], str]

    def render(self, x: str, template_index: int) -> str:
        return self.templates[template_index].format(x=x)


def _word(rng: random.Random, low: int = 3, high: int = 5) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high)))


def _off_by_one(answer: str, rng: random.Random) -> str:
    value = int(answer)
    return str(value + 1 if value == 0 or rng.random() < 0.5 else value - 1)


def _swap_two(answer: str, rng: random.Random) -> str:
    chars = list(answer)
    for _ in range(10):
        i, j = rng.sample(range(len(chars)), 2)
        if chars[i] != chars[j]:
            chars[i], chars[j] = chars[j], chars[i]
            return "".join(chars)
    return answer + rng.choice(LETTERS)


def _letter_like(char: str, rng: random.Random) -> str:
    letter = rng.choice([other for other in LETTERS if other != char.lower()])
    return letter.upper() if char.isupper() else letter


def _string_slip(answer: str, rng: random.Random) -> str:
    """A small model's slip on a string answer: swap, drop, double or replace a letter, or stop early."""
    i = rng.randrange(len(answer))
    slip = rng.choice(["swap", "drop", "double", "replace", "cut"] if len(answer) > 1 else ["double", "replace"])
    if slip == "swap":
        return _swap_two(answer, rng)
    if slip == "drop":
        return answer[:i] + answer[i + 1 :]
    if slip == "double":
        return answer[: i + 1] + answer[i:]
    if slip == "replace":
        return answer[:i] + _letter_like(answer[i], rng) + answer[i + 1 :]
    return answer[: rng.randint(1, len(answer) - 1)]


def _number_slip(answer: str, rng: random.Random) -> str:
    """Off by one most often, sometimes by two or more."""
    value = int(answer)
    offset = rng.choice([1, 1, 1, 2, rng.randint(3, 9)]) * rng.choice([-1, 1])
    return str(value + offset if value + offset >= 0 else value - offset)


def _mixed_mistakes(own_mistake: Callable[[str, str, random.Random], str], slip: Callable[[str, random.Random], str]):
    """Half the time the family's own mistake, else a generic slip; never the right answer."""

    def corrupt(x: str, answer: str, rng: random.Random) -> str:
        wrong = own_mistake(x, answer, rng) if rng.random() < 0.5 else slip(answer, rng)
        return wrong if wrong != answer else answer + rng.choice(LETTERS)

    return corrupt


def _partly_reversed(x: str, answer: str, rng: random.Random) -> str:
    cut = rng.randint(1, len(x) - 1)
    return x[:cut][::-1] + x[cut:] if rng.random() < 0.5 else x


def _partly_upper(x: str, answer: str, rng: random.Random) -> str:
    cut = rng.randint(1, len(x) - 1)
    return x[:cut].upper() + x[cut:] if rng.random() < 0.5 else x.capitalize()


def _count_a_input(rng: random.Random) -> str:
    chars = [rng.choice("aa" + LETTERS[1:]) for _ in range(rng.randint(3, 7))]
    return "".join(chars)


def _sum_input(rng: random.Random) -> str:
    return f"{rng.randint(0, 9)}+{rng.randint(0, 9)}"


FAMILIES: dict[str, TaskFamily] = {
    family.name: family
    for family in [
        TaskFamily(
            "reverse",
            (
                "Reverse the string {x}.",
                "Write {x} backwards.",
                "What is {x} spelled in reverse?",
                "Flip the order of the letters in {x}.",
            ),
            _word,
            lambda x: x[::-1],
            _mixed_mistakes(_partly_reversed, _string_slip),
        ),
        TaskFamily(
            "uppercase",
            (
                "Convert {x} to upper case.",
                "Write {x} in capital letters.",
                "Uppercase this: {x}",
                "Make every letter of {x} a capital.",
            ),
            _word,
            str.upper,
            _mixed_mistakes(_partly_upper, _string_slip),
        ),
        TaskFamily(
            "sort",
            (
                "Sort the letters of {x} alphabetically.",
                "Put the letters in {x} in alphabetical order.",
                "Alphabetize: {x}",
                "Arrange the characters of {x} from a to z.",
            ),
            _word,
            lambda x: "".join(sorted(x)),
            _mixed_mistakes(lambda x, answer, rng: _swap_two(answer, rng), _string_slip),
        ),
        TaskFamily(
            "add",
            (
                "Compute {x}.",
                "What is {x}?",
                "Add the numbers: {x}",
                "Give the sum {x}.",
            ),
            _sum_input,
            lambda x: str(sum(int(part) for part in x.split("+"))),
            _mixed_mistakes(lambda x, answer, rng: _off_by_one(answer, rng), _number_slip),
        ),
        TaskFamily(
            "length",
            (
                "How many letters are in {x}?",
                "Count the characters of {x}.",
                "What is the length of {x}?",
                "Give the number of letters in {x}.",
            ),
            lambda rng: _word(rng, 1, 9),
            lambda x: str(len(x)),
            _mixed_mistakes(lambda x, answer, rng: _off_by_one(answer, rng), _number_slip),
        ),
        TaskFamily(
            "count_a",
            (
                "How many times does a appear in {x}?",
                "Count the letter a in {x}.",
                "Number of a's in {x}?",
                "Tell me how often the letter a occurs in {x}.",
            ),
            _count_a_input,
            lambda x: str(x.count("a")),
            _mixed_mistakes(lambda x, answer, rng: _off_by_one(answer, rng), _number_slip),
        ),
        TaskFamily(
            "repeat",
            (
                "Repeat {x} twice.",
                "Write {x} two times in a row.",
                "Say {x} and then {x} again, with no space.",
                "Double the string {x}.",
            ),
            lambda rng: _word(rng, 2, 4),
            lambda x: x + x,
            _mixed_mistakes(lambda x, answer, rng: x if rng.random() < 0.5 else x + x[:-1], _string_slip),
        ),
    ]
}


def toy_rows(
    count: int, seed: int, families: list[str] | None = None, exclude: set[tuple[str, str]] | None = None
) -> list[dict]:
    """Draws `count` distinct (family, input) instances, round-robin over the families.

    A family with few distinct instances (single-digit sums) stops contributing once it is exhausted,
    so every instance appears once and held-out rows are never seen in training.
    """
    names = list(families or FAMILIES)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown toy task families {unknown}; valid: {sorted(FAMILIES)}")
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows: list[dict] = []
    misses = dict.fromkeys(names, 0)
    turn = 0
    while len(rows) < count:
        active = [name for name in names if misses[name] < 500]
        if not active:
            raise ValueError(f"cannot draw {count} distinct toy instances from families {names}; got {len(rows)}")
        family = FAMILIES[active[turn % len(active)]]
        x = family.make_input(rng)
        if (family.name, x) in seen:
            misses[family.name] += 1
            continue
        turn += 1
        misses[family.name] = 0
        seen.add((family.name, x))
        rows.append({"family": family.name, "input": x, "answer": family.solve(x)})
    return rows


def wrong_answer(family: str, x: str, seed: int) -> str:
    fam = FAMILIES[family]
    return fam.corrupt(x, fam.solve(x), random.Random(f"{seed}:{family}:{x}"))
