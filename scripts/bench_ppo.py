"""PPO throughput and memory: our stage's four roles on one 4-bit base against four separate models.

Every configuration runs the suite's own PPO loop (`alignment.ppo.trainer.PPOTrainer`: the same
sampling, role passes, GAE, mini-batches and optimiser) on one workload; only where the roles live
differs:

- shared-4bit (ours): one 4-bit base with the policy, reference, reward and value adapters, as the
  PPO stage builds it;
- shared-4bit-adapter-sampling: ours before `merged_sampling` (the default since the fifteenth
  session): sampling token by token through the 4-bit base and the adapters;
- shared-4bit-release-per-step: ours with `release_memory: step` (malloc_trim after every optimiser step);
- shared-float32 (ours with `quantization: {mode: none}`): the same on one float32 base;
- separate-4bit: four 4-bit models, one LoRA adapter each (policy and value train theirs);
- separate-float32: four float32 models, policy and value fully fine-tuned (the classic set-up).

The separate rows subclass the trainer, overriding only the three places a role becomes a module
(sampling, the log-prob passes, the value pass); that subclass is the whole of "the same PPO with
four separate models". The model is Llama-shaped with random weights (the toy tokenizer's prompts,
a 512-token vocabulary by default, as in issue 16), so responses run to the length limit and every
configuration does the same work.

Each configuration runs in a fresh process with the allocator the `alignment` command gives it
(`--allocator auto`: tcmalloc, else mimalloc, when installed, see `alignment.allocator`; the
table says which ran). `--allocator system` keeps the C library's malloc: glibc's RSS then includes the
freed memory it keeps, and `--live-rss` fixes glibc's mmap threshold so RSS follows the live tensors
(to find where memory goes; slower for every configuration, and ours most, since bitsandbytes
allocates a dequantized weight in every pass).
Reported: episodes per second over the iterations after the first (which pays one-time
initialisation), seconds per rollout and per update, and peak RSS per phase (the kernel's VmHWM,
reset before each phase): loading, rollout (sampling and the role passes) and update (the PPO
epochs); with a GPU, peak CUDA memory too.

    python scripts/bench_ppo.py                                    # 86 M parameters, 3 iterations
    python scripts/bench_ppo.py --hidden-size 512 --layers 7 --iterations 6   # about 22 M
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from bench_ppo_memory import (
    RESULT_PREFIX,
    child_result,
    copy_out_of_checkpoint_mapping,
    machine,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    save_random_llama,
    status_mib,
)

from alignment.allocator import ALLOCATOR_VARIABLE, SYSTEM, active_allocator, allocator_library, preload_environment

CONFIGURATIONS = {
    "shared-4bit": "ours: one 4-bit base + 4 LoRA adapters",
    "shared-4bit-adapter-sampling": "ours, sampling through the adapters (merged_sampling: false)",
    "shared-4bit-release-per-step": "ours, freed memory handed back after every optimiser step (release_memory: step)",
    "shared-float32": "ours unquantized: one float32 base + 4 LoRA adapters",
    "separate-4bit": "four 4-bit models, one LoRA adapter each",
    "separate-float32": "four float32 models, policy and value fully fine-tuned",
}
PHASES = ("rollout", "update")


# Child: one configuration in its own process


def is_quantized(configuration: str) -> bool:
    return "4bit" in configuration


def model_config(model_dir: Path, quantized: bool, compute_dtype: str = "auto"):
    from alignment.recipes.schema import ModelConfig, QuantizationConfig

    if quantized:  # the suite's defaults: NF4, double quantization, compute dtype from the hardware
        return ModelConfig(str(model_dir), quantization=QuantizationConfig(compute_dtype=compute_dtype))
    return ModelConfig(str(model_dir), dtype="float32", quantization=QuantizationConfig(mode="none"))


def trainer_classes():
    """PPOTrainer with per-phase memory marks, and its separate-models variant (imported in the child only)."""
    from alignment.models.scoring import token_scores
    from alignment.names import POLICY, VALUE
    from alignment.ppo.trainer import PPOTrainer, pad_columns, response_logits, trim_padding

    class MeasuredPPOTrainer(PPOTrainer):
        """Marks the peak RSS of each rollout and update (VmHWM reset before each)."""

        phase_peaks: dict[str, list[float]]

        def rollout(self, rows):
            return self._measured("rollout", super().rollout, rows)

        def update(self, rollout):
            return self._measured("update", super().update, rollout)

        def _measured(self, phase, run, argument):
            if not hasattr(self, "phase_peaks"):
                self.phase_peaks = defaultdict(list)
            reset_peak_rss()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            result = run(argument)
            self.phase_peaks[phase].append(status_mib("VmHWM"))
            if torch.cuda.is_available():
                self.phase_peaks[f"cuda_{phase}"].append(torch.cuda.max_memory_allocated() / 2**20)
            return result

    class ValueModel(torch.nn.Module):
        """The value role as a model of its own with its head, trained beside the policy."""

        def __init__(self, model: torch.nn.Module, head: torch.nn.Module):
            super().__init__()
            self.model, self.head = model, head

    class SeparateRolesTrainer(MeasuredPPOTrainer):
        """The same PPO with each role a model of its own: only where a role's forward pass goes differs."""

        def __init__(self, config, roles: dict, value_head, reward, tokenizer, prompts, work_dir, tracker, **kwargs):
            self.roles = roles
            value = ValueModel(roles[VALUE], value_head)
            super().__init__(config, roles[POLICY], value, reward, tokenizer, prompts, work_dir, tracker, **kwargs)

        @property
        def unwrapped(self):  # the model that samples
            return self.roles[POLICY]

        def _response_logits(self, adapter, input_ids, attention_mask, response_start):
            with self.autocast():
                return response_logits(self.roles[adapter], input_ids, attention_mask, response_start)

        def _values(self, input_ids, attention_mask, response_start):
            width = input_ids.shape[1] - response_start
            input_ids, attention_mask, response_start = trim_padding(input_ids, attention_mask, response_start)
            value = self.policy_and_value.value_head
            with self.autocast():
                values = token_scores(value.model, value.head, input_ids, attention_mask)
            return pad_columns(values[:, response_start - 1 : -1].float(), width)

    return MeasuredPPOTrainer, SeparateRolesTrainer


