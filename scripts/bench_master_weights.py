"""How much of one optimiser step survives when LoRA weights are stored in bfloat16, at each shipped recipe's
learning rate: the measurement behind keeping float32 master weights (`keep_float32_master_weights`).

AdamW's first steps move every entry by about the learning rate. A bfloat16 weight keeps 8 significant
bits, so a step below half the spacing of bfloat16 numbers around the weight rounds back to the weight.
TRL stores adapters on quantized bases in bfloat16 (QLoRA's choice at SFT learning rates around 2e-4).

For every stage of every shipped recipe this prints the share of LoRA A entries that one step of the
stage's learning rate changes, stored in bfloat16 and in float32. A entries are drawn as PEFT initialises
them (Kaiming-uniform, bound 1/sqrt(fan_in)) for the model's layer shapes; B starts at zero, where every
step survives, so A is the part at risk. With `--adapter DIR` it also measures every entry of a trained
adapter (A and B), e.g. the SFT adapter of a run.

    python scripts/bench_master_weights.py [--adapter runs/<run>/sft]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# (hidden size, MLP size) of each model the shipped recipes name: LoRA A's fan-in is one or the other.
SHAPES = {
    "toy": (128, 384),
    "smollm2-135m": (576, 1536),
    "Qwen/Qwen2.5-0.5B": (896, 4864),
    "meta-llama/Llama-3.2-1B": (2048, 8192),
    "meta-llama/Llama-3.1-8B": (4096, 14336),
}


def default_learning_rate(stage_type: str) -> float:
    """The learning rate a stage gets when its recipe names none: its config class's default."""
    from alignment.stages import STAGE_TYPES

    fields = {field.name: field for field in dataclasses.fields(STAGE_TYPES[stage_type].args_class)}
    return fields["learning_rate"].default


def surviving_share(weights: torch.Tensor, step: float) -> tuple[float, float]:
    """Shares of entries that `weights + step` changes, stored in bfloat16 and in float32."""
    stored = weights.bfloat16()
    in_bf16 = ((stored.float() + step).bfloat16() != stored).float().mean().item()
    in_fp32 = ((weights.float() + step) != weights.float()).float().mean().item()
    return in_bf16, in_fp32


def lora_a_at_init(fan_in: int, count: int = 1_000_000, seed: int = 0) -> torch.Tensor:
    bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on an (r, fan_in) matrix
    return (torch.rand(count, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * bound


def model_key(name_or_path: str) -> str:
    return next((key for key in SHAPES if key in name_or_path), name_or_path)


def recipe_rows() -> list[tuple[str, str, str, float, str]]:
    rows = []
    for path in sorted((ROOT / "recipes").rglob("*.yaml")):
        recipe = yaml.safe_load(path.read_text())
        if "stages" not in recipe:  # recipes/accelerate: launch configs, not recipes
            continue
        model = model_key(recipe["model"]["name_or_path"])
        compute = recipe["model"].get("quantization", {}).get("compute_dtype", "auto")
        for stage in recipe["stages"]:
            rate = stage.get("args", {}).get("learning_rate", default_learning_rate(stage["type"]))
            rows.append((str(path.relative_to(ROOT)), stage["name"], model, float(rate), compute))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, help="a stage folder with adapter_model.safetensors to measure too")
    args = parser.parse_args()

    print(
        "| recipe | stage | model | learning rate | recipe's compute dtype | LoRA A entries a step changes, bf16 storage | float32 storage |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for recipe, stage, model, rate, compute in recipe_rows():
        if model not in SHAPES:
            continue
        hidden, mlp = SHAPES[model]
        # six of the seven linear layers of a block read the hidden state, down_proj reads the MLP's
        shares = [surviving_share(lora_a_at_init(fan_in), rate) for fan_in in [hidden] * 6 + [mlp]]
        bf16 = sum(share[0] for share in shares) / len(shares)
        fp32 = sum(share[1] for share in shares) / len(shares)
        print(f"| {recipe} | {stage} | {model} | {rate:g} | {compute} | {bf16:.3f} | {fp32:.3f} |")

    if args.adapter is not None:
        weights = torch.cat(
            [tensor.flatten().float() for tensor in load_file(args.adapter / "adapter_model.safetensors").values()]
        )
        print(f"\nEvery entry of {args.adapter} ({weights.numel():,} entries):\n")
        print("| learning rate | entries a step changes, bf16 storage | float32 storage |")
        print("| --- | --- | --- |")
        for rate in (2e-4, 1e-4, 5e-5, 1e-5, 5e-6, 1e-6, 5e-7):
            bf16, fp32 = surviving_share(weights, rate)
            print(f"| {rate:g} | {bf16:.3f} | {fp32:.3f} |")


if __name__ == "__main__":
    main()
