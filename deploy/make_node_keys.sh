#!/usr/bin/env bash
# make_node_keys.sh OUTDIR N — N SuperNode key pairs node_0..node_{N-1} (OpenSSH ECDSA P-384).
# The .pub file is registered with the SuperLink; the private file goes to that node only.
set -euo pipefail
OUT="${1:?usage: make_node_keys.sh OUTDIR N}"
N="${2:?usage: make_node_keys.sh OUTDIR N}"
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "make_node_keys.sh: error: N must be a positive integer" >&2; exit 2; }
mkdir -p "$OUT"
for ((i = 0; i < N; i++)); do
  rm -f "$OUT/node_$i" "$OUT/node_$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "lte-fed node $i" -f "$OUT/node_$i"
done
echo "$N key pairs in $OUT"
