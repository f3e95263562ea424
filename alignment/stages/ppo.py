"""InstructGPT's RL step (`type: ppo`): PPO against the reward model, every role an adapter on one base.

The base is loaded once. The policy is a trainable copy of the SFT adapter; the reference is a
frozen copy of the same SFT adapter (the KL anchor is π_SFT, not the bare base); the reward is the
reward stage's adapter and head, frozen; the value is a trainable adapter and head, initialised from
the reward model (InstructGPT) or from the policy. A Python function may replace the reward model.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import gather_object
from torch import nn
from transformers import AutoModelForSequenceClassification

from alignment.data.build import EVAL, TRAIN, build_stage_data
from alignment.distributed import process_state
from alignment.evaluation.generation import SAMPLE_COLUMNS, generate_responses, score_answers
from alignment.io import read_json, write_json, write_jsonl
from alignment.models.batching import IGNORE_INDEX, pad_with_labels
from alignment.models.heads import (
    ScalarHead,
    active_adapter,
    affine_head,
    read_reward_stats,
    reward_statistics,
    save_scalar_head,
)
from alignment.models.loading import (
    attach_adapter,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
    use_adapter,
)
from alignment.models.precision import compute_dtype
from alignment.models.sampling import sample
from alignment.models.scoring import (
    RewardSource,
    WeightedReward,
    adapter_reward,
    function_reward,
    load_reward_role,
    read_score_head,
    separate_model_reward,
)
from alignment.names import (
    EVAL_INITIAL,
    LOG_HISTORY,
    POLICY,
    REFERENCE,
    REWARD_STATS_FILE,
    SAMPLES_DIR,
    VALUE,
    reward_functions,
    reward_source_names,
)
from alignment.ppo import core
from alignment.ppo.config import PPOConfig
from alignment.ppo.trainer import PPOTrainer
from alignment.recipes.schema import DataSpec, GenerationEvalConfig, ModelConfig, StageSpec
from alignment.recipes.validate import RecipeError, build, check_args
from alignment.stages.base import Stage, register
from alignment.tracking import Tracker

INITIAL_EVAL_FILE = "eval_initial.json"  # in the work folder: the initial evaluation, reused on resume
EVAL_COLUMNS = [*SAMPLE_COLUMNS, "reward", "ended", "length"]


@dataclass
class RewardModelConfig(ModelConfig):
    """A reward model of its own (another base, or a reward model from the hub), loaded frozen beside
    the shared base with its own tokenizer: any `AutoModelForSequenceClassification` with one label."""

    chat_template: str = "tokenizer"  # its tokenizer's own; or a built-in name or a Jinja string


@dataclass
class PPOStageSpec(StageSpec):
    init_from: str = ""  # the SFT stage: its adapter starts the policy and is the frozen reference
    # The reward: one source or a weighted sum of several (each logged on its own as `reward/<name>`):
    reward_from: str | None = None  # the reward stage (adapter + head); named by the stage's name
    reward_function: str | list[str] | None = None  # Python `module:function(prompts, responses, references)`
    reward_model: RewardModelConfig | None = None  # a separate sequence-classification model: `reward_model`
    reward_weights: dict[str, float] = field(default_factory=dict)  # source name → weight (1.0 if absent)
    value_from: Literal["reward", "policy"] = "reward"
    ptx_data: DataSpec | None = None  # PPO-ptx: SFT data whose loss is mixed in (args.ptx_coef)
    evaluation: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)

    def __post_init__(self) -> None:
        if not self.init_from:
            raise RecipeError("init_from", "a ppo stage needs init_from: <the sft stage>")
        names = self.reward_source_names()
        if not names:
            raise RecipeError(
                "reward_from",
                "give a reward: reward_from (a reward stage), reward_function or reward_model (several are summed, "
                "weighted by reward_weights)",
            )
        if len(set(names)) != len(names):
            raise RecipeError("reward_function", f"two reward sources have one name: {names}; each must differ")
        for name in self.reward_weights:
            if name not in names:
                raise RecipeError(f"reward_weights.{name}", f"no reward source is called {name!r}; sources: {names}")
        critic_free = self.args.get("advantage_estimator", "gae") != "gae"  # no value role to start
        if self.value_from == "reward" and self.reward_from is None and not critic_free:
            raise RecipeError("value_from", "value_from: reward needs reward_from; use value_from: policy")

    def reward_source_names(self) -> list[str]:
        """Each source's name, the key of its weight and of its metric: the reward stage's name,
        `reward_model`, and each function's own name."""
        return reward_source_names(self.reward_from, self.reward_model, self.reward_function)

    def depends_on(self) -> list[str]:
        return [name for name in (self.init_from, self.reward_from) if name]


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
    if not isinstance(getattr(model, "score", None), nn.Linear):
        raise RecipeError(
            "reward_model.name_or_path",
            f"{type(model).__name__} has no `score` layer to read the reward from; use a Llama-, Qwen-, Mistral- "
            "or Gemma-style sequence-classification reward model",
        )
    return model.eval().requires_grad_(False), tokenizer


