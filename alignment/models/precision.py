"""Which floating-point type a run computes in, chosen from the hardware it runs on.

bfloat16 halves memory traffic and is what GPU recipes train in, but only where it runs natively: a
CPU without AVX512-BF16 or AMX emulates it more than 10 times slower than float32 (the embedded
reward recipe's stage took 2.3 minutes with native bfloat16 and was still running after 39 without). `auto`
in a recipe therefore means bfloat16 on a CUDA device that supports it or on a CPU with those
instructions, float32 everywhere else; a recipe that names a dtype gets that dtype.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from alignment.recipes.schema import ModelConfig

CPU_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo's names for the instructions


@functools.cache
def cpu_runs_bfloat16_natively() -> bool:
    """Whether this CPU has AVX512-BF16 or AMX (PyTorch's own detection, the kernel's flags as fallback)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(probe) for probe in probes):
        return any(probe() for probe in probes)
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
    return any(flag in flags for flag in CPU_BFLOAT16_FLAGS)


def cpu_4bit_kernel() -> str:
    """Which bfloat16 4-bit matrix-vector kernel bitsandbytes runs on this CPU, for `alignment env`."""
    if not cpu_runs_bfloat16_natively():
        return "bitsandbytes built-in"
    from bitsandbytes.backends.cpu import ops

    if getattr(ops, "gemm_4bit_forward_kernel", None) is not None:
        return "kernels-community (hub)"
    return "bitsandbytes built-in (kernels-community's needs `pip install kernels` and hub access)"


def native_bfloat16() -> bool:
    """Whether the device a run trains on (the GPU if there is one, else the CPU) computes bfloat16 natively."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_runs_bfloat16_natively()


def torch_dtype(name: str) -> torch.dtype:
    """A recipe's dtype name as a torch dtype; `auto` is bfloat16 where it is native, else float32."""
    if name == "auto":
        return torch.bfloat16 if native_bfloat16() else torch.float32
    return getattr(torch, name)


def compute_dtype(config: ModelConfig) -> torch.dtype:
    """The dtype the forward passes compute in: the 4-bit/8-bit compute dtype, or the weights' dtype."""
    quantized = config.quantization.mode != "none"
    return torch_dtype(config.quantization.compute_dtype if quantized else config.dtype)


def trainer_precision_args(config: ModelConfig) -> dict[str, Any]:
    """transformers' mixed-precision switches for the run's compute dtype (autocast; weights stay float32).

    transformers accepts `bf16` without a GPU only together with `use_cpu`.
    """
    bf16 = compute_dtype(config) == torch.bfloat16
    return {"bf16": bf16} | ({"use_cpu": True} if bf16 and not torch.cuda.is_available() else {})
