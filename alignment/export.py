"""`alignment export STAGE_DIR OUT_DIR`: a trained stage as a plain Hugging Face model, which `transformers`
and serving engines load as any hub model, without this package.

A policy stage (SFT, PPO, DPO) becomes a causal LM: its LoRA merged into the unquantized base weights
(bfloat16 by default), the tokenizer with the chat template it was trained with, and a generation
config whose stop tokens are every token that ended a turn in training. A reward stage becomes a
one-label sequence classifier the same way, with the pad token set so it scores batches. The base is
loaded unquantized: a QLoRA adapter merged into it scores as the 4-bit model did up to the base's
quantization error (docs/benchmarks.md has the size of it on stories260k). Both carry a model card
(`alignment.model_card`) for the hub page.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from alignment.io import atomic_directory, write_json
from alignment.model_card import model_card
from alignment.models.loading import load_stage_recipe, resolve_model_path, split_reward_adapter
from alignment.models.precision import torch_dtype
from alignment.models.sampling import stop_token_ids
from alignment.names import ADAPTER_CONFIG, MANIFEST, REWARD_STATS_FILE
from alignment.stages.base import read_manifest

POLICY_STAGES = ("sft", "ppo", "dpo")
EXPORT_FILE = "alignment_export.json"  # in the exported folder: which stage it came from, and how
MODEL_CARD = "README.md"  # the hub shows it as the model's page


class ExportError(ValueError):
    """A stage folder that cannot be exported: what is wrong, and how to fix it."""


def _check_stage(stage_dir: Path) -> dict:
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise ExportError(f"{stage_dir} is not a stage output folder (no {MANIFEST}); point at runs/<run>/<stage>")
    if manifest.get("status") != "completed" or not (stage_dir / ADAPTER_CONFIG).exists():
        raise ExportError(
            f"{stage_dir}: the {manifest.get('type')} stage did not complete (status {manifest.get('status')!r}); "
            "run its recipe to the end (`alignment run RECIPE`) and export again"
        )
    if manifest["type"] not in (*POLICY_STAGES, "reward"):
        raise ExportError(f"{stage_dir}: a {manifest['type']!r} stage has no model to export")
    return manifest


def _merged(stage_dir: Path, kind: str, dtype: torch.dtype) -> PreTrainedModel:
    recipe = load_stage_recipe(stage_dir)
    source = {"revision": recipe.model.revision, "trust_remote_code": recipe.model.trust_remote_code, "dtype": dtype}
    if kind == "reward":
        if (
            LoraConfig.from_pretrained(str(stage_dir)).task_type != "SEQ_CLS"
            or "weight" not in (split_reward_adapter(stage_dir)[1])
        ):
            raise ExportError(
                f"{stage_dir}: only a reward stage with the linear score head exports as a sequence classifier "
                "(the attention head is this suite's own module); train it with score_head.type: linear"
            )
        base = AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path(recipe.model), num_labels=1, **source
        )
    else:
        base = AutoModelForCausalLM.from_pretrained(resolve_model_path(recipe.model), **source)
    return PeftModel.from_pretrained(base, str(stage_dir)).merge_and_unload()


def export_stage(
    stage_dir: str | Path, out_dir: str | Path, dtype: str = "bfloat16", push_to_hub: str | None = None
) -> Path:
    """Writes the stage as a Hugging Face model folder (atomically) and optionally pushes it to the hub."""
    stage_dir, out_dir = Path(stage_dir), Path(out_dir)
    manifest = _check_stage(stage_dir)
    if push_to_hub:
        _require_hub_login(push_to_hub)  # before the merge, not after minutes of it
    kind = "reward" if manifest["type"] == "reward" else "policy"
    model = _merged(stage_dir, kind, torch_dtype(dtype))
    tokenizer = AutoTokenizer.from_pretrained(str(stage_dir))  # with the chat template used in training
    model.config.pad_token_id = tokenizer.pad_token_id
    if manifest["type"] in POLICY_STAGES:
        model.generation_config.eos_token_id = stop_token_ids(tokenizer, model)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(
            Path(tmp) / EXPORT_FILE, {"stage": str(stage_dir.resolve()), "type": manifest["type"], "dtype": dtype}
        )
        if kind == "reward" and (stage_dir / REWARD_STATS_FILE).exists():  # for standardising its rewards
            shutil.copy2(stage_dir / REWARD_STATS_FILE, Path(tmp) / REWARD_STATS_FILE)
        card = model_card(stage_dir, kind, dtype, where=push_to_hub or str(out_dir))
        (Path(tmp) / MODEL_CARD).write_text(card)
    if push_to_hub:
        push_folder(out_dir, push_to_hub)
    return out_dir


def _require_hub_login(repo: str) -> None:
    from huggingface_hub import get_token

    if get_token() is None:
        raise ExportError(
            f"--push-to-hub {repo}: not logged in to the Hugging Face Hub; run `hf auth login` (or set HF_TOKEN) "
            "and export again, or export without --push-to-hub and upload the folder later"
        )


def push_folder(folder: Path, repo: str) -> None:
    """Uploads the exported folder as it is on disk (what was checked locally is what is served), creating
    the model repo if it does not exist."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message=f"alignment export of {folder.name}")
    except Exception as error:  # network, permissions, a malformed repo id: all end the same way for the user
        raise ExportError(
            f"could not push {folder} to the hub repo {repo}: {type(error).__name__}: {error}. The exported model "
            f"is complete in {folder}; upload it when the hub is reachable: `hf upload {repo} {folder}`"
        ) from None
