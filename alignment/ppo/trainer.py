"""The PPO loop of InstructGPT, with the policy, reference, reward and value roles as adapters on one base.

One iteration: sample responses with the policy (rollout) → score them with the reward role and take
log-probs under the policy and the reference and values under the value role → per-token rewards
with the KL penalty → GAE → several epochs of clipped policy and value updates over mini-batches.
With a critic-free estimator (grpo, rloo) each prompt is sampled several times, the group is each
answer's baseline, and there is no value role; with kl_coef 0 the reference does not run either.
The maths lives in `alignment.ppo.core`; this file moves tensors between the roles and keeps state.

Roles never leak into each other: the model stays in eval mode (no dropout anywhere, so the first
mini-batch has ratio 1 exactly), frozen roles have requires_grad off and are run under no_grad, and
adapters are switched with `active_adapter`, which leaves requires_grad alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import get_scheduler

from alignment.allocator import missing_allocator_advice, release_freed_memory
from alignment.evaluation.checkers import resolve_checker
from alignment.io import read_json, write_json
from alignment.models.heads import active_adapter, positions_from_mask
from alignment.models.merged import MergedCopy
from alignment.models.sampling import Responses, sample
from alignment.models.scoring import RewardSource, token_scores
from alignment.names import POLICY, REFERENCE, VALUE
from alignment.ppo import core
from alignment.ppo.config import PPOConfig
from alignment.tracking import Tracker

logger = logging.getLogger(__name__)

CHECKPOINT = "ppo_checkpoint"  # accelerate's save_state folder in the stage's work folder
TRAINER_STATE = "trainer_state.json"  # in it: counters, history, config, KL controller, PPO-ptx sampler
TRAINABLE_WEIGHTS = "model.safetensors"  # in it: the trainable weights only (accelerate's name for the model's)


@dataclass
class Rollout:
    """One batch of sampled episodes and everything measured on them before the update."""

    query_ids: torch.Tensor  # (batch, query length), left-padded prompts
    query_mask: torch.Tensor
    response_ids: torch.Tensor  # (batch, response length), pad after the first EOS
    response_mask: torch.Tensor  # 1 on real response tokens, up to and including the first EOS
    contains_eos: torch.Tensor  # (batch,)
    logprobs: torch.Tensor  # log π_old(y_t | x, y_<t), the sampling policy
    reference_logprobs: torch.Tensor  # log π_SFT(y_t | x, y_<t)
    values: torch.Tensor  # V_old(s_t)
    scores: torch.Tensor  # the sequence reward after normalisation and the missing-EOS penalty
    raw_scores: torch.Tensor  # the reward source's scores as it gave them
    responses: list[str]
    prompts: list[list[dict]]
    gold: list[bool | None]
    kl: torch.Tensor  # KL_t, the per-token penalty's estimate
    kl_coef: float  # β when the rollout was scored
    advantages: torch.Tensor  # A_t (whitened when the config says so)
    returns: torch.Tensor  # R_t = A_t + V_old(s_t), before whitening
    sampling_metrics: dict[str, float]  # scores, gold accuracy and group statistics of everything sampled

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


@dataclass
class ScoredResponses:
    """Sampled responses with their scores, before the role passes: what dynamic sampling selects from."""

    responses: Responses
    raw_scores: torch.Tensor  # the reward source's scores as it gave them
    scores: torch.Tensor  # after normalisation, clipping and the missing-EOS penalty
    gold: list[bool | None]  # the gold checker's verdict where the data has one
    components: dict[str, torch.Tensor]  # each source's own scores when the reward is a weighted sum

    def __len__(self) -> int:
        return len(self.responses)

    def select(self, rows: torch.Tensor) -> ScoredResponses:
        """These rows only, in this order."""
        indices = rows.tolist()
        return ScoredResponses(
            self.responses.select(indices), self.raw_scores[rows.to(self.raw_scores.device)],
            self.scores[rows.to(self.scores.device)], [self.gold[row] for row in indices],
            {name: values[rows.to(values.device)] for name, values in self.components.items()},
        )  # fmt: skip

    @classmethod
    def concatenate(cls, parts: Sequence[ScoredResponses], pad_id: int) -> ScoredResponses:
        if len(parts) == 1:
            return parts[0]
        return cls(
            Responses.concatenate([part.responses for part in parts], pad_id),
            torch.cat([part.raw_scores for part in parts]),
            torch.cat([part.scores for part in parts]),
            [verdict for part in parts for verdict in part.gold],
            {name: torch.cat([part.components[name] for part in parts]) for name in parts[0].components},
        )


def trim_padding(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Drops the columns that are padding in every row: before the longest prompt of these rows and after
    their longest response. Positions come from the mask, so no row's numbers change; the passes only
    get cheaper when a micro-batch's prompts and responses are shorter than the whole rollout's."""
    real = attention_mask.bool().any(0)
    first = int(real.int().argmax())
    last = len(real) - int(real.flip(0).int().argmax())
    first = min(first, response_start - 1)  # keep the position that predicts the first response token
    last = max(last, response_start + 1)
    return input_ids[:, first:last], attention_mask[:, first:last], response_start - first