def shipped_reward_stats(config: RewardModelConfig) -> dict[str, float] | None:
    """The reward statistics a separate reward model ships beside its weights (`reward_stats.json`, as
    `alignment export` writes for a reward stage), from its folder or hub repo; None for any other model.
    transformers' own file lookup, so a local folder, the hub and its cache are found the same way."""
    from transformers.utils import cached_file

    path = cached_file(
        resolve_model_path(config), REWARD_STATS_FILE, revision=config.revision,
        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
    )  # fmt: skip
    if path is None:
        return None
    try:
        stats = read_json(Path(path))
    except ValueError:  # not JSON at all
        stats = Path(path).read_text(errors="replace")[:80]
    valid = isinstance(stats, dict) and all(isinstance(stats.get(key), int | float) for key in ("mean", "std"))
    if not valid or stats["std"] <= 0:
        raise RecipeError(
            "reward_model.name_or_path",
            f'{path} is not reward statistics: expected {{"mean": ..., "std": ...}} with std above 0, as '
            f"`alignment export` writes them; got {stats!r}. Fix or delete the file (then the initial policy's "
            "answers give the statistics)",
        )
    return stats


class PtxSampler:
    """PPO-ptx batches of the SFT loss (prompt masked) drawn from `ptx_data`; draw n is seeded by (seed, n),
    so the count of draws is the whole state a checkpoint keeps."""

    def __init__(self, examples: Any, tokenizer: Any, seed: int):
        self.examples, self.tokenizer, self.seed, self.draws = examples, tokenizer, seed, 0

    def __call__(self, size: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.draws)
        self.draws += 1
        rows = [self.examples[int(i)] for i in torch.randint(len(self.examples), (size,), generator=generator)]
        sequences, labels = [], []
        for row in rows:
            prompt = self.tokenizer.apply_chat_template(
                row["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True
            )["input_ids"]
            full = self.tokenizer.apply_chat_template(
                row["prompt"] + row["completion"], tokenize=True, return_dict=True
            )["input_ids"]
            sequences.append(full)
            labels.append([IGNORE_INDEX] * len(prompt) + full[len(prompt) :])
        return pad_with_labels(self.tokenizer, sequences, labels)

    def state_dict(self) -> dict[str, int]:
        return {"draws": self.draws}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.draws = state["draws"]


def initial_policy_reward_stats(
    model: Any, tokenizer: Any, source: RewardSource, prompts: Any, config: PPOConfig, seed: int, dtype: torch.dtype
) -> dict[str, float]:
    """The mean and standard deviation of a reward model's scores of the answers the initial (SFT) policy
    samples, as in training, to `reward_stats_prompts` training prompts: Ziegler et al. (2019) normalised
    their reward model so, to make one `kl_coef` mean the same for any reward model. Each process answers
    its share of the prompts and every process gets all the scores, so all normalise alike. The prompts and
    the sampling are seeded, and the policy adapter is the SFT one whenever the roles are built, so a resumed
    run estimates the same statistics; the global random state is left as it was."""
    state = process_state()
    count = min(config.reward_stats_prompts, len(prompts))
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    rows = [prompts[index]["prompt"] for index in order[state.process_index :: state.num_processes]]
    device = next(model.parameters()).device
    model.eval()  # no dropout, as in every pass of training
    scores: list[float] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), active_adapter(model, POLICY):
        torch.manual_seed(seed + state.process_index)
        for start in range(0, len(rows), config.rollout_batch_size):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                sampled = sample(
                    model, tokenizer, rows[start : start + config.rollout_batch_size],
                    max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                )  # fmt: skip
                scores += source(sampled).float().tolist()
    if state.num_processes > 1:
        scores = gather_object(scores)
    stats = reward_statistics(scores)
    if stats["std"] <= 0:
        raise RecipeError(
            "reward_stats_prompts",
            f"the reward model gave all {count} answers of the initial policy the same score, so its scores "
            "cannot be standardised; estimate over more prompts, or set normalize_reward: false",
        )
    return stats


def normalized(source: RewardSource, stats: dict[str, float] | None) -> RewardSource:
    """The source's scores standardised by its statistics; the source itself when it has none."""
    if stats is None:
        return source
    return lambda responses: core.normalize_scores(source(responses), stats["mean"], stats["std"])


