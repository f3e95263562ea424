"""Preference pairs from a policy's own samples, labelled by the data's checker.

InstructGPT's labellers compared the SFT policy's own samples, so the reward model learned to tell
apart the answers PPO would go on to produce. Where the data has a checker (exact answers, GSM8K),
the checker can be the labeller: each wrong sample is paired against the reference answer. On the
embedded task suite, a reward model trained only on hand-made wrong answers ranks the reference above the
early SFT policy's own mistakes only 55% of the time, and PPO exploits exactly those mistakes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from alignment.data.loading import DataError
from alignment.evaluation.checkers import resolve_checker
from alignment.evaluation.generation import generate_answers
from alignment.recipes.schema import SamplingConfig
from alignment.recipes.validate import RecipeError


@dataclass
class PolicySamplesConfig(SamplingConfig):
    """Sampling of a policy stage on the training prompts; every wrong sample becomes a pair."""

    policy_from: str = ""  # the stage whose adapter samples (the SFT stage)
    samples_per_prompt: int = 2
    max_prompts: int | None = None  # training prompts to sample on (None: all)
    temperature: float = 1.0  # the sampling defaults of this use: varied samples, short answers
    max_new_tokens: int = 32
    batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.policy_from:
            raise RecipeError("policy_from", "policy_samples needs policy_from: <the stage that samples, e.g. sft>")
        if self.samples_per_prompt < 1:
            raise RecipeError("samples_per_prompt", f"must be at least 1, got {self.samples_per_prompt}")
        if self.temperature <= 0:
            raise RecipeError("temperature", f"must be above 0 (the samples must differ), got {self.temperature}")


def sample_policy_pairs(
    model: Any, tokenizer: Any, prompts: Dataset, config: PolicySamplesConfig, seed: int
) -> tuple[Dataset, dict[str, float]]:
    """Samples `samples_per_prompt` answers per prompt, checks each, and pairs every distinct wrong
    answer against the reference. Returns the pairs (the preference columns) and sampling metrics."""
    rows = [row for row in prompts if row.get("checker") and row.get("reference")]
    if not rows:
        raise DataError(
            "policy_samples: no training prompt has a checker and a reference answer to label samples with; "
            "use data with a checker (a `checker:` on the dataset, or a format that has one) or drop policy_samples"
        )
    if config.max_prompts is not None and config.max_prompts < len(rows):
        rows = random.Random(f"{seed}:policy-samples").sample(rows, config.max_prompts)
    repeated = [row for row in rows for _ in range(config.samples_per_prompt)]
    answers = generate_answers(model, tokenizer, [row["prompt"] for row in repeated], config, "policy samples")
    pairs, seen, correct, empty = [], set(), 0, 0
    for row, answer in zip(repeated, answers, strict=True):
        if resolve_checker(row["checker"])(answer, row["reference"]):
            correct += 1
            continue
        answer = answer.strip()
        key = (row["prompt"][-1]["content"], answer)
        if not answer:
            empty += 1
            continue
        if key in seen:
            continue
        seen.add(key)
        pairs.append(
            {
                "prompt": row["prompt"],
                "chosen": [{"role": "assistant", "content": row["reference"]}],
                "rejected": [{"role": "assistant", "content": answer}],
                "group": row.get("group"),
                "source": "policy_samples",
            }
        )
    metrics = {
        "policy_samples/prompts": len(rows),
        "policy_samples/samples": len(repeated),
        "policy_samples/accuracy": correct / len(repeated),
        "policy_samples/pairs": len(pairs),
        "policy_samples/dropped_empty": empty,
    }
    return Dataset.from_list(pairs), metrics
