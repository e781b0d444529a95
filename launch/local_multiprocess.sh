#!/usr/bin/env bash
# Rehearse a multi-host dlm-train run on one machine: N local CPU processes that form one JAX cluster through a
# loopback coordinator (127.0.0.1:PORT), exactly as N hosts of a pod or cluster would.
#
#   bash launch/local_multiprocess.sh [N] CONFIG WORKDIR [--config.KEY=VALUE ...]
#
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which dlm_jax/cli.py passes to
# jax.distributed.initialize. Process 0 prints to this terminal; process i > 0 logs to LOG_DIR/process_i.log; process
# i's pid is in LOG_DIR/process_i.pid while it runs.
#
# Preemption: SIGTERM to this script, or to any one process, makes every process save the same step (JAX's preemption
# sync point, see dlm_jax/train.py) and exit 143; this script then exits 143. If a process dies otherwise (an error, or
# killed like a crashed host), a line names it and its status, the others are stopped (they would otherwise wait
# forever in a collective) and this script exits non-zero. Either way, rerunning the same command resumes from the
# last complete checkpoint (a save cut short is never picked up).
#
# Environment:
#   PORT                 coordinator port (default: a free port chosen at start)
#   DEVICES_PER_PROCESS  fake CPU devices per process via XLA_FLAGS=--xla_force_host_platform_device_count (default 1)
#   JAX_PLATFORMS        default cpu (the rehearsal is meant for CPU; set it to use another backend)
#   LOG_DIR              default WORKDIR/multiprocess_logs (a gs:// WORKDIR: $TMPDIR/dlm_multiprocess_logs)
#   JAX_INIT_TIMEOUT     seconds to wait for all processes to join (dlm_jax default 1800)
#   GRACE_SECONDS        after a failure or Ctrl-C: seconds between SIGTERM and SIGKILL for the others; after one
#                        process stopped on SIGTERM: seconds the others get to save the same step (default 60)
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
if [[ "$workdir" == *://* ]]; then  # a gs:// workdir: the processes' logs stay on this machine
  log_dir="${LOG_DIR:-${TMPDIR:-/tmp}/dlm_multiprocess_logs}"
else
  log_dir="${LOG_DIR:-$workdir/multiprocess_logs}"
fi
mkdir -p "$log_dir"

export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT"
export JAX_NUM_PROCESSES="$nproc"
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"

echo "$prog: $nproc processes x $devices device(s), coordinator $JAX_COORDINATOR_ADDRESS, logs of processes 1.. in $log_dir" >&2

grace="${GRACE_SECONDS:-60}"
pids=()
# Waits up to GRACE_SECONDS for the processes still running to exit by themselves, then SIGKILLs the rest.
await_rest() {
  local deadline=$((SECONDS + grace))
  while [[ -n "$(jobs -rp)" && $SECONDS -lt $deadline ]]; do sleep 1; done
  local running
  running="$(jobs -rp)"
  if [[ -n "$running" ]]; then
    echo "$prog: killing processes that did not stop within ${grace}s" >&2
    # shellcheck disable=SC2086
    kill -KILL $running 2>/dev/null || true
  fi
}

# Stops the processes still running: SIGTERM (dlm-train then saves a checkpoint at the step all agree on), and SIGKILL
# after GRACE_SECONDS for any that do not exit (a process blocked in a collective with a dead peer never will).
stop_rest() {
  local running
  running="$(jobs -rp)"
  [[ -n "$running" ]] || return 0
  # shellcheck disable=SC2086  # one pid per word
  kill -TERM $running 2>/dev/null || true
  await_rest
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
  echo "$!" >"$log_dir/process_$i.pid"
done

# How a process ended, from its wait status N (143 is also dlm-train's exit after its SIGTERM save).
how_ended() {
  if [[ $1 -eq 143 ]]; then
    echo "exited with status 143 (stopped on SIGTERM)"
  elif [[ $1 -gt 128 ]]; then
    echo "was killed by signal $(kill -l $(($1 - 128)) 2>/dev/null || echo $(($1 - 128))) (status $1)"
  else
    echo "exited with status $1"
  fi
}

# Reap every process. On the first failure, name the process and how it ended, then stop the rest: a process that
# exited 143 stopped on SIGTERM at the step all processes agreed to save, so the others are saving it too and get
# GRACE_SECONDS to finish; any other failure (an error, a signal such as SIGKILL from a crashed host) leaves them stuck
# in a collective, so they get SIGTERM, then SIGKILL. The script exits with the first failure's status (143 only when
# every process stopped on SIGTERM).
status=0
for ((k = 0; k < nproc; k++)); do
  set +e
  wait -n -p done_pid 2>/dev/null  # (no "Killed ..." job notice: the line below says it)
  rc=$?
  set -e
  [[ -n "${done_pid:-}" ]] || break  # nothing left to reap
  idx="?"
  for ((i = 0; i < nproc; i++)); do [[ "${pids[$i]}" != "$done_pid" ]] || idx=$i; done
  rm -f "$log_dir/process_$idx.pid"
  pid="$done_pid"; done_pid=""
  [[ $rc -ne 0 ]] || continue
  if [[ $status -ne 0 ]]; then  # a process stopping after the first failure
    echo "$prog: process $idx $(how_ended "$rc")" >&2
    if [[ $status -eq 143 && $rc -ne 143 ]]; then status=$rc; fi
    continue
  fi
  status=$rc
  if [[ $rc -eq 143 ]]; then
    echo "$prog: process $idx $(how_ended "$rc"); waiting up to ${grace}s for the others to save the same step" >&2
    await_rest
    continue
  fi
  echo "$prog: process $idx (pid $pid) $(how_ended "$rc"); stopping the others" >&2
  if [[ "$idx" != 0 && -f "$log_dir/process_$idx.log" ]]; then
    echo "$prog: last lines of $log_dir/process_$idx.log:" >&2
    tail -n 5 "$log_dir/process_$idx.log" | sed 's/^/  | /' >&2
  fi
  stop_rest
done
exit "$status"
