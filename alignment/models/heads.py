"""Scalar heads on the shared base: one number per token from the final hidden states.

PPO puts every role on one loaded causal LM as named PEFT adapters. The reward role is that base
with the reward adapter active, plus a scalar head on the final hidden states (after the last norm),
read at the last real token (`alignment.models.scoring`); the value role reads the same kind of head
at every token. Positions are counted from the attention mask, so left padding shifts nothing.

Two kinds of head (`ScoreHeadConfig`): `linear`, the usual reward-model head (InstructGPT, TRL), a
linear read-out of each token's own hidden state, which plain `transformers` loads as a classifier's
`score`; and `attention`, one causal attention layer whose values are scalars, so a token's score can
gather evidence from every earlier token. The second exists because a small base does not carry
per-token evidence (a wrong letter in the middle of an answer) to the last token in a few epochs
(docs/benchmarks.md); it is this suite's own module, so only this suite loads it.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from alignment.models.loading import use_adapter
from alignment.names import REWARD_STATS_FILE, SCORE_HEAD_FILE
from alignment.recipes.validate import RecipeError


@dataclass
class ScoreHeadConfig:
    """The reward model's head. `linear` reads each token's hidden state; `attention` lets the score at a
    token attend to every earlier token (`heads` heads of `head_dim` query/key units, scalar values)."""

    type: Literal["linear", "attention"] = "linear"
    heads: int = 64
    head_dim: int = 8

    def __post_init__(self) -> None:
        for key in ("heads", "head_dim"):
            if getattr(self, key) <= 0:
                raise RecipeError(key, f"must be a positive integer, got {getattr(self, key)}")


class ScalarHead(nn.Linear):
    """hidden → one number per token; the same shape and keys as a classification model's `score`."""

    kind = "linear"

    def __init__(self, hidden_size: int, bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__(hidden_size, 1, bias=bias, dtype=dtype)

    @property
    def hidden_size(self) -> int:
        return self.in_features

    def token_scores(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, length, hidden) → (batch, length); the mask is not needed: each token reads only itself."""
        return self(hidden.to(self.weight.dtype)).squeeze(-1)

    def last_token_scores(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The score at each row's last real token, (batch,)."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self(hidden[rows, last_token_index(attention_mask)].to(self.weight.dtype)).squeeze(-1)


class AttentionScalarHead(nn.Module):
    """One causal attention layer with scalar values: the score at token t is, per head, an attention-weighted
    average of scalar values at the real tokens up to t, summed over heads.

    A reward reads only the last real token, so `last_token_scores` computes that one query (linear in the
    length); `token_scores` computes every token's, for the value role. The query starts at zero (uniform
    attention), the values as a linear head's would. The weights are plain parameters, not `nn.Linear`
    layers, so LoRA's `all-linear` never targets them.
    """

    kind = "attention"

    def __init__(
        self,
        hidden_size: int,
        heads: int = 64,
        head_dim: int = 8,
        dtype: torch.dtype | None = None,
        bias: bool = False,
    ):
        super().__init__()
        self.heads, self.head_dim, self.hidden_size = heads, head_dim, hidden_size
        self.query_weight = nn.Parameter(torch.zeros(heads * head_dim, hidden_size, dtype=dtype))
        self.key_weight = nn.Parameter(torch.empty(heads * head_dim, hidden_size, dtype=dtype))
        self.value_weight = nn.Parameter(torch.empty(heads, hidden_size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(1, dtype=dtype)) if bias else None
        nn.init.kaiming_uniform_(self.key_weight, a=math.sqrt(5))
        nn.init.normal_(self.value_weight, std=hidden_size**-0.5)
        self._classifier_mask: torch.Tensor | None = None

    def pool_last_token_in(self, decoder: nn.Module) -> None:
        """As a classifier's `score`, compute only the query the classifier pools: the classifier calls
        `score(hidden)` without the mask, so a forward pre-hook on its decoder hands the head the mask of
        the call (the all-token scores cost 1.7 times as much and change nothing the classifier reads)."""

        def keep_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._classifier_mask = kwargs.get("attention_mask")

        decoder.register_forward_pre_hook(keep_mask, with_kwargs=True)

    def _plus_bias(self, scores: torch.Tensor) -> torch.Tensor:
        return scores if self.bias is None else scores + self.bias

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, length, hidden) → (batch, length, 1), as a classification model's `score` is called; with
        the classifier's mask (`pool_last_token_in`), every position holds the last real token's score."""
        if attention_mask is None and self._classifier_mask is not None:
            last = self.last_token_scores(hidden, self._classifier_mask)
            return last[:, None, None].expand(-1, hidden.shape[1], 1)
        return self.token_scores(hidden, attention_mask).unsqueeze(-1)

    def _keys_and_values(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, _ = hidden.shape
        key = nn.functional.linear(hidden, self.key_weight).view(batch, length, self.heads, self.head_dim)
        value = nn.functional.linear(hidden, self.value_weight).view(batch, length, self.heads, 1)
        return key.transpose(1, 2), value.transpose(1, 2)

    def _queries(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden.shape
        query = nn.functional.linear(hidden, self.query_weight).view(batch, length, self.heads, self.head_dim)
        return query.transpose(1, 2)

    def token_scores(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every token's score, (batch, length); padding (where the mask is 0) is never attended to."""
        hidden = hidden.to(self.value_weight.dtype)
        length = hidden.shape[1]
        key, value = self._keys_and_values(hidden)
        allowed = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
        if attention_mask is not None:  # a padding position attends to itself only, so no row is empty
            allowed = allowed & attention_mask.bool()[:, None, None, :]
            allowed = allowed | torch.eye(length, dtype=torch.bool, device=hidden.device)
        pooled = nn.functional.scaled_dot_product_attention(self._queries(hidden), key, value, attn_mask=allowed)
        return self._plus_bias(pooled.squeeze(-1).sum(1))

    def last_token_scores(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The score at each row's last real token, (batch,): the same number as `token_scores` there."""
        hidden = hidden.to(self.value_weight.dtype)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        query = self._queries(hidden[rows, last_token_index(attention_mask)].unsqueeze(1))
        key, value = self._keys_and_values(hidden)
        allowed = attention_mask.bool()[:, None, None, :]  # every real token is at or before the last one
        pooled = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed)
        return self._plus_bias(pooled.squeeze(-1).squeeze(-1).sum(1))


def build_score_head(config: ScoreHeadConfig, hidden_size: int, dtype: torch.dtype | None = None) -> nn.Module:
    """A freshly initialised head of the configured kind."""
    if config.type == "linear":
        return ScalarHead(hidden_size, dtype=dtype)
    return AttentionScalarHead(hidden_size, config.heads, config.head_dim, dtype=dtype)


@torch.no_grad()
def affine_head(head: nn.Module, scale: float, shift: float) -> nn.Module:
    """A copy of `head`, in float32, whose every score is `scale * score + shift` (with a bias to carry the shift).

    PPO's value role starts as the reward head but predicts returns in the units of the normalised
    rewards, (score - mean) / std: started in raw units, a constant offset in V would bias every advantage.
    """
    tensors = {name: tensor.detach().float().clone() for name, tensor in head.state_dict().items()}
    scaled = "weight" if "weight" in tensors else "value_weight"
    tensors[scaled] = tensors[scaled] * scale
    tensors["bias"] = tensors.get("bias", torch.zeros(1)) * scale + shift
    return head_from_weights(tensors)


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


def final_hidden_states(
    model: PreTrainedModel | PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The decoder's output after the final norm at every position, shape (batch, length, hidden)."""
    outputs = decoder_stack(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        use_cache=False,
    )
    return outputs.last_hidden_state


@contextlib.contextmanager
def active_adapter(model: PreTrainedModel | PeftModel, name: str | None) -> Iterator[None]:
    """Runs with adapter `name` active and puts the previous one back; leaves requires_grad alone."""
    if name is None or not isinstance(model, PeftModel) or model.active_adapter == name:
        yield
        return
    previous = model.active_adapter
    use_adapter(model, name)
    try:
        yield
    finally:
        use_adapter(model, previous)


def save_scalar_head(head: nn.Module, directory: str | Path) -> Path:
    """Writes a scalar head as `score_head.safetensors`, its kind and shape in the metadata."""
    if isinstance(head, nn.Linear) and head.out_features != 1:
        raise ValueError(f"a scalar head has one output, this layer has {head.out_features}")
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in head.state_dict().items()}
    metadata = {"kind": head.kind, "hidden_size": str(head.hidden_size)}
    path = Path(directory) / SCORE_HEAD_FILE
    save_file(tensors, str(path), metadata=metadata)
    return path


def head_from_weights(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The head that holds `tensors` (a state dict, e.g. a trained `score` layer's); its kind and shape
    are read from the weights' names and shapes."""
    bias = "bias" in tensors
    if "weight" in tensors:
        head = ScalarHead(tensors["weight"].shape[-1], bias=bias, dtype=tensors["weight"].dtype)
    elif "value_weight" in tensors:
        value = tensors["value_weight"]
        heads, head_dim = value.shape[0], tensors["query_weight"].shape[0] // value.shape[0]
        head = AttentionScalarHead(value.shape[-1], heads, head_dim, dtype=value.dtype, bias=bias)
    else:
        raise ValueError(f"not the weights of a score head: {sorted(tensors)}")
    head.load_state_dict(tensors)
    return head


def load_scalar_head(directory: str | Path, device: torch.device | str | None = None) -> nn.Module:
    path = Path(directory) / SCORE_HEAD_FILE
    if not path.exists():
        raise FileNotFoundError(f"{directory} holds no {SCORE_HEAD_FILE}")
    head = head_from_weights(load_file(str(path)))
    return head.to(device) if device is not None else head


def reward_statistics(rewards: list[float]) -> dict[str, float]:
    """Mean, (sample) standard deviation and count of a reward model's scores: what PPO normalises with."""
    mean = sum(rewards) / len(rewards)
    variance = sum((reward - mean) ** 2 for reward in rewards) / max(len(rewards) - 1, 1)
    return {"mean": mean, "std": math.sqrt(variance), "count": len(rewards)}


def read_reward_stats(stage_dir: str | Path) -> dict[str, float]:
    """The reward mean and std over the training prompts that a reward stage saved (PPO normalises with them)."""
    path = Path(stage_dir) / REWARD_STATS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{stage_dir} holds no {REWARD_STATS_FILE}; point at a reward stage's output folder")
    return json.loads(path.read_text())
