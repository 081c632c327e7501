#!/usr/bin/env bash
# register_nodes.sh [KEYDIR] — register every KEYDIR/node_*.pub with the running SuperLink
# (`flwr supernode register`), then list the federation's nodes. Run before the nodes start:
# an unregistered key is refused ("Exit Code: 305 ... Failed to activate SuperNode" in its log,
# process exit status 1) and that node does not retry.
set -euo pipefail
source "$(dirname "$0")/common.sh"
DIR="${1:-$KEYS}"
shopt -s nullglob
pubs=("$DIR"/node_*.pub)
(( ${#pubs[@]} )) || die "no node_*.pub in $DIR (run make_node_keys.sh $DIR N)"
for pub in "${pubs[@]}"; do
  name="$(basename "$pub" .pub)"
  "$VENV_BIN/flwr" supernode register "$pub" "$FEDERATION" --name "$name"
done
"$VENV_BIN/flwr" supernode list "$FEDERATION"
