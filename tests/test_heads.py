"""Scalar heads: what PPO's reward and value roles rely on, for both kinds of head."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from alignment.models.heads import (
    AttentionScalarHead,
    ScalarHead,
    ScoreHeadConfig,
    build_score_head,
    load_scalar_head,
    save_scalar_head,
)
from alignment.names import SCORE_HEAD_FILE
from alignment.recipes.load import validate_recipe
from alignment.recipes.validate import RecipeError

from conftest import minimal_recipe

HIDDEN = 16


def trained_looking(head: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (a fresh attention head has a zero query, which would hide causality bugs)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(std=0.5)
    return head


@pytest.mark.parametrize("kind", ["linear", "attention"])
def test_a_tokens_score_reads_only_that_token_and_earlier_ones(kind):
    """The value role reads the head at every response token: a score must not see the tokens after it."""
    head = trained_looking(build_score_head(ScoreHeadConfig(type=kind, heads=3, head_dim=4), HIDDEN))
    hidden = torch.randn(1, 7, HIDDEN)
    changed_tail = hidden.clone()
    changed_tail[:, 4:] = torch.randn(1, 3, HIDDEN)
    before, after = head.token_scores(hidden), head.token_scores(changed_tail)
    assert before.shape == (1, 7)
    assert torch.allclose(before[:, :4], after[:, :4], atol=1e-6)
    assert not torch.allclose(before[:, 4:], after[:, 4:], atol=1e-3)


def test_attention_head_scores_ignore_left_padding_and_see_every_earlier_token():
    head = trained_looking(AttentionScalarHead(HIDDEN, heads=3, head_dim=4))
    real = torch.randn(1, 5, HIDDEN)
    padded = torch.cat([torch.randn(1, 2, HIDDEN) * 10, real], dim=1)  # two left-padding positions of junk
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    alone = head.token_scores(real, torch.ones(1, 5, dtype=torch.long))
    assert torch.allclose(head.token_scores(padded, mask)[:, 2:], alone, atol=1e-5)
    # Not a per-token read-out: changing the first real token moves the score at the last one.
    changed_first = real.clone()
    changed_first[:, 0] = torch.randn(HIDDEN)
    assert abs(head.token_scores(changed_first)[0, -1] - alone[0, -1]) > 1e-3
    # Inside a classification model (`forward`, no mask, right padding) the real tokens score the same.
    assert torch.allclose(head(real).squeeze(-1), alone, atol=1e-6)
    # A reward computes only the last real token's query: the same number, with either padding side.
    right_padded = torch.cat([real, torch.randn(1, 2, HIDDEN) * 10], dim=1)
    right_mask = mask.flip(-1)
    assert torch.allclose(head.last_token_scores(padded, mask), alone[:, -1], atol=1e-5)
    assert torch.allclose(head.last_token_scores(right_padded, right_mask), alone[:, -1], atol=1e-5)
    # As a classifier's `score` (no mask), read at the last real token of a right-padded row: the same again.
    assert torch.allclose(head(right_padded)[:, 4, 0], alone[:, -1], atol=1e-5)

    # Given the mask of the classifier's call (a hook on its decoder), it computes only that token's query,
    # and any position the classifier pools holds the same number.
    class Decoder(torch.nn.Module):
        def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            return hidden

    decoder = Decoder()
    head.pool_last_token_in(decoder)
    decoder(right_padded, attention_mask=right_mask)
    pooled = head(right_padded)
    assert pooled.shape == (1, 7, 1) and torch.allclose(pooled[:, 4, 0], alone[:, -1], atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "attention"])
def test_a_saved_head_loads_back_as_the_same_kind_with_the_same_scores(kind, tmp_path):
    head = trained_looking(build_score_head(ScoreHeadConfig(type=kind, heads=2, head_dim=3), HIDDEN))
    save_scalar_head(head, tmp_path)
    with safe_open(str(tmp_path / SCORE_HEAD_FILE), framework="pt") as saved:
        metadata = saved.metadata()
    assert metadata["kind"] == kind and metadata["hidden_size"] == str(HIDDEN)
    loaded = load_scalar_head(tmp_path)
    assert type(loaded) is type(head) and loaded.hidden_size == HIDDEN
    hidden = torch.randn(2, 6, HIDDEN)
    assert torch.equal(loaded.token_scores(hidden), head.token_scores(hidden))


def test_a_head_saved_without_a_kind_loads_as_the_linear_head(tmp_path):
    """Reward stages saved before heads had kinds wrote a bare linear layer."""
    from safetensors.torch import save_file

    save_file({"weight": torch.ones(1, HIDDEN)}, str(tmp_path / SCORE_HEAD_FILE), metadata={"hidden_size": "16"})
    loaded = load_scalar_head(tmp_path)
    assert isinstance(loaded, ScalarHead)
    assert loaded.token_scores(torch.ones(1, 2, HIDDEN)).tolist() == [[16.0, 16.0]]


def test_a_bad_score_head_in_a_recipe_names_its_key():
    raw = minimal_recipe()
    raw["stages"].append({"name": "reward", "type": "reward", "data": raw["stages"][0]["data"]})
    raw["stages"][1]["score_head"] = {"type": "mlp"}
    with pytest.raises(
        RecipeError, match=r"stages.reward.score_head.type: expected one of .linear., .attention., got .mlp."
    ):
        validate_recipe(raw)
    raw["stages"][1]["score_head"] = {"type": "attention", "heads": 0}
    with pytest.raises(RecipeError, match=r"stages.reward.score_head.heads: must be a positive integer, got 0"):
        validate_recipe(raw)
    recipe = validate_recipe({**raw, "stages": [raw["stages"][0], {**raw["stages"][1], "score_head": {}}]})
    assert recipe.stage("reward").score_head == ScoreHeadConfig(type="linear")
