"""The PPO maths against independent references: plain Python loops over floats, or numbers worked by hand.

The vectorised code in `alignment.ppo.core` is never its own reference here.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from alignment.models.sampling import Responses, truncate_after_eos
from alignment.ppo import PPOConfig, core
from alignment.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    logprobs_from_logits,
    make_kl_controller,
    masked_mean,
    masked_moments,
    masked_var,
    masked_whiten,
    normalize_scores,
    per_token_rewards,
    policy_loss,
    response_logprobs,
    value_loss,
)
from alignment.recipes.validate import RecipeError, build

GARBAGE = 1e6  # put in padding positions: any leak into a result shows


def padded_batch(lengths: list[int], width: int, seed: int) -> tuple[list[list[float]], torch.Tensor, torch.Tensor]:
    """Random per-row values of the given real lengths, garbage in the padding, and the mask."""
    rng = random.Random(seed)
    rows = [[rng.uniform(-2, 2) for _ in range(length)] for length in lengths]
    tensor = torch.tensor([row + [GARBAGE] * (width - len(row)) for row in rows], dtype=torch.float64)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return rows, tensor, mask


def reference_log_softmax_at(logits: list[float], index: int, temperature: float) -> float:
    scaled = [z / temperature for z in logits]
    top = max(scaled)
    log_normaliser = top + math.log(sum(math.exp(z - top) for z in scaled))
    return scaled[index] - log_normaliser


def tiny_llama(seed: int = 0, dropout: float = 0.0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=37,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=dropout,
    )
    return LlamaForCausalLM(config).eval()


# GAE


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_a_plain_reverse_loop_with_padding_and_ragged_rows(gamma: float, lam: float) -> None:
    lengths, width = [6, 3, 1, 5], 6
    reward_rows, rewards, mask = padded_batch(lengths, width, seed=1)
    value_rows, values, _ = padded_batch(lengths, width, seed=2)

    advantages, returns = compute_gae(rewards, values, mask, gamma, lam)

    for row, length in enumerate(lengths):
        expected_advantages = [0.0] * length
        next_advantage = 0.0
        for t in reversed(range(length)):
            next_value = value_rows[row][t + 1] if t + 1 < length else 0.0  # episode ends after the last token
            delta = reward_rows[row][t] + gamma * next_value - value_rows[row][t]
            next_advantage = delta + gamma * lam * next_advantage
            expected_advantages[t] = next_advantage
        for t in range(length):
            assert advantages[row, t].item() == pytest.approx(expected_advantages[t], abs=1e-9)
            assert returns[row, t].item() == pytest.approx(expected_advantages[t] + value_rows[row][t], abs=1e-9)
        for t in range(length, width):
            assert advantages[row, t].item() == 0.0
            assert returns[row, t].item() == 0.0


def test_gae_by_hand_with_monte_carlo_settings() -> None:
    # gamma = lam = 1: A_t = (sum of rewards from t on) - V_t
    rewards = torch.tensor([[0.0, -0.1, 1.0, GARBAGE]])
    values = torch.tensor([[0.5, 0.2, 0.4, GARBAGE]])
    mask = torch.tensor([[1, 1, 1, 0]])
    advantages, returns = compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages[0].tolist() == pytest.approx([0.9 - 0.5, 0.9 - 0.2, 1.0 - 0.4, 0.0])
    assert returns[0].tolist() == pytest.approx([0.9, 0.9, 1.0, 0.0])


# Masked statistics and whitening


def test_masked_mean_and_var_match_plain_statistics_and_ignore_padding() -> None:
    rows, values, mask = padded_batch([4, 2, 5], width=5, seed=3)
    real = [value for row in rows for value in row]
    assert masked_mean(values, mask).item() == pytest.approx(statistics.fmean(real))
    assert masked_var(values, mask).item() == pytest.approx(statistics.variance(real))  # unbiased
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(statistics.pvariance(real))
    per_row = masked_mean(values, mask, dim=1)
    assert per_row.tolist() == pytest.approx([statistics.fmean(row) for row in rows])


def test_masked_mean_is_not_poisoned_by_non_finite_padding() -> None:
    values = torch.tensor([[1.0, 3.0, float("-inf")], [2.0, float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)


def test_masked_var_refuses_too_few_real_positions() -> None:
    with pytest.raises(ValueError, match="at least 2 real positions"):
        masked_var(torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 0]]))


def test_whitening_over_real_tokens_only() -> None:
    rows, values, mask = padded_batch([7, 3, 5, 1], width=7, seed=4)
    whitened = masked_whiten(values, mask)

    real_whitened = [whitened[r, t].item() for r, row in enumerate(rows) for t in range(len(row))]
    assert statistics.fmean(real_whitened) == pytest.approx(0.0, abs=1e-9)
    assert statistics.variance(real_whitened) == pytest.approx(1.0, abs=1e-6)
    # each real value is (x - mean) / std with the statistics of the real values alone
    real = [value for row in rows for value in row]
    mean, std = statistics.fmean(real), statistics.stdev(real)
    assert whitened[0, 0].item() == pytest.approx((rows[0][0] - mean) / std, rel=1e-6)
    assert (whitened[mask == 0] == 0).all()

    # changing the padding changes nothing
    other_padding = torch.where(mask.bool(), values, torch.full_like(values, -3.0))
    assert torch.equal(masked_whiten(other_padding, mask), whitened)

    scaled_only = masked_whiten(values, mask, shift_mean=False)
    real_scaled = [scaled_only[r, t].item() for r, row in enumerate(rows) for t in range(len(row))]
    assert statistics.fmean(real_scaled) == pytest.approx(mean, abs=1e-9)


def test_whitening_a_split_batch_with_summed_moments_equals_whitening_it_whole() -> None:
    """What several processes do: each holds part of the rollouts, and their moments are summed."""
    _, values, mask = padded_batch([7, 3, 5, 1, 6, 2], width=7, seed=5)
    whole = masked_whiten(values, mask)
    moments = masked_moments(values[:2], mask[:2]) + masked_moments(values[2:], mask[2:])
    parts = [masked_whiten(values[rows], mask[rows], moments=moments) for rows in (slice(0, 2), slice(2, None))]
    assert torch.allclose(torch.cat(parts), whole, atol=1e-6)
    # whitening the first part alone (what each process did before) gives different advantages
    assert not torch.allclose(masked_whiten(values[:2], mask[:2]), whole[:2], atol=1e-3)
    with pytest.raises(ValueError, match="at least 2 real positions"):
        masked_whiten(values[:1], mask[:1], moments=masked_moments(values[:1, :1], mask[:1, :1]))


def test_explained_variance() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0, GARBAGE]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask).item() == pytest.approx(1.0)
    constant_at_mean = torch.full_like(returns, 2.0)
    assert explained_variance(constant_at_mean, returns, mask).item() == pytest.approx(0.0)
    # off by a constant: the residuals do not vary, so the critic explains all the variance
    assert explained_variance(returns - 1.0, returns, mask).item() == pytest.approx(1.0)
    # values = 4 - returns: residuals [-2, 0, 2] (variance 8/3) against returns' variance 2/3
    assert explained_variance(-returns + 4.0, returns, mask).item() == pytest.approx(1 - (8 / 3) / (2 / 3))


# Log-probabilities, entropy, truncation


def test_logprobs_and_entropy_match_plain_python() -> None:
    logits_rows = [[2.0, -1.0, 0.5, 0.0], [0.0, 0.0, 3.0, -2.0]]
    tokens = [2, 3]
    logits = torch.tensor([logits_rows])
    for temperature in (1.0, 0.7, 2.0):
        logprobs = logprobs_from_logits(logits, torch.tensor([tokens]), temperature)
        for t, token in enumerate(tokens):
            assert logprobs[0, t].item() == pytest.approx(reference_log_softmax_at(logits_rows[t], token, temperature))
        entropy = entropy_from_logits(logits, temperature)
        for t, row in enumerate(logits_rows):
            log_probabilities = [reference_log_softmax_at(row, i, temperature) for i in range(len(row))]
            expected = -sum(math.exp(lp) * lp for lp in log_probabilities)
            assert entropy[0, t].item() == pytest.approx(expected, rel=1e-6)


def test_response_logprobs_shift_matches_prefix_by_prefix_loop_on_a_tiny_model() -> None:
    model = tiny_llama(seed=0)
    generator = torch.Generator().manual_seed(0)
    prompt_length, response_length, temperature = 5, 4, 0.7
    input_ids = torch.randint(0, model.config.vocab_size, (2, prompt_length + response_length), generator=generator)

    with torch.no_grad():
        full_logits = model(input_ids).logits
        logprobs = response_logprobs(full_logits, input_ids, prompt_length, temperature)

        assert logprobs.shape == (2, response_length)
        for row in range(2):
            for t in range(response_length):
                position = prompt_length + t
                prefix = input_ids[row : row + 1, :position]  # the model sees only the tokens before this one
                next_token_logits = model(prefix).logits[0, -1].tolist()
                expected = reference_log_softmax_at(next_token_logits, int(input_ids[row, position]), temperature)
                assert logprobs[row, t].item() == pytest.approx(expected, abs=1e-5)


def test_response_logprobs_shift_on_hand_made_logits() -> None:
    # logits at position p put all their mass on token p + 1: every correctly shifted log-prob is ~0
    vocab, length = 6, 5
    input_ids = torch.tensor([[0, 1, 2, 3, 4]])
    logits = torch.full((1, length, vocab), -50.0)
    for position in range(length - 1):
        logits[0, position, position + 1] = 50.0
    logprobs = response_logprobs(logits, input_ids, response_start=2)
    assert logprobs[0].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    unshifted = logprobs_from_logits(logits[:, 2:], input_ids[:, 2:])
    assert (unshifted < -1).all()  # the mistake this helper exists to prevent
    with pytest.raises(ValueError, match="response_start"):
        response_logprobs(logits, input_ids, response_start=0)


@pytest.mark.parametrize("pad_id", [0, 2])  # pad distinct from EOS, and pad == EOS (common for base models)
def test_truncate_after_eos(pad_id: int) -> None:
    eos_id = 2
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [5, 6, 7, 2]])
    tokens, mask, contains_eos = truncate_after_eos(responses, eos_id, pad_id)
    p = pad_id
    assert tokens.tolist() == [[5, 2, p, p], [5, 6, 7, 8], [2, p, p, p], [5, 6, 7, 2]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert contains_eos.tolist() == [True, False, True, True]


# KL and rewards


def test_kl_estimators_on_hand_made_numbers() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    reference_logprobs = torch.tensor([[-1.5, -2.0, -0.1]])
    differences = [0.5, 0.0, -0.4]
    assert kl_penalty(logprobs, reference_logprobs, "k1")[0].tolist() == pytest.approx(differences)
    expected_k3 = [math.exp(-d) - 1 + d for d in differences]
    assert kl_penalty(logprobs, reference_logprobs, "k3")[0].tolist() == pytest.approx(expected_k3)
    assert expected_k3[0] == pytest.approx(0.1065306597)
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logprobs, reference_logprobs, "k2")  # type: ignore[arg-type]


def test_kl_k3_is_never_negative_and_both_are_zero_when_equal() -> None:
    generator = torch.Generator().manual_seed(5)
    logprobs = -torch.rand(64, 32, generator=generator) * 10
    reference_logprobs = -torch.rand(64, 32, generator=generator) * 10
    assert (kl_penalty(logprobs, reference_logprobs, "k3") >= 0).all()
    assert (kl_penalty(logprobs, reference_logprobs, "k1") < 0).any()  # k1 can be, per token
    for estimator in ("k1", "k3"):
        assert torch.equal(kl_penalty(logprobs, logprobs, estimator), torch.zeros_like(logprobs))


def test_per_token_rewards_by_hand() -> None:
    scores = torch.tensor([2.0, -1.0, 0.5])
    kl = torch.tensor([[0.1, 0.2, 0.3, GARBAGE], [0.4, GARBAGE, GARBAGE, GARBAGE], [0.0, -0.1, 0.2, 0.1]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    rewards = per_token_rewards(scores, kl, kl_coef=0.5, mask=mask)
    expected_rows = [
        [-0.05, -0.1, -0.15 + 2.0, 0.0],  # score on the last real token; padding gets nothing
        [-0.2 - 1.0, 0.0, 0.0, 0.0],
        [0.0, 0.05, -0.1, -0.05 + 0.5],  # a negative KL estimate (k1) is a bonus
    ]
    for row, expected in enumerate(expected_rows):
        assert rewards[row].tolist() == pytest.approx(expected)


def test_score_normalisation_and_missing_eos_penalty() -> None:
    scores = torch.tensor([3.0, -1.0, 11.0])
    assert normalize_scores(scores, mean=1.0, std=2.0).tolist() == pytest.approx([1.0, -1.0, 5.0])
    assert normalize_scores(scores, mean=1.0, std=2.0, clip=3.0).tolist() == pytest.approx([1.0, -1.0, 3.0])
    with pytest.raises(ValueError, match="std"):
        normalize_scores(scores, mean=0.0, std=0.0)
    contains_eos = torch.tensor([True, False, True])
    assert apply_missing_eos_penalty(scores, contains_eos, 1.0).tolist() == [3.0, -2.0, 11.0]
    assert torch.equal(apply_missing_eos_penalty(scores, contains_eos, None), scores)


# Losses


def test_policy_loss_with_clipping_active_and_inactive() -> None:
    ratios = [1.0, 1.5, 0.5, 1.1, 0.7, 9.0]
    advantages_list = [1.0, 1.0, -1.0, -1.0, 1.0, 5.0]
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # the last token is padding: its huge ratio must not count
    old_logprobs = torch.tensor([[-1.0, -2.0, -0.3, -0.7, -1.2, -4.0]], dtype=torch.float64)
    new_logprobs = (old_logprobs + torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64)).requires_grad_()
    advantages = torch.tensor([advantages_list], dtype=torch.float64)

    loss, approxkl, clipfrac = policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange=0.2)

    # by hand, max(-A*r, -A*clip(r, 0.8, 1.2)):
    #   r=1.0 A=+1: max(-1.0, -1.0) = -1.0   not clipped
    #   r=1.5 A=+1: max(-1.5, -1.2) = -1.2   clipped (too much gain is not trusted)
    #   r=0.5 A=-1: max( 0.5,  0.8) =  0.8   clipped
    #   r=1.1 A=-1: max( 1.1,  1.1) =  1.1   inside the range
    #   r=0.7 A=+1: max(-0.7, -0.8) = -0.7   outside the range, but the unclipped term is the pessimistic one
    assert loss.item() == pytest.approx((-1.0 - 1.2 + 0.8 + 1.1 - 0.7) / 5)
    assert clipfrac.item() == pytest.approx(2 / 5)
    assert approxkl.item() == pytest.approx(0.5 * sum(math.log(r) ** 2 for r in ratios[:5]) / 5)

    loss.backward()
    # d/dlogp of -A*r is -A*r / 5 where the unclipped term is taken; 0 where the clipped one is
    expected_gradient = [-1.0 / 5, 0.0, 0.0, 1.1 / 5, -0.7 / 5, 0.0]
    assert new_logprobs.grad[0].tolist() == pytest.approx(expected_gradient)
    assert not approxkl.requires_grad and not clipfrac.requires_grad


def test_policy_loss_with_clip_higher_and_per_sequence_aggregation_by_hand() -> None:
    """DAPO's clip-higher (ratio clipped to [0.8, 1.28]) and the original GRPO's per-answer mean."""
    ratios = [[1.25, 1.5, 1.0], [0.5, 1.0, 1.0]]
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the second answer has two tokens
    old = torch.zeros(2, 3, dtype=torch.float64)
    new = torch.tensor([[math.log(r) for r in row] for row in ratios], dtype=torch.float64)
    # by hand, max(-A*r, -A*clip(r, 0.8, 1.28)): row 1: -1.25 (inside), -1.28 (clipped), -1.0; row 2: 0.8
    # (clipped), 1.0; the padding is out
    token_losses = [[-1.25, -1.28, -1.0], [0.8, 1.0]]
    loss, _, clipfrac = policy_loss(new, old, advantages, mask, cliprange=0.2, cliprange_high=0.28)
    assert loss.item() == pytest.approx(sum(map(sum, token_losses)) / 5)  # every real token alike
    assert clipfrac.item() == pytest.approx(2 / 5)
    loss, _, _ = policy_loss(new, old, advantages, mask, cliprange=0.2, cliprange_high=0.28, aggregation="sequence")
    assert loss.item() == pytest.approx(sum(sum(row) / len(row) for row in token_losses) / 2)  # each answer alike
    # split in two micro-batches with the mini-batch's answer count, the parts add up to the whole
    parts = [
        policy_loss(new[i : i + 1], old[i : i + 1], advantages[i : i + 1], mask[i : i + 1], 0.2,
                    cliprange_high=0.28, aggregation="sequence", num_sequences=2)[0]
        for i in range(2)
    ]  # fmt: skip
    assert sum(part.item() for part in parts) == pytest.approx(loss.item())


def test_value_loss_with_clipping_active_and_inactive() -> None:
    old_values = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    new_values = torch.tensor([[0.1, 0.5, -0.5, 1.0, 0.5, 50.0]])
    returns = torch.tensor([[1.0, 1.0, -1.0, 0.0, 0.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])

    loss, clipfrac = value_loss(new_values, old_values, returns, mask, cliprange_value=0.2)

    # by hand, max((V - R)^2, (clip(V, V_old - 0.2, V_old + 0.2) - R)^2):
    #   V=0.1  -> clip 0.1 : max(0.81, 0.81) = 0.81  not clipped
    #   V=0.5  -> clip 0.2 : max(0.25, 0.64) = 0.64  clipped term taken
    #   V=-0.5 -> clip -0.2: max(0.25, 0.64) = 0.64  clipped term taken
    #   V=1.0  -> clip 1.0 : max(1.00, 1.00) = 1.00  not clipped
    #   V=0.5  -> clip 0.2 : max(0.25, 0.04) = 0.25  clipped value, but the unclipped term is larger
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.64 + 0.64 + 1.0 + 0.25) / 5)
    assert clipfrac.item() == pytest.approx(2 / 5)


# KL controllers


def test_adaptive_kl_controller_sequence_by_hand() -> None:
    controller = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    n_steps = 256  # episodes per batch: one update moves beta by at most 0.2 * 256 / 10000 = 0.512%
    observed_kls = [6.0, 9.0, 3.0, 6.6, 100.0, 0.0]
    # errors: 6/6-1 = 0; 9/6-1 = 0.5 -> clipped to +0.2; 3/6-1 = -0.5 -> -0.2; 6.6/6-1 = 0.1; +0.2; -0.2
    expected = [
        0.1,
        0.1 * 1.00512,
        0.1 * 1.00512 * 0.99488,
        0.1 * 1.00512 * 0.99488 * 1.00256,
        0.1 * 1.00512 * 0.99488 * 1.00256 * 1.00512,
        0.1 * 1.00512 * 0.99488 * 1.00256 * 1.00512 * 0.99488,
    ]
    values = []
    for kl in observed_kls:
        controller.update(kl, n_steps)
        values.append(controller.value)
    assert values == pytest.approx(expected, rel=1e-12)


def test_kl_controllers_restore_from_state_dict() -> None:
    controller = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    for kl in (10.0, 8.0):
        controller.update(kl, 64)
    restored = AdaptiveKLController(0.05, target=1.0, horizon=1)
    restored.load_state_dict(controller.state_dict())
    controller.update(2.0, 64)
    restored.update(2.0, 64)
    assert restored.value == controller.value
    assert restored.state_dict() == controller.state_dict()

    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05

    assert isinstance(make_kl_controller(0.05, None, 10000), FixedKLController)
    adaptive = make_kl_controller(0.05, 6.0, 10000)
    assert isinstance(adaptive, AdaptiveKLController) and adaptive.value == 0.05


# Step 0: the policy is the reference


def test_step_zero_sanity_on_shared_base_with_policy_and_reference_adapters(tmp_path) -> None:
    """Policy and reference are two copies of one adapter on one base: KL = 0, ratio = 1, approxkl = 0,
    clipfrac = 0, with dropout configured in the model and the adapter (eval mode turns it off)."""
    from alignment.models.loading import attach_adapter, use_adapter
    from alignment.recipes.schema import LoraSettings

    settings = LoraSettings(r=4, alpha=8, dropout=0.1, target_modules="all-linear")
    model = attach_adapter(tiny_llama(seed=1, dropout=0.1), "policy", settings)
    with torch.no_grad():  # a trained-looking SFT adapter, not LoRA's identity initialisation
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    model.save_pretrained(str(tmp_path / "sft"), selected_adapters=["policy"])
    model = attach_adapter(model, "reference", from_path=tmp_path / "sft" / "policy", trainable=False)
    model.eval()

    generator = torch.Generator().manual_seed(2)
    prompt_length, temperature = 4, 0.7
    input_ids = torch.randint(0, 37, (3, prompt_length + 6), generator=generator)
    _, mask, _ = truncate_after_eos(input_ids[:, prompt_length:], 36, pad_id=0)

    use_adapter(model, "policy")
    with torch.no_grad():
        old_logprobs = response_logprobs(model(input_ids).logits, input_ids, prompt_length, temperature)
    use_adapter(model, "reference")
    with torch.no_grad():
        reference_logprobs = response_logprobs(model(input_ids).logits, input_ids, prompt_length, temperature)
    use_adapter(model, "policy")
    new_logprobs = response_logprobs(model(input_ids).logits, input_ids, prompt_length, temperature)

    advantages = torch.randn(3, 6, generator=generator)
    loss, approxkl, clipfrac = policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange=0.2)
    assert torch.equal(new_logprobs.detach(), old_logprobs)  # ratio exactly 1
    assert approxkl.item() == 0.0
    assert clipfrac.item() == 0.0
    assert loss.item() == pytest.approx(masked_mean(-advantages, mask).item())
    for estimator in ("k1", "k3"):
        kl = kl_penalty(old_logprobs, reference_logprobs, estimator)
        assert masked_mean(kl.abs(), mask).item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()  # the policy adapter is trainable, the reference is not
    assert any(p.grad is not None for n, p in model.named_parameters() if ".policy." in n)
    assert all(p.grad is None for n, p in model.named_parameters() if ".reference." in n)


# Config


def test_config_defaults_are_valid_and_derive_batch_sizes() -> None:
    config = PPOConfig()
    assert config.mini_batch_size * config.num_mini_batches == config.rollout_batch_size
    assert config.micro_batch_size * config.gradient_accumulation_steps == config.mini_batch_size
    assert PPOConfig(num_iterations=7).iterations(10**6) == 7
    assert PPOConfig(rollout_batch_size=64, total_episodes=100).iterations(10**6) == 2
    assert PPOConfig(rollout_batch_size=64).iterations(640) == 10
    assert PPOConfig(rollout_batch_size=64).iterations(640, num_processes=2) == 5  # each process rolls out 64


@pytest.mark.parametrize(
    ("values", "key", "message"),
    [
        ({"num_mini_batches": 5}, "num_mini_batches", "must divide the episodes of an iteration"),
        ({"advantage_estimator": "grpo"}, "samples_per_prompt", "must be at least 2 for advantage_estimator grpo"),
        (
            {"samples_per_prompt": 3, "num_mini_batches": 5},
            "num_mini_batches",
            "rollout_batch_size × samples_per_prompt = 192",
        ),
        ({"cliprange_high": 0}, "cliprange_high", "must be positive or null"),
        ({"gradient_accumulation_steps": 3}, "gradient_accumulation_steps", "must divide the mini-batch"),
        ({"total_episodes": 100, "num_iterations": 2}, "total_episodes", "not both"),
        ({"temperature": 0}, "temperature", "must be positive"),
        ({"top_p": 1.5}, "top_p", "(0, 1]"),
        ({"cliprange": 0}, "cliprange", "must be positive"),
        ({"gamma": 1.1}, "gamma", "[0, 1]"),
        ({"lam": -0.1}, "lam", "[0, 1]"),
        ({"kl_target": -1.0}, "kl_target", "must be positive"),
        ({"kl_target": 6.0, "kl_coef": 0.0}, "kl_coef", "cannot grow from 0"),
        ({"kl_estimator": "k2"}, "kl_estimator", "'k1', 'k3'"),
        ({"missing_eos_penalty": -1.0}, "missing_eos_penalty", "subtracted"),
        ({"save_steps": 0}, "save_steps", "at least 1"),
        ({"reward_stats_prompts": -1}, "reward_stats_prompts", "0 (no estimate) or more"),
    ],
)
def test_config_rejects_impossible_values_naming_the_key(values: dict, key: str, message: str) -> None:
    with pytest.raises(RecipeError) as error:
        build(PPOConfig, values, "stages[2].args")
    assert error.value.path == f"stages[2].args.{key}"
    assert message in error.value.message
    assert isinstance(error.value, ValueError)


def test_switching_roles_runs_each_adapter_and_keeps_which_weights_train() -> None:
    """`use_adapter` (PPO switches roles several times a step) makes the named adapter the one that runs,
    leaves every weight's requires_grad as it was, and sees an adapter added after it cached the layers."""
    from alignment.models.loading import attach_adapter, use_adapter
    from alignment.recipes.schema import LoraSettings

    settings = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    model = attach_adapter(tiny_llama(seed=3), "policy", settings)
    model = attach_adapter(model, "reference", settings, trainable=False)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    input_ids = torch.arange(1, 9).unsqueeze(0)

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids).logits

    def flags() -> dict[str, bool]:
        return {name: parameter.requires_grad for name, parameter in model.named_parameters()}

    before = flags()
    assert any(before.values())
    use_adapter(model, "reference")
    reference = logits()
    assert model.active_adapter == "reference" and flags() == before
    use_adapter(model, "policy")
    policy = logits()
    assert model.active_adapter == "policy" and flags() == before
    assert not torch.allclose(policy, reference)
    with model.disable_adapter():
        assert not torch.allclose(logits(), policy)

    model = attach_adapter(model, "value", settings)  # a third adapter after the layers were cached
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B.value" in name:
                parameter.normal_(0, 0.5)
    before = flags()
    use_adapter(model, "value")
    assert model.active_adapter == "value" and flags() == before
    assert not torch.allclose(logits(), policy) and not torch.allclose(logits(), reference)
    use_adapter(model, "reference")
    assert torch.equal(logits(), reference)


