#!/usr/bin/env bash
# start_supernode.sh ID NUM_PARTITIONS [DATA_ROOT] — start one authenticated SuperNode in the
# background: key $KEYS/node_ID, Runtime API port 9094+ID (each node on a machine needs its
# own), node_config partition-id=ID num-partitions=N state-dir=$STATE/node_ID (the head and its
# AdamW state, so a restarted node continues), with DATA_ROOT data-root=DATA_ROOT, and with
# NODE_CAPACITY (e.g. "heads=4 rank=16", "memory-gb=24") what the node can carry; with
# NODE_THREADS the torch threads its ClientApp uses (several nodes on one machine split its cores).
# PID in $STATE/pids/supernode_ID.pid, log in $STATE/logs/supernode_ID.log.
set -euo pipefail
source "$(dirname "$0")/common.sh"
ID="${1:?usage: start_supernode.sh ID NUM_PARTITIONS [DATA_ROOT]}"
N="${2:?usage: start_supernode.sh ID NUM_PARTITIONS [DATA_ROOT]}"
DATA_ROOT="${3:-}"   # optional: this device's data folder (overrides the run's data.root here)
[[ "$ID" =~ ^[0-9]+$ && "$N" =~ ^[1-9][0-9]*$ && "$ID" -lt "$N" ]] || die "need 0 <= ID < NUM_PARTITIONS, got ID=$ID N=$N"
KEY="$KEYS/node_$ID"
[[ -f "$KEY" ]] || die "missing key $KEY (run make_node_keys.sh $KEYS N)"
[[ -f "$CERTS/ca.crt" ]] || die "missing $CERTS/ca.crt"
PORT="${NODE_PORT:-$((9094 + ID))}"
PIDF="$STATE/pids/supernode_$ID.pid"
if [[ -f "$PIDF" ]] && running "$(cat "$PIDF")"; then die "supernode $ID already running (PID $(cat "$PIDF"))"; fi
free_port 127.0.0.1 "$PORT" "SuperNode's Runtime API" NODE_PORT
mkdir -p "$STATE/node_$ID"
NODE_CONFIG="partition-id=$ID num-partitions=$N state-dir=\"$STATE/node_$ID\""
if [[ -n "$DATA_ROOT" ]]; then   # a folder, or a text file (data.name=text)
  [[ -e "$DATA_ROOT" ]] || die "DATA_ROOT $DATA_ROOT does not exist"
  NODE_CONFIG+=" data-root=\"$(realpath "$DATA_ROOT")\""
fi
# NODE_CAPACITY (optional): what this device can carry, e.g. "heads=4 rank=16" or "memory-gb=24"
[[ -z "${NODE_CAPACITY:-}" ]] || NODE_CONFIG+=" $NODE_CAPACITY"
# NODE_THREADS (optional): torch threads per message; split the cores when several nodes share a machine
if [[ -n "${NODE_THREADS:-}" ]]; then
  [[ "$NODE_THREADS" =~ ^[0-9]+$ ]] || die "NODE_THREADS must be a whole number, got '$NODE_THREADS'"
  NODE_CONFIG+=" threads=$NODE_THREADS"
fi

LOG="$STATE/logs/supernode_$ID.log"
SKIP=0; [[ -f "$LOG" ]] && SKIP=$(wc -l < "$LOG")

# Started directly (no wrapper shell): $! is the SuperNode's own PID.
"$VENV_BIN/flower-supernode" \
  --superlink "$SUPERLINK_HOST:$SUPERLINK_PORT" --root-certificates "$CERTS/ca.crt" \
  --auth-supernode-private-key "$KEY" --port "$PORT" --node-config "$NODE_CONFIG" \
  >> "$LOG" 2>&1 &   # appended: a restart keeps the history
PID=$!
echo "$PID" > "$PIDF"
wait_up "$PID" 127.0.0.1 "$PORT" "$LOG"
# Activated: the node logs its "SuperNode ID". An unregistered key (or a wrong CA) makes it
# exit within seconds instead ("Exit Code: 305 ... Failed to activate SuperNode"), no retry.
for _ in $(seq $((2 * ${START_WAIT:-60}))); do
  running "$PID" || { tail -n +$((SKIP + 1)) "$LOG" | tail -20 >&2; die "supernode $ID exited at start (unregistered key? wrong CA? or, just after this node was killed, the SuperLink still counts it online until its heartbeat runs out, about a minute: start it again then)"; }
  tail -n +$((SKIP + 1)) "$LOG" | grep -q "SuperNode ID:" && { echo "supernode $ID PID $PID port $PORT (log $LOG)"; exit 0; }
  sleep 0.5
done
die "supernode $ID (PID $PID, still running) not connected after ${START_WAIT:-60} s: SuperLink reachable? (log $LOG; stop it with stop_all.sh)"