@register
class PPOStage(Stage):
    type = "ppo"
    spec_class = PPOStageSpec
    args_class = PPOConfig
    reward_model_stats: dict[str, float] | None = None  # set by build_roles when there is a separate reward model

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
            reward_stats=reward_stats, ptx_batches=self.ptx_sampler(tokenizer, seed), seed=seed,
            compute_dtype=compute_dtype(self.recipe.model),
        )  # fmt: skip
        metrics: dict[str, Any] = {}
        eval_split = data.splits.get(EVAL) if spec.evaluation.num_prompts > 0 else None
        if eval_split is not None:
            metrics |= self.initial_evaluation(trainer, eval_split, tracker)
        history = trainer.train()
        metrics |= {f"train/{key}": value for key, value in history[-1].items()} if history else {}
        if self.reward_model_stats:  # what the separate reward model's scores were normalised with
            metrics |= {f"reward_model_stats/{key}": value for key, value in self.reward_model_stats.items()}
        metrics |= data.metrics()

        roles = [POLICY, VALUE] if value_head is not None else [POLICY]
        model.save_pretrained(str(output_dir / "adapters"), selected_adapters=roles)
        policy_dir = output_dir / "adapters" / POLICY
        for item in policy_dir.iterdir():  # the policy adapter at the folder's root, as for SFT
            item.replace(output_dir / item.name)
        policy_dir.rmdir()
        if value_head is not None:  # safetensors, as a reward stage saves its head
            save_scalar_head(value_head, output_dir / "adapters" / VALUE)
        tokenizer.save_pretrained(str(output_dir))
        write_json(output_dir / LOG_HISTORY, history)

        if eval_split is not None:
            final, rows = self.evaluate(trainer, eval_split, EVAL)
            self.write_samples(EVAL, rows, output_dir, tracker)
            self.write_samples(EVAL_INITIAL, read_json(self.work_dir / INITIAL_EVAL_FILE)["rows"], output_dir, None)
            metrics |= final | reward_gain(read_json(self.work_dir / INITIAL_EVAL_FILE)["rows"], rows)
        return metrics

    def build_roles(self, tokenizer: Any, data: Any) -> tuple[Any, nn.Module | None, Any, dict | None]:
        """Loads the base once and puts the roles on it (four for PPO; no value role for grpo and rloo);
        returns (model, value head or None, reward, stats)."""
        recipe, spec = self.recipe, self.spec
        sft_dir = self.require_stage(spec.init_from)
        model = load_base_model(recipe.model)
        model = attach_adapter(model, POLICY, from_path=sft_dir, trainable=True)
        model = attach_adapter(model, REFERENCE, from_path=sft_dir, trainable=False)
        config = PPOConfig(**spec.args)
        sources: list[RewardSource] = []
        source_stats: list[dict[str, float] | None] = []  # each source's reward statistics, where it has them
        reward_stats = None
        if spec.reward_from:
            reward_dir = self.require_stage(spec.reward_from)
            model, reward_head = load_reward_role(model, reward_dir)
            sources.append(adapter_reward(model, reward_head, tokenizer))
            reward_stats = read_reward_stats(reward_dir)
            source_stats.append(reward_stats)
        if spec.reward_model:
            source = separate_model_reward(*load_reward_model(spec.reward_model), policy_tokenizer=tokenizer)
            stats = shipped_reward_stats(spec.reward_model)
            if stats is None and config.normalize_reward and config.reward_stats_prompts > 0:
                seed = config.seed if config.seed is not None else self.seed
                stats = initial_policy_reward_stats(
                    model, tokenizer, source, data.splits[TRAIN], config, seed, compute_dtype(recipe.model)
                )
            self.reward_model_stats = stats
            sources.append(source)
            source_stats.append(stats)
        if functions := reward_functions(spec.reward_function):
            references = {
                row["prompt"][-1]["content"]: row["reference"] for split in data.splits.values() for row in split
            }
            sources += [function_reward(import_function(path), references) for path in functions]
            source_stats += [None] * len(functions)  # a checker's scores are in its own units
        names = spec.reward_source_names()
        if len(sources) == 1 and not spec.reward_weights:
            reward, trainer_reward_stats = sources[0], source_stats[0]  # the trainer normalises (and clips) them
        else:  # each reward model's scores normalised before the weighted sum, so weights compare like units
            if config.normalize_reward:
                sources = [normalized(source, stats) for source, stats in zip(sources, source_stats, strict=True)]
            weighted = {
                name: (source, spec.reward_weights.get(name, 1.0)) for name, source in zip(names, sources, strict=True)
            }
            reward, trainer_reward_stats = WeightedReward(weighted), None
        if not config.uses_value:  # grpo, rloo: no value role at all
            value_head = None
        elif spec.value_from == "reward":
            model = attach_adapter(model, VALUE, from_path=reward_dir, trainable=True)
            value_head = read_score_head(reward_dir)
            if config.normalize_reward:  # V predicts returns in the normalised rewards' units
                value_head = affine_head(
                    value_head, 1 / reward_stats["std"], -reward_stats["mean"] / reward_stats["std"]
                )
        else:
            model = attach_adapter(model, VALUE, from_path=sft_dir, trainable=True)
            value_head = ScalarHead(model.config.get_text_config().hidden_size)
            torch.nn.init.zeros_(value_head.weight)
        use_adapter(model, POLICY)
        for parameter in model.parameters():
            if parameter.requires_grad:  # float32 master weights; the forward passes run under autocast
                parameter.data = parameter.data.float()
        value_head = value_head.float().requires_grad_(True) if value_head else None
        return model, value_head, reward, trainer_reward_stats

    def initial_evaluation(self, trainer: PPOTrainer, split: Any, tracker: Tracker) -> dict[str, float]:
        """The SFT policy's answers before any update, kept in the work folder so a resumed run reuses them."""
        path = self.work_dir / INITIAL_EVAL_FILE
        if path.exists():
            print(f"ppo: initial evaluation reused from {path}")
            return read_json(path)["metrics"]
        metrics, rows = self.evaluate(trainer, split, EVAL_INITIAL)
        write_json(path, {"metrics": metrics, "rows": rows})
        tracker.table(f"{EVAL_INITIAL}/samples", EVAL_COLUMNS, rows)
        return metrics

    def evaluate(self, trainer: PPOTrainer, split: Any, name: str) -> tuple[dict[str, float], list[list]]:
        """The policy's answers to held-out prompts, sampled as `evaluation` says (greedy by default): gold
        accuracy where there is a checker, the reward source's score of exactly what was generated, the
        response length and the share that ended with a stop token, and (when sampled) the KL to the SFT policy."""
        config = self.spec.evaluation
        model = trainer.unwrapped
        use_adapter(model, POLICY)
        examples = split.select(range(min(config.num_prompts, len(split)))).to_list()
        with trainer.autocast():
            batches = generate_responses(model, trainer.tokenizer, [row["prompt"] for row in examples], config, name)
        texts = [text for batch in batches for text in batch.texts]
        metrics, rows = score_answers(examples, texts, name)
        rewards, lengths, ended, kls = [], [], [], []
        components: dict[str, list[float]] = {}
        for batch in batches:
            with torch.no_grad(), trainer.autocast():
                rewards += trainer.reward(batch).float().tolist()
            for source, scores in getattr(trainer.reward, "components", {}).items():
                components.setdefault(source, []).extend(scores.tolist())
            lengths += batch.response_mask.sum(1).tolist()
            ended += batch.ended.tolist()
            if config.temperature > 0:
                kls += trainer.sequence_kl(batch, config.temperature).tolist()
        metrics |= {
            f"{name}/reward_score": sum(rewards) / len(rewards),
            f"{name}/response_length": sum(lengths) / len(lengths),
            f"{name}/ended_share": sum(ended) / len(ended),
        }
        if kls:
            metrics[f"{name}/kl"] = sum(kls) / len(kls)
        metrics |= {f"{name}/reward/{source}": sum(scores) / len(scores) for source, scores in components.items()}
        rows = [
            row + [reward, done, length]
            for row, reward, done, length in zip(rows, rewards, ended, lengths, strict=True)
        ]
        return metrics, rows

    def write_samples(self, name: str, rows: list[list], output_dir: Path, tracker: Tracker | None) -> None:
        if tracker is not None:
            tracker.table(f"{name}/samples", EVAL_COLUMNS, rows)
        write_jsonl(
            output_dir / SAMPLES_DIR / f"{name}.jsonl", [dict(zip(EVAL_COLUMNS, row, strict=True)) for row in rows]
        )

    def ptx_sampler(self, tokenizer: Any, seed: int) -> PtxSampler | None:
        """PPO-ptx: batches of the SFT loss drawn from `ptx_data`, or None."""
        if self.spec.ptx_data is None:
            return None
        return PtxSampler(build_stage_data(self.spec.ptx_data, "sft", seed, tokenizer).splits[TRAIN], tokenizer, seed)


def reward_gain(before: list[list], after: list[list]) -> dict[str, float]:
    """Mean change of the reward score over the same held-out prompts, with the 95% interval of that mean
    (normal approximation on the per-prompt differences)."""
    reward = EVAL_COLUMNS.index("reward")
    differences = [new[reward] - old[reward] for old, new in zip(before, after, strict=True)]
    mean = sum(differences) / len(differences)
    variance = sum((d - mean) ** 2 for d in differences) / max(len(differences) - 1, 1)
    return {
        f"{EVAL}/reward_score_gain": mean,
        f"{EVAL}/reward_score_gain_ci95": 1.96 * math.sqrt(variance / len(differences)),
    }
