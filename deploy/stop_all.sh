#!/usr/bin/env bash
# stop_all.sh — stop every process this deploy started, by its PID file: SuperNodes first
# (SIGTERM deactivates a node cleanly at once), then the SuperLink. Their descendants
# (flower-superexec, and the flwr-clientapp / flwr-serverapp processes it spawns) are found by
# parent PID before anything is signalled, and stopped too. A PID file whose process is gone,
# or whose PID now belongs to something else, is only removed.
set -uo pipefail
source "$(dirname "$0")/common.sh"

stop() {  # stop PID and its descendants: TERM, wait up to 10 s, then KILL what is left
  local pid=$1 all p alive
  all="$pid $(descendants "$pid")"
  kill -TERM $all 2>/dev/null
  for _ in $(seq 20); do
    alive=""
    for p in $all; do running "$p" && alive+=" $p"; done
    [[ -z "$alive" ]] && return 0
    sleep 0.5
  done
  echo "still running after 10 s, SIGKILL:$alive" >&2
  kill -KILL $alive 2>/dev/null || true
}

shopt -s nullglob
for f in "$STATE"/pids/supernode_*.pid "$STATE"/pids/superlink.pid; do
  pid=$(cat "$f")
  if running "$pid" && grep -qa "flower-super" "/proc/$pid/cmdline" 2>/dev/null; then
    stop "$pid"; echo "stopped $(basename "$f" .pid) (PID $pid)"
  fi
  rm -f "$f"
done
