#!/usr/bin/env bash
# The GPU check, one command from the repository root of a GPU machine with no network:
#   bash bench/gpu/check.sh [--cpu] [--budget SECONDS] [--only STEP ...]
# Installs .gpu-kit/ (from `make gpu-kit`) into a temporary folder, runs `pytest -m gpu`, two
# `ftlaunch submit` jobs and the GPU benchmark, prints one table and writes a JSON to $OUT
# (or bench/results/). Without CUDA the GPU parts are skipped. Exit 1 when a step failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
exec "$PYTHON" -m bench.gpu.check "$@"