def build(configuration: str, model_dir: Path, lora_rank: int, compute_dtype: str):
    """(policy model or shared model, {role: model} for separate roles or None, reward head, value head)."""
    from alignment.models.heads import ScalarHead
    from alignment.models.loading import attach_adapter, load_base_model, use_adapter
    from alignment.names import POLICY, REFERENCE, REWARD, VALUE
    from alignment.recipes.schema import LoraSettings

    lora = LoraSettings(r=lora_rank, alpha=lora_rank, dropout=0.0)
    trainable = {POLICY: True, REFERENCE: False, REWARD: False, VALUE: True}
    quantized = is_quantized(configuration)

    def load() -> torch.nn.Module:
        model = load_base_model(model_config(model_dir, quantized, compute_dtype))
        copy_out_of_checkpoint_mapping(model, model_dir / "model.safetensors")
        return model

    if configuration.startswith("shared"):  # as PPOStage.build_roles puts the roles on its base
        model = load()
        for role, trains in trainable.items():
            model = attach_adapter(model, role, lora, trainable=trains)
        use_adapter(model, POLICY)
        roles = None
    else:
        roles = {}
        for role, trains in trainable.items():
            if quantized:
                roles[role] = attach_adapter(load(), role, lora, trainable=trains)
            else:
                roles[role] = load().requires_grad_(trains)
            roles[role].eval()
        model = roles[POLICY]
    for module in [model] + list((roles or {}).values()):
        for parameter in module.parameters():
            if parameter.requires_grad:  # float32 master weights, as the stage keeps them
                parameter.data = parameter.data.float()
    hidden_size = model.config.get_text_config().hidden_size
    reward_head = ScalarHead(hidden_size).requires_grad_(False)
    value_head = ScalarHead(hidden_size)
    torch.nn.init.normal_(reward_head.weight, std=0.02)
    return model, roles, reward_head, value_head


def prompts_dataset(count: int):
    """Chat prompts of varied length in the toy tokenizer's alphabet (the toy task families' wording)."""
    from datasets import Dataset

    words = ["add", "the", "numbers", "reverse", "copy", "sort", "these", "letters", "count", "how", "many"]
    rows = []
    for index in range(count):
        length = 3 + index % 7
        text = " ".join(words[(index * 7 + position * 3) % len(words)] for position in range(length))
        rows.append({"prompt": [{"role": "user", "content": f"{text} {index}"}]})
    return Dataset.from_list(rows)


