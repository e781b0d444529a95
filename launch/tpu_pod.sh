#!/usr/bin/env bash
# Launch dlm-train on every worker (host) of a Cloud TPU VM pod slice.
#
#   bash launch/tpu_pod.sh --name TPU --zone ZONE --config configs/NAME.py --workdir gs://BUCKET/runs/NAME \
#       (--repo GIT_URL [--ref REF] | --src LOCAL_DIR | --no-install) [options] [-- DLM_TRAIN_ARGS ...]
#
# What it does, from the machine you run it on (needs `gcloud`, authenticated, and python3):
#   1. `gcloud compute tpus tpu-vm describe` gives the workers' internal IPs: worker 0's IP:PORT becomes the
#      coordinator, the number of workers the number of JAX processes.
#   2. --src only: the directory is packed (without .git) and copied to every worker with `tpu-vm scp --worker=all`.
#   3. `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command ...` runs, on every worker at once:
#      install (unless --no-install): git clone/fetch --repo (or unpack --src) into --remote-dir, create the venv
#      --venv and `pip install -e ".[tpu,gcs]" "jax[tpu]"` in it ("jax[tpu]" picks the libtpu that matches jax; the
#      gcs extra, gcsfs and google-cloud-storage, lets dlm_jax write gs:// workdirs);
#      run: export JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (the worker's number, from
#      $TPU_WORKER_ID if set, else the TPU VM metadata attribute agent-worker-number), then
#      `dlm-train --config CONFIG --workdir WORKDIR ARGS...` inside --remote-dir. dlm_jax/cli.py passes those three
#      variables to jax.distributed.initialize (it does not auto-detect the TPU cluster by itself).
#
# The workdir must be ONE place that every worker sees: Orbax writes each host's shards of a checkpoint into the same
# step directory, and a resumed run reads them back from there. On Cloud TPU VMs use a Cloud Storage URL,
# gs://BUCKET/runs/NAME: dlm_jax writes checkpoints, config.json, metrics.jsonl and TensorBoard events there through
# Cloud Storage's API (dlm_jax/storage.py), nothing to mount. The TPU VM's service account needs
# roles/storage.objectUser on the bucket, and the VM access scopes that let it write to Cloud Storage (e.g.
# `tpu-vm create --scopes=https://www.googleapis.com/auth/cloud-platform`). An absolute path on a filesystem that
# every worker mounts (Filestore, NFS) works too.
#
# Required:
#   --name NAME            TPU VM name (the pod slice)
#   --zone ZONE            its zone
#   --config PATH          config file, relative to the repo on the workers (e.g. configs/quickstart.py)
#   --workdir DIR          gs://BUCKET/PATH, or an absolute path on a filesystem shared by all workers (see above)
# Source of the code on the workers (exactly one):
#   --repo URL             git URL to clone (or fetch, if --remote-dir already holds a clone)
#   --ref REF              with --repo: branch, tag or commit to check out (default: the remote's HEAD)
#   --src DIR              a local checkout to copy (e.g. --src .)
#   --no-install           the repo is already in --remote-dir and installed in --venv
# Options:
#   --project PROJECT      gcloud project (default: gcloud's configured one)
#   --remote-dir DIR       repo location on the workers (default dlm_jax; relative = under the worker's home)
#   --venv DIR             virtualenv on the workers (default dlm_venv; relative = under the worker's home)
#   --python PY            interpreter that creates the venv (default python3; dlm_jax needs Python >= 3.11)
#   --port PORT            coordinator port on worker 0 (default 8476)
#   --env KEY=VALUE        extra environment variable for dlm-train on every worker (repeatable)
#   --detach               start dlm-train with nohup and return; its output goes to ~/dlm_train.log on each worker
#   --internal-ip          pass --internal-ip to gcloud ssh/scp (launching from a VM in the same VPC)
#   --dry-run              print the gcloud commands and the worker script instead of running them
#   -h, --help             this text
# Everything after `--` is passed to dlm-train, e.g. -- --config.train.steps=20000 --config.mesh.fsdp=4
#
# Examples:
#   bash launch/tpu_pod.sh --name my-v4-32 --zone us-central2-b --src . --config configs/bench_25m.py \
#       --workdir gs://my-bucket/runs/bench -- --config.train.steps=2000 --config.train.batch_size=256
#   bash launch/tpu_pod.sh --name my-v4-32 --zone us-central2-b --no-install --detach --config configs/bench_25m.py \
#       --workdir gs://my-bucket/runs/bench          # rerun = resume from the latest checkpoint
set -euo pipefail