def test_prompt_indices_follow_one_seeded_permutation_per_pass_over_the_prompts() -> None:
    """The prompts of an iteration: pass p over the dataset in the order of randperm seeded with seed + p,
    continuing across the pass boundary (the order a resumed run must see again)."""
    from alignment.ppo.trainer import prompt_indices

    num_prompts, seed = 10, 7
    passes = [torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed + p)).tolist() for p in range(3)]
    stream = [index for order in passes for index in order]
    assert prompt_indices(0, 4, num_prompts, seed) == stream[0:4]
    assert prompt_indices(8, 4, num_prompts, seed) == stream[8:12]  # crosses into the second pass
    assert prompt_indices(20, 10, num_prompts, seed) == passes[2]


def plain_group_advantages(scores: list[float], group_size: int, estimator: str, scale_by_std: bool) -> list[float]:
    """The estimators as the papers write them, one response at a time."""
    advantages = []
    for index, score in enumerate(scores):
        first = index - index % group_size
        group = scores[first : first + group_size]
        others = group[: index - first] + group[index - first + 1 :]
        if estimator == "rloo":
            advantages.append(score - sum(others) / len(others))
            continue
        mean = sum(group) / group_size
        std = math.sqrt(sum((value - mean) ** 2 for value in group) / (group_size - 1))
        advantages.append((score - mean) / (std + 1e-4) if scale_by_std else score - mean)
    return advantages