def child(configuration: str, model_dir: Path, args: argparse.Namespace) -> dict:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    from alignment.models import precision
    from alignment.models.scoring import adapter_reward
    from alignment.names import REWARD
    from alignment.ppo.config import PPOConfig
    from alignment.tracking import Tracker

    measured_trainer, separate_trainer = trainer_classes()
    rss_after_imports = rss_mib()
    started = time.perf_counter()
    model, roles, reward_head, value_head = build(configuration, model_dir, args.lora_rank, args.compute_dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    reward_model = roles[REWARD] if roles else model
    reward = adapter_reward(reward_model, reward_head, tokenizer)
    config = PPOConfig(
        num_iterations=args.iterations, rollout_batch_size=args.rollout_batch_size,
        num_mini_batches=args.num_mini_batches, num_ppo_epochs=args.num_ppo_epochs,
        max_new_tokens=args.max_new_tokens, temperature=1.0, missing_eos_penalty=None,
        learning_rate=1e-5, save_steps=None, sample_table_steps=None, normalize_reward=False,
        merged_sampling=not configuration.endswith("adapter-sampling"),
        release_memory="step" if configuration.endswith("release-per-step") else "phase",
    )  # fmt: skip
    compute_dtype = precision.compute_dtype(model_config(model_dir, is_quantized(configuration), args.compute_dtype))
    with tempfile.TemporaryDirectory(prefix="bench_ppo_work_") as work_dir:
        common = dict(
            config=config, value_head=value_head, reward=reward, tokenizer=tokenizer,
            prompts=prompts_dataset(args.rollout_batch_size * args.iterations), work_dir=Path(work_dir),
            tracker=Tracker.disabled(), compute_dtype=compute_dtype,
        )  # fmt: skip
        trainer = separate_trainer(roles=roles, **common) if roles else measured_trainer(model=model, **common)
        result = {
            "configuration": configuration,
            "allocator": active_allocator(),
            "rss_after_imports_mib": rss_after_imports,
            "peak_rss_loading_mib": peak_rss_mib(),
            "rss_after_loading_mib": rss_mib(),
            "load_seconds": time.perf_counter() - started,
            "trainable_parameters": sum(p.numel() for p in trainer.policy_and_value.trainable_parameters().values()),
        }
        history = trainer.train()
    measured = history[1:] or history  # the first iteration pays one-time initialisation
    seconds = sum(row["time/rollout_s"] + row["time/update_s"] for row in measured)
    result |= {
        "episodes_per_second": args.rollout_batch_size * len(measured) / seconds,
        "rollout_seconds": sum(row["time/rollout_s"] for row in measured) / len(measured),
        "update_seconds": sum(row["time/update_s"] for row in measured) / len(measured),
        "response_tokens": sum(row["val/mean_response_length"] for row in measured) / len(measured),
    }
    for phase, peaks in trainer.phase_peaks.items():
        result[f"peak_{phase}_mib"] = max(peaks)
    phases = [result["peak_rss_loading_mib"]] + [result[f"peak_{phase}_mib"] for phase in PHASES]
    result["peak_rss_process_mib"] = max([peak_rss_mib(), *phases])
    return result


# Parent: build the model once, run each configuration in a fresh process, print the table


def run_child(configuration: str, args: argparse.Namespace, model_dir: Path) -> dict:
    command = [sys.executable, __file__, "--child", configuration, "--model-dir", str(model_dir)]
    passed_on = ("iterations", "rollout_batch_size", "num_mini_batches", "num_ppo_epochs", "max_new_tokens",
                 "lora_rank", "threads", "compute_dtype")  # fmt: skip
    for key in passed_on:
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    library = allocator_library(args.allocator)
    environment = preload_environment(library)
    if library is None:  # the C library's malloc, whatever this process was started with
        environment.pop("LD_PRELOAD", None)
    if args.live_rss:  # large buffers from mmap, returned when freed: RSS follows the live tensors
        environment |= {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    elif args.mmap_threshold is not None:  # only buffers from this size up come from mmap
        environment |= {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
    return child_result(command, environment, configuration)


def allocator_setting(args: argparse.Namespace, allocator: str) -> str:
    if allocator != SYSTEM:
        return f"{allocator} as malloc"
    if args.live_rss:
        return "glibc mmap threshold fixed at 64 KiB (live tensors)"
    if args.mmap_threshold is not None:
        return f"glibc mmap threshold fixed at {args.mmap_threshold:,} bytes"
    return "glibc defaults"


def table(results: list[dict]) -> str:
    ours = results[0]
    header = [
        "configuration", "episodes/s", "× ours", "rollout s", "update s", "peak RSS loading", "peak RSS rollout",
        "peak RSS update", "peak RSS process", "× ours",
    ]  # fmt: skip
    cuda = "peak_cuda_update_mib" in ours
    if cuda:
        header += ["peak CUDA rollout", "peak CUDA update"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for result in results:
        cells = [
            CONFIGURATIONS[result["configuration"]],
            f"{result['episodes_per_second']:.2f}",
            f"{result['episodes_per_second'] / ours['episodes_per_second']:.2f}",
            f"{result['rollout_seconds']:.2f}",
            f"{result['update_seconds']:.2f}",
            f"{result['peak_rss_loading_mib']:,.0f} MiB",
            f"{result['peak_rollout_mib']:,.0f} MiB",
            f"{result['peak_update_mib']:,.0f} MiB",
            f"{result['peak_rss_process_mib']:,.0f} MiB",
            f"{result['peak_rss_process_mib'] / ours['peak_rss_process_mib']:.2f}",
        ]
        if cuda:
            cells += [f"{result['peak_cuda_rollout_mib']:,.0f} MiB", f"{result['peak_cuda_update_mib']:,.0f} MiB"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--rollout-batch-size", type=int, default=64)
    parser.add_argument("--num-mini-batches", type=int, default=2)
    parser.add_argument("--num-ppo-epochs", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--compute-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the 4-bit rows' compute dtype (auto: bfloat16 where the hardware runs it natively); float32 rows stay float32",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads per child")
    parser.add_argument(
        "--allocator",
        default=os.environ.get(ALLOCATOR_VARIABLE, "auto"),
        help="the children's malloc, as ALIGNMENT_ALLOCATOR (auto, tcmalloc, mimalloc, jemalloc, system or a path)",
    )
    parser.add_argument(
        "--live-rss",
        action="store_true",
        help="fix glibc's mmap threshold so RSS follows the live tensors (slower; the default is a user's allocator)",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        help="fix glibc's mmap threshold at this many bytes (between glibc's defaults and --live-rss)",
    )
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--child", choices=list(CONFIGURATIONS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        torch.set_num_threads(args.threads)
        print(RESULT_PREFIX + json.dumps(child(args.child, args.model_dir, args)), flush=True)
        return

    if args.configurations[0] != "shared-4bit":
        args.configurations.insert(0, "shared-4bit")  # the reference every ratio is taken against
    from transformers import AutoTokenizer

    from alignment.plugins import model_folder

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as folder:
        model_dir = Path(folder)
        parameters = save_random_llama(model_dir, args.hidden_size, args.layers, args.vocab_size)
        AutoTokenizer.from_pretrained(str(model_folder("toy"))).save_pretrained(str(model_dir))
        print(
            f"Llama-shaped model, random weights: hidden {args.hidden_size}, {args.layers} layers, vocabulary "
            f"{args.vocab_size}, {parameters / 1e6:.1f} M parameters. {args.iterations} iterations of "
            f"{args.rollout_batch_size} prompts x {args.max_new_tokens} new tokens, {args.num_ppo_epochs} PPO epochs "
            f"x {args.num_mini_batches} mini-batches; LoRA rank {args.lora_rank}; 4-bit compute dtype "
            f"{args.compute_dtype}; {args.threads} threads",
            flush=True,
        )
        results = []
        for configuration in args.configurations:
            result = run_child(configuration, args, model_dir)
            print(
                f"  {configuration}: {result['episodes_per_second']:.2f} episodes/s, "
                f"peak {result['peak_rss_process_mib']:,.0f} MiB",
                flush=True,
            )
            results.append(result)
    print(
        f"\n{machine()}. Peaks are whole-process RSS, "
        f"{allocator_setting(args, results[0]['allocator'])} (imports alone: "
        f"{results[0]['rss_after_imports_mib']:,.0f} MiB); episodes/s over iterations 2-{args.iterations}; "
        f"mean response {results[0]['response_tokens']:.1f} tokens.\n"
    )
    print(table(results))
    print(f"\nTotal runtime: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
