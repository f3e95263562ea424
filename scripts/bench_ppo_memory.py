"""Peak memory of PPO's four roles on one shared 4-bit base, against separate models for each role.

PPO needs four networks at once: the policy (trained), the reference (frozen SFT policy), the reward
model and the value model (trained), the last two with a scalar head. This suite keeps them as four
LoRA adapters on one 4-bit base. This script measures what that saves, side by side, for a
Llama-shaped model with random weights (134 M parameters by default):

- shared 4-bit: one 4-bit base (loaded as the suite loads it, `load_base_model`) + four adapters
  (`attach_adapter`), roles switched with `use_adapter`;
- shared 4-bit, upcast: the same with the embeddings and the LM head in float32, as k-bit preparation
  leaves them (the suite keeps them in a 16-bit compute dtype since issue 16 item 4: run with
  `--compute-dtype bfloat16` to see the difference; in float32 the two rows are the same);
- shared 4-bit, GRPO: the same without the value role (GRPO and RLOO need none);
- four 4-bit models: the same base loaded four times, one adapter each;
- four bf16 models: four bf16 copies, one adapter each (quantization off, sharing off);
- four bf16 models, full fine-tuning: no adapters, policy and value train every weight (the classic
  four-model PPO set-up).

Each configuration runs in a fresh subprocess so that peaks do not mix. The child loads its models,
then runs one forward pass per role on a fixed batch and one backward pass for the trainable roles
(policy, value), twice: the first round pays one-time initialisation, the second is measured. It
reports peak RSS while loading (`ru_maxrss`), and the peak RSS of the measured round on its own
(the kernel's VmHWM, which `ru_maxrss` reads, reset with /proc/self/clear_refs before the round);
with a GPU, peak CUDA memory (`torch.cuda.max_memory_allocated`) as well. Children run with glibc's
mmap threshold fixed, so freed buffers go back to the OS and RSS follows the live tensors.

    python scripts/bench_ppo_memory.py             # about 2-3 minutes on 2 CPU cores
    python scripts/bench_ppo_memory.py --layers 4  # quicker, smaller model
    python scripts/bench_ppo_memory.py --compute-dtype bfloat16 --configurations shared-4bit shared-4bit-upcast
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIGURATIONS = {
    "shared-4bit": "one 4-bit base + 4 LoRA adapters",
    "shared-4bit-upcast": "the same, embeddings and LM head in float32 (k-bit preparation alone)",
    "shared-4bit-grpo": "GRPO/RLOO: one 4-bit base + 3 LoRA adapters (no value role)",
    "separate-4bit": "four 4-bit models, one LoRA adapter each",
    "separate-bf16": "four bf16 models, one LoRA adapter each",
    "separate-bf16-full": "four bf16 models, full fine-tuning (no LoRA)",
}
ROLES = ("policy", "reference", "reward", "value")
TRAINABLE_ROLES = {"policy", "value"}
SCALAR_HEAD_ROLES = {"reward", "value"}
RESULT_PREFIX = "RESULT "
MIB = 1024**2


# Child: one configuration in its own process


def status_mib(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS: resident now; VmHWM: peak resident), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def rss_mib() -> float:
    return status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS, so the next peak is the next phase's alone.

    ru_maxrss cannot be reset: it also keeps the peak recorded whenever a thread exits (loader and
    progress-bar threads do), so a phase's own peak is read from VmHWM after this reset.
    """
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def copy_out_of_checkpoint_mapping(model: torch.nn.Module, checkpoint_file: Path) -> None:
    """Copies weights that still point into the memory-mapped checkpoint into process memory.

    On a CPU, transformers keeps bf16 weights of a bf16 checkpoint as views of the mmap'd file: they
    are only resident once touched, and four copies share one page cache. On a GPU the weights are
    copied to device memory; this makes the CPU measurement account for them the same way.
    """
    mapped_ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(checkpoint_file)):
                start, end = line.split()[0].split("-")
                mapped_ranges.append((int(start, 16), int(end, 16)))
    if not mapped_ranges:
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type == "cpu" and any(start <= tensor.data_ptr() < end for start, end in mapped_ranges):
            tensor.data = tensor.data.clone()
    gc.collect()


@dataclass
class Role:
    name: str
    model: torch.nn.Module  # a PeftModel (adapters) or a plain causal LM (full fine-tuning)
    adapter: str | None  # the adapter to activate before the pass, when several share the model
    head: torch.nn.Linear | None  # scalar head on the last hidden state (reward, value)


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack without the LM head (its output is after the final norm)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal_lm.model