prog="tpu_pod.sh"
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "$prog: error: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value; see --help"; }

name="" zone="" config="" workdir="" repo="" ref="" src="" project="" install=1
remote_dir="dlm_jax" venv="dlm_venv" python_bin="python3" port="8476" detach=0 internal_ip=0 dry_run=0
envs=() train_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name) need_value "$@"; name="$2"; shift 2 ;;
    --zone) need_value "$@"; zone="$2"; shift 2 ;;
    --config) need_value "$@"; config="$2"; shift 2 ;;
    --workdir) need_value "$@"; workdir="$2"; shift 2 ;;
    --repo) need_value "$@"; repo="$2"; shift 2 ;;
    --ref) need_value "$@"; ref="$2"; shift 2 ;;
    --src) need_value "$@"; src="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    --project) need_value "$@"; project="$2"; shift 2 ;;
    --remote-dir) need_value "$@"; remote_dir="$2"; shift 2 ;;
    --venv) need_value "$@"; venv="$2"; shift 2 ;;
    --python) need_value "$@"; python_bin="$2"; shift 2 ;;
    --port) need_value "$@"; port="$2"; shift 2 ;;
    --env) need_value "$@"; envs+=("$2"); shift 2 ;;
    --detach) detach=1; shift ;;
    --internal-ip) internal_ip=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; train_args=("$@"); break ;;
    *) die "unknown argument '$1'; dlm-train arguments go after --; see --help" ;;
  esac
done

