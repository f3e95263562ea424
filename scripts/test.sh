#!/usr/bin/env bash
# Sets up and runs the whole test suite, slow tests included (the real files under ../shared are used
# when present; tests that need them skip with the reason otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
# One pytest worker per core, each torch on one thread: the suite's models are small, so separate tests
# side by side use the cores better than two threads on one test. A test file stays on one worker (its
# trained fixtures run once). TEST_WORKERS=0 runs everything in this process.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python3 -m pytest -q -rs --durations=15 -n "${TEST_WORKERS:-auto}" --dist loadfile "$@"
