#!/usr/bin/env bash
# The heterogeneity runs of docs/results/heterogeneous/README.md, on the default digits job
# (vit_digits, 900 steps, T=10), four simulated nodes, one head each, through the CLI users run.
#   bash scripts/heterogeneous_digits.sh OUT_DIR [SEED]              the rank runs
#   bash scripts/heterogeneous_digits.sh OUT_DIR SEED DEADLINE_S     the deadline runs
# Ranks: all at rank 8, against ranks {2,4,8,16} (run.fleet) with s = alpha/sqrt(r*8) (the
# default) and s = alpha/r. Deadline: four nodes of one head each (run.fleet heads=1), half a
# core each (run.client_cpus=0.5: all four train at once on this 2-core machine), undelayed, and
# with the node of partition 3 answering 5x its training time late every round
# (run.fault=slow5:node3:*, a slow device whatever heads it holds): without a deadline, and under
# a round deadline of DEADLINE_S seconds, its update dropped (the partial merge divided by the
# heads that arrived, and by all N), or the slow node sent fewer steps, as many as fit
# (run.deadline_steps=fit).
set -euo pipefail
OUT="${1:?usage: heterogeneous_digits.sh OUT_DIR [SEED] [DEADLINE_S]}"; SEED="${2:-0}"; DEADLINE="${3:-}"
LTE="${LTE_FED:-.venv/bin/lte-fed}"
COMMON="run.engine=flower run.progress=false lte.heads=4 run.nodes=4 lte.rank=8 run.seed=$SEED"
run() { local name=$1; shift; [[ -f "$OUT/$name/summary.json" ]] || $LTE $COMMON run.out="$OUT/$name" "$@"; }
if [[ -z "$DEADLINE" ]]; then
  run "rank8-s$SEED"
  run "ranks2-16-sqrt-s$SEED" "run.fleet='rank=2;rank=4;rank=8;rank=16'"
  run "ranks2-16-linear-s$SEED" "run.fleet='rank=2;rank=4;rank=8;rank=16'" lte.rank_scale=linear
else
  ONE="run.fleet='heads=1;heads=1;heads=1;heads=1' run.client_cpus=0.5"
  run "one-head-nodes-s$SEED" $ONE
  run "slow5-deadline-arrived-s$SEED" $ONE "run.fault='slow5:node3:*'" run.round_deadline="$DEADLINE"
  run "slow5-deadline-all-s$SEED" $ONE "run.fault='slow5:node3:*'" run.round_deadline="$DEADLINE" run.partial_merge=all
  run "slow5-deadline-fit-s$SEED" $ONE "run.fault='slow5:node3:*'" run.round_deadline="$DEADLINE" run.deadline_steps=fit
  run "slow5-nodeadline-s$SEED" $ONE "run.fault='slow5:node3:*'"
fi
