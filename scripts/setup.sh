#!/usr/bin/env bash
# Installs alignment and its test tools. torch comes first, as the CPU build 2.13.0 unless a torch is
# already installed (a GPU user installs their CUDA build of torch before running this).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
  "$PYTHON" -m pip install -q "torch==2.13.0"
fi
"$PYTHON" -m pip install -q -e ".[dev]"
"$PYTHON" -c 'from alignment.notices import quiet_known_notices; quiet_known_notices()
import alignment, torch, trl, peft, bitsandbytes, datasets, wandb
print(f"alignment {alignment.__version__} with torch {torch.__version__}, trl {trl.__version__}, peft {peft.__version__}")'
"$PYTHON" -c 'import sys
from alignment.allocator import INSTALL_HINT, allocator_library
if sys.platform.startswith("linux") and allocator_library("auto") is None:
    print(f"note: no caching malloc (tcmalloc or mimalloc) here; CPU training peaks higher on the system malloc: {INSTALL_HINT}")'
