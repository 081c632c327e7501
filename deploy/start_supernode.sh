#!/usr/bin/env bash
# start_supernode.sh ID NUM_PARTITIONS [DATA_ROOT] — start one authenticated SuperNode in the
# background: key $KEYS/node_ID, Runtime API port 9094+ID (each node on a machine needs its
# own), node_config partition-id=ID num-partitions=N data-root=... state-dir=$STATE/node_ID.
# PID in $STATE/pids/supernode_ID.pid, log in $STATE/logs/supernode_ID.log.
set -euo pipefail
source "$(dirname "$0")/common.sh"
ID="${1:?usage: start_supernode.sh ID NUM_PARTITIONS [DATA_ROOT]}"
N="${2:?usage: start_supernode.sh ID NUM_PARTITIONS [DATA_ROOT]}"
DATA_ROOT="${3:-$REPO_DIR/data}"
[[ "$ID" =~ ^[0-9]+$ && "$N" =~ ^[1-9][0-9]*$ && "$ID" -lt "$N" ]] || die "need 0 <= ID < NUM_PARTITIONS, got ID=$ID N=$N"
KEY="$KEYS/node_$ID"
[[ -f "$KEY" ]] || die "missing key $KEY (run make_node_keys.sh $KEYS N)"
[[ -f "$CERTS/ca.crt" ]] || die "missing $CERTS/ca.crt"
PORT="${NODE_PORT:-$((9094 + ID))}"
PIDF="$STATE/pids/supernode_$ID.pid"
if [[ -f "$PIDF" ]] && kill -0 "$(cat "$PIDF")" 2>/dev/null; then die "supernode $ID already running (PID $(cat "$PIDF"))"; fi
mkdir -p "$STATE/node_$ID"

"$VENV_BIN/flower-supernode" \
  --superlink "$SUPERLINK_HOST:$SUPERLINK_PORT" --root-certificates "$CERTS/ca.crt" \
  --auth-supernode-private-key "$KEY" --port "$PORT" \
  --node-config "partition-id=$ID num-partitions=$N data-root=\"$DATA_ROOT\" state-dir=\"$STATE/node_$ID\"" \
  > "$STATE/logs/supernode_$ID.log" 2>&1 &
echo $! > "$PIDF"
# An unregistered key makes the node exit after ~3 s (code 305) without retrying: check then.
wait_up "$(cat "$PIDF")" 127.0.0.1 "$PORT" "$STATE/logs/supernode_$ID.log"
sleep "${START_WAIT:-5}"
kill -0 "$(cat "$PIDF")" 2>/dev/null || { tail -20 "$STATE/logs/supernode_$ID.log" >&2; die "supernode $ID exited at start (unregistered key? wrong CA?)"; }
echo "supernode $ID PID $(cat "$PIDF") port $PORT (log $STATE/logs/supernode_$ID.log)"
