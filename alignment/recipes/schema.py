"""The recipe format: one YAML file describes a whole run.

Each dataclass documents its keys once; `alignment validate` and the tests check every shipped
recipe against them. Stage-specific keys live on the stage's own spec class (see `alignment.stages`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, ClassVar, Literal

from alignment.plugins import data_source
from alignment.recipes.validate import RecipeError

DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class QuantizationConfig:
    """bitsandbytes quantization of the shared base. 4-bit NF4 with double quantization is QLoRA's."""

    mode: Literal["4bit", "8bit", "none"] = "4bit"
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: DType = "auto"  # auto: bfloat16 where the GPU or CPU runs it natively, else float32


@dataclass
class ModelConfig:
    name_or_path: str  # hub id, local folder, or the name of a plugin's model
    revision: str | None = None
    dtype: DType = "auto"
    attn_implementation: str | None = None  # eager, sdpa, flash_attention_2, ...
    trust_remote_code: bool = False
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None
    # Adapt only these decoder layers (indices from 0), e.g. the top ones: backward passes then stop at
    # the lowest adapted layer, which on a CPU nearly halves a training step. null: every layer.
    layers_to_transform: list[int] | None = None

    def __post_init__(self) -> None:
        if self.layers_to_transform is not None:
            if not self.layers_to_transform or min(self.layers_to_transform) < 0:
                raise RecipeError(
                    "layers_to_transform", f"must be a non-empty list of layer indices, got {self.layers_to_transform}"
                )
            if isinstance(self.target_modules, str):
                raise RecipeError(
                    "target_modules",
                    "must list module names when layers_to_transform is set (PEFT cannot combine it with "
                    f"{self.target_modules!r}), e.g. [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
                )
        if self.r <= 0:
            raise RecipeError("r", f"must be a positive integer, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise RecipeError("dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class TrackingConfig:
    """Weights & Biases. `mode: auto` goes online with an API key and offline without one."""

    project: str = "alignment"
    entity: str | None = None
    group: str | None = None  # defaults to the recipe's name
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    tags: list[str] = field(default_factory=list)


@dataclass
class DatasetSpec:
    """One dataset of a stage: where it is, how its rows read, and how much of it to use."""

    path: str  # local file or folder (JSON, JSONL, .gz, Parquet, CSV), a hub id, or a plugin's source
    options: dict[str, Any] = field(default_factory=dict)  # the settings of a plugin's source
    name: str | None = None  # hub configuration name
    data_dir: str | None = None  # a hub dataset's subfolder (Anthropic/hh-rlhf's `harmless-base`)
    revision: str | None = None  # a hub dataset's branch, tag or commit: pins what a run reads
    split: str = "train"
    format: str | None = None  # alpaca, messages, prompt_completion, sharegpt, ... (detected when absent)
    columns: dict[str, str] = field(default_factory=dict)  # canonical field -> column in this dataset
    weight: float = 1.0  # fraction of rows to take (above 1: repeated)
    max_rows: int | None = None
    system: str | None = None  # system prompt put before each conversation
    templates: list[str] | str | None = None  # instruction templates, or a built-in set name (`flan`)
    held_out_templates: int = 0  # the last N templates are used only for evaluation
    checker: str | None = None  # exact-answer checker for generated answers: built-in name or module:function

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise RecipeError("weight", f"must be positive, got {self.weight}")
        if self.held_out_templates < 0:
            raise RecipeError("held_out_templates", "must be zero or positive")
        from alignment.data.loading import is_local  # here, not at the top: loading imports this module

        for key in ("data_dir", "revision"):
            if getattr(self, key) is not None and (data_source(self.path) is not None or is_local(self.path)):
                raise RecipeError(key, f"only a hub dataset has one; {self.path} is a local file or a plugin's source")

    @property
    def shuffle_key(self) -> str:
        """Seeds this dataset's shuffle: the file name, not its folder, so a split is the same on every machine."""
        if data_source(self.path) is not None:  # a plugin's source: its name
            return self.path
        return ":".join(part for part in (PurePosixPath(self.path).name, self.name, self.data_dir, self.split) if part)


@dataclass
class DataSpec:
    datasets: list[DatasetSpec]
    eval_datasets: list[DatasetSpec] = field(default_factory=list)
    eval_split: float = 0.0  # below 1: fraction of each dataset held out; 1 or more: a row count
    on_bad_rows: Literal["error", "drop"] = "error"
    max_length: int | None = None  # token limit per example; defaults to the stage's max_length arg
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.datasets:
            raise RecipeError("datasets", "needs at least one dataset")
        if self.eval_split < 0:
            raise RecipeError("eval_split", f"must be zero or positive, got {self.eval_split}")


@dataclass
class SamplingConfig:
    """How answers are sampled wherever the suite generates outside PPO's rollout: held-out evaluation,
    a policy's own samples for reward pairs, `alignment generate`. Declared and checked here only; a use
    with other defaults restates just the defaults. (PPO's rollout keys are PPOConfig's, as in TRL.)"""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise RecipeError("max_new_tokens", f"must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise RecipeError("temperature", f"must be 0 (greedy) or above, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise RecipeError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise RecipeError("batch_size", f"must be at least 1, got {self.batch_size}")


@dataclass
class GenerationEvalConfig(SamplingConfig):
    """Answers generated for held-out prompts after training, scored by the checker where there is one."""

    num_prompts: int = 64
    before_training: bool = False  # SFT: also evaluate the starting model (loss and answers) as `<split>_initial`


@dataclass
class StageSpec:
    """Keys every stage has; a stage type adds its own by subclassing (see `alignment.stages`)."""

    name: str
    type: str
    data: DataSpec | None = None
    args: dict[str, Any] = field(default_factory=dict)
    # Keys of earlier versions, refused with their new spelling (DPO and PPO said `policy_from`).
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"policy_from": "init_from"}

    def depends_on(self) -> list[str]:
        """Names of earlier stages whose outputs this stage reads."""
        return []


@dataclass
class Recipe:
    name: str
    output_dir: str
    model: ModelConfig
    stages: list[Any]
    seed: int = 42
    lora: LoraSettings = field(default_factory=LoraSettings)
    chat_template: str = "tokenizer"  # the tokenizer's own, a built-in name (alpaca, chatml), or Jinja
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def stage(self, name: str) -> StageSpec:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)
