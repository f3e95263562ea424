"""Sampling as the log-probabilities assume it, on a real chat model (SmolLM2-135M-Instruct, float32).

A chat model's own generation config adds logits processors and lists its own stop tokens; every
answer the suite generates (evaluation, policy samples, `alignment generate`, PPO's rollouts, which
share `alignment.models.sampling.sample`) must come from plain softmax(logits / T) and stop at every
stop token of the model and its template.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment.evaluation.generation import generate_answers
from alignment.recipes.schema import GenerationEvalConfig

PROMPTS = [[{"role": "user", "content": "Give me a fruit."}], [{"role": "user", "content": "Say hi."}]]


@pytest.fixture
def model_dir(smollm2, tmp_path):
    """A copy of SmolLM2 whose generation config can be changed."""
    copy = tmp_path / "model"
    shutil.copytree(smollm2, copy)
    return copy


def with_generation_config(model_dir, **settings):
    config = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps(config | settings))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), tokenizer


def plain_greedy(model, tokenizer, prompt: list[dict], max_new_tokens: int) -> str:
    """Greedy decoding by hand: the argmax of plain logits at every step, stopping at EOS."""
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_generation_ignores_the_models_own_logits_processors(model_dir):
    """The model's generation_config.json sets a repetition penalty, no repeated bigrams and a suppressed
    token (Qwen2.5-Instruct ships a repetition penalty): greedy answers must still be plain argmax."""
    model, tokenizer = with_generation_config(
        model_dir, repetition_penalty=1.5, no_repeat_ngram_size=2, suppress_tokens=[28], do_sample=True
    )
    config = GenerationEvalConfig(max_new_tokens=16, batch_size=2)
    answers = generate_answers(model, tokenizer, PROMPTS, config)
    assert answers == [plain_greedy(model, tokenizer, prompt, 16) for prompt in PROMPTS]

    with torch.no_grad():  # the model's own generate does apply them: the test would catch a leak
        own = model.generate(
            **tokenizer.apply_chat_template(PROMPTS[0], add_generation_prompt=True, return_tensors="pt", return_dict=True),
            do_sample=False, max_new_tokens=16,
        )  # fmt: skip
    assert tokenizer.decode(own[0], skip_special_tokens=True).split("assistant\n")[-1] != answers[0]


def test_answers_stop_at_every_stop_token_of_the_models_generation_config(model_dir):
    """Llama 3 lists <|end_of_text|>, <|eom_id|> and <|eot_id|> in its generation config. Here SmolLM2's
    lists the period besides <|im_end|>: every answer ends at its first period, and the same greedy
    answer without that setting runs on past it."""
    period = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids(".")
    config = GenerationEvalConfig(max_new_tokens=32, batch_size=2)
    model, tokenizer = with_generation_config(model_dir)
    free = generate_answers(model, tokenizer, PROMPTS, config)
    model, tokenizer = with_generation_config(model_dir, eos_token_id=[tokenizer.eos_token_id, period])
    stopped = generate_answers(model, tokenizer, PROMPTS, config)
    assert any("." in answer.rstrip(".") for answer in free)  # the free answers go on past a period
    for answer, longer in zip(stopped, free, strict=True):
        assert answer.endswith(".") and "." not in answer[:-1] and longer.startswith(answer)
