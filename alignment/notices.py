"""Third-party notices the `alignment` command drops: each is known to be harmless here, asks nothing of the
user and reads like a problem. Anything else a library logs or warns still shows."""

from __future__ import annotations

import logging
import warnings

# bitsandbytes, imported on a CPU with AVX512-BF16, tries to fetch a bfloat16 4-bit matrix-vector kernel from
# the hub's kernels-community and, without the optional `kernels` package, logs a warning that reads like a
# failure; its built-in kernel then runs, as on every other CPU (`alignment env` says which one runs).
HUB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
# peft 0.21 calls transformers 5's deprecated `is_gradient_checkpointing` on every adapter load: a
# FutureWarning about peft's code, not the user's.
PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"


def quiet_known_notices() -> None:
    """Installs the filters; call it before anything imports bitsandbytes."""
    logging.getLogger(HUB_KERNEL_LOGGER).addFilter(lambda record: not record.getMessage().startswith(HUB_KERNEL_NOTICE))
    warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
