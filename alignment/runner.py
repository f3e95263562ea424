"""Runs a recipe's stages in order, each from the stage registry, all into one run folder.

A stage whose output is complete and whose fingerprint (its config and its inputs' outputs) is
unchanged is skipped, so re-running a recipe after a crash continues where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformers import set_seed

from alignment.distributed import process_state
from alignment.recipes.schema import Recipe, StageSpec
from alignment.recipes.validate import RecipeError
from alignment.stages import STAGE_TYPES, Stage

logger = logging.getLogger(__name__)


def plan(recipe: Recipe, only: list[str] | None = None) -> list[StageSpec]:
    """The stages to run, in recipe order; `only` picks some by name."""
    names = [stage.name for stage in recipe.stages]
    unknown = [name for name in only or [] if name not in names]
    if unknown:
        raise RecipeError("--stages", f"unknown stage(s) {unknown}; the recipe's stages are {names}")
    return [stage for stage in recipe.stages if not only or stage.name in only]


def make_stage(recipe: Recipe, spec: StageSpec) -> Stage:
    return STAGE_TYPES[spec.type](recipe, spec, Path(recipe.output_dir))


def run_recipe(recipe: Recipe, only: list[str] | None = None, force: bool = False) -> dict[str, dict[str, Any]]:
    """Runs the planned stages; returns each stage's metrics (None for a stage skipped as complete)."""
    results: dict[str, dict[str, Any]] = {}
    say = process_state().print  # once per run, not once per process
    for spec in plan(recipe, only):
        stage = make_stage(recipe, spec)
        if not force and not only and stage.is_complete():
            say(f"[{spec.name}] already complete in {stage.stage_dir} with the same config; skipping")
            results[spec.name] = None
            continue
        say(f"[{spec.name}] running {spec.type} stage → {stage.stage_dir}")
        set_seed(recipe.seed)
        results[spec.name] = stage.execute()
        say(f"[{spec.name}] done: {summarise(results[spec.name])}")
    return results


def summarise(metrics: dict[str, Any]) -> str:
    keys = [key for key in metrics if key.endswith(("exact_match", "/loss", "accuracy")) and key.count("/") <= 1]
    return ", ".join(f"{key}={metrics[key]:.4g}" for key in keys[:8])
