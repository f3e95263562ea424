#!/usr/bin/env bash
# Sets up and runs the whole test suite, slow tests included (the real files under ../shared are used
# when present; tests that need them skip with the reason otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
python3 -m pytest -q -rs --durations=15 "$@"
