"""Reward models: the one format they are saved in, and the one way anything is scored.

A reward stage saves a PEFT sequence-classification adapter with its `score` layer (PEFT's
`modules_to_save`), which plain `transformers` + `peft` load; `load_reward_role` puts the same files
onto the causal-LM base PPO shares, as one more adapter and a head beside it. Every score (the reward
stage's evaluation, PPO's reward sources, `alignment score`) is the head read at the last real token
of the decoder's final hidden states, positions counted from the mask: padding changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from alignment.models.batching import encode_conversations, pad
from alignment.models.heads import active_adapter, final_hidden_states, head_from_weights, last_token_index
from alignment.models.loading import (
    SCORE_MODULE,
    attach_adapter,
    load_base_model,
    load_stage_recipe,
    split_reward_adapter,
)
from alignment.models.sampling import Responses, turn_suffix_ids
from alignment.names import REWARD

# --- Scoring ----------------------------------------------------------------------------------


def read_out(head: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The score at each row's last real token, (batch,), in float32: our heads' own read-out, or a
    classification model's linear `score` layer."""
    attention_mask = attention_mask.to(hidden.device)
    if hasattr(head, "last_token_scores"):
        return head.last_token_scores(hidden, attention_mask).float()
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
    return head(last.to(head.weight.dtype)).squeeze(-1).float()


def sequence_scores(
    model: PreTrainedModel | PeftModel,
    head: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    adapter: str | None = None,
) -> torch.Tensor:
    """One score per sequence, with `adapter` active."""
    with active_adapter(model, adapter):
        hidden = final_hidden_states(model, input_ids, attention_mask)
    return read_out(head, hidden, attention_mask)


def token_scores(
    model: PreTrainedModel | PeftModel,
    head: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    adapter: str | None = None,
) -> torch.Tensor:
    """Every token's score, (batch, length), with `adapter` active: PPO's value role reads V(s_t) there."""
    with active_adapter(model, adapter):
        hidden = final_hidden_states(model, input_ids, attention_mask)
    return head.token_scores(hidden, attention_mask)


@torch.no_grad()
def score_batches(
    model: PreTrainedModel | PeftModel, head: nn.Module, batches: Iterable[dict], adapter: str | None = None
) -> torch.Tensor:
    """Scores of every row of every batch, in eval mode (the model's mode is put back after)."""
    was_training = model.training
    model.eval()
    device = model.get_input_embeddings().weight.device
    try:
        scores = [
            sequence_scores(model, head, batch["input_ids"].to(device), batch["attention_mask"].to(device), adapter)
            for batch in batches
        ]
    finally:
        model.train(was_training)
    return torch.cat(scores)


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    return (items[start : start + size] for start in range(0, len(items), size))


def score_conversations(
    model: PreTrainedModel | PeftModel,
    head: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict]],
    batch_size: int = 16,
    adapter: str | None = None,
) -> list[float]:
    """Scores of whole conversations, in batches."""
    batches = (encode_conversations(tokenizer, chunk) for chunk in _chunks(conversations, batch_size))
    return score_batches(model, head, batches, adapter).tolist()


# --- Reward sources for PPO: sampled responses → one score each -------------------------------
# The reward role, a separate reward model or a Python function. A source gets the token ids too, so a
# reward model scores exactly what was sampled.
RewardSource = Callable[[Responses], torch.Tensor]


def adapter_reward(model: PeftModel, head: torch.nn.Module, tokenizer: Any, batch_size: int = 16) -> RewardSource:
    """The reward role: the reward adapter and its head score the sampled token ids themselves.

    A finished response gets the template's text after the end-of-turn token (ChatML's newline), so it
    is read at the token the reward stage trained at; a response cut at the length limit is scored as
    it is, visibly unfinished, and any special token the policy emitted stays in view.
    """
    suffix = turn_suffix_ids(tokenizer)

    def score(responses: Responses) -> torch.Tensor:
        sequences = [responses.sampled_ids(row, suffix) for row in range(len(responses))]
        return score_batches(model, head, (pad(tokenizer, chunk) for chunk in _chunks(sequences, batch_size)), REWARD)

    return score


