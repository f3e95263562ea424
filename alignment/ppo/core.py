"""The maths of RLHF with PPO, in the order of the papers, with no I/O and no model code.

Sources: Ziegler et al. 2019 (KL-penalised reward, adaptive KL), Ouyang et al. 2022 (InstructGPT's
objective), Schulman et al. 2016 (GAE) and 2017 (clipped surrogate), and the implementation details
collected by Huang et al. (2023, 2024), which TRL's PPO trainer follows.

The papers' symbols and their names here (and in `PPOConfig` and the trainer's `Rollout`):

| symbol | name | what |
| --- | --- | --- |
| π_θ | `new_logprobs` | the policy being updated (the `policy` adapter), log-probs in the update |
| π_old | `old_logprobs`, `Rollout.logprobs` | the policy that sampled the rollout |
| π_SFT | `reference_logprobs` | the frozen SFT policy (the `reference` adapter) |
| r_θ(x, y) | `scores` (`raw_scores` before normalisation) | the reward model's (or checker's) score of a whole answer |
| β | `kl_coef` | the KL coefficient; `kl_target` makes it adaptive (Ziegler et al.) |
| KL_t | `kl_penalty(...)` | log π_old − log π_SFT per token (k1), or the k3 estimator |
| r_t | `per_token_rewards(...)` | −β·KL_t, plus r_θ at the answer's last token |
| V(s_t) | `values` (`Rollout.values`: V_old) | the value head on the `value` adapter |
| γ, λ | `gamma`, `lam` | GAE's discount and its bias-variance trade-off |
| A_t, R_t | `advantages`, `returns` | GAE advantages (whitened when `whiten_advantages`) and R_t = A_t + V_old(s_t) |
| ε | `cliprange`, `cliprange_value` | the ratio's clip range; the value's around V_old |
| γ_ptx | `ptx_coef` | PPO-ptx: the weight of the pre-training (SFT) loss |

Conventions: every tensor is batch x time over the *response* tokens only. `mask` is 1 for a real
response token, up to and including the first EOS, and 0 for everything after it (padding); it takes
part in every mean, the KL, the rewards and the GAE, so padding never leaks into a statistic.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

WHITEN_EPSILON = 1e-8


# Log-probabilities and entropy


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) under softmax(logits / temperature), at each position.

    The temperature must be the sampling temperature wherever log-probs are taken, or the ratio and
    the KL are biased from step 0. Computed in float32 as (selected logit - logsumexp), which avoids
    materialising a second vocabulary-sized tensor.
    """
    scaled_logits = logits.float() / temperature
    selected_logits = torch.gather(scaled_logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return selected_logits - torch.logsumexp(scaled_logits, dim=-1)


def response_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, response_start: int, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs of the response tokens `input_ids[:, response_start:]` from a full-sequence forward pass.

    The off-by-one: a causal LM's logits at position t - 1 predict token t, so the response's
    log-probs come from `logits[:, response_start - 1 : -1]`. Prompts are left-padded to the same
    length, so every row's response starts at `response_start`. Per-token values follow the same rule
    (the value of the state before token t is the value head's output at position t - 1).
    """
    if not 1 <= response_start < input_ids.shape[1]:
        raise ValueError(
            f"response_start must be in [1, {input_ids.shape[1] - 1}] (a prompt token must precede the response), "
            f"got {response_start}"
        )
    response_tokens = input_ids[:, response_start:]
    predicting_logits = logits[:, response_start - 1 : -1]
    return logprobs_from_logits(predicting_logits, response_tokens, temperature)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / temperature) at each position: logsumexp(z) - sum(p * z)."""
    scaled_logits = logits.float() / temperature
    probabilities = torch.softmax(scaled_logits, dim=-1)
    return torch.logsumexp(scaled_logits, dim=-1) - (probabilities * scaled_logits).sum(dim=-1)


# Masked statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is 1 (over all of them, or along `dim`).

    Padding is selected out rather than multiplied by 0, so a non-finite value there (a log-prob of a
    pad token, say) cannot turn the mean into NaN.
    """
    real = mask.bool()
    selected = torch.where(real, values, torch.zeros_like(values))
    if dim is None:
        return selected.sum() / real.sum()
    return selected.sum(dim) / real.sum(dim)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` over positions where `mask` is 1 (padding selected out, as in `masked_mean`)."""
    selected = torch.where(mask.bool(), values, torch.zeros_like(values))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` over real positions; unbiased (Bessel's n / (n - 1)) by default, like TRL."""
    count = int(mask.bool().sum())
    if count == 0 or (unbiased and count == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} real positions, got {count}")
    centered = values - masked_mean(values, mask)
    variance = masked_mean(centered**2, mask)
    if unbiased:
        variance = variance * count / (count - 1)
    return variance


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(count, sum, sum of squares) of the real positions, in float64: moments of several processes add up."""
    real = mask.bool()
    selected = torch.where(real, values, torch.zeros_like(values)).double()
    return torch.stack([real.sum().double(), selected.sum(), (selected**2).sum()])


def mean_and_var_from_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance from `masked_moments` (summed over processes when there are several)."""
    count, total, total_squares = moments.unbind()
    if count < 2:
        raise ValueError(f"whitening needs at least 2 real positions, got {int(count)}")
    mean = total / count
    variance = (total_squares - count * mean**2).clamp(min=0) / (count - 1)
    return mean, variance


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    moments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Standardises `values` with the mean and variance of the real positions; padding is set to 0.

    With `shift_mean=False` the mean is added back (scale only), as TRL does for whitened rewards.
    `moments` (from `masked_moments`, summed over processes) whitens with the statistics of the whole
    batch rather than this process's share of it.
    """
    if moments is None:
        mean, variance = masked_mean(values, mask), masked_var(values, mask)
    else:
        mean, variance = (statistic.to(values.dtype) for statistic in mean_and_var_from_moments(moments))
    whitened = (values - mean) * torch.rsqrt(variance + WHITEN_EPSILON)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 is a perfect critic, 0 a constant one,
    negative worse than a constant. NaN when the returns do not vary."""
    returns_variance = masked_var(returns, mask, unbiased=False)
    residual_variance = masked_var(returns - values, mask, unbiased=False)
    return 1 - residual_variance / returns_variance


# Rewards


def normalize_scores(scores: torch.Tensor, mean: float, std: float, clip: float | None = None) -> torch.Tensor:
    """(score - mean) / std with the reward model's own statistics, then optionally clipped to +/- clip,
    so that one KL coefficient means the same for any reward model."""
    if std <= 0:
        raise ValueError(f"the reward model's score std must be positive, got {std}")
    normalized = (scores - mean) / std
    if clip is not None:
        normalized = normalized.clamp(-clip, clip)
    return normalized


def apply_missing_eos_penalty(scores: torch.Tensor, contains_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtracts `penalty` from the score of each response that never produced an EOS."""
    if penalty is None:
        return scores
    return torch.where(contains_eos, scores, scores - penalty)


def kl_penalty(
    logprobs: torch.Tensor, reference_logprobs: torch.Tensor, estimator: Literal["k1", "k3"] = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) at the sampled tokens, with d = log pi_theta - log pi_ref.

    k1 = d is unbiased but negative for some tokens; k3 = (e^-d - 1) + d is unbiased too, never
    negative, and of lower variance (Schulman, "Approximating KL divergence", 2020).
    """
    log_ratio = logprobs - reference_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """r_t = -beta * kl_t on every real response token, plus the sequence's score on its last real token.

    This is InstructGPT's objective spread over tokens: the reward model judges the whole response,
    the KL penalty is paid where each token was chosen. Padding gets 0. A row with no real token gets
    nothing (it has no token to credit).
    """
    real = mask.bool()
    rewards = torch.where(real, -kl_coef * kl, torch.zeros_like(kl))
    lengths = real.sum(dim=1)
    last_index = (lengths - 1).clamp(min=0)
    score_at_last = torch.where(lengths > 0, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index] += score_at_last
    return rewards


# Advantages


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens; returns (advantages, returns).

    delta_t = r_t + gamma * V_(t+1) - V_t, with V = 0 after the last real token (the episode ends);
    A_t = delta_t + gamma * lam * A_(t+1); R_t = A_t + V_t. Padding is excluded: its rewards and
    values are treated as 0 and its advantages and returns are 0.
    """
    real = mask.bool()
    rewards = torch.where(real, rewards, torch.zeros_like(rewards))
    values = torch.where(real, values, torch.zeros_like(values))
    num_steps = rewards.shape[1]
    advantages_reversed = []
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(num_steps)):
        next_value = values[:, t + 1] if t + 1 < num_steps else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = torch.where(real[:, t], delta + gamma * lam * next_advantage, torch.zeros_like(delta))
        advantages_reversed.append(next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    returns = advantages + values
    return advantages, returns


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    estimator: Literal["grpo", "rloo"],
    scale_by_std: bool = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    """One advantage per response, the other responses to the same prompt as its baseline (no critic).

    Rows g*G … g*G + G − 1 answer one prompt (G = `group_size`). grpo (Shao et al. 2024, DeepSeekMath):
    A_i = (r_i − mean_g r) / (std_g r + eps), the std unbiased; `scale_by_std=False` drops the division
    (Dr. GRPO, Liu et al. 2025), so groups whose rewards barely differ are not up-weighted. rloo
    (Ahmadian et al. 2024): A_i = r_i − mean_{j≠i} r_j, the leave-one-out mean, an unbiased baseline.
    """
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size} (at least 2)")
    grouped = scores.reshape(-1, group_size)
    if estimator == "rloo":
        leave_one_out = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        return (grouped - leave_one_out).reshape(-1)
    if estimator == "grpo":
        advantages = grouped - grouped.mean(dim=1, keepdim=True)
        if scale_by_std:
            advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
        return advantages.reshape(-1)
    raise ValueError(f"unknown group advantage estimator {estimator!r}; expected 'grpo' or 'rloo'")


def groups_with_signal(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group (rows g*G … g*G + G − 1), whether its rewards differ: a group of equal rewards has
    advantage 0 for every answer under grpo and rloo, so it teaches nothing."""
    grouped = scores.reshape(-1, group_size)
    return grouped.max(dim=1).values != grouped.min(dim=1).values


def select_groups(signal: torch.Tensor, count: int, group_size: int) -> torch.Tensor:
    """Rows of `count` groups, in sampling order: the first groups with signal, then, if there are too few
    of them, the first groups without (DAPO's dynamic sampling keeps the batch size fixed)."""
    groups = torch.cat([signal.nonzero()[:, 0], (~signal).nonzero()[:, 0]])[:count].sort().values
    return (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)


def group_statistics(scores: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """Mean reward std within groups, and the share of groups whose rewards are all equal (no signal)."""
    return {
        "group/reward_std": scores.reshape(-1, group_size).std(dim=1).mean(),
        "group/equal_reward_share": (~groups_with_signal(scores, group_size)).float().mean(),
    }


# Losses


def token_mean(values: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor | int | None) -> torch.Tensor:
    """The masked mean, or with `num_tokens` the masked sum divided by it (a share of a larger batch's mean)."""
    return masked_mean(values, mask) if num_tokens is None else masked_sum(values, mask) / num_tokens


def sequence_mean(values: torch.Tensor, mask: torch.Tensor, num_sequences: torch.Tensor | int | None) -> torch.Tensor:
    """Each row's mean over its real tokens, averaged over rows (the original GRPO's loss aggregation); with
    `num_sequences` the rows' sum divided by it (a share of a larger batch's mean). Rows without a token add 0."""
    row_means = masked_sum(values, mask, dim=1) / mask.sum(dim=1).clamp(min=1)
    return row_means.mean() if num_sequences is None else row_means.sum() / num_sequences


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    aggregation: Literal["token", "sequence"] = "token",
    num_tokens: torch.Tensor | int | None = None,
    num_sequences: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """A per-token loss reduced to one number: over all real tokens, or per response then over responses."""
    if aggregation == "sequence":
        return sequence_mean(values, mask, num_sequences)
    return token_mean(values, mask, num_tokens)


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
    num_tokens: torch.Tensor | int | None = None,
    cliprange_high: float | None = None,
    aggregation: Literal["token", "sequence"] = "token",
    num_sequences: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, as a loss to minimise; returns (loss, approxkl, clipfrac).

    ratio = exp(log pi_new - log pi_old); loss = mean over real tokens of
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high)), eps_high = `cliprange_high` or eps (DAPO's
    clip-higher when larger). approxkl = 1/2 * mean((log pi_new - log pi_old)^2) and clipfrac (the share
    of tokens where the clipped term is the larger) are diagnostics, detached. With `num_tokens` the loss
    is the sum over these tokens divided by it (the real tokens of the whole mini-batch that this
    micro-batch is part of), so accumulating micro-batches gives the mini-batch's mean; with
    aggregation "sequence", the mean over each row's tokens summed over rows and divided by `num_sequences`.
    """
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    upper = cliprange if cliprange_high is None else cliprange_high
    unclipped_losses = -advantages * ratio
    clipped_losses = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + upper)
    loss = aggregate(torch.max(unclipped_losses, clipped_losses), mask, aggregation, num_tokens, num_sequences)
    with torch.no_grad():
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
        clipfrac = masked_mean((clipped_losses > unclipped_losses).float(), mask)
    return loss, approxkl, clipfrac


def value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
    num_tokens: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss, 1/2 * mean of max((V_new - R)^2, (clip(V_new, V_old +/- eps_v) - R)^2);
    returns (loss, clipfrac), clipfrac being the share of tokens where the clipped term is the larger.
    `num_tokens` as in `policy_loss`."""
    clipped_values = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    unclipped_losses = (new_values - returns) ** 2
    clipped_losses = (clipped_values - returns) ** 2
    loss = 0.5 * token_mean(torch.max(unclipped_losses, clipped_losses), mask, num_tokens)
    with torch.no_grad():
        clipfrac = masked_mean((clipped_losses > unclipped_losses).float(), mask)
    return loss, clipfrac


# KL coefficient control


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt; present so callers treat both controllers alike."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller that steers the observed KL towards a target.

    e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n_steps / horizon), where KL is the
    mean per-response KL (summed over tokens) of the last batch and n_steps the episodes in it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got {target} and {horizon}")
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = int(state["horizon"])


def make_kl_controller(
    kl_coef: float, kl_target: float | None, kl_horizon: int
) -> FixedKLController | AdaptiveKLController:
    """The controller a config asks for: adaptive when it names a KL target, fixed otherwise."""
    if kl_target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, kl_target, kl_horizon)
