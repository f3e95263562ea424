"""Generated answers for held-out prompts, scored by each row's checker (exact-match accuracy).

SFT, PPO and DPO all evaluate through here on the same prompts, so their numbers compare.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from alignment.evaluation.checkers import resolve_checker
from alignment.models.sampling import Responses, sample
from alignment.recipes.schema import GenerationEvalConfig, SamplingConfig


@torch.no_grad()
def generate_responses(
    model: Any, tokenizer: Any, prompts: Sequence[list[dict]], config: SamplingConfig, desc: str = "generating"
) -> list[Responses]:
    """Responses to chat prompts in batches of `config.batch_size`, each batch with its token ids and texts."""
    was_training = model.training
    model.eval()
    batches = []
    try:
        for start in tqdm(range(0, len(prompts), config.batch_size), desc=desc, leave=False):
            batches.append(
                sample(
                    model,
                    tokenizer,
                    prompts[start : start + config.batch_size],
                    max_new_tokens=config.max_new_tokens,
                    temperature=config.temperature,
                    top_p=config.top_p,
                )
            )
    finally:
        model.train(was_training)
    return batches


def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[list[dict]], config: SamplingConfig, desc: str = "generating"
) -> list[str]:
    """Answers to chat prompts as text, greedy or sampled as `config` says (see `alignment.models.sampling`)."""
    return [text for batch in generate_responses(model, tokenizer, prompts, config, desc) for text in batch.texts]


def score_answers(examples: Sequence[dict], answers: Sequence[str], prefix: str) -> tuple[dict[str, float], list]:
    """Exact-match accuracy over rows that have a checker and a reference, overall and per group."""
    correct_by_group: dict[str, list[bool]] = defaultdict(list)
    rows = []
    for example, answer in zip(examples, answers, strict=True):
        correct = None
        if example.get("checker") and example.get("reference"):
            correct = bool(resolve_checker(example["checker"])(answer, example["reference"]))
            correct_by_group[example.get("group") or ""].append(correct)
        prompt = example["prompt"][-1]["content"]
        rows.append([prompt, answer, example.get("reference", ""), correct, example.get("group", "")])
    metrics: dict[str, float] = {}
    checked = [value for values in correct_by_group.values() for value in values]
    if checked:
        metrics[f"{prefix}/exact_match"] = sum(checked) / len(checked)
        for group, values in sorted(correct_by_group.items()):
            if group:
                metrics[f"{prefix}/exact_match/{group}"] = sum(values) / len(values)
    return metrics, rows


SAMPLE_COLUMNS = ["prompt", "response", "reference", "correct", "group"]


def evaluate_generation(
    model: Any, tokenizer: Any, split: Any, prefix: str, config: GenerationEvalConfig
) -> tuple[dict[str, float], list]:
    """Generates for the first `num_prompts` rows of `split` and scores them."""
    examples = split.select(range(min(config.num_prompts, len(split)))).to_list()
    answers = generate_answers(model, tokenizer, [example["prompt"] for example in examples], config, desc=prefix)
    return score_answers(examples, answers, prefix)
