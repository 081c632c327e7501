# Shared settings for the deploy scripts (sourced, not run). Override any of them in the env.
# STATE holds PID files and logs; CERTS the CA and server cert; KEYS the node key pairs.
DEPLOY_DIR="${DEPLOY_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
REPO_DIR="${REPO_DIR:-$(dirname "$DEPLOY_DIR")}"
VENV_BIN="${VENV_BIN:-$REPO_DIR/.venv/bin}"
STATE="${STATE:-$HOME/.lte-fed/deploy}"   # outside the repo: keys and certs are not for git
CERTS="${CERTS:-$STATE/certs}"
KEYS="${KEYS:-$STATE/keys}"
SUPERLINK_HOST="${SUPERLINK_HOST:-127.0.0.1}"
SUPERLINK_PORT="${SUPERLINK_PORT:-8000}"      # flower-superlink serves everything here (HTTPS)
FEDERATION="${FEDERATION:-lte-deploy}"        # the [superlink.NAME] table in $FLWR_HOME/config.toml
# flower-superlink / flower-supernode spawn `flower-superexec` (and flwr-serverapp/-clientapp)
# by name, so the venv's bin must be on PATH.
export PATH="$VENV_BIN:$PATH"
export FLWR_HOME="${FLWR_HOME:-$STATE/flwr_home}"
mkdir -p "$STATE/pids" "$STATE/logs"

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }

source "$DEPLOY_DIR/proc.sh"   # running, descendants

# free_port HOST PORT WHAT: die if something already listens there (another deployment's
# SuperLink answering wait_up would make a new one that died at start look up).
free_port() {
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && die "$1:$2 is already in use (another $3? set ${4:-the port})" || true
}

# wait_up PID HOST PORT LOG: until PORT accepts connections (or PID dies / 60 s pass).
wait_up() {
  local pid=$1 host=$2 port=$3 log=$4
  for _ in $(seq 120); do
    running "$pid" || { tail -20 "$log" >&2; die "PID $pid exited at start (log $log)"; }
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null && return 0
    sleep 0.5
  done
  die "nothing listens on $host:$port after 60 s (log $log)"
}
