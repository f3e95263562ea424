"""Precision from the hardware (issue 16): bfloat16 only where the device runs it natively, float32
otherwise, for every shipped recipe; a recipe may still name a dtype and get it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignment.models import loading
from alignment.models.loading import attach_adapter, load_base_model
from alignment.models.precision import (
    CPU_BFLOAT16_FLAGS,
    compute_dtype,
    native_bfloat16,
    trainer_precision_args,
)
from alignment.recipes.load import load_recipe
from alignment.recipes.schema import LoraSettings, ModelConfig, QuantizationConfig

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


def tiny_untied_llama(folder: Path) -> Path:
    """A small Llama with its own LM head (not tied to the embeddings), saved in bfloat16."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_frozen_embeddings_and_lm_head_stay_in_bfloat16_after_k_bit_preparation(tmp_path, monkeypatch):
    """Issue 16 item 4: k-bit preparation casts the embeddings and the LM head to float32 (most of a 4-bit
    copy's memory); with a bfloat16 checkpoint and compute dtype they stay bfloat16, half the bytes, and
    the logits under autocast, the residual stream's dtype and a LoRA step's gradients are unchanged."""
    folder = tiny_untied_llama(tmp_path / "llama")
    config = ModelConfig(
        name_or_path=str(folder), dtype="bfloat16", quantization=QuantizationConfig(compute_dtype="bfloat16")
    )
    kept = load_base_model(config)
    monkeypatch.setattr(loading, "keep_frozen_embeddings_in_compute_dtype", lambda model, config: None)
    upcast = load_base_model(config)  # what k-bit preparation alone leaves
    for model, dtype in ((kept, torch.bfloat16), (upcast, torch.float32)):
        assert model.get_input_embeddings().weight.dtype == model.get_output_embeddings().weight.dtype == dtype
        assert model.model.norm.weight.dtype == torch.float32
    for model in (kept, upcast):
        embedding_bytes = [
            m.weight.numel() * m.weight.element_size() for m in (model.model.embed_tokens, model.lm_head)
        ]
        print(f"embeddings and LM head: {sum(embedding_bytes) / 1024:.0f} KiB")
    assert kept.lm_head.weight.element_size() * 2 == upcast.lm_head.weight.element_size()
    input_ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, gradients = [], []
    for model in (kept, upcast):
        torch.manual_seed(0)
        model = attach_adapter(model, "policy", LoraSettings(r=4, alpha=8, dropout=0.0))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # non-zero, so the gradients reach every adapter weight
                torch.nn.init.normal_(parameter, std=0.02)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(input_ids=input_ids, labels=input_ids, output_hidden_states=True)
        assert output.hidden_states[0].dtype == torch.float32  # the residual stream starts in float32
        output.loss.backward()
        logits.append(output.logits.detach())
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert torch.equal(logits[0], logits[1])
    assert gradients[0].keys() == gradients[1].keys()
    assert all(torch.equal(gradients[0][name], gradients[1][name]) for name in gradients[0])
    with torch.no_grad():  # outside autocast the LM head reads its input in bfloat16
        assert kept(input_ids=input_ids).logits.dtype == torch.bfloat16


def test_float32_compute_keeps_the_embeddings_in_float32(tmp_path):
    folder = tiny_untied_llama(tmp_path / "llama")
    config = ModelConfig(
        name_or_path=str(folder), dtype="bfloat16", quantization=QuantizationConfig(compute_dtype="float32")
    )
    model = load_base_model(config)
    assert model.get_input_embeddings().weight.dtype == model.get_output_embeddings().weight.dtype == torch.float32


def test_the_command_drops_known_library_notices_and_nothing_else():
    """bitsandbytes' "Failed to load" warning for an optional hub kernel (AVX512-BF16 CPUs) and peft's
    deprecation warning are dropped; other messages of the same logger and category still show. In a fresh
    interpreter, with the filters the command installs."""
    code = (
        "import logging, warnings\n"
        "from alignment.notices import HUB_KERNEL_LOGGER, quiet_known_notices\n"
        "quiet_known_notices()\n"
        "logger = logging.getLogger(HUB_KERNEL_LOGGER)\n"
        "logger.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please pip install', 'x')\n"
        "logger.warning('some other bitsandbytes warning')\n"
        "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed in v6.', FutureWarning)\n"
        "warnings.warn('some other future change', FutureWarning)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "kernels-community" not in result.stderr and "some other bitsandbytes warning" in result.stderr
    assert "is_gradient_checkpointing" not in result.stderr and "some other future change" in result.stderr
