"""InstructGPT's RL step (`type: ppo`): PPO against the reward model, every role an adapter on one base.

The base is loaded once. The policy is a trainable copy of the SFT adapter; the reference is a
frozen copy of the same SFT adapter (the KL anchor is π_SFT, not the bare base); the reward is the
reward stage's adapter and head, frozen; the value is a trainable adapter and head, initialised from
the reward model (InstructGPT) or from the policy. A Python function may replace the reward model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from alignment.data.build import EVAL, TRAIN, build_stage_data
from alignment.evaluation.generation import SAMPLE_COLUMNS, evaluate_generation
from alignment.io import write_json, write_jsonl
from alignment.models.heads import ScalarHead, load_reward_role, load_scalar_head, read_reward_stats
from alignment.models.loading import (
    attach_adapter,
    load_base_model,
    load_tokenizer,
    torch_dtype,
    use_adapter,
)
from alignment.ppo.config import PPOConfig
from alignment.ppo.trainer import (
    POLICY,
    REFERENCE,
    VALUE,
    PPOTrainer,
    adapter_reward,
    function_reward,
    separate_model_reward,
)
from alignment.recipes.schema import DataSpec, GenerationEvalConfig, ModelConfig, StageSpec
from alignment.recipes.validate import RecipeError, build, check_args
from alignment.stages.base import Stage, register
from alignment.tracking import Tracker


@dataclass
class RewardModelConfig(ModelConfig):
    """A reward model of its own (another base, or a reward model from the hub), loaded frozen beside
    the shared base with its own tokenizer: any `AutoModelForSequenceClassification` with one label."""

    chat_template: str = "tokenizer"  # its tokenizer's own; or a built-in name or a Jinja string


@dataclass
class PPOStageSpec(StageSpec):
    policy_from: str = ""  # the SFT stage: its adapter starts the policy and is the frozen reference
    reward_from: str | None = None  # the reward stage (adapter + head), or...
    reward_function: str | None = None  # ...a Python reward `module:function(prompts, responses, references)`
    reward_model: RewardModelConfig | None = None  # ...or a separate sequence-classification model
    value_from: Literal["reward", "policy"] = "reward"
    ptx_data: DataSpec | None = None  # PPO-ptx: SFT data whose loss is mixed in (args.ptx_coef)
    evaluation: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)

    def __post_init__(self) -> None:
        if not self.policy_from:
            raise RecipeError("policy_from", "a ppo stage needs policy_from: <the sft stage>")
        sources = [self.reward_from, self.reward_function, self.reward_model]
        if sum(source is not None for source in sources) != 1:
            raise RecipeError(
                "reward_from",
                "give exactly one of reward_from (a reward stage), reward_function or reward_model",
            )
        if self.value_from == "reward" and self.reward_from is None:
            raise RecipeError("value_from", "value_from: reward needs reward_from; use value_from: policy")

    def depends_on(self) -> list[str]:
        return [name for name in (self.policy_from, self.reward_from) if name]


def import_function(path: str) -> Any:
    module_name, _, function_name = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise RecipeError("reward_function", f"cannot import {path!r}: {error}") from None


def load_reward_model(config: RewardModelConfig) -> tuple[Any, Any]:
    """The separate reward model, frozen in eval mode, and its tokenizer (chat template and pad token set)."""
    try:
        tokenizer = load_tokenizer(config, config.chat_template)
    except ValueError as error:
        raise RecipeError("reward_model.chat_template", str(error)) from None
    model = load_base_model(config, auto_class=AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the classifier pools at the last non-pad token
    return model.eval().requires_grad_(False), tokenizer


@register
class PPOStage(Stage):
    type = "ppo"
    spec_class = PPOStageSpec
    args_class = PPOConfig

    @classmethod
    def check_args(cls, args: dict[str, Any], path: str) -> dict[str, Any]:
        build(PPOConfig, args, path, what="PPOConfig field")  # cross-field checks too, at validation time
        return check_args(PPOConfig, args, path)

    def run(self, output_dir: Path, tracker: Tracker) -> dict[str, Any]:
        recipe, spec = self.recipe, self.spec
        config = PPOConfig(**spec.args)
        seed = config.seed if config.seed is not None else self.seed
        tokenizer = load_tokenizer(recipe.model, recipe.chat_template)
        data = build_stage_data(spec.data, "prompt", seed, tokenizer)

        model, value_head, reward, reward_stats = self.build_roles(tokenizer, data)
        trainer = PPOTrainer(
            config, model, value_head, reward, tokenizer, data.splits[TRAIN], self.work_dir, tracker,
            reward_stats=reward_stats, ptx_batches=self.ptx_batches(tokenizer, seed), seed=seed,
        )  # fmt: skip
        metrics: dict[str, Any] = {}
        eval_split = data.splits.get(EVAL)
        if eval_split is not None and spec.evaluation.num_prompts > 0:
            metrics |= self.evaluate(trainer, eval_split, "eval_initial", output_dir, tracker)
        history = trainer.train()
        metrics |= {f"train/{key}": value for key, value in history[-1].items()} if history else {}
        metrics |= data.metrics()

        model.save_pretrained(str(output_dir / "adapters"), selected_adapters=[POLICY, VALUE])
        policy_dir = output_dir / "adapters" / POLICY
        for item in policy_dir.iterdir():  # the policy adapter at the folder's root, as for SFT
            item.replace(output_dir / item.name)
        policy_dir.rmdir()
        torch.save(value_head.state_dict(), output_dir / "adapters" / VALUE / "value_head.pt")
        tokenizer.save_pretrained(str(output_dir))
        write_json(output_dir / "log_history.json", history)

        if eval_split is not None and spec.evaluation.num_prompts > 0:
            metrics |= self.evaluate(trainer, eval_split, EVAL, output_dir, tracker)
        return metrics

    def build_roles(self, tokenizer: Any, data: Any) -> tuple[Any, nn.Module, Any, dict | None]:
        """Loads the base once and puts the four roles on it; returns (model, value head, reward, stats)."""
        recipe, spec = self.recipe, self.spec
        sft_dir = self.require_stage(spec.policy_from)
        model = load_base_model(recipe.model)
        model = attach_adapter(model, POLICY, from_path=sft_dir, trainable=True)
        model = attach_adapter(model, REFERENCE, from_path=sft_dir, trainable=False)
        reward_stats = None
        if spec.reward_from:
            reward_dir = self.require_stage(spec.reward_from)
            model, reward_head = load_reward_role(model, reward_dir)
            reward = adapter_reward(model, reward_head, tokenizer)
            reward_stats = read_reward_stats(reward_dir)
        elif spec.reward_model:
            reward = separate_model_reward(*load_reward_model(spec.reward_model))
        else:
            references = {
                row["prompt"][-1]["content"]: row["reference"] for split in data.splits.values() for row in split
            }
            reward = function_reward(import_function(spec.reward_function), references)
        if spec.value_from == "reward":
            model = attach_adapter(model, VALUE, from_path=reward_dir, trainable=True)
            value_head = load_scalar_head(reward_dir).requires_grad_(True)
        else:
            model = attach_adapter(model, VALUE, from_path=sft_dir, trainable=True)
            value_head = ScalarHead(model.config.get_text_config().hidden_size)
            torch.nn.init.zeros_(value_head.weight)
        use_adapter(model, POLICY)
        compute_dtype = torch_dtype(recipe.model.quantization.compute_dtype)
        for parameter in [*model.parameters(), *value_head.parameters()]:
            if parameter.requires_grad:  # trainable adapters and head in the compute dtype
                parameter.data = parameter.data.to(compute_dtype)
        return model, value_head.to(compute_dtype), reward, reward_stats

    def evaluate(self, trainer: PPOTrainer, split: Any, name: str, output_dir: Path, tracker: Tracker) -> dict:
        """Greedy answers of the policy on held-out prompts: gold accuracy and the mean reward score."""
        model = trainer.accelerator.unwrap_model(trainer.model)
        use_adapter(model, POLICY)
        scores, rows = evaluate_generation(model, trainer.tokenizer, split, name, self.spec.evaluation)
        examples = split.select(range(len(rows))).to_list()
        rewards = trainer.reward([row["prompt"] for row in examples], [row[1] for row in rows])
        scores[f"{name}/reward_score"] = rewards.float().mean().item()
        tracker.table(f"{name}/samples", SAMPLE_COLUMNS, rows)
        write_jsonl(
            output_dir / "samples" / f"{name}.jsonl", [dict(zip(SAMPLE_COLUMNS, row, strict=True)) for row in rows]
        )
        return scores

    def ptx_batches(self, tokenizer: Any, seed: int):
        """PPO-ptx: batches of the SFT loss (prompt masked) drawn from `ptx_data`, or None."""
        if self.spec.ptx_data is None:
            return None
        examples = build_stage_data(self.spec.ptx_data, "sft", seed, tokenizer).splits[TRAIN]
        generator = torch.Generator().manual_seed(seed)

        def batch(size: int) -> dict[str, torch.Tensor]:
            rows = [examples[int(i)] for i in torch.randint(len(examples), (size,), generator=generator)]
            sequences, labels = [], []
            for row in rows:
                prompt = tokenizer.apply_chat_template(
                    row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True
                )["input_ids"]
                full = tokenizer.apply_chat_template(
                    row["prompt"] + row["completion"], tokenize=True, return_dict=True
                )["input_ids"]
                sequences.append(full)
                labels.append([-100] * len(prompt) + full[len(prompt) :])
            width = max(len(ids) for ids in sequences)
            input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
            label_ids = torch.full((len(rows), width), -100)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, (ids, target) in enumerate(zip(sequences, labels, strict=True)):
                input_ids[row, : len(ids)] = torch.tensor(ids)
                label_ids[row, : len(target)] = torch.tensor(target)
                attention_mask[row, : len(ids)] = 1
            return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}

        return batch
