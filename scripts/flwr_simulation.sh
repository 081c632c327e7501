#!/usr/bin/env bash
# `flwr run .` in Flower's simulation engine, using the venv the project already installed.
#
# `flwr run` starts a local SuperLink that installs the app's dependencies into a fresh env
# with `uv sync` (torch and all, several GB). This script starts that local SuperLink itself,
# on the ports `flwr run` looks for, with runtime dependency installation disabled, runs the
# app, and stops the SuperLink (and its children) by PID when done.
#
#   scripts/flwr_simulation.sh 4 "lte.heads=4 train.steps=100 run.out='runs/flwr'"
#       $1: number of virtual nodes (= lte.heads), $2: the --run-config string
set -euo pipefail
cd "$(dirname "$0")/.."
nodes=${1:-4}
run_config=${2:-}
export PATH="$PWD/.venv/bin:$PATH"
own_home=""
[[ -n "${FLWR_HOME:-}" ]] || { FLWR_HOME=$(mktemp -d); own_home=$FLWR_HOME; }  # ours: removed at exit
export FLWR_HOME
http_port=${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}
control_port=${FLWR_LOCAL_CONTROL_API_PORT:-39093}
mkdir -p "$FLWR_HOME/local-superlink"

flower-superlink --insecure --simulation --isolation subprocess --disable-runtime-dependency-installation \
  --control-api-address "127.0.0.1:$control_port" --host 127.0.0.1 --port "$http_port" \
  --log-file "$FLWR_HOME/local-superlink/superlink.log" &
superlink=$!

source deploy/proc.sh   # descendants
stop() {
  # the SuperLink's process tree (superexec, flwr-simulation, Ray) first, then the SuperLink
  local pids
  pids="$(descendants "$superlink") $superlink"
  kill $pids 2>/dev/null || true
  wait "$superlink" 2>/dev/null || true
  sleep 1
  kill -9 $pids 2>/dev/null || true
  [[ -z "$own_home" ]] || rm -rf "$own_home"
}
trap stop EXIT

for _ in $(seq 100); do  # wait for its health endpoint
  curl -fs "http://127.0.0.1:$http_port/health" >/dev/null 2>&1 && break
  sleep 0.2
done

flwr run . --stream --federation-config "num-supernodes=$nodes client-resources-num-cpus=1" \
  ${run_config:+--run-config "$run_config"}
