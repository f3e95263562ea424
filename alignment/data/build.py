"""From a stage's `data` spec to the splits it trains and evaluates on.

For each dataset: load → recognise the format → hold out evaluation rows → weight the training rows →
convert every row (drawing its instruction template) → check its token length. Bad rows stop the
run with the file, row and field, or are dropped and counted when the recipe says `on_bad_rows: drop`.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from datasets import Dataset

from alignment.data.formats import Format, RowContext, RowError, detect_format, formats
from alignment.data.loading import DataError, load_raw
from alignment.data.templates import draw_template, resolve_template_set
from alignment.plugins import data_source
from alignment.recipes.schema import DatasetSpec, DataSpec

logger = logging.getLogger(__name__)

TRAIN, EVAL, EVAL_HELD_OUT = "train", "eval", "eval_heldout_templates"
HELD_OUT_PROMPT = "prompt is held out"  # the reason a training row is dropped when its prompt is in an eval split


@dataclass
class StageData:
    splits: dict[str, Dataset]
    report: list[dict] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return sum(sum(entry["dropped"].values()) for entry in self.report)

    def metrics(self) -> dict[str, Any]:
        counts = {f"data/{name}_rows": len(split) for name, split in self.splits.items()}
        counts["data/dropped_rows"] = self.dropped
        return counts


def example_token_length(example: dict, tokenizer: Any) -> int:
    """Tokens of the longest sequence this example becomes (prompt plus its longest answer)."""
    answers = [example[key] for key in ("completion", "chosen", "rejected") if key in example] or [[]]
    return max(
        len(tokenizer.apply_chat_template(example["prompt"] + answer, tokenize=True, return_dict=True)["input_ids"])
        for answer in answers
    )


def _resolve_format(spec: DatasetSpec, columns: list[str]) -> Format:
    known = formats()
    if spec.format is not None:
        if spec.format not in known:
            raise DataError(f"{spec.path}: unknown format '{spec.format}'; known formats: {', '.join(known)}")
        fmt = known[spec.format]
    else:
        fmt = detect_format(columns)
        if fmt is None:
            raise DataError(
                f"{spec.path}: cannot tell the format from the columns {columns}; set 'format' "
                f"(one of {', '.join(known)}) and map other column names with 'columns'"
            )
    source = data_source(spec.path)
    if source is not None and fmt.name != source.format:
        raise DataError(f"{spec.path} dataset: format must be '{source.format}', got '{fmt.name}'")
    if (spec.templates or spec.held_out_templates) and not fmt.uses_templates:
        with_templates = [name for name, other in known.items() if other.uses_templates]
        raise DataError(
            f"{spec.path}: instruction templates apply to the {', '.join(with_templates)} formats, not '{fmt.name}'"
        )
    return fmt


def _weighted(indices: list[int], weight: float, max_rows: int | None, rng: random.Random) -> list[int]:
    whole, fraction = int(weight), weight - int(weight)
    chosen = indices * whole + rng.sample(indices, round(fraction * len(indices)))
    return chosen[:max_rows] if max_rows is not None else chosen


def _held_out_count(eval_split: float, total: int) -> int:
    count = round(eval_split * total) if eval_split < 1 else int(eval_split)
    return min(count, total - 1) if total > 1 else 0


class _Converter:
    """Converts one dataset's rows to examples of one kind, applying the bad-row policy."""

    def __init__(self, spec: DatasetSpec, fmt: Format, kind: str, data: DataSpec, seed: int, tokenizer, max_length):
        self.spec, self.fmt, self.kind, self.data, self.seed = spec, fmt, kind, data, seed
        self.tokenizer, self.max_length = tokenizer, max_length
        self.recipe_templates = resolve_template_set(spec.templates)
        self.dropped: Counter[str] = Counter()

    def _template(self, row: dict, index: int, held_out: bool) -> str | None:
        templates = (self.fmt.row_templates and self.fmt.row_templates(row)) or self.recipe_templates
        if templates is None:
            return None
        return draw_template(templates, self.spec.held_out_templates, index, self.seed, use_held_out=held_out)

    def _fail(self, index: int, field_name: str, message: str, reason: str | None = None) -> None:
        """Raises naming the row, or (on_bad_rows: drop) counts it under a reason shared by like rows."""
        if self.data.on_bad_rows == "drop":
            self.dropped[f"{field_name}: {reason or message}"] += 1
            return
        raise DataError(
            f"{self.spec.path}: row {index}: field '{field_name}' {message} "
            "(rows count from 0; set data.on_bad_rows: drop to skip bad rows)"
        )

    def convert(self, rows: list[dict], indices: list[int], held_out_templates: bool = False) -> list[dict]:
        examples = []
        for index in indices:
            row = rows[index]
            if not isinstance(row, dict):
                self._fail(index, "<row>", f"is not a mapping but {type(row).__name__}")
                continue
            ctx = RowContext(
                template=self._template(row, index, held_out_templates),
                system=self.spec.system,
                checker=self.spec.checker or self.fmt.default_checker,
                seed=self.seed,
            )
            try:
                example = self.fmt.convert(self.kind, row, ctx)
            except RowError as error:
                self._fail(index, error.field, error.message)
                continue
            if self.tokenizer is not None and self.max_length is not None:
                length = example_token_length(example, self.tokenizer)
                if length > self.max_length:
                    self._fail(
                        index,
                        "<tokens>",
                        f"is over-long: {length} tokens > max_length {self.max_length}",
                        reason=f"over max_length {self.max_length}",
                    )
                    continue
            example["source"] = self.spec.path
            examples.append(example)
        return examples


