# Process helpers shared by deploy/*.sh (sourced, not run).

# running PID: the process exists and is not a zombie (an exited process nobody reaped yet; in
# containers whose PID 1 does not reap, those linger and `kill -0` still succeeds on them).
running() {
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n "$st" && "$st" != Z ]]
}

descendants() {  # PIDs below $1, depth first
  local kid
  for kid in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$kid"; descendants "$kid"; done
}
