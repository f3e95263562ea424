"""Precision from the hardware (issue 16): bfloat16 only where the device runs it natively, float32
otherwise, for every shipped recipe; a recipe may still name a dtype and get it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignment.models.precision import (
    CPU_BFLOAT16_FLAGS,
    compute_dtype,
    native_bfloat16,
    trainer_precision_args,
)
from alignment.recipes.load import load_recipe
from alignment.recipes.schema import ModelConfig, QuantizationConfig

from conftest import ROOT, SHIPPED_RECIPES

PRECISION_ARGS = {"bf16", "fp16", "use_cpu", "bf16_full_eval", "fp16_full_eval"}


@pytest.mark.skipif(torch.cuda.is_available() or not Path("/proc/cpuinfo").exists(), reason="reads a CPU's flags")
def test_auto_is_bfloat16_exactly_when_the_cpu_has_avx512_bf16_or_amx():
    flags = Path("/proc/cpuinfo").read_text().split()
    native = any(flag in flags for flag in CPU_BFLOAT16_FLAGS)
    assert native_bfloat16() == native
    model = ModelConfig(name_or_path="toy", quantization=QuantizationConfig(compute_dtype="auto"))
    assert compute_dtype(model) == (torch.bfloat16 if native else torch.float32)
    assert trainer_precision_args(model) == ({"bf16": True, "use_cpu": True} if native else {"bf16": False})


def test_a_named_dtype_is_kept_whatever_the_hardware():
    forced = ModelConfig(name_or_path="toy", quantization=QuantizationConfig(compute_dtype="bfloat16"))
    assert compute_dtype(forced) == torch.bfloat16
    expected = {"bf16": True} | ({} if torch.cuda.is_available() else {"use_cpu": True})
    assert trainer_precision_args(forced) == expected
    unquantized = ModelConfig(name_or_path="toy", dtype="float32", quantization=QuantizationConfig(mode="none"))
    assert compute_dtype(unquantized) == torch.float32


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_shipped_recipe_hard_codes_mixed_precision_in_a_stages_trainer_args(path):
    """Precision is the model's (compute) dtype, resolved from the hardware when `auto`; a `bf16: true`
    in trainer args made the toy reward recipe emulate bfloat16 for 39+ minutes on AVX2-only CPUs."""
    recipe = load_recipe(path)
    for stage in recipe.stages:
        assert not PRECISION_ARGS & set(stage.args), (
            f"{path.name}: stage {stage.name} sets {PRECISION_ARGS & set(stage.args)}"
        )


def test_the_toy_reward_recipe_computes_in_bfloat16_only_where_it_is_native():
    recipe = load_recipe(ROOT / "recipes" / "toy" / "reward.yaml")
    assert recipe.model.quantization.compute_dtype == "auto"
    assert compute_dtype(recipe.model) == (torch.bfloat16 if native_bfloat16() else torch.float32)