[[ -n "$name" ]] || die "--name is required (the TPU VM name); see --help"
[[ -n "$zone" ]] || die "--zone is required; see --help"
[[ -n "$config" ]] || die "--config is required (a config file relative to the repo, e.g. configs/quickstart.py)"
[[ -n "$workdir" ]] || die "--workdir is required (gs://BUCKET/runs/NAME, or an absolute path shared by all workers)"
if [[ "$workdir" == gs://* ]]; then
  # bucket names: 3..222 lowercase letters, digits, '-', '_', '.', starting and ending with a letter or digit
  [[ "$workdir" =~ ^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?$ ]] \
    || die "--workdir '$workdir' is not gs://BUCKET/PATH (a bucket name of lowercase letters, digits, '-', '_', '.'), e.g. gs://my-bucket/runs/NAME"
elif [[ "$workdir" == *://* ]]; then
  die "--workdir '$workdir': the workers get the gcs extra only; give a gs://BUCKET/PATH URL or an absolute path on a filesystem shared by all workers"
else
  [[ "$workdir" == /* ]] || die "--workdir '$workdir' must be a gs://BUCKET/PATH URL or an absolute path on a filesystem shared by all workers"
fi
sources=$(( (${#repo} > 0) + (${#src} > 0) + (install == 0) ))
[[ $sources -eq 1 ]] || die "give exactly one of --repo URL, --src DIR or --no-install"
[[ "$port" =~ ^[0-9]+$ && "$port" -ge 1 && "$port" -le 65535 ]] || die "--port must be 1..65535, got '$port'"
for kv in "${envs[@]+"${envs[@]}"}"; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv' must look like KEY=VALUE"
done
if [[ -n "$src" ]]; then
  [[ -d "$src" ]] || die "--src '$src' is not a directory"
  [[ -f "$src/pyproject.toml" ]] || die "--src '$src' has no pyproject.toml; point it at the dlm_jax repo root"
  [[ -f "$src/$config" ]] || die "--config '$config' does not exist in --src '$src' (it is resolved relative to the repo)"
fi
[[ -z "$ref" || -n "$repo" ]] || die "--ref only goes with --repo"
if [[ $dry_run -eq 0 ]]; then
  command -v gcloud >/dev/null || die "gcloud is not on PATH; install the Google Cloud SDK and run gcloud auth login"
fi
command -v python3 >/dev/null || die "python3 is needed on this machine to read gcloud's JSON"

gflags=(--zone "$zone")
[[ -z "$project" ]] || gflags+=(--project "$project")
sshflags=()
[[ $internal_ip -eq 0 ]] || sshflags+=(--internal-ip)

show() { printf '%q ' "$@"; echo; }

# 1. Worker IPs -> coordinator and process count.
describe=(gcloud compute tpus tpu-vm describe "$name" "${gflags[@]}" --format=json)
if [[ $dry_run -eq 1 ]]; then
  echo "# 1. read the worker IPs:"; show "${describe[@]}"
  coordinator_ip="WORKER0_IP" num_workers="NUM_WORKERS"
else
  info="$("${describe[@]}")" || die "gcloud could not describe TPU '$name' in zone '$zone' (see the message above)"
  read -r state num_workers coordinator_ip < <(python3 -c '
import json, sys
d = json.loads(sys.stdin.read())
ips = [e.get("ipAddress", "") for e in d.get("networkEndpoints", [])]
print(d.get("state", "UNKNOWN"), len(ips), ips[0] if ips else "-")' <<<"$info")
  [[ "$state" == "READY" ]] || die "TPU '$name' is in state $state, not READY"
  [[ "$num_workers" -ge 1 && "$coordinator_ip" != "-" ]] || die "TPU '$name' reports no worker network endpoints"
  echo "$prog: $name: $num_workers worker(s), coordinator $coordinator_ip:$port" >&2
fi

# 2. --src: pack and copy the checkout.
archive="dlm_jax_src.tar.gz"
if [[ -n "$src" ]]; then
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  tar -czf "$tmp/$archive" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ -C "$src" .
  scp_cmd=(gcloud compute tpus tpu-vm scp "$tmp/$archive" "$name:$archive" --worker=all "${gflags[@]}" "${sshflags[@]+"${sshflags[@]}"}")
  if [[ $dry_run -eq 1 ]]; then echo "# 2. copy the source:"; show "${scp_cmd[@]}"; else "${scp_cmd[@]}"; fi
fi

# 3. The script every worker runs. Values are embedded with printf %q; the script travels base64-encoded so the
# remote login shell does not have to parse it.
{
  printf 'INSTALL=%q REPO=%q REF=%q SRC_ARCHIVE=%q REMOTE_DIR=%q VENV=%q PY=%q\n' \
    "$install" "$repo" "$ref" "$([[ -n "$src" ]] && echo "$archive")" "$remote_dir" "$venv" "$python_bin"
  printf 'COORD=%q NUM=%q CONFIG=%q WORKDIR=%q DETACH=%q\n' \
    "$coordinator_ip:$port" "$num_workers" "$config" "$workdir" "$detach"
  printf 'TRAIN_ARGS=('; for a in "${train_args[@]+"${train_args[@]}"}"; do printf ' %q' "$a"; done; printf ' )\n'
  printf 'EXTRA_ENV=('; for a in "${envs[@]+"${envs[@]}"}"; do printf ' %q' "$a"; done; printf ' )\n'
  cat <<'WORKER'
set -euo pipefail
cd "$HOME"
abs() { case "$1" in /*) echo "$1" ;; *) echo "$HOME/$1" ;; esac; }
REMOTE_DIR="$(abs "$REMOTE_DIR")"; VENV="$(abs "$VENV")"
WID="${TPU_WORKER_ID:-}"
if [ -z "$WID" ]; then
  WID="$(curl -sf -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)" \
    || { echo "[worker ?] cannot read agent-worker-number from the metadata server and TPU_WORKER_ID is unset" >&2; exit 1; }
fi
say() { echo "[worker $WID] $*" >&2; }
if [ "$INSTALL" = 1 ]; then
  if [ -n "$REPO" ]; then
    [ -d "$REMOTE_DIR/.git" ] || git clone --quiet "$REPO" "$REMOTE_DIR"
    git -C "$REMOTE_DIR" fetch --quiet origin "${REF:-HEAD}"
    git -C "$REMOTE_DIR" checkout --quiet --detach FETCH_HEAD
    say "code: $REPO at $(git -C "$REMOTE_DIR" rev-parse --short HEAD)"
  else
    mkdir -p "$REMOTE_DIR"
    tar -xzf "$HOME/$SRC_ARCHIVE" -C "$REMOTE_DIR"
    say "code: unpacked into $REMOTE_DIR"
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    command -v "$PY" >/dev/null || { say "interpreter '$PY' not found (pass --python PATH to a Python >= 3.11)"; exit 1; }
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || { say "$PY is Python $("$PY" -c 'import platform; print(platform.python_version())'); dlm_jax needs >= 3.11 (pass --python)"; exit 1; }
    "$PY" -m venv "$VENV" || { say "could not create the venv $VENV (on Debian/Ubuntu: sudo apt-get install python3-venv)"; exit 1; }
  fi
  (cd "$REMOTE_DIR" && "$VENV/bin/python" -m pip install --quiet --upgrade pip \
    && "$VENV/bin/python" -m pip install --quiet -e ".[tpu,gcs]" "jax[tpu]")
  say "installed into $VENV"
fi
[ -x "$VENV/bin/dlm-train" ] || { say "$VENV/bin/dlm-train is missing; run without --no-install first"; exit 1; }
case "$WORKDIR" in
  gs://*) "$VENV/bin/python" -c 'import gcsfs' 2>/dev/null \
    || { say "a gs:// workdir needs the gcs extra in $VENV; run without --no-install (it installs .[tpu,gcs])"; exit 1; } ;;
esac
cd "$REMOTE_DIR"
[ -f "$CONFIG" ] || { say "config '$CONFIG' does not exist in $REMOTE_DIR"; exit 1; }
export JAX_COORDINATOR_ADDRESS="$COORD" JAX_NUM_PROCESSES="$NUM" JAX_PROCESS_ID="$WID"
for kv in "${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}"; do export "$kv"; done
cmd=("$VENV/bin/dlm-train" --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}")
say "process $WID of $NUM, coordinator $COORD: ${cmd[*]}"
if [ "$DETACH" = 1 ]; then
  nohup "${cmd[@]}" >"$HOME/dlm_train.log" 2>&1 </dev/null &
  say "started (pid $!); output in ~/dlm_train.log"
else
  exec "${cmd[@]}"
fi
WORKER
} >"${TMPDIR:-/tmp}/dlm_tpu_worker.$$.sh"
worker_script="${TMPDIR:-/tmp}/dlm_tpu_worker.$$.sh"
b64="$(base64 <"$worker_script" | tr -d '\n')"
ssh_cmd=(gcloud compute tpus tpu-vm ssh "$name" --worker=all "${gflags[@]}" "${sshflags[@]+"${sshflags[@]}"}"
         --command "bash -c \"\$(echo $b64 | base64 -d)\"")
if [[ $dry_run -eq 1 ]]; then
  echo "# 3. on every worker (--worker=all), this script:"
  sed 's/^/#    /' "$worker_script"
  rm -f "$worker_script"
  echo "# as:"
  show "${ssh_cmd[@]}"
  exit 0
fi
rm -f "$worker_script"
set +e
"${ssh_cmd[@]}"
rc=$?
[[ $rc -eq 0 ]] || echo "$prog: gcloud ssh exited with status $rc (a worker failed or the connection dropped)" >&2
exit $rc