def model_config(model_dir: Path, quantized: bool, compute_dtype: str):
    from alignment.recipes.schema import ModelConfig, QuantizationConfig

    if quantized:  # the suite's defaults (NF4, double quantization), the checkpoint's bf16 when computing in it
        dtype = "bfloat16" if compute_dtype == "bfloat16" else "auto"
        return ModelConfig(str(model_dir), dtype=dtype, quantization=QuantizationConfig(compute_dtype=compute_dtype))
    return ModelConfig(name_or_path=str(model_dir), dtype="bfloat16", quantization=QuantizationConfig(mode="none"))


def build_roles(configuration: str, model_dir: Path, lora_rank: int, compute_dtype: str) -> list[Role]:
    from alignment.models import loading
    from alignment.models.loading import attach_adapter, load_base_model
    from alignment.recipes.schema import LoraSettings

    lora = LoraSettings(r=lora_rank, alpha=2 * lora_rank, dropout=0.0)
    checkpoint_file = model_dir / "model.safetensors"
    quantized = "4bit" in configuration
    if configuration.endswith("-upcast"):  # as before issue 16 item 4: what k-bit preparation alone leaves
        loading.keep_frozen_embeddings_in_compute_dtype = lambda model, config: None

    def load() -> torch.nn.Module:
        model = load_base_model(model_config(model_dir, quantized, compute_dtype))
        copy_out_of_checkpoint_mapping(model, checkpoint_file)
        return model

    def scalar_head(model: torch.nn.Module, trainable: bool) -> torch.nn.Linear:
        head = torch.nn.Linear(model.config.hidden_size, 1, device=model.device)
        return head.requires_grad_(trainable)

    roles = []
    if configuration.startswith("shared-4bit"):
        names = [name for name in ROLES if name != "value" or not configuration.endswith("-grpo")]
        model = load()
        for name in names:
            model = attach_adapter(model, name, lora, trainable=name in TRAINABLE_ROLES)
        for name in names:
            head = scalar_head(model, name in TRAINABLE_ROLES) if name in SCALAR_HEAD_ROLES else None
            roles.append(Role(name, model, name, head))
    elif configuration in ("separate-4bit", "separate-bf16"):
        for name in ROLES:
            model = attach_adapter(load(), name, lora, trainable=name in TRAINABLE_ROLES)
            head = scalar_head(model, name in TRAINABLE_ROLES) if name in SCALAR_HEAD_ROLES else None
            roles.append(Role(name, model, None, head))
    elif configuration == "separate-bf16-full":
        for name in ROLES:
            model = load().requires_grad_(name in TRAINABLE_ROLES)
            head = scalar_head(model, name in TRAINABLE_ROLES) if name in SCALAR_HEAD_ROLES else None
            roles.append(Role(name, model, None, head))
    else:
        raise ValueError(f"unknown configuration {configuration!r}; expected one of {list(CONFIGURATIONS)}")
    for role in roles:
        role.model.eval()  # dropout off, as for every PPO forward pass that yields log-probs or values
    return roles


