#!/usr/bin/env bash
# Runs NUM_PROCESSES copies of COMMAND on this machine as one multi-process JAX job over loopback,
# each process with DEVICES_PER_PROCESS virtual CPU devices: the multi-host code path without a
# cluster.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND [ARGS...]
#   launch/local_multiprocess.sh 2 4 -- xmodal train \
#       --config experiments/digits/source_only.py --workdir runs/mp
#
# Each copy gets XMODAL_COORDINATOR (127.0.0.1 and a free port), XMODAL_NUM_PROCESSES and
# XMODAL_PROCESS_ID, which xmodal_jax/parallel/distributed.py reads. Output of all copies is
# interleaved on this terminal. Waits for all; when one fails the others are stopped (SIGTERM,
# then SIGKILL after XMODAL_KILL_GRACE seconds, default 10) and the exit status is that of the
# first failure. SIGINT/SIGTERM to this script are passed on to every copy as SIGTERM: each saves
# a checkpoint and exits 75 (preempted), and so does this script; rerun it to resume. A copy
# that exits 75 does not stop the others (they stop together, after saving their part).
set -euo pipefail

preempted=75 # xmodal's exit status after saving on SIGTERM (docs/DESIGN.md §4)

usage() {
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND [ARGS...]" >&2
  exit 2
}

positive_int() {
  [[ $2 =~ ^[1-9][0-9]*$ ]] || {
    echo "$0: $1=$2 is not a positive integer." >&2
    usage
  }
}

[[ $# -ge 4 && $3 == "--" ]] || usage
num_processes=$1
devices_per_process=$2
positive_int NUM_PROCESSES "$num_processes"
positive_int DEVICES_PER_PROCESS "$devices_per_process"
shift 3
grace=${XMODAL_KILL_GRACE:-10}
positive_int XMODAL_KILL_GRACE "$grace"

python=$(command -v python3 || command -v python) || {
  echo "$0: needs python3 to pick a free port." >&2
  exit 2
}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

# Any device-count flag already in XLA_FLAGS (e.g. from a test harness) is replaced.
xla_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
done
xla_flags+="--xla_force_host_platform_device_count=$devices_per_process"

# Job control puts each copy in its own process group, so stopping one stops its children too.
set -m
pids=()
for ((i = 0; i < num_processes; i++)); do
  XMODAL_COORDINATOR="127.0.0.1:$port" \
    XMODAL_NUM_PROCESSES="$num_processes" \
    XMODAL_PROCESS_ID="$i" \
    XLA_FLAGS="$xla_flags" \
    JAX_PLATFORMS=cpu \
    "$@" &
  pids+=("$!")
done
set +m

stop_all() {
  local signal=$1 pid
  for pid in "${pids[@]}"; do
    kill "-$signal" -- "-$pid" 2>/dev/null || true
  done
}

# Stops every copy still running: SIGTERM, then SIGKILL for those alive after the grace period.
stop_rest() {
  local ticks=0 pid alive
  stop_all TERM
  while ((ticks < grace * 10)); do
    alive=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || return 0
    sleep 0.1
    ticks=$((ticks + 1))
  done
  stop_all KILL
}

interrupted=0
trap 'interrupted=130; stop_all TERM' INT
trap 'interrupted=143; stop_all TERM' TERM

# Polls rather than `wait -n`, which bash 3 (macOS) lacks.
status=0
finished=()
running=$num_processes
while ((running > 0)); do
  for ((i = 0; i < num_processes; i++)); do
    [[ -z ${finished[i]:-} ]] || continue
    ! kill -0 "${pids[i]}" 2>/dev/null || continue
    rc=0
    wait "${pids[i]}" || rc=$?
    finished[i]=$rc
    running=$((running - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      if ((running > 0 && rc != preempted)); then
        echo "$0: process $i exited with status $rc; stopping the others." >&2
        stop_rest
      fi
    fi
  done
  ((running == 0)) || sleep 0.2
done
if ((status == 0)); then status=$interrupted; fi
exit "$status"
