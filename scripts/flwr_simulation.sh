#!/usr/bin/env bash
# `flwr run .` in Flower's simulation engine, using the venv the project already installed.
#
# `flwr run` would start a shared local SuperLink that installs the app's dependencies into a
# fresh env with `uv sync` (torch and all, several GB) and keeps running afterwards. The launcher
# (strategies/launcher.py, the one `lte-fed` uses) starts a private SuperLink on a free port
# instead, with dependency installation disabled, runs the app, and stops everything it started.
#
#   scripts/flwr_simulation.sh 4 "lte.heads=4 train.steps=100 run.out='runs/flwr'"
#       $1: number of virtual nodes (= lte.heads), $2: the --run-config string
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${1:-4}
run_config=${2:-}
exec "${VENV_BIN:-.venv/bin}/python" -m strategies.launcher --nodes "$nodes" ${run_config:+--run-config "$run_config"}
