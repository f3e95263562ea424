"""Reward model (`type: reward`) on TRL's RewardTrainer: a LoRA adapter and a scalar head on the quantized base.

The loss is Bradley-Terry on preference pairs (minus a per-pair `margin` when the data has one, plus
RewardConfig's optional `center_rewards_coefficient` term). `init_from` starts from an earlier
stage's adapter (InstructGPT starts the reward model from the SFT model); without it, from the base.

Training runs on the sequence-classification form of the base (same decoder stack, same adapter
paths, a `score` layer: linear, or the attention head that `score_head` asks for, see
`alignment.models.heads`). The output is that PEFT adapter as PEFT saves it, the `score` layer
included, which plain `transformers` + `peft` load and `alignment.models.scoring.load_reward_role`
puts onto the one base that PPO shares. After training: pairwise accuracy, margin and the reward
distributions on the held-out pairs, and the reward mean and standard deviation over the training
prompts (`reward_stats.json`), which PPO uses to normalise rewards.
"""

from __future__ import annotations

import gc
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.constants import SEQ_CLS_HEAD_NAMES
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase, set_seed
from trl import RewardConfig, RewardTrainer
from trl.trainer.reward_trainer import suppress_seqcls_warning

from alignment.data.build import EVAL, EVAL_HELD_OUT, TRAIN, build_stage_data
from alignment.data.policy_pairs import PolicySamplesConfig, sample_policy_pairs
from alignment.io import write_json, write_jsonl
from alignment.models.heads import (
    ScoreHeadConfig,
    build_score_head,
    decoder_stack,
    read_reward_stats,
    reward_statistics,
)
from alignment.models.loading import SCORE_MODULE, attach_adapter, load_base_model, load_tokenizer, lora_config
from alignment.models.scoring import score_conversations, trained_score_head
from alignment.names import ADAPTER_WEIGHTS, LOG_HISTORY, POLICY, REWARD_STATS_FILE
from alignment.recipes.schema import Recipe, StageSpec
from alignment.stages.base import Stage, register
from alignment.stages.common import keep_float32_master_weights, last_checkpoint, trainer_columns
from alignment.tracking import Tracker

logger = logging.getLogger(__name__)