def response_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int
) -> torch.Tensor:
    """Logits that predict each response token (positions response_start - 1 … end - 1), and no others:
    the LM head never runs on the prompt, which for a large vocabulary is most of a pass's memory."""
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=input_ids.shape[1] - response_start + 1,
    ).logits
    return logits[:, :-1]


def pad_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """Zeros appended on the right up to `width` columns (the response positions a trimmed pass left out)."""
    return torch.nn.functional.pad(values, (0, width - values.shape[1]))


def prompt_indices(first: int, count: int, num_prompts: int, seed: int) -> list[int]:
    """Dataset rows of episodes first … first + count − 1: pass p over the prompts visits them in the order
    of randperm(num_prompts) seeded with seed + p, so a resumed run sees the same prompts."""
    indices = []
    for position in range(first, first + count):
        epoch, index = divmod(position, num_prompts)
        indices.append(int(_prompt_order(num_prompts, seed + epoch)[index]))
    return indices


@functools.lru_cache(maxsize=2)
def _prompt_order(num_prompts: int, seed: int) -> torch.Tensor:
    return torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed))


class PolicyAndValue(torch.nn.Module):
    """The trainable parts, the adapters on the shared base and the value head, in one module, so that
    accelerate prepares both and DDP averages all their gradients."""

    def __init__(self, model: PeftModel, value_head: torch.nn.Module | None):
        super().__init__()
        self.model, self.value_head = model, value_head  # no value head: a critic-free estimator

    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: parameter for name, parameter in self.named_parameters() if parameter.requires_grad}


