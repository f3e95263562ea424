"""SFT throughput and peak memory: our SFT stage against TRL's SFTTrainer with its defaults, side by side.

Both train on the same model, rows, batch size, sequence length and number of steps, each in a
fresh subprocess (so peaks do not mix):

- ours: the suite's SFT stage as a recipe runs it (`alignment.runner.run_recipe`): the base in 4-bit
  NF4 with k-bit preparation, a LoRA adapter on every linear layer, float32 master weights, the
  precision chosen from the hardware;
- ours, packed: the same with TRL's `packing` (best-fit decreasing into rows of max length, padding-free:
  positions restart at each sequence and the attention boundaries come from them), which pays where a
  varlen attention kernel (flash attention) runs and costs a block mask over the whole row elsewhere;
- trl-defaults: `SFTTrainer(model=PATH, train_dataset=rows, args=SFTConfig(...))` with only the
  output folder, steps, batch size, sequence length and logging set: the model as TRL loads it,
  full fine-tuning, TRL's default precision (bf16; on a CPU, which TRL's default refuses, bf16 where
  the CPU runs it natively and float32 elsewhere).

Tokens/s counts the real (non-padding) tokens the trainer saw (TRL's `num_tokens`) over its train
runtime; peak memory is the child's peak RSS and, on a GPU, `torch.cuda.max_memory_allocated`.

    python scripts/bench_sft.py                        # the toy base, 40 steps of 32 rows: ~1 minute
    python scripts/bench_sft.py --model ~/.cache/alignment-test-models/smollm2-135m --batch-size 8 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CONFIGURATIONS = {
    "ours": "4-bit NF4 base + LoRA (r 64, all linear), the SFT stage",
    "ours-packed": "the same, TRL packing (best-fit decreasing, padding-free)",
    "trl-defaults": "SFTTrainer(model=PATH) with its defaults: full fine-tuning",
}
RESULT_PREFIX = "RESULT "
MIB = 1024**2


def recipe(args: argparse.Namespace, work: Path, packing: bool = False):
    """The one-stage SFT recipe both sides train on: its data (the toy suite's rows, no evaluation split)
    and, for ours, its model, quantization and LoRA."""
    from alignment.recipes.load import validate_recipe

    sft_args = {
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size,
        "max_length": args.max_length,
        "learning_rate": 1e-4,
        "logging_steps": 1,
        "save_strategy": "no",
        "activation_checkpointing": False,
        **({"packing": True, "packing_strategy": "bfd"} if packing else {}),
    }
    return validate_recipe(
        {
            "name": "bench-sft",
            "seed": 0,
            "output_dir": str(work / "run"),
            "model": {"name_or_path": args.model, "quantization": {"mode": "4bit", "compute_dtype": "auto"}},
            "lora": {"r": 64, "alpha": 64, "dropout": 0.0, "target_modules": "all-linear"},
            "chat_template": "tokenizer",
            "tracking": {"mode": "disabled"},
            "stages": [
                {
                    "name": "sft",
                    "type": "sft",
                    "data": {
                        "datasets": [{"path": "toy", "options": {"rows": args.steps * args.batch_size}}],
                        "eval_split": 0.0,
                    },
                    "evaluation": {"num_prompts": 0},
                    "args": sft_args,
                }
            ],
        }
    )


def run_ours(args: argparse.Namespace, work: Path, packing: bool) -> dict:
    from alignment.runner import run_recipe

    metrics = run_recipe(recipe(args, work, packing))["sft"]
    history = json.loads((work / "run" / "sft" / "log_history.json").read_text())
    tokens = max(row.get("num_tokens", 0) for row in history)
    return {"tokens": tokens, "seconds": metrics["train/runtime_s"]}


def run_trl_defaults(args: argparse.Namespace, work: Path) -> dict:
    from trl import SFTConfig, SFTTrainer

    from alignment.data.build import TRAIN, build_stage_data
    from alignment.models.loading import load_tokenizer, resolve_model_path
    from alignment.models.precision import native_bfloat16
    from alignment.stages.common import trainer_columns

    spec = recipe(args, work)
    tokenizer = load_tokenizer(spec.model, spec.chat_template)
    data = build_stage_data(spec.stages[0].data, "sft", spec.seed, tokenizer, args.max_length)
    config = SFTConfig(
        output_dir=str(work / "trl"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        # TRL's default precision (bf16) refuses to start on a CPU; there, bf16 only where the CPU has it natively
        **({} if torch.cuda.is_available() else {"use_cpu": True, "bf16": native_bfloat16()}),
    )
    trainer = SFTTrainer(
        model=resolve_model_path(spec.model),
        args=config,
        train_dataset=trainer_columns(data.splits[TRAIN], ["prompt", "completion"]),
        processing_class=tokenizer,  # the same chat template as ours
    )
    result = trainer.train()
    tokens = max(row.get("num_tokens", 0) for row in trainer.state.log_history)
    return {"tokens": tokens, "seconds": result.metrics["train_runtime"], "bf16": bool(config.bf16)}


def child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if args.child == "trl-defaults":
            result = run_trl_defaults(args, work)
        else:
            result = run_ours(args, work, packing=args.child == "ours-packed")
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / MIB if torch.cuda.is_available() else None
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def measure(args: argparse.Namespace, name: str) -> dict:
    command = [sys.executable, __file__, "--child", name, "--model", args.model]
    command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    environment = os.environ | {"WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment)
    lines = [line for line in finished.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if finished.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed:\n{(finished.stdout + finished.stderr)[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", help="toy, a local folder or a hub id")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--child", choices=list(CONFIGURATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"SFT throughput: model {args.model}, {args.steps} steps × {args.batch_size} rows, max length {args.max_length}"
    )
    print(f"{device}; {platform.processor() or platform.machine()}; torch {torch.__version__}\n")
    results = {name: measure(args, name) for name in args.configs}
    baseline = results.get("ours")
    print("| configuration | what | real tokens/s | × ours | peak RSS MiB | peak CUDA MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, result in results.items():
        speed = result["tokens"] / result["seconds"]
        ratio = speed / (baseline["tokens"] / baseline["seconds"]) if baseline else float("nan")
        cuda = f"{result['cuda_peak_mib']:.0f}" if result["cuda_peak_mib"] is not None else "—"
        what = CONFIGURATIONS[name] + (" (bf16)" if result.get("bf16") else "")
        print(f"| {name} | {what} | {speed:,.0f} | {ratio:.2f} | {result['peak_rss_mib']:,.0f} | {cuda} |")


if __name__ == "__main__":
    main()
