"""Token ids to padded batches: the one padding path (the tokenizer's own `pad`), for scoring and training."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # labels the loss skips (the prompt, the padding)


def pad(tokenizer: PreTrainedTokenizerBase, sequences: Sequence[Sequence[int]], padding_side: str = "right") -> dict:
    """Token-id lists as one padded batch with its attention mask."""
    return tokenizer.pad(
        {"input_ids": [list(ids) for ids in sequences]}, padding=True, padding_side=padding_side, return_tensors="pt"
    )


def pad_with_labels(
    tokenizer: PreTrainedTokenizerBase, sequences: Sequence[Sequence[int]], labels: Sequence[Sequence[int]]
) -> dict[str, torch.Tensor]:
    """A right-padded language-modelling batch whose labels are padded with IGNORE_INDEX."""
    batch = pad(tokenizer, sequences)
    width = batch["input_ids"].shape[1]
    batch["labels"] = torch.tensor([list(target) + [IGNORE_INDEX] * (width - len(target)) for target in labels])
    return dict(batch)


def encode_conversations(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[list[dict]], padding_side: str = "right"
) -> dict:
    """Whole conversations (prompt messages + the response) as the chat template renders them, padded:
    the ids TRL's RewardTrainer trains on."""
    ids = [
        tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        for messages in conversations
    ]
    return pad(tokenizer, ids, padding_side)