@pytest.mark.parametrize(("estimator", "scale_by_std"), [("grpo", True), ("grpo", False), ("rloo", True)])
def test_group_advantages_match_a_plain_loop_on_a_hand_made_batch(estimator: str, scale_by_std: bool) -> None:
    scores = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0]  # 3 prompts x 4 samples
    advantages = core.group_advantages(torch.tensor(scores), 4, estimator, scale_by_std=scale_by_std)
    expected = plain_group_advantages(scores, 4, estimator, scale_by_std)
    assert advantages.tolist() == pytest.approx(expected, abs=1e-6)
    assert advantages[4:8].abs().max() == 0  # a group of equal rewards gives no signal, whatever the estimator


def test_group_advantages_refuse_a_batch_that_is_not_whole_groups() -> None:
    with pytest.raises(ValueError, match="groups of 4"):
        core.group_advantages(torch.zeros(6), 4, "grpo")


def test_group_statistics_count_groups_without_signal() -> None:
    group = core.group_statistics(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2)
    assert group["group/equal_reward_share"].item() == pytest.approx(2 / 3)
    assert group["group/reward_std"].item() == pytest.approx(math.sqrt(0.5) / 3)


def test_dynamic_sampling_keeps_groups_with_signal_first_in_sampling_order_then_fills() -> None:
    scores = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0])  # groups of 2: -, +, -, +, +
    signal = core.groups_with_signal(scores, 2)
    assert signal.tolist() == [False, True, False, True, True]
    assert core.select_groups(signal, 2, 2).tolist() == [2, 3, 6, 7]  # the first two with signal
    assert core.select_groups(signal, 4, 2).tolist() == [0, 1, 2, 3, 6, 7, 8, 9]  # all three, then group 0
    assert core.select_groups(torch.tensor([False, False]), 1, 3).tolist() == [0, 1, 2]


