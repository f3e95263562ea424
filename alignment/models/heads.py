"""Scalar heads on the shared base: a reward (or a value) is a linear read-out of one hidden state.

PPO puts every role on one loaded causal LM as named PEFT adapters. The reward role is that base
with the reward adapter active, plus a `ScalarHead` applied to the final hidden state (after the
last norm) at the last real token. The token is found from the attention mask and positions are
counted from it, so a sequence scores the same with left or right padding and in any batch.

The reward stage trains through a sequence-classification model whose `score` layer is the same
read-out on the same decoder stack; its adapter and `score` weights are saved beside each other
(`adapter_model.safetensors`, `score_head.safetensors`) and `load_reward_role` puts them back onto
an already-loaded base, so no second copy of the base is ever made.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

SCORE_HEAD_FILE = "score_head.safetensors"
REWARD_STATS_FILE = "reward_stats.json"  # {"mean", "std", "count"} of rewards over the training prompts


class ScalarHead(nn.Linear):
    """hidden → one number per sequence; the same shape and keys as a classification model's `score`."""

    def __init__(self, hidden_size: int, bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__(hidden_size, 1, bias=bias, dtype=dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden.to(self.weight.dtype)).squeeze(-1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so left padding does not shift a sequence's positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def decoder_stack(model: PreTrainedModel | PeftModel) -> nn.Module:
    """The transformer under the LM or classification head (adapters included): its output is after the final norm."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(base, base.base_model_prefix)


def last_hidden_states(
    model: PreTrainedModel | PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The final hidden state at each sequence's last real token, shape (batch, hidden)."""
    outputs = decoder_stack(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        use_cache=False,
    )
    hidden = outputs.last_hidden_state
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last_token_index(attention_mask).to(hidden.device)]


@contextlib.contextmanager
def active_adapter(model: PreTrainedModel | PeftModel, name: str | None) -> Iterator[None]:
    """Runs with adapter `name` active and puts the previous one back; leaves requires_grad alone."""
    if name is None or not isinstance(model, PeftModel) or model.active_adapter == name:
        yield
        return
    from alignment.models.loading import use_adapter

    previous = model.active_adapter
    use_adapter(model, name)
    try:
        yield
    finally:
        use_adapter(model, previous)


def sequence_scores(
    model: PreTrainedModel | PeftModel,
    head: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    adapter: str | None = None,
) -> torch.Tensor:
    """One score per sequence: `head` on the last real token's final hidden state, with `adapter` active."""
    with active_adapter(model, adapter):
        return head(last_hidden_states(model, input_ids, attention_mask)).float()


def encode_conversations(
    tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]], padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Chat-template token ids for whole conversations, padded into a batch.

    The ids are those TRL's RewardTrainer trains on (`apply_chat_template` of prompt + response).
    """
    sequences = [
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        for messages in conversations
    ]
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        span = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
        input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def score_conversations(
    model: PreTrainedModel | PeftModel,
    head: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict]],
    batch_size: int = 16,
    adapter: str | None = None,
) -> list[float]:
    """Scores of whole conversations (prompt messages + the response), in batches, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    try:
        for start in range(0, len(conversations), batch_size):
            batch = encode_conversations(tokenizer, conversations[start : start + batch_size])
            batch = {key: value.to(device) for key, value in batch.items()}
            scores += sequence_scores(model, head, batch["input_ids"], batch["attention_mask"], adapter).tolist()
    finally:
        model.train(was_training)
    return scores


def save_scalar_head(layer: nn.Linear, directory: str | Path) -> Path:
    """Writes a (hidden → 1) linear layer as `score_head.safetensors`."""
    if layer.out_features != 1:
        raise ValueError(f"a scalar head has one output, this layer has {layer.out_features}")
    tensors = {"weight": layer.weight.detach().cpu().contiguous()}
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach().cpu().contiguous()
    path = Path(directory) / SCORE_HEAD_FILE
    save_file(tensors, str(path), metadata={"hidden_size": str(layer.in_features)})
    return path


def load_scalar_head(directory: str | Path, device: torch.device | str | None = None) -> ScalarHead:
    path = Path(directory) / SCORE_HEAD_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} holds no {SCORE_HEAD_FILE}; point at a reward stage's output folder")
    tensors = load_file(str(path))
    head = ScalarHead(tensors["weight"].shape[-1], bias="bias" in tensors, dtype=tensors["weight"].dtype)
    head.load_state_dict(tensors)
    return head.to(device) if device is not None else head


def read_reward_stats(stage_dir: str | Path) -> dict[str, float]:
    """The reward mean and std over the training prompts that a reward stage saved (PPO normalises with them)."""
    path = Path(stage_dir) / REWARD_STATS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{stage_dir} holds no {REWARD_STATS_FILE}; point at a reward stage's output folder")
    return json.loads(path.read_text())


def load_reward_role(
    model: PreTrainedModel | PeftModel, stage_dir: str | Path, adapter_name: str = "reward"
) -> tuple[PeftModel, ScalarHead]:
    """Puts a reward stage's adapter onto an already-loaded base as frozen adapter `adapter_name`.

    Returns the PeftModel (every adapter on the one base) and the frozen head; score with
    `sequence_scores(model, head, ids, mask, adapter=adapter_name)`.
    """
    from alignment.models.loading import attach_adapter

    head = load_scalar_head(stage_dir)
    hidden_size = model.config.get_text_config().hidden_size
    if head.in_features != hidden_size:
        raise ValueError(
            f"{stage_dir}: the score head reads hidden size {head.in_features}, but this base has {hidden_size}; "
            "a reward model only loads onto the base it was trained on"
        )
    model = attach_adapter(model, adapter_name, from_path=stage_dir, trainable=False)
    head = head.to(model.get_input_embeddings().weight.device).requires_grad_(False)
    return model, head


def load_trained_reward_model(
    stage_dir: str | Path, adapter_name: str = "reward"
) -> tuple[PeftModel, ScalarHead, PreTrainedTokenizerBase]:
    """A reward stage's model on its own base, with its saved tokenizer, ready to score conversations."""
    from transformers import AutoTokenizer

    from alignment.models.loading import load_base_model, load_stage_recipe

    recipe = load_stage_recipe(stage_dir)
    load_scalar_head(stage_dir)  # a reward stage's folder? (checked before the base loads)
    tokenizer = AutoTokenizer.from_pretrained(str(stage_dir))
    model, head = load_reward_role(load_base_model(recipe.model), stage_dir, adapter_name)
    return model, head, tokenizer
