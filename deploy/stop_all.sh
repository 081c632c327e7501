#!/usr/bin/env bash
# stop_all.sh — stop every process this deploy started, by its PID file: SuperNodes first
# (SIGTERM deactivates a node cleanly at once), then the SuperLink. Child processes (the
# flwr-clientapp / flwr-serverapp each spawns) are found by parent PID and stopped too.
set -uo pipefail
source "$(dirname "$0")/common.sh"

stop() {  # stop PID and its descendants: TERM, wait up to 10 s, then KILL
  local pid=$1 kids
  kids=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
  kill -TERM "$pid" $kids 2>/dev/null || return 0
  for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$pid" $kids 2>/dev/null || true
}

shopt -s nullglob
for f in "$STATE"/pids/supernode_*.pid "$STATE"/pids/superlink.pid; do
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then stop "$pid"; echo "stopped $(basename "$f" .pid) (PID $pid)"; fi
  rm -f "$f"
done
