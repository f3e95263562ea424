"""`alignment compare RUN_DIR...`: the key metrics of several runs, stage by stage, and the recipe keys
that differ, read from the run folders alone (no W&B server needed), as one Markdown table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from alignment.io import read_json
from alignment.names import MANIFEST, METRICS, RESOLVED_RECIPE
from alignment.stages.base import read_manifest

# The metrics a reader compares first, in this order, where a stage has them.
KEY_METRICS = (
    "eval_initial/exact_match",
    "eval/exact_match",
    "eval_heldout_templates/exact_match",
    "eval/pairwise_accuracy",
    "eval/mean_margin",
    "eval/reward_score",
    "eval/reward_score_gain",
    "eval/loss",
    "train/loss",
    "train/objective/kl",
)
IGNORED_KEYS = ("output_dir",)  # differs between any two runs and says nothing about them


def completed_stages(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Stage name → its manifest, metrics and resolved recipe, for every completed stage of a run, in run order."""
    stages = []
    for manifest_path in Path(run_dir).glob(f"*/{MANIFEST}"):
        folder, manifest = manifest_path.parent, read_manifest(manifest_path.parent)
        if manifest and manifest.get("status") == "completed":
            recipe = yaml.safe_load((folder / RESOLVED_RECIPE).read_text())
            stages.append((manifest.get("started_at", ""), folder.name, manifest, read_json(folder / METRICS), recipe))
    if not stages:
        raise FileNotFoundError(f"{run_dir} holds no completed stage (no */{MANIFEST} with status completed)")
    return {name: {"manifest": m, "metrics": metrics, "recipe": r} for _, name, m, metrics, r in sorted(stages)}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested recipe; stages are keyed by their names, as `--set` addresses them."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, list) and value and all(isinstance(item, dict) and "name" in item for item in value):
        return {k: v for item in value for k, v in flatten(item, f"{prefix}{item['name']}.").items()}
    return {prefix.rstrip("."): value}


def differing_keys(recipes: list[dict[str, Any]]) -> dict[str, list[Any]]:
    flat = [flatten(recipe) for recipe in recipes]
    keys = sorted({key for recipe in flat for key in recipe} - set(IGNORED_KEYS))
    missing = object()
    return {
        key: [recipe.get(key) for recipe in flat]
        for key in keys
        if len({repr(recipe.get(key, missing)) for recipe in flat}) > 1
    }


def metric_cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def compare_runs(run_dirs: list[str | Path]) -> str:
    """The Markdown comparison of `run_dirs`: a row per stage and key metric, a column per run; then the
    recipe keys whose values differ."""
    runs = {str(run_dir): completed_stages(Path(run_dir)) for run_dir in run_dirs}
    header = "| stage | metric | " + " | ".join(runs) + " |\n|" + " --- |" * (len(runs) + 2) + "\n"
    rows = []
    stage_names = list(dict.fromkeys(name for stages in runs.values() for name in stages))
    for stage in stage_names:
        found = [stages.get(stage) for stages in runs.values()]
        for metric in KEY_METRICS:
            values = [entry["metrics"].get(metric) if entry else None for entry in found]
            if any(value is not None for value in values):
                rows.append(f"| {stage} | {metric} | " + " | ".join(metric_cell(value) for value in values) + " |")
        seconds = [entry["manifest"].get("duration_s") if entry else None for entry in found]
        rows.append(f"| {stage} | wall time (s) | " + " | ".join(metric_cell(value) for value in seconds) + " |")
    recipes = [next(iter(stages.values()))["recipe"] for stages in runs.values()]
    differences = differing_keys(recipes)
    lines = ["\n**Recipe keys that differ**\n"]
    if differences:
        lines.append("| key | " + " | ".join(runs) + " |\n|" + " --- |" * (len(runs) + 1))
        lines += [
            f"| {key} | " + " | ".join(metric_cell(value) for value in values) + " |"
            for key, values in differences.items()
        ]
    else:
        lines.append("none (besides output_dir)")
    return header + "\n".join(rows) + "\n" + "\n".join(lines) + "\n"
