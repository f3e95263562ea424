"""Exact match of the pre-trained toy base (before any instruction tuning), per task family.

Prints one row per prompt form: the bare pre-training form (`family: input = `) and an instruction
phrasing seen in pre-training, followed by a newline. Loads the base as the stages do (4-bit NF4,
double quantization) unless `--float32`.

    python scripts/eval_toy_base.py [--rows 350] [--float32]
"""

from __future__ import annotations

import argparse

import torch

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
    tokenizer.padding_side = "left"
    model = load_base_model(config, gradient_checkpointing=False).eval()
    rows = toy_rows(args.rows, seed=12345)
    forms = {
        "bare": lambda row: f"{row['family']}: {row['input']} = ",
        "phrasing 1": lambda row: FAMILIES[row["family"]].render(row["input"], 0) + "\n",
    }
    print(f"| form | {' | '.join(FAMILIES)} | all |")
    print(f"| --- |{' --- |' * (len(FAMILIES) + 1)}")
    for form, render in forms.items():
        correct: dict[str, list[bool]] = {name: [] for name in FAMILIES}
        for start in range(0, len(rows), 70):
            batch_rows = rows[start : start + 70]
            batch = tokenizer(
                [render(row) for row in batch_rows], return_tensors="pt", padding=True, add_special_tokens=False
            )
            with torch.no_grad():
                output = model.generate(
                    **batch, max_new_tokens=14, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for row, answer in zip(batch_rows, answers, strict=True):
                correct[row["family"]].append(answer.split("\n")[0].strip() == row["answer"])
        cells = [f"{sum(hits) / len(hits):.2f}" for hits in correct.values()]
        total = sum(sum(hits) for hits in correct.values()) / len(rows)
        print(f"| {form} | {' | '.join(cells)} | {total:.3f} |")


if __name__ == "__main__":
    main()
