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
from alignment.recipes.schema import GenerationEvalConfig


def render_prompts(tokenizer: Any, prompts: Sequence[list[dict]]) -> list[str]:
    return [tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) for prompt in prompts]


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[list[dict]], config: GenerationEvalConfig, desc: str = "generating"
) -> list[str]:
    """Answers each chat prompt; left padding so every answer starts right after its prompt."""
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = []
    texts = render_prompts(tokenizer, prompts)
    try:
        for start in tqdm(range(0, len(texts), config.batch_size), desc=desc, leave=False):
            batch = tokenizer(
                texts[start : start + config.batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model.device)
            sampling = config.temperature > 0
            output = model.generate(
                **batch,
                max_new_tokens=config.max_new_tokens,
                do_sample=sampling,
                temperature=config.temperature if sampling else None,
                top_p=config.top_p if sampling else None,
                top_k=None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
            completions = output[:, batch["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(completions, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return answers


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