class PPOTrainer:
    """Runs PPO iterations over a prompt dataset; resumable from its last checkpoint.

    Trainable weights (the policy and value adapters and the value head) stay in float32, the master
    weights; with a bfloat16 or float16 `compute_dtype` every forward pass runs under autocast, so an
    optimiser step smaller than a bfloat16 rounding step is not lost.
    """

    def __init__(
        self,
        config: PPOConfig,
        model: PeftModel,
        value_head: torch.nn.Module | None,
        reward: RewardSource,
        tokenizer: Any,
        prompts: Dataset,
        work_dir: Path,
        tracker: Tracker,
        reward_stats: dict | None = None,
        ptx_batches: Any = None,
        seed: int = 0,
        compute_dtype: torch.dtype = torch.float32,
    ):
        self.config, self.reward = config, reward
        self.tokenizer, self.prompts, self.work_dir, self.tracker = tokenizer, prompts, Path(work_dir), tracker
        self.reward_stats, self.ptx_batches, self.seed = reward_stats, ptx_batches, seed
        self.accelerator = Accelerator(step_scheduler_with_optimizer=False)  # one scheduler step per optimiser step
        self.device = self.accelerator.device
        if self.device.type == "cpu" and (advice := missing_allocator_advice()):
            logger.warning(advice)
        self.compute_dtype = compute_dtype
        policy_and_value = PolicyAndValue(model, value_head.to(self.device) if value_head is not None else None)
        self.optimizer = torch.optim.AdamW(
            policy_and_value.trainable_parameters().values(),
            lr=config.learning_rate, eps=1e-5, weight_decay=config.weight_decay,
        )  # fmt: skip
        self.num_iterations = config.iterations(len(self.prompts), self.accelerator.num_processes)
        self.scheduler = get_scheduler(
            "linear", self.optimizer, num_warmup_steps=0,
            num_training_steps=self.num_iterations * config.num_ppo_epochs * config.num_mini_batches,
        )  # fmt: skip
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
            policy_and_value, self.optimizer, self.scheduler
        )
        self.policy_and_value = self.accelerator.unwrap_model(self.model)  # unwrapping walks every module: once
        self.accelerator.register_save_state_pre_hook(self._save_trainable_weights)
        self.accelerator.register_load_state_pre_hook(self._load_trainable_weights)
        sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        mergeable = config.merged_sampling and not sharded and isinstance(self.unwrapped, PeftModel)
        self.merged_copy = MergedCopy(self.unwrapped, compute_dtype) if mergeable else None
        self.kl_controller = core.make_kl_controller(config.kl_coef, config.kl_target, config.kl_horizon)
        self.iteration, self.episode, self.history = 0, 0, []
        self.model.eval()  # dropout off in every pass, including the update

    # ---- bookkeeping ------------------------------------------------------------------------
    def _prompt_batch(self, iteration: int, sampling_round: int = 0) -> list[dict]:
        """The prompts of one iteration's sampling round, read from the dataset in one go: each iteration
        owns `sampling_rounds` blocks of the prompt order (see `prompt_indices`), used or not, so that a
        resumed run samples the same prompts."""
        size, processes = self.config.rollout_batch_size, self.accelerator.num_processes
        block = iteration * self.config.sampling_rounds + sampling_round
        first = (block * processes + self.accelerator.process_index) * size
        columns = self.prompts[prompt_indices(first, size, len(self.prompts), self.seed)]
        rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
        return [row for row in rows for _ in range(self.config.samples_per_prompt)]  # a prompt's group is consecutive

    # ---- forward passes of each role ----------------------------------------------------------
    def autocast(self) -> torch.autocast:
        """Mixed precision for every pass: the compute dtype's matmuls over float32 master weights."""
        enabled = self.compute_dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled)

    @property
    def unwrapped(self) -> PeftModel:
        """The PeftModel under accelerate's wrapper: adapters are switched on it, forwards go through the wrapper."""
        return self.policy_and_value.model

    @contextlib.contextmanager
    def _sampling_policy(self) -> Iterator[torch.nn.Module]:
        """The model to sample from: the policy merged into a plain copy of the base where allowed
        (`merged_sampling`), else the shared base with the policy adapter active."""
        if self.merged_copy is not None:
            with self.merged_copy.weights(POLICY) as model:
                yield model
        else:
            with active_adapter(self.unwrapped, POLICY):
                yield self.unwrapped

    def _response_logits(
        self, adapter: str, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int
    ) -> torch.Tensor:
        with active_adapter(self.unwrapped, adapter), self.autocast():
            return response_logits(self.model, input_ids, attention_mask, response_start)

    def _logprobs(
        self,
        adapter: str,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        start: int,
        temperature: float,
        with_entropy: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the response tokens under `adapter` (and their entropies), one column per response
        position; the columns that are padding in every row are not computed (they come back as 0)."""
        width = input_ids.shape[1] - start
        input_ids, attention_mask, start = trim_padding(input_ids, attention_mask, start)
        logits = self._response_logits(adapter, input_ids, attention_mask, start)
        logprobs = pad_columns(core.logprobs_from_logits(logits, input_ids[:, start:], temperature), width)
        if not with_entropy:
            return logprobs
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.entropy_coef > 0):
            entropy = pad_columns(core.entropy_from_logits(logits, temperature), width)
        return logprobs, entropy

    @torch.no_grad()
    def sequence_kl(self, responses: Responses, temperature: float) -> torch.Tensor:
        """Σ_t log π_θ(y_t) − log π_SFT(y_t) over each sampled response: a per-response estimate of the KL
        to the SFT policy (its mean over responses sampled at `temperature` from π_θ is the KL itself)."""
        start = responses.query_ids.shape[1]
        ids = torch.cat([responses.query_ids, responses.response_ids], dim=1).to(self.device)
        mask = torch.cat([responses.query_mask, responses.response_mask], dim=1).to(self.device)
        log_ratio = self._logprobs(POLICY, ids, mask, start, temperature) - self._logprobs(
            REFERENCE, ids, mask, start, temperature
        )
        return (log_ratio * mask[:, start:]).sum(1).cpu()

    def _values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int) -> torch.Tensor:
        """V(s_t) for each response token t: the value head's score at position t − 1 (it reads only up to there)."""
        width = input_ids.shape[1] - response_start
        input_ids, attention_mask, response_start = trim_padding(input_ids, attention_mask, response_start)
        with self.autocast():
            values = token_scores(self.unwrapped, self.policy_and_value.value_head, input_ids, attention_mask, VALUE)
        return pad_columns(values[:, response_start - 1 : -1].float(), width)

    def _micro_batches(self, size: int) -> list[slice]:
        micro = max(1, self.config.micro_batch_size)
        return [slice(start, min(start + micro, size)) for start in range(0, size, micro)]

    # ---- rollout ----------------------------------------------------------------------------
    def _score(self, rows: Sequence[dict], sampled: Responses) -> ScoredResponses:
        """The reward of each sampled response (normalised, clipped, EOS-penalised as the config says) and
        whether the gold checker, where the data has one, accepts it."""
        config = self.config
        with self.autocast():
            raw_scores = self.reward(sampled).float().to(self.device)
        scores = raw_scores
        if config.normalize_reward and self.reward_stats:
            scores = core.normalize_scores(
                scores, self.reward_stats["mean"], self.reward_stats["std"], config.reward_clip
            )
        elif config.reward_clip is not None:
            scores = scores.clamp(-config.reward_clip, config.reward_clip)
        scores = core.apply_missing_eos_penalty(scores, sampled.ended.to(self.device), config.missing_eos_penalty)
        gold = [
            bool(resolve_checker(row["checker"])(text, row["reference"]))
            if row.get("checker") and row.get("reference")
            else None
            for row, text in zip(rows, sampled.texts, strict=True)
        ]
        components = {name: values.float() for name, values in getattr(self.reward, "components", {}).items()}
        return ScoredResponses(sampled, raw_scores, scores, gold, components)

    def _sample_scored(self, rows: Sequence[dict]) -> tuple[ScoredResponses, int]:
        """Samples and scores `rows`; with `dynamic_sampling`, further prompt batches of this iteration too,
        until every process holds `rollout_batch_size` groups whose scores differ or the rounds run out.
        The merged sampling copy lives across the rounds; after the last possible round it is freed before
        the scoring, as without dynamic sampling."""
        config = self.config
        parts: list[ScoredResponses] = []
        with contextlib.ExitStack() as sampling:
            policy = sampling.enter_context(self._sampling_policy())
            for sampling_round in range(config.sampling_rounds):
                round_rows = rows if sampling_round == 0 else self._prompt_batch(self.iteration, sampling_round)
                with self.autocast():
                    sampled = sample(
                        policy,
                        self.tokenizer,
                        [row["prompt"] for row in round_rows],
                        max_new_tokens=config.max_new_tokens,
                        temperature=config.temperature,
                        top_p=config.top_p,
                    )
                if sampling_round == config.sampling_rounds - 1:
                    sampling.close()  # no more sampling: the copy's memory is free for the reward pass
                parts.append(self._score(round_rows, sampled))
                scores = torch.cat([part.scores for part in parts])
                if not config.dynamic_sampling or self._on_every_process(
                    int(core.groups_with_signal(scores, config.samples_per_prompt).sum()) >= config.rollout_batch_size
                ):
                    break
        return ScoredResponses.concatenate(parts, self.tokenizer.pad_token_id), len(parts)

    def _on_every_process(self, condition: bool) -> bool:
        """Whether `condition` holds on every process (all of them take the same branch after it)."""
        if self.accelerator.num_processes == 1:
            return condition
        return bool(self.accelerator.gather(torch.tensor([condition], device=self.device)).all())

    def _sampling_metrics(self, scored: ScoredResponses, rounds: int) -> dict[str, float]:
        """What the policy did, over every response sampled this iteration (before dynamic sampling's
        selection, which would bias them): scores, gold accuracy, the group statistics."""
        config = self.config
        metrics = {
            "objective/scores": scored.scores.mean().item(),
            "objective/raw_scores": scored.raw_scores.mean().item(),
            **{f"objective/reward/{name}": values.mean().item() for name, values in scored.components.items()},
        }
        checked = [value for value in scored.gold if value is not None]
        if checked:
            metrics["objective/gold_accuracy"] = sum(checked) / len(checked)
        if config.samples_per_prompt > 1:
            statistics = core.group_statistics(scored.scores, config.samples_per_prompt)
            metrics |= {key: value.item() for key, value in statistics.items()}
        if config.dynamic_sampling:
            metrics |= {"rollout/sampling_rounds": float(rounds), "rollout/sampled_episodes": float(len(scored))}
        return metrics

    @torch.no_grad()
    def rollout(self, rows: Sequence[dict]) -> Rollout:
        config = self.config
        scored, rounds = self._sample_scored(rows)
        sampling_metrics = self._sampling_metrics(scored, rounds)
        if config.dynamic_sampling:
            signal = core.groups_with_signal(scored.scores, config.samples_per_prompt)
            scored = scored.select(core.select_groups(signal, config.rollout_batch_size, config.samples_per_prompt))
        sampled, raw_scores, scores, gold = scored.responses, scored.raw_scores, scored.scores, scored.gold
        ended = sampled.ended.to(self.device)
        start = sampled.query_ids.shape[1]
        input_ids = torch.cat([sampled.query_ids, sampled.response_ids], dim=1).to(self.device)
        attention_mask = torch.cat([sampled.query_mask, sampled.response_mask], dim=1).to(self.device)
        logprobs, reference_logprobs, values = [], [], []
        for part in self._micro_batches(len(sampled)):
            ids, mask = input_ids[part], attention_mask[part]
            logprobs.append(self._logprobs(POLICY, ids, mask, start, config.temperature))
            if config.uses_reference:  # else the policy's own: a KL of exactly 0, never used
                reference_logprobs.append(self._logprobs(REFERENCE, ids, mask, start, config.temperature))
            else:
                reference_logprobs.append(logprobs[-1])
            values.append(self._values(ids, mask, start) if config.uses_value else torch.zeros_like(logprobs[-1]))
        logprobs, reference_logprobs, values = torch.cat(logprobs), torch.cat(reference_logprobs), torch.cat(values)
        mask = attention_mask[:, start:]
        kl = core.kl_penalty(logprobs, reference_logprobs, config.kl_estimator)
        kl_coef = self.kl_controller.value
        reward_kl_coef = kl_coef if config.kl_penalty_in == "reward" else 0.0  # else the update's loss pays it
        if config.uses_value:
            rewards = core.per_token_rewards(scores, kl, reward_kl_coef, mask)
            advantages, returns = core.compute_gae(rewards, values, mask, config.gamma, config.lam)
            if config.whiten_advantages:
                moments = self._moments_over_processes(advantages, mask)
                advantages = core.masked_whiten(advantages, mask, moments=moments)
        else:  # critic-free: the group's other responses are the baseline, every token gets the response's
            sequence_rewards = scores - reward_kl_coef * core.masked_sum(kl, mask, dim=1)
            advantages = (
                core.group_advantages(
                    sequence_rewards,
                    config.samples_per_prompt,
                    config.advantage_estimator,
                    config.scale_advantages_by_std,
                )[:, None]
                * mask
            )
            returns = torch.zeros_like(advantages)
        return Rollout(
            input_ids[:, :start], attention_mask[:, :start], input_ids[:, start:], mask, ended,
            logprobs, reference_logprobs, values, scores, raw_scores, sampled.texts, sampled.prompts, gold,
            kl, kl_coef, advantages, returns, sampling_metrics,
        )  # fmt: skip

    # ---- update -------------------------------------------------------------------------------
    def update(self, rollout: Rollout) -> dict[str, float]:
        """num_ppo_epochs passes of clipped policy and value updates over mini-batches of the rollout.

        Every loss is a sum over the mini-batch's real tokens divided by their count, whatever the
        micro-batches: gradient accumulation changes only the memory a step needs, never its gradient.
        """
        config = self.config
        mask, kl, kl_coef = rollout.response_mask, rollout.kl, rollout.kl_coef
        advantages, returns = rollout.advantages, rollout.returns
        update_generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.iteration)
        input_ids, attention_mask, start = rollout.input_ids, rollout.attention_mask, rollout.query_ids.shape[1]
        batch_size = len(rollout.responses)
        mini_batch_size = batch_size // config.num_mini_batches
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        for _ in range(config.num_ppo_epochs):
            order = torch.randperm(batch_size, generator=update_generator)
            for first in range(0, batch_size, mini_batch_size):
                mini_batch = order[first : first + mini_batch_size].to(self.device)
                num_tokens = mask[mini_batch].sum().clamp(min=1)
                num_sequences = len(mini_batch)
                ptx = self.ptx_batches(len(mini_batch)) if config.ptx_coef > 0 and self.ptx_batches else None
                self.optimizer.zero_grad(set_to_none=True)
                totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
                for part in self._micro_batches(len(mini_batch)):
                    rows = mini_batch[part]
                    ids, row_mask, response_mask = input_ids[rows], attention_mask[rows], mask[rows]
                    share = response_mask.sum() / num_tokens  # this micro-batch's share of the mini-batch's tokens
                    new_logprobs, entropies = self._logprobs(
                        POLICY, ids, row_mask, start, config.temperature, with_entropy=True
                    )
                    entropy = core.masked_sum(entropies, response_mask)
                    policy_loss, approxkl, clipfrac = core.policy_loss(
                        new_logprobs, rollout.logprobs[rows], advantages[rows], response_mask, config.cliprange,
                        num_tokens=num_tokens, cliprange_high=config.cliprange_high,
                        aggregation=config.loss_aggregation, num_sequences=num_sequences,
                    )  # fmt: skip
                    loss = policy_loss - config.entropy_coef * entropy / num_tokens
                    if config.kl_penalty_in == "loss" and config.uses_reference:  # GRPO's β·KL term
                        kl_loss = core.aggregate(
                            core.kl_penalty(new_logprobs, rollout.reference_logprobs[rows], config.kl_estimator),
                            response_mask, config.loss_aggregation, num_tokens, num_sequences,
                        )  # fmt: skip
                        loss = loss + rollout.kl_coef * kl_loss
                        totals["loss/kl_avg"] += kl_loss.detach()
                    if ptx is not None:
                        ptx_loss = self._ptx_loss({key: value[part] for key, value in ptx.items()}, ptx["labels"])
                        loss = loss + config.ptx_coef * ptx_loss
                        totals["loss/ptx_avg"] += ptx_loss.detach()
                    if config.uses_value:
                        if self.accelerator.num_processes == 1:
                            # The policy's graph is freed before the value pass builds its own: half the
                            # update's activation peak, the same gradients (the two adapters share no
                            # trainable weight). DDP reduces gradients in one backward per step, so there
                            # the two losses go back together.
                            self.accelerator.backward(loss)
                            loss = torch.zeros((), device=self.device)
                        new_values = self._values(ids, row_mask, start)
                        value_loss, value_clipfrac = core.value_loss(
                            new_values, rollout.values[rows], returns[rows], response_mask, config.cliprange_value,
                            num_tokens=num_tokens,
                        )  # fmt: skip
                        loss = loss + config.vf_coef * value_loss
                        totals["loss/value_avg"] += value_loss.detach()
                        totals["val/clipfrac_avg"] += value_clipfrac * share
                    self.accelerator.backward(loss)
                    ratio = torch.exp(new_logprobs.detach() - rollout.logprobs[rows])
                    totals["loss/policy_avg"] += policy_loss.detach()
                    totals["policy/approxkl_avg"] += approxkl * share
                    totals["policy/clipfrac_avg"] += clipfrac * share
                    totals["policy/entropy_avg"] += entropy.detach() / num_tokens
                    totals["val/ratio"] += core.masked_sum(ratio, response_mask) / num_tokens
                for key, total in totals.items():
                    stats[key].append(total)
                if config.max_grad_norm is not None:
                    params = [p for group in self.optimizer.param_groups for p in group["params"]]
                    self.accelerator.clip_grad_norm_(params, config.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                if config.release_memory == "step":
                    release_freed_memory()

        metrics = {key: torch.stack(values).mean().item() for key, values in stats.items()}  # one host sync
        metrics |= rollout.sampling_metrics
        metrics |= {
            "objective/entropy": (-rollout.logprobs * mask).sum(1).mean().item(),
            "val/num_eos_tokens": float(rollout.contains_eos.sum().item()),
            "val/mean_response_length": mask.sum(1).float().mean().item(),
            "kl_coef": kl_coef,
        }
        if config.uses_reference:  # with kl_coef 0 the reference never ran: the KL is not measured
            sequence_kl = (kl * mask).sum(1)
            non_score_reward = -kl_coef * sequence_kl
            metrics |= {
                "objective/kl": sequence_kl.mean().item(),
                "objective/non_score_reward": non_score_reward.mean().item(),
                "objective/rlhf_reward": (rollout.scores + non_score_reward).mean().item(),
            }
        if config.uses_value:
            metrics["val/explained_variance"] = core.explained_variance(rollout.values, returns, mask).item()
        metrics = self._mean_over_processes(metrics)
        self.kl_controller.update(metrics.get("objective/kl", 0.0), batch_size * self.accelerator.num_processes)
        return metrics

    def _ptx_loss(self, micro_batch: dict[str, torch.Tensor], mini_batch_labels: torch.Tensor) -> torch.Tensor:
        """PPO-ptx's language-modelling loss on one micro-batch: its summed token NLL divided by the label
        tokens of the whole mini-batch, so accumulation does not reweight it either."""
        num_items = (mini_batch_labels[:, 1:] != -100).sum().clamp(min=1).to(self.device)
        with active_adapter(self.unwrapped, POLICY), self.autocast():
            return self.model(
                **{key: value.to(self.device) for key, value in micro_batch.items()}, num_items_in_batch=num_items
            ).loss

    # ---- several processes ----------------------------------------------------------------------
    def _moments_over_processes(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Whitening statistics of every process's rollouts together, as one process with the whole batch would see."""
        if self.accelerator.num_processes == 1:
            return None
        return self.accelerator.reduce(core.masked_moments(values, mask).to(self.device), reduction="sum")

    def _mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric averaged over the processes, so the logs and the KL controller see every episode."""
        if self.accelerator.num_processes == 1:
            return metrics
        values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=self.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(metrics, values.tolist(), strict=True))

    def replica_checksums(self) -> list[float]:
        """One checksum of the trainable weights per process: they must agree, or the replicas diverged."""
        checksum = sum(parameter.double().sum() for parameter in self.trainable_state().values())
        return [float(value) for value in gather_object([float(checksum)])]

    # ---- the loop ----------------------------------------------------------------------------
    def train(self, on_iteration: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Runs the remaining iterations (all of them, or those after the last checkpoint)."""
        torch.manual_seed(self.seed + self.accelerator.process_index)  # each process samples its own responses
        self.load_checkpoint()
        config = self.config
        progress = tqdm(
            range(self.iteration, self.num_iterations), desc="ppo", initial=self.iteration, total=self.num_iterations
        )
        for iteration in progress:
            rows = self._prompt_batch(iteration)
            started = time.monotonic()
            rollout = self.rollout(rows)
            release_freed_memory()
            rollout_seconds = time.monotonic() - started
            started = time.monotonic()
            metrics = self.update(rollout)
            release_freed_memory()
            update_seconds = time.monotonic() - started
            self.iteration = iteration + 1
            self.episode += len(rollout.responses) * self.accelerator.num_processes
            response_tokens = rollout.response_mask.sum().item()
            all_tokens = rollout.attention_mask.sum().item()
            metrics |= {
                "episode": self.episode,
                "iteration": self.iteration,
                "lr": self.scheduler.get_last_lr()[0],
                "time/rollout_s": rollout_seconds,
                "time/update_s": update_seconds,
                "tokens_per_second/rollout": response_tokens / max(rollout_seconds, 1e-9),
                "tokens_per_second/train": all_tokens * config.num_ppo_epochs / max(update_seconds, 1e-9),
            }
            self.history.append(metrics)
            if self.iteration % config.logging_steps == 0:
                self.tracker.log(metrics, step=self.iteration)
            if config.sample_table_steps and (self.iteration % config.sample_table_steps == 0 or self.iteration == 1):
                self.log_samples(rollout)
            if on_iteration is not None:
                on_iteration(self.iteration, metrics)
            if config.save_steps and self.iteration % config.save_steps == 0 and self.iteration < self.num_iterations:
                self.save_checkpoint()
            progress.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics.get('objective/kl', 0):.3f}")
        checksums = self.replica_checksums()
        if max(checksums) - min(checksums) > 1e-6 * max(1.0, abs(checksums[0])):
            raise RuntimeError(f"ppo: the processes' trainable weights diverged (checksums {checksums})")
        return self.history

    def log_samples(self, rollout: Rollout) -> None:
        rows = [
            [prompt[-1]["content"], response, score, gold]
            for prompt, response, score, gold in zip(
                rollout.prompts, rollout.responses, rollout.scores.tolist(), rollout.gold, strict=True
            )
        ][:16]
        self.tracker.table("samples", ["prompt", "response", "score", "gold_correct"], rows, step=self.iteration)

    # ---- checkpoints -------------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights (policy and value adapters, value head), copied to the CPU."""
        return {name: p.detach().cpu().clone() for name, p in self.policy_and_value.trainable_parameters().items()}

    def _save_trainable_weights(self, models: list, weights: list, output_dir: str) -> None:
        """accelerate's save hook: the trainable weights, not the whole state with the frozen 4-bit base."""
        weights[0] = {name: tensor.contiguous() for name, tensor in self.trainable_state().items()}

    def _load_trainable_weights(self, models: list, input_dir: str) -> None:
        """accelerate's load hook: the trainable weights back, every one of them, then nothing else to load."""
        saved, parameters = load_file(Path(input_dir) / TRAINABLE_WEIGHTS), self.policy_and_value.trainable_parameters()
        if saved.keys() != parameters.keys():
            raise RuntimeError(f"{input_dir} holds other trainable weights than this run's; delete {self.work_dir}")
        for name, tensor in saved.items():
            parameters[name].data.copy_(tensor)
        models.clear()

    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly, through accelerate's `save_state` (trainable weights as
        safetensors, optimiser, scheduler, every process's random generators) plus our counters, history,
        config, KL controller and PPO-ptx sampler as JSON (accelerate's custom objects would need pickle).
        Written beside the last checkpoint and swapped in with renames, so a kill leaves one whole."""
        path = self.work_dir / CHECKPOINT
        tmp = path.with_name(f".{CHECKPOINT}.tmp")
        if self.accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        if self.accelerator.is_main_process:
            write_json(tmp / TRAINER_STATE, {
                "config": dataclasses.asdict(self.config),
                "iteration": self.iteration,
                "episode": self.episode,
                "history": self.history,
                "kl_controller": self.kl_controller.state_dict(),
                "ptx_sampler": self.ptx_batches.state_dict() if self.ptx_batches is not None else None,
                "num_processes": self.accelerator.num_processes,
            })  # fmt: skip
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            old = path.with_name(f".{CHECKPOINT}.old")
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self) -> bool:
        path = self.work_dir / CHECKPOINT
        if not (path / TRAINER_STATE).exists():
            return False
        state = read_json(path / TRAINER_STATE)
        now = json.loads(json.dumps(dataclasses.asdict(self.config), default=str))  # as JSON reads it back
        changed = {key: (then, now.get(key)) for key, then in state["config"].items() if then != now.get(key)}
        if changed:
            differences = ", ".join(f"{key}: {old!r} then, {new!r} now" for key, (old, new) in changed.items())
            raise RuntimeError(
                f"{path} was written by a PPO run with another config ({differences}); resuming "
                f"would mix the two runs. Put the config back to continue it, or delete {self.work_dir} to start afresh"
            )
        if state["num_processes"] != self.accelerator.num_processes:
            raise RuntimeError(
                f"{path} was written by {state['num_processes']} process(es), this run has "
                f"{self.accelerator.num_processes}: resume with the same number, or delete {self.work_dir}"
            )
        self.accelerator.load_state(str(path))
        self.kl_controller.load_state_dict(state["kl_controller"])
        if self.ptx_batches is not None and state["ptx_sampler"] is not None:
            self.ptx_batches.load_state_dict(state["ptx_sampler"])
        self.iteration, self.episode, self.history = state["iteration"], state["episode"], state["history"]
        print(f"ppo: resumed from {path} at iteration {self.iteration}/{self.num_iterations}")
        return True
