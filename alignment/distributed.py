"""The process state of a run: one process, or several under `accelerate launch` / `torchrun`.

accelerate joins CPU processes (gloo) only when asked for the CPU, so on a machine without CUDA
the state is created with `cpu=True`: `accelerate launch --multi_gpu --num_processes N -m alignment
run RECIPE` (or torchrun) then runs N CPU processes, as on a GPU machine it runs one per GPU.
"""

from __future__ import annotations

import os

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env


def process_state() -> PartialState:
    """The shared accelerate state, created on first use (every later call returns the same one).

    Without CUDA, `ACCELERATE_USE_CPU` is set for the whole process: the HF Trainer rebuilds the
    state from it, and without it would train each CPU process alone on all the data.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
