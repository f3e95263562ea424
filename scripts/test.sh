#!/usr/bin/env bash
# Sets up and runs the whole test suite, slow tests included (the real files under ../shared are used
# when present; tests that need them skip with the reason otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_SILENT=true TOKENIZERS_PARALLELISM=false
if [[ $# -gt 0 ]]; then  # a selection of tests: as asked, in one process
  exec python3 -m pytest -q -rs --durations=15 "$@"
fi
# The quick tests in two processes of one thread each (both cores stay busy through imports, data
# preparation and small models, where one process leaves a core idle), each test file in one process;
# then the slow tests (the toy recipes' learning thresholds, as measured) one after another on every core.
status=0
OMP_NUM_THREADS=1 python3 -m pytest -q -rs --durations=10 -m "not slow" -n 2 --dist loadfile || status=$?
python3 -m pytest -q -rs --durations=10 -m slow || status=$?
exit $status
