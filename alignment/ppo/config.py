"""The PPO stage's typed configuration: every hyperparameter of one PPO run, documented once.

Defaults follow TRL's PPO trainer and the published RLHF recipes (Ziegler et al. 2019; Ouyang et al.
2022; Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"), scaled for LoRA on a
quantized base. The recipe validator builds it from YAML (`alignment.recipes.validate.build`), so an
impossible value fails at `alignment validate` time, with the key path, not hours into a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from alignment.recipes.validate import RecipeError

KLEstimator = Literal["k1", "k3"]
AdvantageEstimator = Literal["gae", "grpo", "rloo"]


@dataclass
class PPOConfig:
    """Hyperparameters of the PPO stage (RLHF with a KL penalty to the SFT policy, optionally PPO-ptx).

    One *iteration* samples `samples_per_prompt` responses (one by default) for each of
    `rollout_batch_size` prompts, scores them, and
    then runs `num_ppo_epochs` passes over that batch, split into `num_mini_batches` mini-batches; each
    mini-batch is one optimiser step, accumulated over `gradient_accumulation_steps` micro-batches.

    Parameters:
        > Optimisation

        learning_rate: Adam learning rate of the trainable adapters (policy and value). PPO wants a
            small one: a large step makes the first epoch's ratios leave the clip range at once.
        num_ppo_epochs: Passes over each rollout batch. More reuse is cheaper per sample but drifts
            further from the sampling policy (watch `policy/clipfrac_avg` and `policy/approxkl_avg`).
        rollout_batch_size: Prompts sampled per iteration (`samples_per_prompt` responses each): the
            batch the advantages are whitened over and the KL controller is updated with.
        num_mini_batches: Mini-batches per PPO epoch; each is one optimiser step. `mini_batch_size`
            is derived: `rollout_batch_size / num_mini_batches`.
        gradient_accumulation_steps: Micro-batches a mini-batch is split into for the forward and
            backward passes, to bound activation memory; the optimiser still steps once per mini-batch,
            with the same gradient (every loss is normalised by the mini-batch's token count).
        weight_decay: AdamW's decoupled weight decay on the trainable adapters and the value head. 0 by
            default: decay pulls the policy's LoRA weights towards the bare base, not towards the SFT
            policy it starts from (the KL penalty is the anchor).
        max_grad_norm: Clip the global gradient norm of each optimiser step to this value; None: no clipping.
        total_episodes: Episodes (prompt-response pairs) to train on in all. At most one of
            `total_episodes` and `num_iterations`; neither: one pass over the prompt dataset.
        num_iterations: Iterations (rollout + update) to run in all, instead of `total_episodes`.

        > Sampling (rollout)

        temperature: Sampling temperature. The same temperature divides the logits wherever
            log-probs are taken (rollout, reference, update); otherwise the ratio and the KL are
            biased from the first step.
        top_p: Nucleus sampling threshold; 1.0 samples from the full (temperature-scaled) distribution.
            Below 1 the samples come from a truncated distribution while the log-probs do not, which
            biases the importance ratio; keep 1.0 unless you know you want it.
        max_new_tokens: Longest response sampled, in tokens; responses are cut after their first stop
            token (the tokenizer's EOS, the model's generation-config EOS list, the template's end of turn).
        merged_sampling: Sample from a plain copy of the base with the policy adapter merged in (in the
            compute dtype), made at the start of each rollout and freed at its end, instead of through
            the 4-bit base and the adapters: no dequantization or LoRA matmuls per generated token.
            Costs one unquantized copy of the base during the rollout; log-probs still come from the
            policy's own passes. Off under FSDP and DeepSpeed, whose sharded weights it cannot read.
        missing_eos_penalty: Subtracted from the score of every response that reached
            `max_new_tokens` without a stop token, to discourage rambling; None: no penalty. The
            default 1.0 (TRL's PPO examples' value) is one standard deviation of the normalised
            reward-model score; such a response is also scored as it is, visibly unfinished.

        > Reward

        normalize_reward: Standardise reward-model scores with the reward model's own mean and standard
            deviation over its training data, so that one `kl_coef` means the same for any reward model:
            a reward stage's statistics, or the `reward_stats.json` a separate reward model ships (as
            `alignment export` writes it), else statistics estimated from the initial policy's answers
            (`reward_stats_prompts`).
        reward_stats_prompts: For a separate reward model that ships no statistics: how many training
            prompts the initial (SFT) policy answers, sampled as in training, for the mean and standard
            deviation of its scores (Ziegler et al. 2019 normalised so); 0: use its scores as they come.
        reward_clip: After normalisation, clip scores to [-reward_clip, reward_clip]; None: no clip.
        kl_estimator: Per-token KL estimate in the reward, with d = log pi_theta - log pi_SFT at the
            sampled token: "k1" = d (unbiased, can be negative per token); "k3" = (e^-d - 1) + d
            (unbiased, never negative, lower variance).
        kl_coef: The KL coefficient beta in r_t = -beta * kl_t (+ score at the last token); the initial
            value when the KL is adaptive. InstructGPT used 0.02, TRL defaults to 0.05.
        kl_target: Adaptive KL (Ziegler et al.): the per-response KL (summed over tokens) that the
            controller steers beta towards; None keeps beta fixed at `kl_coef`.
        kl_horizon: Adaptive KL time constant, in episodes: beta changes by at most
            20% * episodes / horizon per update.

        > Advantages and losses

        advantage_estimator: "gae": PPO's, from the value role's V(s_t) (InstructGPT). "grpo" (Shao et
            al. 2024) and "rloo" (Ahmadian et al. 2024): critic-free, each response's advantage is its
            sequence reward against the other responses to the same prompt (`samples_per_prompt` of them);
            no value role is loaded, every token of a response gets its advantage.
        samples_per_prompt: Responses sampled per prompt per iteration (the group); at least 2 for grpo
            and rloo. An iteration has rollout_batch_size × samples_per_prompt episodes.
        dynamic_sampling: grpo/rloo: DAPO's dynamic sampling (Yu et al. 2025). A group whose answers all
            got the same score (all right, or all wrong, under a checker) has advantage 0 everywhere and
            only dilutes the update; so further batches of `rollout_batch_size` prompts are sampled and
            scored until that many groups with differing scores are found (at most `max_sampling_rounds`
            batches), and the update trains on those. Short of them, equal-score groups fill the batch.
            Sampling and a checker are cheap next to the update, so each update gets several times the
            signal; the group metrics are over everything sampled.
        max_sampling_rounds: With `dynamic_sampling`, the most batches of prompts sampled per iteration.
        scale_advantages_by_std: grpo: divide each group's centred rewards by their std. False is Dr.
            GRPO (Liu et al. 2025): no up-weighting of groups whose rewards barely differ.
        loss_aggregation: "token": the policy loss is the mean over all real tokens of the mini-batch
            (DAPO, Dr. GRPO; PPO's usual); "sequence": the mean over each response's tokens, then over
            responses (the original GRPO), which gives short responses' tokens more weight.
        kl_penalty_in: "reward": beta * KL is taken from the reward (per token for gae, summed over the
            response for grpo/rloo); "loss": beta * the mean per-token KL estimate (`kl_estimator`, k3
            as GRPO uses it) is added to the loss instead. With kl_coef 0 the reference role never runs.
        gamma: Discount factor of the GAE. 1.0: the score at the end counts fully for every token.
        lam: GAE lambda: 1.0 is the Monte-Carlo return (high variance); 0 the one-step TD error (high bias).
        whiten_advantages: Normalise advantages to mean 0 and variance 1 over the real response tokens of
            the rollout batch.
        cliprange: PPO's epsilon: the probability ratio is clipped to [1 - cliprange, 1 + cliprange].
        cliprange_high: The upper epsilon when it differs (DAPO's clip-higher, Yu et al. 2025: e.g. 0.28
            with cliprange 0.2 leaves more room to raise unlikely tokens); None: cliprange.
        cliprange_value: Value predictions are clipped to old value +/- cliprange_value in the value loss.
        vf_coef: Weight of the value loss in the total loss.
        entropy_coef: Weight of the entropy bonus (subtracted from the loss); 0 in InstructGPT and TRL.
        ptx_coef: PPO-ptx: weight gamma_ptx of the language-modelling loss on SFT or pre-training data,
            added to keep the policy's performance on public tasks; 0 is plain PPO.

        > Memory

        release_memory: When the loop hands memory that glibc's malloc keeps after frees back to the OS
            (`malloc_trim`; CPU tensors come from malloc): "phase", after each rollout and each update;
            "step", after every optimiser step as well, which keeps the update's peak RSS near its live
            tensors instead of its fragmented high-water mark, at some update speed (freed pages are
            faulted in again). A caching malloc (`alignment.allocator`) needs neither. Nothing on GPUs,
            where tensors live in CUDA's caching allocator.

        > Logging and checkpoints (in iterations)

        logging_steps: Log the metrics every this many iterations.
        sample_table_steps: Log a table of prompts, responses and scores every this many iterations,
            to catch reward hacking by eye; None: never.
        save_steps: Save a resumable checkpoint (adapters, value head, optimiser, KL controller, RNG)
            every this many iterations; None: only at the end.

        > Reproducibility

        seed: Seed for sampling, shuffling and head initialisation; None: the recipe's seed.
    """

    # Optimisation
    learning_rate: float = 1e-5
    num_ppo_epochs: int = 4
    rollout_batch_size: int = 64
    num_mini_batches: int = 4
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    total_episodes: int | None = None
    num_iterations: int | None = None

    # Sampling
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 64
    merged_sampling: bool = True
    missing_eos_penalty: float | None = 1.0

    # Reward
    normalize_reward: bool = True
    reward_stats_prompts: int = 64
    reward_clip: float | None = None
    kl_estimator: KLEstimator = "k1"
    kl_coef: float = 0.05
    kl_target: float | None = None
    kl_horizon: int = 10000

    # Advantages and losses
    advantage_estimator: AdvantageEstimator = "gae"
    samples_per_prompt: int = 1
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    scale_advantages_by_std: bool = True
    loss_aggregation: Literal["token", "sequence"] = "token"
    kl_penalty_in: Literal["reward", "loss"] = "reward"
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    cliprange: float = 0.2
    cliprange_high: float | None = None
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    ptx_coef: float = 0.0

    # Memory
    release_memory: Literal["phase", "step"] = "phase"

    # Logging and checkpoints
    logging_steps: int = 1
    sample_table_steps: int | None = 10
    save_steps: int | None = 50

    # Reproducibility
    seed: int | None = None

    def __post_init__(self) -> None:
        def require(condition: bool, key: str, message: str) -> None:
            if not condition:
                raise RecipeError(key, f"{message}, got {getattr(self, key)!r}")

        require(self.learning_rate > 0, "learning_rate", "must be positive")
        require(self.num_ppo_epochs >= 1, "num_ppo_epochs", "must be at least 1")
        require(self.rollout_batch_size >= 1, "rollout_batch_size", "must be at least 1")
        require(self.num_mini_batches >= 1, "num_mini_batches", "must be at least 1")
        require(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be at least 1")
        require(self.samples_per_prompt >= 1, "samples_per_prompt", "must be at least 1")
        require(
            self.advantage_estimator == "gae" or self.samples_per_prompt >= 2,
            "samples_per_prompt",
            f"must be at least 2 for advantage_estimator {self.advantage_estimator} (the group is the baseline)",
        )
        require(
            not self.dynamic_sampling or self.advantage_estimator != "gae",
            "dynamic_sampling",
            "needs a group baseline (advantage_estimator grpo or rloo): under gae no group is without signal",
        )
        require(self.max_sampling_rounds >= 1, "max_sampling_rounds", "must be at least 1")
        require(self.reward_stats_prompts >= 0, "reward_stats_prompts", "must be 0 (no estimate) or more")
        require(
            self.episodes_per_iteration % self.num_mini_batches == 0,
            "num_mini_batches",
            f"must divide the episodes of an iteration (rollout_batch_size × samples_per_prompt = "
            f"{self.episodes_per_iteration}) into equal mini-batches",
        )
        require(
            self.mini_batch_size % self.gradient_accumulation_steps == 0,
            "gradient_accumulation_steps",
            f"must divide the mini-batch size (rollout_batch_size / num_mini_batches = {self.mini_batch_size})",
        )
        require(self.weight_decay >= 0, "weight_decay", "must be zero or positive")
        require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be positive or null")
        if self.total_episodes is not None and self.num_iterations is not None:
            raise RecipeError("total_episodes", "give total_episodes or num_iterations, not both")
        require(
            self.total_episodes is None or self.total_episodes >= self.episodes_per_iteration,
            "total_episodes",
            f"must be at least one rollout batch ({self.episodes_per_iteration} episodes)",
        )
        require(self.num_iterations is None or self.num_iterations >= 1, "num_iterations", "must be at least 1")

        require(self.temperature > 0, "temperature", "must be positive (sampling is required for PPO)")
        require(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        require(self.max_new_tokens >= 1, "max_new_tokens", "must be at least 1")
        require(
            self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
            "missing_eos_penalty",
            "must be zero or positive (it is subtracted from the score)",
        )

        require(self.reward_clip is None or self.reward_clip > 0, "reward_clip", "must be positive or null")
        require(self.kl_coef >= 0, "kl_coef", "must be zero or positive")
        require(self.kl_target is None or self.kl_target > 0, "kl_target", "must be positive, or null for a fixed KL")
        require(self.kl_horizon >= 1, "kl_horizon", "must be at least 1 episode")
        require(
            self.kl_target is None or self.kl_coef > 0,
            "kl_coef",
            "must be positive when kl_target is set (an adaptive coefficient cannot grow from 0)",
        )

        require(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]")
        require(0 <= self.lam <= 1, "lam", "must be in [0, 1]")
        require(self.cliprange > 0, "cliprange", "must be positive")
        require(self.cliprange_high is None or self.cliprange_high > 0, "cliprange_high", "must be positive or null")
        require(self.cliprange_value > 0, "cliprange_value", "must be positive")
        require(self.vf_coef >= 0, "vf_coef", "must be zero or positive")
        require(self.entropy_coef >= 0, "entropy_coef", "must be zero or positive")
        require(self.ptx_coef >= 0, "ptx_coef", "must be zero or positive")

        require(self.logging_steps >= 1, "logging_steps", "must be at least 1")
        require(
            self.sample_table_steps is None or self.sample_table_steps >= 1,
            "sample_table_steps",
            "must be at least 1, or null for never",
        )
        require(self.save_steps is None or self.save_steps >= 1, "save_steps", "must be at least 1, or null")

    @property
    def episodes_per_iteration(self) -> int:
        return self.rollout_batch_size * self.samples_per_prompt

    @property
    def sampling_rounds(self) -> int:
        """Prompt batches an iteration may sample: each iteration owns this many blocks of the prompt order."""
        return self.max_sampling_rounds if self.dynamic_sampling else 1

    @property
    def uses_value(self) -> bool:
        """Whether the value role exists: only GAE needs V(s_t)."""
        return self.advantage_estimator == "gae"

    @property
    def uses_reference(self) -> bool:
        """Whether the reference role runs: not when the KL has no weight and never will."""
        return self.kl_coef > 0 or self.kl_target is not None

    @property
    def mini_batch_size(self) -> int:
        """Episodes per optimiser step."""
        return self.episodes_per_iteration // self.num_mini_batches

    @property
    def micro_batch_size(self) -> int:
        """Episodes per forward/backward pass during the update."""
        return self.mini_batch_size // self.gradient_accumulation_steps

    def iterations(self, num_prompts: int, num_processes: int = 1) -> int:
        """Iterations to run for a prompt dataset of `num_prompts` rows (one pass when no budget is set);
        each iteration rolls out `rollout_batch_size` episodes in every process."""
        if self.num_iterations is not None:
            return self.num_iterations
        if self.total_episodes is not None:
            return max(1, math.ceil(self.total_episodes / (self.episodes_per_iteration * num_processes)))
        prompts_per_iteration = self.rollout_batch_size * num_processes * self.sampling_rounds  # the blocks it owns
        return max(1, math.ceil(num_prompts / prompts_per_iteration))