def held_weights(roles: list[Role]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(parameters, other weight tensors: buffers and bitsandbytes quantization state), each tensor once."""
    seen: set[int] = set()
    parameters: list[torch.Tensor] = []
    others: list[torch.Tensor] = []

    def add(tensor: torch.Tensor | None, into: list[torch.Tensor]) -> None:
        if tensor is not None and id(tensor) not in seen:
            seen.add(id(tensor))
            into.append(tensor)

    for role in roles:
        modules = [role.model] + ([role.head] if role.head is not None else [])
        for module in modules:
            for buffer in module.buffers():
                add(buffer, others)
            for parameter in module.parameters():
                add(parameter, parameters)
                quant_state = getattr(parameter, "quant_state", None)
                if quant_state is not None:
                    for state in (quant_state, getattr(quant_state, "state2", None)):
                        if state is not None:
                            add(state.absmax, others)
                            add(state.code, others)
                    add(getattr(quant_state, "offset", None), others)
    return parameters, others


def logical_numel(tensor: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight holds two per byte."""
    quant_state = getattr(tensor, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else tensor.numel()


def run_role_pass(role: Role, input_ids: torch.Tensor, response_start: int, temperature: float) -> None:
    """One forward pass of a role, and a backward pass when it trains, as in a PPO step."""
    from alignment.models.loading import use_adapter
    from alignment.ppo.core import response_logprobs

    if role.adapter is not None:
        use_adapter(role.model, role.adapter)
    trainable = role.name in TRAINABLE_ROLES
    with torch.set_grad_enabled(trainable):
        if role.head is None:  # policy and reference: token log-probs of the response
            logits = role.model(input_ids=input_ids).logits
            loss = -response_logprobs(logits, input_ids, response_start, temperature).mean()
        else:  # reward: one score at the last token; value: one value per response token
            hidden = backbone(role.model)(input_ids=input_ids).last_hidden_state
            outputs = role.head(hidden.float()).squeeze(-1)
            scored = outputs[:, -1] if role.name == "reward" else outputs[:, response_start - 1 : -1]
            loss = scored.pow(2).mean()
    if trainable:
        loss.backward()


def run_role_passes(
    roles: list[Role], input_ids: torch.Tensor, response_start: int, temperature: float, dtype: torch.dtype
) -> None:
    with torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):  # as PPO's passes
        for role in roles:
            run_role_pass(role, input_ids, response_start, temperature)


def child(
    configuration: str, model_dir: Path, batch_size: int, sequence_length: int, lora_rank: int, compute_dtype: str
) -> dict:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    import alignment.models.loading  # noqa: F401  (the libraries' own memory is the baseline)
    import alignment.ppo.core  # noqa: F401
    from alignment.models import precision

    cuda = torch.cuda.is_available()
    rss_after_imports = rss_mib()
    started = time.perf_counter()
    roles = build_roles(configuration, model_dir, lora_rank, compute_dtype)
    dtype = precision.compute_dtype(model_config(model_dir, "4bit" in configuration, compute_dtype))
    load_seconds = time.perf_counter() - started
    parameters, other_weights = held_weights(roles)
    result = {
        "configuration": configuration,
        "rss_after_imports_mib": rss_after_imports,
        "parameters": sum(logical_numel(parameter) for parameter in parameters),
        "trainable_parameters": sum(parameter.numel() for parameter in parameters if parameter.requires_grad),
        "weights_mib": sum(tensor.numel() * tensor.element_size() for tensor in parameters + other_weights) / MIB,
        "peak_rss_loading_mib": peak_rss_mib(),
        "rss_after_loading_mib": rss_mib(),
        "load_seconds": load_seconds,
    }
    if cuda:
        result["cuda_allocated_after_loading_mib"] = torch.cuda.memory_allocated() / MIB
        result["cuda_peak_loading_mib"] = torch.cuda.max_memory_allocated() / MIB
        torch.cuda.reset_peak_memory_stats()

    generator = torch.Generator().manual_seed(0)
    vocab_size = roles[0].model.config.vocab_size
    input_ids = torch.randint(0, vocab_size, (batch_size, sequence_length), generator=generator)
    input_ids = input_ids.to(roles[0].model.device)
    # A first, unmeasured round pays the one-time costs (kernel and allocator initialisation) that every
    # configuration pays alike; the measured round is a steady-state PPO step, gradients freed before it.
    run_role_passes(roles, input_ids, response_start=sequence_length // 2, temperature=0.7, dtype=dtype)
    for role in roles:
        role.model.zero_grad(set_to_none=True)
        if role.head is not None:
            role.head.zero_grad(set_to_none=True)
    gc.collect()
    result["rss_before_passes_mib"] = rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result["peak_reset"] = reset_peak_rss()
    started = time.perf_counter()
    run_role_passes(roles, input_ids, response_start=sequence_length // 2, temperature=0.7, dtype=dtype)
    result["passes_seconds"] = time.perf_counter() - started
    result["peak_rss_passes_mib"] = status_mib("VmHWM") if result["peak_reset"] else peak_rss_mib()
    result["peak_rss_process_mib"] = peak_rss_mib()
    if cuda:
        torch.cuda.synchronize()
        result["cuda_peak_passes_mib"] = torch.cuda.max_memory_allocated() / MIB
    return result


# Parent: build the model once, run each configuration in a fresh process, print the table


def save_random_llama(model_dir: Path, hidden_size: int, layers: int, vocab_size: int) -> int:
    """A Llama-shaped model with random weights, saved in bf16 like the checkpoints on the hub."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=int(hidden_size * 8 / 3 // 256 * 256) or 256,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(model_dir))
    return sum(parameter.numel() for parameter in model.parameters())


def machine() -> str:
    """The machine a benchmark ran on, in one line (both PPO benchmarks print it)."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {device}; "
        f"torch {torch.__version__}"
    )


def child_result(command: list[str], environment: dict[str, str], configuration: str) -> dict:
    """Runs one configuration's child process and reads back the JSON line it prints."""
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
        raise RuntimeError(f"configuration {configuration} failed (exit code {completed.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def run_child(configuration: str, args: argparse.Namespace, model_dir: Path) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        configuration,
        "--model-dir",
        str(model_dir),
        "--batch-size",
        str(args.batch_size),
        "--sequence-length",
        str(args.sequence_length),
        "--lora-rank",
        str(args.lora_rank),
        "--threads",
        str(args.threads),
        "--compute-dtype",
        args.compute_dtype,
    ]
    # Large buffers always come from mmap and go back to the OS when freed, so that RSS follows the live
    # tensors rather than what glibc's dynamic thresholds happen to keep cached from earlier phases.
    environment = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    return child_result(command, environment, configuration)


def millions(count: int) -> str:
    return f"{count / 1e6:.1f} M" if count >= 50_000 else f"{count / 1e3:.1f} K"


def mib(value: float) -> str:
    return f"{value:,.0f} MiB"


def table(results: list[dict], base_parameters: int) -> str:
    shared = results[0]
    shared_passes = shared["peak_rss_passes_mib"] - shared["rss_after_imports_mib"]
    header = [
        "configuration",
        "parameters held",
        "weights memory",
        "RSS after loading",
        "peak RSS, role passes",
        "ratio vs shared 4-bit",
        "peak RSS while loading",
    ]
    cuda = "cuda_peak_passes_mib" in shared
    if cuda:
        header += ["peak CUDA, role passes", "CUDA ratio vs shared 4-bit"]
    rows = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for result in results:
        baseline = result["rss_after_imports_mib"]
        passes = result["peak_rss_passes_mib"] - baseline
        copies = 1 if result["configuration"].startswith("shared") else 4
        adapters = result["parameters"] - base_parameters * copies
        held = f"{copies} × {millions(base_parameters)}"
        if adapters > 0:
            held += f" + {millions(adapters)}"
        cells = [
            CONFIGURATIONS[result["configuration"]],
            held,
            mib(result["weights_mib"]),
            mib(result["rss_after_loading_mib"] - baseline),
            mib(passes),
            f"{passes / shared_passes:.2f}",
            mib(result["peak_rss_loading_mib"] - baseline),
        ]
        if cuda:
            cells += [
                mib(result["cuda_peak_passes_mib"]),
                f"{result['cuda_peak_passes_mib'] / shared['cuda_peak_passes_mib']:.2f}",
            ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per child; memory does not depend on it, and on a shared machine one thread avoids "
        "the spin-waiting of oversubscribed thread pools",
    )
    parser.add_argument(
        "--compute-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the 4-bit rows' compute dtype (auto: bfloat16 where native); with bfloat16 the checkpoint loads "
        "in bfloat16 and the passes run under autocast, as a GPU recipe does",
    )
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--child", choices=list(CONFIGURATIONS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        torch.set_num_threads(args.threads)
        result = child(
            args.child, args.model_dir, args.batch_size, args.sequence_length, args.lora_rank, args.compute_dtype
        )
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return

    if args.configurations[0] != "shared-4bit":
        args.configurations.insert(0, "shared-4bit")  # the reference every ratio is taken against
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ppo_memory_") as folder:
        model_dir = Path(folder)
        base_parameters = save_random_llama(model_dir, args.hidden_size, args.layers, args.vocab_size)
        print(
            f"Llama-shaped model: hidden {args.hidden_size}, {args.layers} layers, vocab {args.vocab_size}, "
            f"{millions(base_parameters)} parameters; batch {args.batch_size} x {args.sequence_length} tokens, "
            f"LoRA rank {args.lora_rank} on all linear layers",
            flush=True,
        )
        results = []
        for configuration in args.configurations:
            result = run_child(configuration, args, model_dir)
            print(
                f"  {configuration}: loaded in {result['load_seconds']:.0f} s, "
                f"passes in {result['passes_seconds']:.0f} s",
                flush=True,
            )
            results.append(result)

    print(
        f"\n{machine()}. Memory columns are above the {results[0]['rss_after_imports_mib']:,.0f} MiB "
        "the process holds after importing torch, transformers, peft and bitsandbytes."
    )
    if not all(result["peak_reset"] for result in results):
        print("(/proc/self/clear_refs was not writable: 'peak RSS, role passes' includes loading.)")
    print()
    print(table(results, base_parameters))
    print(f"\nTotal runtime: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
