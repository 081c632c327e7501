#!/usr/bin/env bash
# start_superlink.sh — start flower-superlink with TLS and SuperNode authentication, in the
# background; PID in $STATE/pids/superlink.pid, log in $STATE/logs/superlink.log. Also writes
# the `[superlink.$FEDERATION]` connection into $FLWR_HOME/config.toml for `flwr run/supernode`.
# Needs $CERTS/{ca.crt,server.crt,server.key} (make_certs.sh). SUPERLINK_BIND=0.0.0.0 to serve
# other machines (add their address to the cert with SERVER_SAN).
set -euo pipefail
source "$(dirname "$0")/common.sh"
for f in ca.crt server.crt server.key; do [[ -f "$CERTS/$f" ]] || die "missing $CERTS/$f (run make_certs.sh $CERTS)"; done
PIDF="$STATE/pids/superlink.pid"
if [[ -f "$PIDF" ]] && running "$(cat "$PIDF")"; then die "superlink already running (PID $(cat "$PIDF"))"; fi
free_port "$SUPERLINK_HOST" "$SUPERLINK_PORT" "SuperLink" SUPERLINK_PORT

mkdir -p "$FLWR_HOME"
CA_ABS="$(cd "$CERTS" && pwd)/ca.crt"   # flwr wants an absolute path here
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "$FEDERATION"

[superlink.$FEDERATION]
address = "$SUPERLINK_HOST:$SUPERLINK_PORT"
root-certificates = "$CA_ABS"
TOML

# --disable-runtime-dependency-installation: nodes run the app with the venv's packages, no `uv sync`.
# The binary is started directly (no wrapper shell), so $! is the superlink's own PID.
"$VENV_BIN/flower-superlink" \
  --ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.crt" --ssl-keyfile "$CERTS/server.key" \
  --enable-supernode-auth --disable-runtime-dependency-installation \
  --host "${SUPERLINK_BIND:-$SUPERLINK_HOST}" --port "$SUPERLINK_PORT" \
  --database "$STATE/superlink.db" \
  > "$STATE/logs/superlink.log" 2>&1 &
echo $! > "$PIDF"
wait_up "$(cat "$PIDF")" "$SUPERLINK_HOST" "$SUPERLINK_PORT" "$STATE/logs/superlink.log"
echo "superlink PID $(cat "$PIDF") on $SUPERLINK_HOST:$SUPERLINK_PORT (log $STATE/logs/superlink.log, FLWR_HOME=$FLWR_HOME)"