def test_dynamic_sampling_needs_a_group_baseline_and_owns_its_rounds_of_prompts() -> None:
    with pytest.raises(RecipeError, match="dynamic_sampling.*grpo or rloo"):
        PPOConfig(dynamic_sampling=True)
    config = PPOConfig(advantage_estimator="grpo", samples_per_prompt=4, rollout_batch_size=16, num_mini_batches=2,
                       dynamic_sampling=True, max_sampling_rounds=3)  # fmt: skip
    assert config.iterations(960) == 20  # one pass over the prompts: 16 prompts × 3 rounds per iteration
    assert PPOConfig(advantage_estimator="grpo", samples_per_prompt=4, rollout_batch_size=16).iterations(960) == 60


def test_sampled_batches_concatenate_with_their_padding_on_the_right_sides() -> None:
    def batch(query: list[list[int]], response: list[list[int]], texts: list[str]) -> Responses:
        query_ids, response_ids = torch.tensor(query), torch.tensor(response)
        return Responses([[{"role": "user", "content": text}] for text in texts], query_ids, (query_ids != 0).long(),
                         response_ids, (response_ids != 0).long(), torch.tensor([True] * len(texts)), texts)  # fmt: skip

    first = batch([[0, 5, 6]], [[7, 8]], ["a"])  # left-padded prompt, two response tokens
    second = batch([[5, 6, 6, 6], [1, 2, 3, 4]], [[9, 0, 0], [4, 4, 4]], ["b", "c"])
    both = Responses.concatenate([first, second], pad_id=0)
    assert both.query_ids.tolist() == [[0, 0, 5, 6], [5, 6, 6, 6], [1, 2, 3, 4]]
    assert both.query_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    assert both.response_ids.tolist() == [[7, 8, 0], [9, 0, 0], [4, 4, 4]]
    assert both.response_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert both.texts == ["a", "b", "c"] and len(both) == 3
    picked = both.select([2, 0])
    assert picked.texts == ["c", "a"] and picked.query_ids.tolist() == [[1, 2, 3, 4], [0, 0, 5, 6]]
    assert [prompt[0]["content"] for prompt in picked.prompts] == ["c", "a"]