PAIR_FIELDS = ["prompt", "chosen", "rejected", "margin"]
PAIR_REWARDS_FILE = "pair_rewards.json"  # held-out pairs' rewards by split, in the split's order
POLICY_PAIRS_FILE = "policy_pairs.jsonl"  # the pairs made from the policy's samples, for inspection
HEAD_MODULES = ("lm_head", *SEQ_CLS_HEAD_NAMES)  # heads of one model form or the other, never in the adapter
PAIR_TABLE_COLUMNS = ["prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "correct"]


@dataclass
class RewardEvalConfig:
    """Scoring after training: held-out pairs (metrics, histograms, a table) and reward statistics."""

    batch_size: int = 32
    table_rows: int = 64  # held-out pairs logged to W&B with both rewards
    stats_pairs: int = 1024  # training pairs whose two responses give PPO's reward mean and std (0: all)


@dataclass
class RewardStageSpec(StageSpec):
    init_from: str | None = None  # start from an earlier stage's adapter (the SFT model) instead of the base
    score_head: ScoreHeadConfig = field(default_factory=ScoreHeadConfig)  # linear (the usual) or attention
    policy_samples: PolicySamplesConfig | None = None  # add pairs of a policy's own samples, checker-labelled
    evaluation: RewardEvalConfig = field(default_factory=RewardEvalConfig)

    def depends_on(self) -> list[str]:
        names = [self.init_from] if self.init_from else []
        if self.policy_samples and self.policy_samples.policy_from not in names:
            names.append(self.policy_samples.policy_from)
        return names


# --- The model trained ------------------------------------------------------------------------


def load_sequence_classifier(
    recipe: Recipe, gradient_checkpointing: bool = False, score_head: ScoreHeadConfig | None = None
) -> PreTrainedModel:
    """The base as a one-label classifier, quantized like every other stage's base, with the configured head
    as its `score` layer (the classifier reads `score` at the last real token)."""
    with suppress_seqcls_warning():  # a fresh `score` and an unused `lm_head` are expected
        model = load_base_model(
            recipe.model, gradient_checkpointing, auto_class=AutoModelForSequenceClassification, num_labels=1
        )
    if score_head is not None and score_head.type != "linear":
        linear = getattr(model, SCORE_MODULE, None)
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(
                f"{type(model).__name__} has no '{SCORE_MODULE}' layer to replace with a {score_head.type} head; "
                "use score_head.type: linear with this model"
            )
        head = build_score_head(score_head, linear.in_features, dtype=linear.weight.dtype)
        setattr(model, SCORE_MODULE, head.to(linear.weight.device))
    return model


def reward_lora_config(recipe: Recipe, init_dir: Path | None) -> LoraConfig:
    """The recipe's LoRA (or the init stage's, to load its weights) with the score head trained in full."""
    config = LoraConfig.from_pretrained(str(init_dir)) if init_dir is not None else lora_config(recipe.lora)
    config.task_type, config.inference_mode = "SEQ_CLS", False
    kept = [name for name in config.modules_to_save or [] if name not in HEAD_MODULES]
    config.modules_to_save = [*kept, SCORE_MODULE]
    return config


def load_init_weights(model: PeftModel, init_dir: Path) -> None:
    """Copies an earlier stage's adapter weights into the new adapter; every LoRA weight must be found.

    The score head keeps its fresh weights (a causal-LM stage has none to give).
    """
    saved = {key: value for key, value in load_file(str(init_dir / ADAPTER_WEIGHTS)).items() if ".lm_head." not in key}
    current = get_peft_model_state_dict(model)
    missing = [key for key in current if "lora_" in key and key not in saved]
    unexpected = [key for key in saved if key not in current]
    if missing or unexpected:
        raise RuntimeError(
            f"init_from {init_dir}: its adapter does not fit the reward model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); was it trained on the same base with the same LoRA target modules?"
        )
    set_peft_model_state_dict(model, {**current, **saved})


def check_last_tokens(dataset: Dataset, pad_token_id: int, name: str) -> None:
    """The classifier pools the rightmost non-pad token; a sequence ending in the pad token would be misread."""
    for batch in dataset.select_columns(["chosen_ids", "rejected_ids"]).iter(batch_size=1024):
        for ids in batch["chosen_ids"] + batch["rejected_ids"]:
            if ids and ids[-1] == pad_token_id:
                raise ValueError(
                    f"{name}: a tokenized pair ends with the pad token (id {pad_token_id}), so its reward would be "
                    "read at the wrong token; use a chat template that ends turns differently or a tokenizer whose "
                    "pad token differs from its end-of-turn token"
                )


# --- Evaluation ---------------------------------------------------------------------------------


def score_pairs(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, pairs: Dataset, batch_size: int
) -> tuple[list[float], list[float]]:
    """Rewards of each pair's chosen and of its rejected conversation."""
    head = trained_score_head(model)
    chosen = [example["prompt"] + example["chosen"] for example in pairs]
    rejected = [example["prompt"] + example["rejected"] for example in pairs]
    return (
        score_conversations(model, head, tokenizer, chosen, batch_size),
        score_conversations(model, head, tokenizer, rejected, batch_size),
    )


def pair_metrics(chosen: list[float], rejected: list[float], groups: list[str], prefix: str) -> dict[str, float]:
    """Pairwise accuracy with its 95% interval, margin, loss and mean rewards; accuracy also per group (a task
    family). From the per-pair rewards, which PPO's statistics and the report need anyway: RewardTrainer's
    own evaluation gives batch means of accuracy and margin only."""
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    accuracy = sum(margin > 0 for margin in margins) / len(margins)
    metrics = {
        f"{prefix}/pairwise_accuracy": accuracy,
        # half-width of the 95% interval (normal approximation): above chance when accuracy - 0.5 exceeds it
        f"{prefix}/pairwise_accuracy_ci95": 1.96 * math.sqrt(accuracy * (1 - accuracy) / len(margins)),
        f"{prefix}/mean_margin": sum(margins) / len(margins),
        f"{prefix}/loss": -torch.nn.functional.logsigmoid(torch.tensor(margins, dtype=torch.float64)).mean().item(),
        f"{prefix}/reward_chosen_mean": sum(chosen) / len(chosen),
        f"{prefix}/reward_rejected_mean": sum(rejected) / len(rejected),
        f"{prefix}/num_pairs": len(margins),
    }
    by_group: dict[str, list[bool]] = {}
    for group, margin in zip(groups, margins, strict=True):
        if group:
            by_group.setdefault(group, []).append(margin > 0)
    for group, hits in sorted(by_group.items()):
        metrics[f"{prefix}/pairwise_accuracy/{group}"] = sum(hits) / len(hits)
        metrics[f"{prefix}/num_pairs/{group}"] = len(hits)  # for the report's interval of each group
    return metrics


def pair_table_rows(pairs: Dataset, chosen: list[float], rejected: list[float], limit: int) -> list[list[Any]]:
    rows = []
    for example, chosen_reward, rejected_reward in list(zip(pairs, chosen, rejected, strict=True))[:limit]:
        prompt = "\n".join(f"{message['role']}: {message['content']}" for message in example["prompt"])
        rows.append(
            [
                prompt,
                example["chosen"][-1]["content"],
                example["rejected"][-1]["content"],
                chosen_reward,
                rejected_reward,
                chosen_reward > rejected_reward,
            ]
        )
    return rows


# --- The stage ------------------------------------------------------------------------------------


@register
class RewardStage(Stage):
    type = "reward"
    spec_class = RewardStageSpec
    args_class = RewardConfig

    def run(self, output_dir: Path, tracker: Tracker) -> dict[str, Any]:
        recipe, spec = self.recipe, self.spec
        tokenizer = load_tokenizer(recipe.model, recipe.chat_template)
        args = self.trl_args(tracker)
        data = build_stage_data(spec.data, "preference", self.seed, tokenizer, args.max_length)
        splits = {name: with_margins(split) for name, split in data.splits.items()}
        sampled_metrics = {}
        if spec.policy_samples:
            sampled, sampled_metrics = self.policy_sample_pairs(tokenizer, output_dir)
            splits[TRAIN] = add_pairs(splits[TRAIN], sampled, self.seed)

        init = self.require_stage(spec.init_from) if spec.init_from else None
        set_seed(args.seed)  # the score layer starts from random weights
        model = load_sequence_classifier(recipe, args.gradient_checkpointing, spec.score_head)
        model = get_peft_model(model, reward_lora_config(recipe, init))
        if hasattr(head := trained_score_head(model), "pool_last_token_in"):  # PEFT's trained copy of the head
            head.pool_last_token_in(decoder_stack(model))

        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=trainer_columns(splits[TRAIN], PAIR_FIELDS),
            eval_dataset=trainer_columns(splits.get(EVAL), PAIR_FIELDS),
            processing_class=tokenizer,
        )
        keep_float32_master_weights(trainer.model)
        if init is not None:  # loaded after TRL's bfloat16 cast, so a float32 recipe starts exactly at the SFT adapter
            load_init_weights(trainer.model, init)
        check_last_tokens(trainer.train_dataset, tokenizer.pad_token_id, "training pairs")
        result = trainer.train(resume_from_checkpoint=last_checkpoint(self.work_dir))
        metrics = {"train/loss": result.training_loss, "train/runtime_s": result.metrics["train_runtime"]}
        metrics |= data.metrics() | sampled_metrics

        trainer.save_model(str(output_dir))  # the PEFT sequence-classification adapter, `score` included
        tokenizer.save_pretrained(str(output_dir))
        write_json(output_dir / LOG_HISTORY, trainer.state.log_history)

        batch_size, pair_rewards = spec.evaluation.batch_size, {}
        for name in (EVAL, EVAL_HELD_OUT):
            if name not in splits:
                continue
            chosen, rejected = score_pairs(trainer.model, tokenizer, splits[name], batch_size)
            pair_rewards[name] = {"chosen": chosen, "rejected": rejected}
            metrics |= pair_metrics(chosen, rejected, splits[name]["group"], name)
            tracker.histogram(f"{name}/reward_chosen", chosen)
            tracker.histogram(f"{name}/reward_rejected", rejected)
            rows = pair_table_rows(splits[name], chosen, rejected, spec.evaluation.table_rows)
            tracker.table(f"{name}/pairs", PAIR_TABLE_COLUMNS, rows)
        write_json(output_dir / PAIR_REWARDS_FILE, pair_rewards)

        stats_pairs = sample_rows(splits[TRAIN], spec.evaluation.stats_pairs, self.seed)
        chosen, rejected = score_pairs(trainer.model, tokenizer, stats_pairs, batch_size)
        stats = reward_statistics(chosen + rejected)
        write_json(output_dir / REWARD_STATS_FILE, stats)
        metrics |= {f"reward_stats/{key}": value for key, value in stats.items()}
        tracker.log(metrics)
        return metrics

    def policy_sample_pairs(self, tokenizer: PreTrainedTokenizerBase, output_dir: Path) -> tuple[Dataset, dict]:
        """Pairs from the policy stage's own samples on the training prompts (its base loaded, then freed)."""
        config = self.spec.policy_samples
        prompts = build_stage_data(self.spec.data, "prompt", self.seed, tokenizer).splits[TRAIN]
        policy_dir = self.require_stage(config.policy_from)
        policy = attach_adapter(load_base_model(self.recipe.model), POLICY, from_path=policy_dir, trainable=False)
        pairs, metrics = sample_policy_pairs(policy, tokenizer, prompts, config, self.seed)
        del policy
        gc.collect()
        write_jsonl(output_dir / POLICY_PAIRS_FILE, pairs.to_list())
        return pairs, metrics


def add_pairs(split: Dataset, pairs: Dataset, seed: int) -> Dataset:
    """The split with more pairs, shuffled together; pairs get the split's margin column if it has one."""
    if len(pairs) == 0:  # a policy that answered every sample right leaves nothing to add
        return split
    if "margin" in split.column_names:
        pairs = pairs.add_column("margin", [0.0] * len(pairs))
    pairs = pairs.select_columns(split.column_names).cast(split.features)
    return concatenate_datasets([split, pairs]).shuffle(seed=seed)


def with_margins(split: Dataset) -> Dataset:
    """Rows without a margin (from another dataset of the mixture) get margin 0, the plain loss."""
    if "margin" not in split.column_names:
        return split
    return split.map(lambda row: {"margin": 0.0 if row["margin"] is None else float(row["margin"])})


def sample_rows(split: Dataset, count: int, seed: int) -> Dataset:
    if count <= 0 or count >= len(split):
        return split
    return split.select(sorted(random.Random(f"{seed}:reward-stats").sample(range(len(split)), count)))


__all__ = [
    "PAIR_REWARDS_FILE",
    "REWARD_STATS_FILE",
    "RewardEvalConfig",
    "RewardStage",
    "RewardStageSpec",
    "read_reward_stats",
]