def prompt_key(example: dict) -> str:
    return json.dumps(example["prompt"], sort_keys=True)


def build_stage_data(
    data: DataSpec,
    kind: str,
    seed: int,
    tokenizer: Any = None,
    max_length: int | None = None,
) -> StageData:
    """Loads, checks and splits a stage's data into examples of `kind` (sft, prompt or preference)."""
    seed = data.seed if data.seed is not None else seed
    max_length = data.max_length or max_length
    parts: dict[str, list[dict]] = {TRAIN: [], EVAL: [], EVAL_HELD_OUT: []}
    report, trained = [], []
    for role, specs in (("train", data.datasets), ("eval", data.eval_datasets)):
        for spec in specs:
            rows, columns = load_raw(spec, seed)
            fmt = _resolve_format(spec, columns)
            converter = _Converter(spec, fmt, kind, data, seed, tokenizer, max_length)
            # By hand, not `datasets.train_test_split`: rows stay plain until checked (so a bad row is named by
            # its index), and the split is seeded by the file's name, the same on every machine and mixture.
            indices = list(range(len(rows)))
            rng = random.Random(f"{seed}:{spec.shuffle_key}")
            if role == "train":
                rng.shuffle(indices)
                held = _held_out_count(data.eval_split, len(indices))
                eval_indices, train_indices = sorted(indices[:held]), indices[held:]
                train_indices = _weighted(train_indices, spec.weight, spec.max_rows, rng)
            else:
                eval_indices, train_indices = indices[: spec.max_rows], []
            counts = {name: len(parts[name]) for name in parts}
            train_examples = converter.convert(rows, train_indices)
            parts[EVAL] += converter.convert(rows, eval_indices)
            if spec.held_out_templates:
                parts[EVAL_HELD_OUT] += converter.convert(rows, eval_indices, held_out_templates=True)
            entry = {
                "source": spec.path,
                "format": fmt.name,
                "rows": len(rows),
                **{name: len(parts[name]) - counts[name] for name in parts},
                "dropped": dict(converter.dropped),
            }
            report.append(entry)
            trained.append((entry, train_examples))
    # A held-out prompt stays held out: rows of the same prompt text (HH-RLHF repeats opening questions with
    # other continuations) are dropped from training, so evaluation never scores a prompt a stage trained on.
    held_out_prompts = {prompt_key(example) for name in (EVAL, EVAL_HELD_OUT) for example in parts[name]}
    for entry, train_examples in trained:
        kept = [example for example in train_examples if prompt_key(example) not in held_out_prompts]
        if len(kept) < len(train_examples):
            entry["dropped"][HELD_OUT_PROMPT] = len(train_examples) - len(kept)
        entry[TRAIN] = len(kept)
        parts[TRAIN] += kept
        if entry["dropped"]:
            logger.warning("%s: dropped %d rows: %s", entry["source"], sum(entry["dropped"].values()), entry["dropped"])
    if not parts[TRAIN] and data.datasets:
        raise DataError(f"no training examples left from {[spec.path for spec in data.datasets]}")
    splits = {name: Dataset.from_list(examples) for name, examples in parts.items() if examples}
    return StageData(splits=splits, report=report)
