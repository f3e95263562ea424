"""Direct preference optimisation (`type: dpo`) on TRL's DPOTrainer, from an SFT stage's adapter.

The base is loaded once and the SFT adapter put on it as `default`, the trainable policy. Handed that
PEFT model, DPOTrainer copies the adapter into a second, frozen adapter named `ref` and switches to
it for every reference pass (precomputed or not), so the reference is the SFT policy itself and not
the bare base with adapters disabled; `check_reference` makes sure of it before training. Every
DPOConfig option (loss variants and their weights, `beta`, ...) passes through `args`.

After training: TRL's implicit-reward accuracy and margins on held-out pairs, then generated answers
for the same held-out prompts, scored by their checker as in the SFT stage so the stages compare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import PreTrainedTokenizerBase
from trl import DPOConfig, DPOTrainer

from alignment.data.build import EVAL, EVAL_HELD_OUT, TRAIN, StageData, build_stage_data
from alignment.evaluation.generation import SAMPLE_COLUMNS, evaluate_generation
from alignment.io import write_json, write_jsonl
from alignment.models.loading import attach_adapter, load_base_model, load_tokenizer
from alignment.names import ADAPTER_CONFIG, LOG_HISTORY, SAMPLES_DIR, SAVED_ADAPTER, TRL_REFERENCE_ADAPTER
from alignment.recipes.schema import GenerationEvalConfig, Recipe, StageSpec
from alignment.stages.base import Stage, StageInputError, register
from alignment.stages.common import last_checkpoint, split_metric_key, trainer_columns
from alignment.tracking import Tracker

POLICY, REFERENCE = SAVED_ADAPTER, TRL_REFERENCE_ADAPTER  # the policy as saved and loaded; TRL's frozen copy
PREFERENCE_FIELDS = ["prompt", "chosen", "rejected"]


@dataclass(kw_only=True)
class DPOStageSpec(StageSpec):
    init_from: str  # the SFT stage whose adapter is both the starting policy and the frozen reference
    evaluation: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)

    def depends_on(self) -> list[str]:
        return [self.init_from]


def check_reference(model: PeftModel) -> None:
    """Fails unless the reference is a frozen copy of the policy's starting adapter.

    Without the copy TRL falls back to disabling adapters, i.e. the bare base as reference: DPO would
    then pull the policy towards the pre-SFT model, a silent and common mistake.
    """
    if not isinstance(model, PeftModel) or REFERENCE not in model.peft_config:
        raise RuntimeError(
            f"DPOTrainer made no '{REFERENCE}' adapter, so its reference would be the bare base (adapters "
            "disabled) instead of the SFT adapter; use peft>=0.20 with this TRL"
        )
    parameters = dict(model.named_parameters())
    pairs = [(name, name.replace(f".{POLICY}.", f".{REFERENCE}.")) for name in parameters if f".{POLICY}." in name]
    if not pairs or any(reference not in parameters for _, reference in pairs):
        raise RuntimeError(f"the '{REFERENCE}' adapter does not mirror every weight of the '{POLICY}' adapter")
    if any(parameters[reference].requires_grad for _, reference in pairs):
        raise RuntimeError(f"the reference adapter '{REFERENCE}' has trainable weights; it must stay frozen")


def start_policy_at_reference(model: PeftModel) -> None:
    """Puts the policy's weights back to the reference's exact values, in float32.

    On a quantized base TRL casts the trainable adapter to bfloat16 (QLoRA's choice on GPUs) after
    copying it to the reference, so the policy would start a rounding away from the reference, and
    DPO's small steps would be lost in bfloat16's rounding (see `keep_float32_master_weights`).
    """
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, parameter in parameters.items():
            if parameter.requires_grad and f".{POLICY}." in name:
                parameter.data = parameters[name.replace(f".{POLICY}.", f".{REFERENCE}.")].data.float().clone()


def require_policy_adapter(stage_dir: Path) -> None:
    """The input stage saved a causal-LM LoRA adapter (an SFT or DPO stage, not a reward model)."""
    try:
        config = json.loads((stage_dir / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise StageInputError(f"{stage_dir} holds no saved adapter to start the DPO policy from") from None
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise StageInputError(
            f"{stage_dir} holds a {config.get('task_type')} adapter; init_from must name a stage that trains a "
            "causal-LM policy (an sft stage)"
        )


def dpo_trainer(
    recipe: Recipe,
    policy_dir: Path,
    args: DPOConfig,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Dataset,
    eval_dataset: Dataset | None = None,
) -> DPOTrainer:
    """DPOTrainer on one loaded base: the policy adapter loaded from `policy_dir`, TRL's frozen copy as reference."""
    model = load_base_model(recipe.model, args.gradient_checkpointing)
    model = attach_adapter(model, POLICY, from_path=policy_dir, trainable=True)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=trainer_columns(train_dataset, PREFERENCE_FIELDS),
        eval_dataset=trainer_columns(eval_dataset, PREFERENCE_FIELDS),
        processing_class=tokenizer,
    )
    check_reference(trainer.model)
    start_policy_at_reference(trainer.model)
    return trainer


