"""Supervised instruction tuning (`type: sft`) on TRL's SFTTrainer, LoRA on the quantized base.

The loss is on the response only (prompt/completion examples, TRL's completion-only loss). After
training: evaluation loss and token accuracy on the held-out split(s), then generated answers for
held-out prompts, scored by their checker and logged as a table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import SFTConfig, SFTTrainer

from alignment.data.build import EVAL, TRAIN, build_stage_data
from alignment.io import write_json
from alignment.models.loading import attach_adapter, load_base_model, load_tokenizer
from alignment.names import LOG_HISTORY, SAVED_ADAPTER
from alignment.recipes.schema import GenerationEvalConfig, StageSpec
from alignment.stages.base import Stage, register
from alignment.stages.common import evaluate_splits, keep_float32_master_weights, last_checkpoint, trainer_columns
from alignment.tracking import Tracker

SFT_FIELDS = ["prompt", "completion"]


@dataclass
class SFTStageSpec(StageSpec):
    init_from: str | None = None  # start from an earlier stage's adapter instead of a fresh one
    evaluation: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)

    def depends_on(self) -> list[str]:
        return [self.init_from] if self.init_from else []


@register
class SFTStage(Stage):
    type = "sft"
    spec_class = SFTStageSpec
    args_class = SFTConfig

    def run(self, output_dir: Path, tracker: Tracker) -> dict[str, Any]:
        recipe, spec = self.recipe, self.spec
        tokenizer = load_tokenizer(recipe.model, recipe.chat_template)
        args = self.trl_args(tracker)
        data = build_stage_data(spec.data, "sft", self.seed, tokenizer, args.max_length)

        model = load_base_model(recipe.model, args.gradient_checkpointing)
        init = self.require_stage(spec.init_from) if spec.init_from else None
        model = attach_adapter(model, SAVED_ADAPTER, recipe.lora, from_path=init)

        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=trainer_columns(data.splits[TRAIN], SFT_FIELDS),
            eval_dataset=trainer_columns(data.splits.get(EVAL), SFT_FIELDS),
            processing_class=tokenizer,
        )
        keep_float32_master_weights(trainer.model)
        metrics: dict[str, Any] = {}
        if spec.evaluation.before_training:
            metrics |= evaluate_splits(trainer, data, tokenizer, spec.evaluation, tracker, SFT_FIELDS, output_dir, True)
        result = trainer.train(resume_from_checkpoint=last_checkpoint(self.work_dir))
        metrics |= {"train/loss": result.training_loss, "train/runtime_s": result.metrics["train_runtime"]}
        metrics |= data.metrics()

        trainer.save_model(str(output_dir))
        tokenizer.save_pretrained(str(output_dir))
        write_json(output_dir / LOG_HISTORY, trainer.state.log_history)

        metrics |= evaluate_splits(trainer, data, tokenizer, spec.evaluation, tracker, SFT_FIELDS, output_dir)
        return metrics
