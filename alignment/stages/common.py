"""Steps shared by the stages built on TRL trainers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers.trainer_utils import get_last_checkpoint

from alignment.data.build import EVAL, EVAL_HELD_OUT, StageData
from alignment.evaluation.generation import SAMPLE_COLUMNS, evaluate_generation
from alignment.io import write_jsonl
from alignment.names import SAMPLES_DIR
from alignment.recipes.schema import GenerationEvalConfig
from alignment.tracking import Tracker


def trainer_columns(split: Dataset | None, columns: list[str]) -> Dataset | None:
    """Only the columns the trainer consumes; our bookkeeping columns stay out of TRL's way."""
    if split is None:
        return None
    return split.select_columns([column for column in columns if column in split.column_names])


def last_checkpoint(work_dir: Path) -> str | None:
    """The newest checkpoint an interrupted run of the same config left, to resume from."""
    return get_last_checkpoint(str(work_dir)) if Path(work_dir).is_dir() else None


def keep_float32_master_weights(model: torch.nn.Module) -> None:
    """Keeps every trainable weight (LoRA, heads) in float32; a bfloat16 run computes under autocast.

    TRL casts adapters on quantized bases to bfloat16 (QLoRA's choice at SFT learning rates). An
    AdamW step of about the learning rate is then lost wherever it is below half a bfloat16 step of
    the weight: at the learning rates of DPO, reward models and PPO most of an update vanishes
    (`scripts/bench_master_weights.py` measures the share that survives).
    """
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def split_metric_key(key: str, split: str) -> str:
    """`eval_heldout_templates_loss` → `eval_heldout_templates/loss`; TRL's own `eval_entropy` → `<split>/entropy`."""
    for prefix in (f"{split}_", "eval_"):
        if key.startswith(prefix):
            return f"{split}/{key[len(prefix) :]}"
    return f"{split}/{key}"


def evaluate_splits(
    trainer: Any,
    data: StageData,
    tokenizer: Any,
    generation: GenerationEvalConfig,
    tracker: Tracker,
    trainer_fields: list[str],
    output_dir: Path,
    initial: bool = False,
) -> dict[str, float]:
    """Trainer evaluation (loss, token accuracy) and scored generation on each held-out split.

    The generated samples are logged as a W&B table and kept in `samples/<split>.jsonl` of the stage;
    `initial` names them `<split>_initial` (the model before training).
    """
    metrics: dict[str, float] = {}
    for split_name in (EVAL, EVAL_HELD_OUT):
        split = data.splits.get(split_name)
        if split is None:
            continue
        name = f"{split_name}_initial" if initial else split_name
        evaluated = trainer.evaluate(eval_dataset=trainer_columns(split, trainer_fields), metric_key_prefix=name)
        metrics |= {split_metric_key(key, name): value for key, value in evaluated.items() if key != "epoch"}
        if generation.num_prompts > 0:
            scores, rows = evaluate_generation(trainer.model, tokenizer, split, name, generation)
            metrics |= scores
            tracker.table(f"{name}/samples", SAMPLE_COLUMNS, rows)
            write_jsonl(
                output_dir / SAMPLES_DIR / f"{name}.jsonl",
                [dict(zip(SAMPLE_COLUMNS, row, strict=True)) for row in rows],
            )
    return metrics
