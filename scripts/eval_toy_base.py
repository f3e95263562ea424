"""Exact match of the pre-trained toy base (before any instruction tuning), per task family.

Prints one row per prompt form: the bare pre-training form (`family: input = `) and an instruction
phrasing seen in pre-training, followed by a newline. Loads the base as the stages do (4-bit NF4,
double quantization) unless `--float32`.

    python scripts/eval_toy_base.py [--rows 350] [--float32]
"""

from __future__ import annotations

import argparse

from build_toy_base import bare_form, exact_match_by_family

from alignment.models.loading import load_base_model, load_tokenizer
from alignment.recipes.schema import ModelConfig, QuantizationConfig
from alignment.toy.tasks import FAMILIES, toy_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=350, help="held-out instances, round-robin over the families")
    parser.add_argument("--float32", action="store_true", help="load the base unquantized")
    args = parser.parse_args()

    mode = "none" if args.float32 else "4bit"
    config = ModelConfig(name_or_path="toy", dtype="float32", quantization=QuantizationConfig(mode=mode))
    tokenizer = load_tokenizer(config, "chatml")
    model = load_base_model(config, gradient_checkpointing=False).eval()
    rows = toy_rows(args.rows, seed=12345)
    forms = {
        "bare": bare_form,
        "phrasing 1": lambda row: FAMILIES[row["family"]].render(row["input"], 0) + "\n",
    }
    print(f"| form | {' | '.join(FAMILIES)} | all |")
    print(f"| --- |{' --- |' * (len(FAMILIES) + 1)}")
    for form, render in forms.items():
        by_family = exact_match_by_family(model, tokenizer, rows, render)
        cells = [f"{by_family[name]:.2f}" for name in FAMILIES]
        print(f"| {form} | {' | '.join(cells)} | {by_family['all']:.3f} |")


if __name__ == "__main__":
    main()