def separate_model_reward(model: Any, tokenizer: Any, policy_tokenizer: Any, batch_size: int = 16) -> RewardSource:
    """A reward model of its own, with its own tokenizer and chat template, read at the last real token
    (found from the attention mask, not from the pad id), as TRL's RewardTrainer trains one.

    The response is decoded with its special tokens; a finished one is rendered as a closed assistant
    turn, a cut one after the generation prompt with nothing closing it.
    """

    def render(responses: Responses, row: int) -> str:
        ids = responses.response_ids[row][responses.response_mask[row].bool()]
        if bool(responses.ended[row]):
            ids = ids[:-1]  # the stop token: the reward model's template closes the turn its own way
        text = policy_tokenizer.decode(ids, skip_special_tokens=False)
        prompt = responses.prompts[row]
        if bool(responses.ended[row]):
            return tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": text}], tokenize=False)
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) + text

    def score(responses: Responses) -> torch.Tensor:
        texts = [render(responses, row) for row in range(len(responses))]
        batches = (
            tokenizer(list(chunk), padding=True, return_tensors="pt", add_special_tokens=False)
            for chunk in _chunks(texts, batch_size)
        )
        return score_batches(model, getattr(model, SCORE_MODULE), batches)

    return score


def function_reward(function: Callable, references: dict[str, str]) -> RewardSource:
    """A Python reward `f(prompts, responses, references) -> list[float]`, e.g. a gold-answer check."""

    def score(responses: Responses) -> torch.Tensor:
        refs = [references.get(prompt[-1]["content"], "") for prompt in responses.prompts]
        return torch.tensor(function(responses.prompts, responses.texts, refs), dtype=torch.float32)

    return score


class WeightedReward:
    """Several reward sources as one: the weighted sum of their scores (a reward model and a format or
    answer checker, say). Each source's own scores of the last call stay in `components`, so that each
    is logged on its own."""

    def __init__(self, sources: dict[str, tuple[RewardSource, float]]):
        self.sources = sources
        self.components: dict[str, torch.Tensor] = {}

    def __call__(self, responses: Responses) -> torch.Tensor:
        self.components = {name: source(responses).float().cpu() for name, (source, _) in self.sources.items()}
        return sum(weight * self.components[name] for name, (_, weight) in self.sources.items())


# --- The reward model's files -----------------------------------------------------------------


def trained_score_head(model: PeftModel) -> nn.Module:
    """The `score` layer a sequence-classification PeftModel trains (PEFT's copy, not the frozen original)."""
    score = getattr(model.get_base_model(), SCORE_MODULE)
    return score.modules_to_save[model.active_adapter] if hasattr(score, "modules_to_save") else score


def read_score_head(stage_dir: str | Path) -> nn.Module:
    """A reward stage's head as a module (its kind and shape read from the weights)."""
    return head_from_weights(split_reward_adapter(stage_dir)[1])


def load_reward_role(
    model: PreTrainedModel | PeftModel, stage_dir: str | Path, adapter_name: str = REWARD
) -> tuple[PeftModel, nn.Module]:
    """Puts a reward stage onto an already-loaded causal-LM base: the frozen adapter `adapter_name` and
    its frozen head. Score with `sequence_scores(model, head, ids, mask, adapter=adapter_name)`."""
    head = read_score_head(stage_dir)
    hidden_size = model.config.get_text_config().hidden_size
    if head.hidden_size != hidden_size:
        raise ValueError(
            f"{stage_dir}: the score head reads hidden size {head.hidden_size}, but this base has {hidden_size}; "
            "a reward model only loads onto the base it was trained on"
        )
    model = attach_adapter(model, adapter_name, from_path=stage_dir, trainable=False)
    head = head.to(model.get_input_embeddings().weight.device).requires_grad_(False)
    return model, head


def load_trained_reward_model(
    stage_dir: str | Path, adapter_name: str = REWARD
) -> tuple[PeftModel, nn.Module, PreTrainedTokenizerBase]:
    """A reward stage's model on its own base, with its saved tokenizer, ready to score conversations."""
    recipe = load_stage_recipe(stage_dir)
    read_score_head(stage_dir)  # a reward stage's folder? (checked before the base loads)
    tokenizer = AutoTokenizer.from_pretrained(str(stage_dir))
    model, head = load_reward_role(load_base_model(recipe.model), stage_dir, adapter_name)
    return model, head, tokenizer
