#!/usr/bin/env bash
# Rehearse a multi-host dlm-train run on one machine: N local CPU processes that form one JAX cluster through a
# loopback coordinator (127.0.0.1:PORT), exactly as N hosts of a pod or cluster would.
#
#   bash launch/local_multiprocess.sh [N] CONFIG WORKDIR [--config.KEY=VALUE ...]
#
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which dlm_jax/cli.py passes to
# jax.distributed.initialize. Process 0 prints to this terminal; process i > 0 logs to LOG_DIR/process_i.log.
# If any process fails, the others are stopped (they would otherwise wait forever in a collective).
#
# Environment:
#   PORT                 coordinator port (default: a free port chosen at start)
#   DEVICES_PER_PROCESS  fake CPU devices per process via XLA_FLAGS=--xla_force_host_platform_device_count (default 1)
#   JAX_PLATFORMS        default cpu (the rehearsal is meant for CPU; set it to use another backend)
#   LOG_DIR              default WORKDIR/multiprocess_logs
#   JAX_INIT_TIMEOUT     seconds to wait for all processes to join (dlm_jax default 1800)
#   GRACE_SECONDS        after a failure or Ctrl-C: seconds between SIGTERM and SIGKILL for the others (default 60)
set -euo pipefail

prog="local_multiprocess.sh"
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}
die() { echo "$prog: error: $*" >&2; exit 2; }

if [[ $# -ge 1 && ( "$1" == "-h" || "$1" == "--help" ) ]]; then usage; exit 0; fi

nproc=2
if [[ $# -ge 1 && "$1" =~ ^[0-9]+$ ]]; then nproc="$1"; shift; fi
[[ "$nproc" -ge 1 ]] || die "the number of processes must be >= 1, got $nproc"
[[ $# -ge 2 ]] || die "need CONFIG and WORKDIR; usage: bash launch/local_multiprocess.sh [N] CONFIG WORKDIR [--config.KEY=VALUE ...] (see --help)"
config="$1"; workdir="$2"; shift 2
[[ -f "$config" ]] || die "config file '$config' does not exist"
for a in "$@"; do
  [[ "$a" == --config.* || "$a" == --no_progress ]] || die "unexpected argument '$a'; only --config.KEY=VALUE overrides and --no_progress may follow WORKDIR"
done
command -v dlm-train >/dev/null || die "dlm-train is not on PATH; activate the venv or pip install -e . first"

devices="${DEVICES_PER_PROCESS:-1}"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS must be a positive integer, got '$devices'"
if [[ -z "${PORT:-}" ]]; then
  PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$PORT'"
log_dir="${LOG_DIR:-$workdir/multiprocess_logs}"
mkdir -p "$log_dir"

export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT"
export JAX_NUM_PROCESSES="$nproc"
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"

echo "$prog: $nproc processes x $devices device(s), coordinator $JAX_COORDINATOR_ADDRESS, logs of processes 1.. in $log_dir" >&2

grace="${GRACE_SECONDS:-60}"
pids=()
# Stop the processes still running: SIGTERM (dlm-train then saves a checkpoint after its current step), and SIGKILL
# after GRACE_SECONDS for any that do not exit (a process blocked in a collective with a dead peer never will).
stop_rest() {
  local running
  running="$(jobs -rp)"
  [[ -n "$running" ]] || return 0
  # shellcheck disable=SC2086  # one pid per word
  kill -TERM $running 2>/dev/null || true
  local deadline=$((SECONDS + grace))
  while [[ -n "$(jobs -rp)" && $SECONDS -lt $deadline ]]; do sleep 1; done
  running="$(jobs -rp)"
  if [[ -n "$running" ]]; then
    echo "$prog: killing processes that did not stop within ${grace}s" >&2
    # shellcheck disable=SC2086
    kill -KILL $running 2>/dev/null || true
  fi
}
trap 'echo "$prog: interrupted; stopping all processes" >&2; stop_rest; exit 130' INT
trap 'stop_rest; exit 143' TERM

for ((i = 0; i < nproc; i++)); do
  if [[ $i -eq 0 ]]; then
    JAX_PROCESS_ID=$i dlm-train --config "$config" --workdir "$workdir" "$@" &
  else
    JAX_PROCESS_ID=$i dlm-train --config "$config" --workdir "$workdir" --no_progress "$@" \
      >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

# Reap every process; on the first failure show where it failed and stop the rest.
status=0
for ((k = 0; k < nproc; k++)); do
  set +e
  wait -n -p done_pid
  rc=$?
  set -e
  if [[ $rc -ne 0 && $status -eq 0 ]]; then
    status=$rc
    idx="?"
    for ((i = 0; i < nproc; i++)); do [[ "${pids[$i]}" != "$done_pid" ]] || idx=$i; done
    echo "$prog: process $idx exited with status $rc; stopping the others" >&2
    if [[ "$idx" != 0 && -f "$log_dir/process_$idx.log" ]]; then
      echo "$prog: last lines of $log_dir/process_$idx.log:" >&2
      tail -n 5 "$log_dir/process_$idx.log" | sed 's/^/  | /' >&2
    fi
    stop_rest
  fi
done
exit "$status"
