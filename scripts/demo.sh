#!/usr/bin/env bash
# Sets up and runs the demo: instruction tuning of the embedded tiny model on the synthetic task suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
alignment run recipes/toy/sft.yaml "$@"