def evaluate_preferences(
    trainer: DPOTrainer,
    pairs: StageData,
    prompts: StageData,
    tokenizer: PreTrainedTokenizerBase,
    generation: GenerationEvalConfig,
    tracker: Tracker,
    output_dir: Path,
) -> dict[str, float]:
    """Per held-out split: implicit-reward accuracy and margins on its pairs, scored answers to its prompts.

    The generated samples are logged as a W&B table and kept in `samples/<split>.jsonl` of the stage.
    """
    metrics: dict[str, float] = {}
    for name in (EVAL, EVAL_HELD_OUT):
        if name in pairs.splits:
            evaluated = trainer.evaluate(
                eval_dataset=trainer_columns(pairs.splits[name], PREFERENCE_FIELDS), metric_key_prefix=name
            )
            metrics |= {split_metric_key(key, name): value for key, value in evaluated.items() if key != "epoch"}
        if name in prompts.splits and generation.num_prompts > 0:
            scores, rows = evaluate_generation(trainer.model, tokenizer, prompts.splits[name], name, generation)
            metrics |= scores
            tracker.table(f"{name}/samples", SAMPLE_COLUMNS, rows)
            samples = [dict(zip(SAMPLE_COLUMNS, row, strict=True)) for row in rows]
            write_jsonl(output_dir / SAMPLES_DIR / f"{name}.jsonl", samples)
    return metrics


@register
class DPOStage(Stage):
    type = "dpo"
    spec_class = DPOStageSpec
    args_class = DPOConfig

    def run(self, output_dir: Path, tracker: Tracker) -> dict[str, Any]:
        recipe, spec = self.recipe, self.spec
        if spec.data is None:
            raise StageInputError(f"stage '{spec.name}' needs `data` with preference pairs")
        policy_dir = self.require_stage(spec.init_from)
        require_policy_adapter(policy_dir)
        tokenizer = load_tokenizer(recipe.model, recipe.chat_template)
        args = self.trl_args(tracker)
        pairs = build_stage_data(spec.data, "preference", self.seed, tokenizer, args.max_length)
        # The same rows as prompts (same held-out rows and templates): what SFT and PPO are scored on.
        prompts = build_stage_data(spec.data, "prompt", self.seed, tokenizer, args.max_length)

        trainer = dpo_trainer(recipe, policy_dir, args, tokenizer, pairs.splits[TRAIN], pairs.splits.get(EVAL))
        result = trainer.train(resume_from_checkpoint=last_checkpoint(self.work_dir))
        metrics = {"train/loss": result.training_loss, "train/runtime_s": result.metrics["train_runtime"]}
        metrics |= pairs.metrics()

        metrics |= evaluate_preferences(trainer, pairs, prompts, tokenizer, spec.evaluation, tracker, output_dir)
        trainer.model.delete_adapter(REFERENCE)  # the output is the policy alone, loadable like an SFT adapter
        trainer.save_model(str(output_dir))
        tokenizer.save_pretrained(str(output_dir))
        write_json(output_dir / LOG_HISTORY, trainer.state.log_history)
        tracker.log(metrics)
        return metrics
