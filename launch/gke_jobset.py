#!/usr/bin/env python3
"""Train on a TPU slice (or several) in a GKE cluster: a Kubernetes JobSet for `dlm-train`, or the `xpk` command.

  python launch/gke_jobset.py --name NAME --image IMAGE --topology v5e:4x4 --config configs/NAME.py \
      --workdir gs://BUCKET/runs/NAME [options] [--dry-run] [-- DLM_TRAIN_ARGS ...]
  python launch/gke_jobset.py ... --workdir /data/runs/NAME (--gcs_bucket BUCKET | --pvc CLAIM) ...   # mounted

Without --dry-run the manifest is piped to `kubectl apply -f -` (with --xpk: `xpk workload create` runs instead).
--dry-run prints the manifest (stdout; YAML, or JSON when PyYAML is missing, both of which kubectl reads) and the
kubectl commands to follow the run (stderr), and runs nothing. Everything after `--` goes to dlm-train verbatim
(shell-quoted), e.g. `-- --config.train.steps=20000 --config.mesh.fsdp=16`.

What the JobSet (jobset.x-k8s.io/v1alpha2; the JobSet controller must be installed in the cluster) holds:
  * one replicated Job `slice` with `replicas` = --num_slices, each Job `parallelism` = `completions` = the slice's
    host count (one pod per TPU VM), `backoffLimit: 0`, Indexed completion; the pod asks for `google.com/tpu: chips
    per host` and selects its nodes with `cloud.google.com/gke-tpu-accelerator` and `cloud.google.com/gke-tpu-topology`;
    the annotation `alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool` keeps each slice's
    pods on one node pool (one slice);
  * `dlm-train` is started with the explicit multi-host variables dlm_jax/cli.py reads: JAX_COORDINATOR_ADDRESS =
    `NAME-slice-0-0.NAME:PORT` (pod 0 of slice 0, through the headless service JobSet creates with
    `network.enableDNSHostnames`), JAX_NUM_PROCESSES = hosts x slices, JAX_PROCESS_ID = slice index x hosts + the pod's
    completion index (JOB_COMPLETION_INDEX). With several slices, the multislice (DCN) variables libtpu reads are set
    as XPK sets them: MEGASCALE_COORDINATOR_ADDRESS (the same pod), MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID (the
    slice's Job index), MEGASCALE_PORT; and `--config.mesh.dcn_data=N` is added unless given;
  * restarts: a failed or preempted pod fails its Job, and JobSet recreates all pods (`failurePolicy.maxRestarts`);
    the same `dlm-train` command then resumes from the workdir's latest checkpoint (on SIGTERM, e.g. a node drain,
    dlm-train saves a checkpoint first and exits 143 within `terminationGracePeriodSeconds`). Exit status 2, dlm-train's
    user error (a bad config or override, a non-finite loss), would repeat on every restart: it fails the JobSet at
    once (a Job podFailurePolicy plus a FailJobSet rule, the mechanism XPK uses). Everything else restarts: signals,
    lost nodes, and status 1 (a runtime error, which is also how the surviving processes exit when a peer host dies);
  * the workdir must outlive the pods and be one place for all hosts. A gs://BUCKET/PATH --workdir needs no volume:
    dlm_jax writes checkpoints (Orbax), config.json, metrics.jsonl and TensorBoard events through Cloud Storage's API
    (dlm_jax/storage.py; the image has the `gcs` extra). The pods run on the host network, where GKE's Workload
    Identity Federation does not apply: they reach Cloud Storage as the TPU node pool's service account, which needs
    roles/storage.objectUser on the bucket and a storage read-write access scope. A local --workdir needs a mount
    at --mount_path, exactly one of: --gcs_bucket, a bucket through the GKE Cloud Storage FUSE CSI driver (pod
    annotation `gke-gcsfuse/volumes`, an ephemeral CSI volume; the pods' Kubernetes service account,
    --service_account, needs read/write access to the bucket through Workload Identity; Orbax finalises a local
    checkpoint by renaming its temporary directory, so use a bucket with hierarchical namespace, where gcsfuse renames
    folders atomically), or --pvc, a PersistentVolumeClaim (e.g. a Filestore ReadWriteMany share); the workdir must lie
    under the mount. With a gs:// workdir one of them may still be given: it is then mounted read-only (volume `data`)
    for data and tokenizer files;
  * --tensorboard adds a Deployment `NAME-tensorboard` (CPU, same image, not on the host network) serving
    `WORKDIR/tensorboard` (the event files dlm_jax/logs.py writes): a gs:// logdir TensorBoard reads itself (through
    gcsfs; as --service_account, through Workload Identity), with no volume; a local one from the same storage,
    mounted read-only. `kubectl port-forward deployment/NAME-tensorboard 6006`.

--xpk: the same dlm-train command in `xpk workload create`. A gs:// workdir needs no XPK storage: no
`xpk storage attach` line and no `--storage` (unless --gcs_bucket is given as well, for data).

Slice shapes (the --topology names dlm-compile takes). Host counts follow Google's GKE TPU tables ("Plan TPUs in
GKE", cloud.google.com/kubernetes-engine/docs/concepts/plan-tpus, and the per-version pages cloud.google.com/tpu/docs/
v4, v5e, v5p, v6e) and XPK's system characteristics (github.com/AI-Hypercomputer/xpk, src/xpk/core/
system_characteristics.py: 4 chips per VM except 1x1); tests/test_launch.py checks them against libtpu's own
topology descriptions:

  generation  GKE accelerator label   machine type (chips/host)        topologies                       hosts
  v4          tpu-v4-podslice         ct4p-hightpu-4t (4)              2x2x1, 2x2x2, 2x2x4, 2x4x4, then  chips / 4
                                                                       AxBxC with A, B, C multiples of 4
                                                                       (up to 4096 chips)
  v5p         tpu-v5p-slice           ct5p-hightpu-4t (4)              as v4, up to 8960 chips          chips / 4
  v5e         tpu-v5-lite-podslice    ct5lp-hightpu-1t (1)             1x1                              1
                                      ct5lp-hightpu-4t (4)             2x2                              1
                                      ct5lp-hightpu-4t (4)             2x4, 4x4, 4x8, 8x8, 8x16, 16x16  chips / 4
                                      ct5lp-hightpu-8t (8)             2x4 (--chips_per_host 8)         1
  v6e         tpu-v6e-slice           ct6e-standard-1t / -4t / -8t     as v5e                           as v5e

e.g. v5e:4x4 = 4 hosts of 4 chips, v5p:4x4x8 = 128 chips on 32 hosts, v4:2x2x2 = 2 hosts. Multislice needs
multi-host slices (GKE runs it on multi-host TPU node pools only). The XPK names are `v5litepod-4x4`, `v5p-4x4x8`,
`v4-2x2x2`, `v6e-4x4` (XPK also accepts them by TensorCore / chip count).

Errors (missing flags, an unknown topology, a local workdir without a mount or outside it, ...) print one line
`gke_jobset.py: error: ...` and exit with status 2. See launch/README.md for the whole path: dlm-compile -> launch ->
TensorBoard -> resume.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys

PROG = "gke_jobset.py"
RJOB = "slice"  # the replicated Job's name: pods are NAME-slice-<slice>-<host>
CONTAINER = "dlm-train"


class LaunchError(Exception):
  """A user error: one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Generation:
  accelerator: str  # GKE node label cloud.google.com/gke-tpu-accelerator
  xpk_prefix: str  # XPK --tpu-type prefix
  dims: int  # 2: v5e / v6e (2D torus), 3: v4 / v5p
  max_chips: int
  machine: str  # GKE machine type stem: + "<chips per host>t"


GENERATIONS = {
    "v4": Generation("tpu-v4-podslice", "v4", 3, 4096, "ct4p-hightpu-"),
    "v5p": Generation("tpu-v5p-slice", "v5p", 3, 8960, "ct5p-hightpu-"),
    "v5e": Generation("tpu-v5-lite-podslice", "v5litepod", 2, 256, "ct5lp-hightpu-"),
    "v6e": Generation("tpu-v6e-slice", "v6e", 2, 256, "ct6e-standard-"),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e"}  # as dlm_jax/aot.py reads them
_SHAPES_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")
_SMALL_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4")


@dataclasses.dataclass(frozen=True)
class Slice:
  generation: str
  shape: str
  chips: int
  hosts: int
  chips_per_host: int

  @property
  def gen(self) -> Generation:
    return GENERATIONS[self.generation]

  @property
  def machine_type(self) -> str:
    return f"{self.gen.machine}{self.chips_per_host}t"

  @property
  def xpk_tpu_type(self) -> str:
    return f"{self.gen.xpk_prefix}-{self.shape}"


def parse_topology(topology: str, chips_per_host: int | None = None) -> Slice:
  """`v5e:4x4` -> the slice's chips, hosts and chips per host on GKE (the table in the module docstring)."""
  m = re.fullmatch(r"([a-z0-9]+)[:-]((?:\d+x){1,2}\d+)", topology.strip().lower())
  if not m:
    raise LaunchError(f"--topology '{topology}' is not GENERATION:SHAPE, e.g. v5e:4x4, v5p:4x4x8, v4:2x2x2, v6e:8x8")
  gen_name = _ALIASES.get(m.group(1), m.group(1))
  if gen_name not in GENERATIONS:
    raise LaunchError(f"--topology '{topology}': unknown TPU generation '{m.group(1)}'; use one of "
                      f"{', '.join(GENERATIONS)}")
  gen, shape = GENERATIONS[gen_name], m.group(2)
  dims = [int(d) for d in shape.split("x")]
  chips = math.prod(dims)
  if gen.dims == 2:
    if shape not in _SHAPES_2D:
      raise LaunchError(f"--topology '{topology}': {gen_name} slices on GKE are {', '.join(_SHAPES_2D)}")
  elif len(dims) != 3 or not (shape in _SMALL_3D or all(d % 4 == 0 for d in dims)) or chips > gen.max_chips:
    raise LaunchError(f"--topology '{topology}': {gen_name} slices on GKE are AxBxC, one of {', '.join(_SMALL_3D)} or "
                      f"with A, B, C multiples of 4, at most {gen.max_chips} chips")
  per_host = 1 if chips == 1 else 4
  if chips_per_host is not None and chips_per_host != per_host:
    if not (chips_per_host == 8 and gen.dims == 2 and shape == "2x4"):
      raise LaunchError(f"--chips_per_host {chips_per_host} does not fit {gen_name}:{shape} (it has {per_host} chips "
                        f"per host); 8 is only for a v5e / v6e 2x4 slice on one 8-chip VM")
    per_host = chips_per_host
  return Slice(gen_name, shape, chips, chips // per_host, per_host)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything the manifest and the xpk command are made of (validated)."""
  name: str
  image: str
  slice: Slice
  num_slices: int
  config: str
  workdir: str
  train_args: tuple[str, ...]
  namespace: str | None = None
  gcs_bucket: str | None = None
  pvc: str | None = None
  mount_path: str = "/data"
  gcs_mount_options: str = "implicit-dirs"
  service_account: str | None = None
  queue: str | None = None
  spot: bool = False
  max_restarts: int = 5
  grace_seconds: int = 300
  port: int = 8476
  megascale_port: int = 8080
  env: tuple[tuple[str, str], ...] = ()
  tensorboard: bool = False

  @property
  def remote(self) -> bool:
    """A gs:// workdir: dlm_jax writes it through Cloud Storage's API, no volume needed."""
    return self.workdir.startswith("gs://")

  @property
  def mounted(self) -> bool:
    return bool(self.gcs_bucket or self.pvc)

  @property
  def tensorboard_logdir(self) -> str:
    return self.workdir.rstrip("/") + "/tensorboard"  # where dlm_jax/logs.py writes the event files

  @property
  def processes(self) -> int:
    return self.slice.hosts * self.num_slices

  @property
  def coordinator_host(self) -> str:
    """Pod 0 of slice 0 through JobSet's headless service (pod hostname NAME-RJOB-<job>-<pod>, subdomain NAME)."""
    return f"{self.name}-{RJOB}-0-0.{self.name}"

  def dlm_train_argv(self) -> list[str]:
    return ["dlm-train", "--config", self.config, "--workdir", self.workdir, *self.train_args]

  def worker_script(self) -> str:
    """The container's `bash -c` script: the process id (needs arithmetic), then exec dlm-train (so it gets SIGTERM)."""
    lines = ["set -eu"]
    if self.processes > 1:
      lines.append(f"export JAX_PROCESS_ID=$(( JOB_INDEX * {self.slice.hosts} + JOB_COMPLETION_INDEX ))")
      lines.append(f'echo "dlm-jax: process $JAX_PROCESS_ID of {self.processes} (slice $JOB_INDEX, host '
                   f'$JOB_COMPLETION_INDEX), coordinator $JAX_COORDINATOR_ADDRESS"')
    lines.append("exec " + shlex.join(self.dlm_train_argv()))
    return "\n".join(lines) + "\n"


def _field(path: str) -> dict:
  return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def container_env(plan: Plan) -> list[dict]:
  env = [{"name": "JOB_INDEX", **_field("metadata.annotations['jobset.sigs.k8s.io/job-index']")},
         {"name": "JOB_COMPLETION_INDEX", **_field("metadata.annotations['batch.kubernetes.io/job-completion-index']")}]
  if plan.processes > 1:
    env += [{"name": "JAX_COORDINATOR_ADDRESS", "value": f"{plan.coordinator_host}:{plan.port}"},
            {"name": "JAX_NUM_PROCESSES", "value": str(plan.processes)}]
  if plan.num_slices > 1:
    env += [{"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": plan.coordinator_host},
            {"name": "MEGASCALE_NUM_SLICES", "value": str(plan.num_slices)},
            {"name": "MEGASCALE_SLICE_ID", **_field("metadata.annotations['jobset.sigs.k8s.io/job-index']")},
            {"name": "MEGASCALE_PORT", "value": str(plan.megascale_port)}]
  env += [{"name": k, "value": v} for k, v in plan.env]
  return env


def _storage(plan: Plan, read_only: bool) -> tuple[dict, dict, dict] | None:
  """(pod annotations, volume, volumeMount) of the mounted storage (--gcs_bucket / --pvc), None without one. With a
  gs:// workdir nothing is written there (the volume `data` holds data and tokenizer files): it is mounted read-only."""
  if not plan.mounted:
    return None
  read_only = read_only or plan.remote
  name = "data" if plan.remote else "workdir"
  mount = {"name": name, "mountPath": plan.mount_path, "readOnly": read_only}
  if plan.gcs_bucket:
    attrs = {"bucketName": plan.gcs_bucket}
    if plan.gcs_mount_options:
      attrs["mountOptions"] = plan.gcs_mount_options
    volume = {"name": name, "csi": {"driver": "gcsfuse.csi.storage.gke.io", "readOnly": read_only,
                                    "volumeAttributes": attrs}}
    # the gcsfuse sidecar stages written files on local disk: no limits on it (as XPK does), checkpoints are large
    annotations = {"gke-gcsfuse/volumes": "true", "gke-gcsfuse/cpu-limit": "0", "gke-gcsfuse/memory-limit": "0",
                   "gke-gcsfuse/ephemeral-storage-limit": "0"}
    return annotations, volume, mount
  volume = {"name": name, "persistentVolumeClaim": {"claimName": plan.pvc, "readOnly": read_only}}
  return {}, volume, mount


def _metadata(plan: Plan, name: str, **extra) -> dict:
  md = {"name": name}
  if plan.namespace:
    md["namespace"] = plan.namespace
  md.update(extra)
  return md


def jobset(plan: Plan) -> dict:
  s = plan.slice
  storage = _storage(plan, read_only=False)
  annotations, volumes, mounts = {}, [], []
  if storage:
    annotations, volume, mount = storage
    volumes, mounts = [volume], [mount]
  node_selector = {"cloud.google.com/gke-tpu-accelerator": s.gen.accelerator,
                   "cloud.google.com/gke-tpu-topology": s.shape}
  if plan.spot:
    node_selector["cloud.google.com/gke-spot"] = "true"
  ports = [{"containerPort": plan.port, "name": "jax-coord"}]
  if plan.num_slices > 1:
    ports.append({"containerPort": plan.megascale_port, "name": "megascale"})
  container = {
      "name": CONTAINER, "image": plan.image, "command": ["bash", "-c", plan.worker_script()],
      "env": container_env(plan), "ports": ports, "securityContext": {"privileged": True},
      "resources": {"limits": {"google.com/tpu": s.chips_per_host}},
      "volumeMounts": [*mounts, {"name": "dshm", "mountPath": "/dev/shm"}]}
  pod_spec = {
      "restartPolicy": "Never", "hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet",
      "terminationGracePeriodSeconds": plan.grace_seconds, "nodeSelector": node_selector,
      "tolerations": [{"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"}],
      "containers": [container],
      "volumes": [*volumes, {"name": "dshm", "emptyDir": {"medium": "Memory"}}]}
  if plan.service_account:
    pod_spec["serviceAccountName"] = plan.service_account
  job_spec = {
      "parallelism": s.hosts, "completions": s.hosts, "completionMode": "Indexed", "backoffLimit": 0,
      # exit 2 (dlm-train's user error: config, override, non-finite loss) repeats on a rerun: fail the Job and, through
      # the FailJobSet rule, the JobSet. Other failures restart it: SIGTERM -> 143 after the checkpoint, SIGKILL -> 137,
      # and 1, a runtime error, also what the other processes exit with when a peer host dies (dlm_jax/cli.py)
      "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
          "containerName": CONTAINER, "operator": "In", "values": [2]}}]},
      "template": {"metadata": {"annotations": annotations} if annotations else {}, "spec": pod_spec}}
  labels = {"app.kubernetes.io/name": "dlm-jax"}
  if plan.queue:
    labels["kueue.x-k8s.io/queue-name"] = plan.queue
  return {
      "apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
      "metadata": _metadata(plan, plan.name, labels=labels, annotations={
          "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}),
      "spec": {
          "failurePolicy": {"maxRestarts": plan.max_restarts,
                            "rules": [{"name": "user-error", "action": "FailJobSet",
                                       "onJobFailureReasons": ["PodFailurePolicy"]}]},
          "network": {"enableDNSHostnames": True},
          "replicatedJobs": [{"name": RJOB, "replicas": plan.num_slices, "template": {"spec": job_spec}}]}}


def tensorboard_deployment(plan: Plan) -> dict:
  """TensorBoard on the event files: a gs:// logdir is read through Cloud Storage's API (TensorBoard reads gs:// itself,
  through gcsfs, which the image's gcs extra installs), so no volume; a local workdir's storage is mounted read-only."""
  labels = {"app.kubernetes.io/name": "dlm-jax-tensorboard", "dlm-jax/run": plan.name}
  container = {"name": "tensorboard", "image": plan.image,
               "command": ["tensorboard", "--logdir", plan.tensorboard_logdir, "--host", "0.0.0.0", "--port", "6006"],
               "ports": [{"containerPort": 6006, "name": "http"}]}
  pod_spec = {"containers": [container]}
  annotations = {}
  if not plan.remote:
    annotations, volume, mount = _storage(plan, read_only=True)
    container["volumeMounts"] = [mount]
    pod_spec["volumes"] = [volume]
  if plan.service_account:
    pod_spec["serviceAccountName"] = plan.service_account
  template_md = {"labels": labels}
  if annotations:
    template_md["annotations"] = annotations
  return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(plan, f"{plan.name}-tensorboard"),
          "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                   "template": {"metadata": template_md, "spec": pod_spec}}}


def manifests(plan: Plan) -> list[dict]:
  return [jobset(plan)] + ([tensorboard_deployment(plan)] if plan.tensorboard else [])


def render(docs: list[dict]) -> str:
  """YAML documents (PyYAML, which flax and orbax already need), or one JSON List when PyYAML is missing."""
  try:
    import yaml
  except ImportError:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}, indent=2) + "\n"

  class Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):  # no &anchors: the manifest reads as written
      return True

  def text(dumper, value):  # the worker script as a `|` block
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

  def seq(dumper, value):  # lists of numbers (exit codes) on one line
    flow = bool(value) and all(isinstance(v, int) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)

  Dumper.add_representer(str, text)
  Dumper.add_representer(list, seq)
  return "---\n".join(yaml.dump(d, Dumper=Dumper, sort_keys=False, width=120) for d in docs)


def xpk_commands(plan: Plan, cluster: str, project: str | None, zone: str | None) -> list[list[str]]:
  """[`xpk storage attach` (with --gcs_bucket; once per cluster, printed, not run)], `xpk workload create`. XPK builds
  its own JobSet; the processes find each other with JAX's GKE auto-detection (DLM_DISTRIBUTED=auto: the
  TPU_WORKER_HOSTNAMES / TPU_WORKER_ID and, multislice, MEGASCALE_* variables GKE gives the pods). A gs:// workdir
  needs no storage: without --gcs_bucket there is no attach line and no --storage."""
  where = (["--project", project] if project else []) + (["--zone", zone] if zone else [])
  cmds = []
  if plan.gcs_bucket:
    cmds.append(["xpk", "storage", "attach", plan.gcs_bucket, "--type", "gcsfuse", "--bucket", plan.gcs_bucket,
                 "--cluster", cluster, *where, "--mount-point", plan.mount_path,
                 "--readonly", "true" if plan.remote else "false",
                 "--auto-mount", "false", "--size", "1", "--mount-options", plan.gcs_mount_options])
  create = ["xpk", "workload", "create", "--cluster", cluster, *where, "--workload", plan.name,
            "--tpu-type", plan.slice.xpk_tpu_type, "--num-slices", str(plan.num_slices),
            "--docker-image", plan.image, "--max-restarts", str(plan.max_restarts),
            # xpk restarts on 42 and 127-255 by default; as in the JobSet, only dlm-train's user error (2) is final
            "--restart-on-exit-codes", "1,3-126", "--termination-grace-period-seconds", str(plan.grace_seconds)]
  if plan.gcs_bucket:
    create += ["--storage", plan.gcs_bucket]
  if plan.spot:
    create.append("--spot")
  for k, v in (("DLM_DISTRIBUTED", "auto"),) + plan.env:
    create += ["--env", f"{k}={v}"]
  create += ["--command", shlex.join(plan.dlm_train_argv())]
  return cmds + [create]


def follow_up(plan: Plan) -> list[str]:
  ns = f" -n {shlex.quote(plan.namespace)}" if plan.namespace else ""
  sel = f"jobset.sigs.k8s.io/jobset-name={plan.name}"
  lines = [f"kubectl get jobset {plan.name}{ns}                          # status, restarts",
           f"kubectl get pods{ns} -l {sel} -o wide",
           f"kubectl logs{ns} -f -l {sel},jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0"
           "   # process 0"]
  if plan.tensorboard:
    lines.append(f"kubectl port-forward{ns} deployment/{plan.name}-tensorboard 6006:6006   # http://localhost:6006")
  lines.append(f"kubectl delete jobset {plan.name}{ns}   # then apply again to resume from {plan.workdir}")
  return lines


# gs://BUCKET[/PATH]: Cloud Storage bucket names are 3..222 characters of lowercase letters, digits, '-', '_' and '.',
# starting and ending with a letter or digit
_GS_WORKDIR = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/.*)?")

_RESERVED_ENV = ("JOB_INDEX", "JOB_COMPLETION_INDEX", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _env_pair(kv: str) -> tuple[str, str]:
  k, sep, v = kv.partition("=")
  if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
    raise LaunchError(f"--env '{kv}' must look like KEY=VALUE")
  if k in _RESERVED_ENV or k.startswith("MEGASCALE_"):
    raise LaunchError(f"--env {k}: the launcher sets {k} from the slice layout (--topology, --num_slices, --port, "
                      "--megascale_port); drop it")
  return k, v


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  pass


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise LaunchError(f"{message}; see --help")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog=PROG, description=__doc__, formatter_class=_Formatter)
  p.add_argument("--name", required=True, help="JobSet / XPK workload name (lowercase letters, digits, '-'; <= 40)")
  p.add_argument("--image", required=True, help="container image with dlm_jax installed (launch/Dockerfile.tpu)")
  p.add_argument("--topology", required=True,
                 help="one slice, named as for dlm-compile: v5e:4x4, v5p:4x4x8, v4:2x2x2, v6e:8x8")
  p.add_argument("--num_slices", type=int, default=1, help="slices (multislice over DCN; adds mesh.dcn_data)")
  p.add_argument("--chips_per_host", type=int, default=None,
                 help="8 for a v5e / v6e 2x4 slice on one 8-chip VM (ct5lp-hightpu-8t / ct6e-standard-8t)")
  p.add_argument("--config", required=True, help="config file, relative to the image's working directory")
  p.add_argument("--workdir", required=True,
                 help="checkpoints, metrics, TensorBoard, config.json: gs://BUCKET/PATH (written through Cloud "
                      "Storage's API, no mount), or an absolute path under --mount_path (with --gcs_bucket or --pvc)")
  p.add_argument("--gcs_bucket", default=None,
                 help="mount this bucket (name, no gs://) at --mount_path with the gcsfuse CSI driver: required for a "
                      "local --workdir unless --pvc; optional (read-only, for data) with a gs:// --workdir")
  p.add_argument("--pvc", default=None,
                 help="mount this PersistentVolumeClaim instead (e.g. Filestore ReadWriteMany); read-only with a gs:// "
                      "--workdir")
  p.add_argument("--mount_path", default="/data", help="where the bucket / claim is mounted in the pods")
  p.add_argument("--gcs_mount_options", default="implicit-dirs", help="gcsfuse mount options (comma-separated)")
  p.add_argument("--service_account", default=None,
                 help="Kubernetes service account of the pods (Workload Identity: the --gcs_bucket mount, the "
                      "TensorBoard Deployment's reads of a gs:// workdir)")
  p.add_argument("--namespace", default=None, help="Kubernetes namespace (default: kubectl's current one)")
  p.add_argument("--queue", default=None, help="Kueue LocalQueue (label kueue.x-k8s.io/queue-name)")
  p.add_argument("--spot", action="store_true", help="run on Spot TPU nodes (node selector cloud.google.com/gke-spot)")
  p.add_argument("--max_restarts", type=int, default=5, help="JobSet restarts after a failure / preemption")
  p.add_argument("--grace_seconds", type=int, default=300,
                 help="terminationGracePeriodSeconds: time for dlm-train's SIGTERM checkpoint")
  p.add_argument("--port", type=int, default=8476, help="JAX coordinator port on pod 0 (host network)")
  p.add_argument("--megascale_port", type=int, default=8080, help="multislice: MEGASCALE_PORT")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra variable (repeatable)")
  p.add_argument("--tensorboard", action="store_true",
                 help="also a TensorBoard Deployment reading WORKDIR/tensorboard (gs:// directly, or the mount)")
  p.add_argument("--xpk", action="store_true", help="print / run `xpk workload create` instead of a JobSet")
  p.add_argument("--cluster", default=None, help="--xpk: the GKE cluster")
  p.add_argument("--project", default=None, help="--xpk: the Google Cloud project")
  p.add_argument("--zone", default=None, help="--xpk: the cluster's zone")
  p.add_argument("--dry-run", dest="dry_run", action="store_true",
                 help="print the manifest (or the xpk commands) and the follow-up commands; run nothing")
  return p


def _dcn_args(train_args: list[str], num_slices: int) -> list[str]:
  """Multislice needs mesh.dcn_data = slices (dlm_jax/sharding.py checks it): add it, or check the one given."""
  given = [a for a in train_args if re.match(r"--config\.mesh\.dcn_data(=|$)", a)]
  if not given:
    return train_args + ([f"--config.mesh.dcn_data={num_slices}"] if num_slices > 1 else [])
  value = given[-1].partition("=")[2] if "=" in given[-1] else None
  if value is None:
    i = train_args.index(given[-1])
    value = train_args[i + 1] if i + 1 < len(train_args) else ""
  if value.strip() != str(num_slices):
    raise LaunchError(f"--config.mesh.dcn_data={value} but --num_slices {num_slices}: the mesh's DCN axis must have "
                      "one entry per slice; drop the override (it is added) or make them equal")
  return train_args


def make_plan(argv: list[str]) -> tuple[Plan, argparse.Namespace]:
  if "--" in argv:
    i = argv.index("--")
    argv, train_args = argv[:i], argv[i + 1:]
  else:
    train_args = []
  a = _parser().parse_args(argv)
  if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", a.name) or len(a.name) > 40:
    raise LaunchError(f"--name '{a.name}' must be lowercase letters, digits and '-', start with a letter, end with a "
                      "letter or digit, at most 40 characters (it becomes pod host names)")
  sl = parse_topology(a.topology, a.chips_per_host)
  if a.num_slices < 1:
    raise LaunchError(f"--num_slices must be >= 1, got {a.num_slices}")
  if a.num_slices > 1 and sl.hosts == 1:
    raise LaunchError(f"--num_slices {a.num_slices}: multislice on GKE needs multi-host slices, and {a.topology} is "
                      "one host; use a larger topology")
  remote = a.workdir.startswith("gs://")
  if remote and not _GS_WORKDIR.fullmatch(a.workdir):
    raise LaunchError(f"--workdir '{a.workdir}' is not gs://BUCKET/PATH (a bucket name of 3..222 lowercase letters, "
                      "digits, '-', '_', '.'), e.g. gs://my-bucket/runs/NAME")
  if not remote and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", a.workdir):
    raise LaunchError(f"--workdir '{a.workdir}': on GKE give a gs://BUCKET/PATH URL (the image has the gcs extra) or "
                      "a path under --mount_path")
  if remote and a.gcs_bucket and a.pvc:
    raise LaunchError("give at most one of --gcs_bucket BUCKET or --pvc CLAIM: with a gs:// --workdir a mount is "
                      "optional (read-only, for data and tokenizer files)")
  if not remote and bool(a.gcs_bucket) == bool(a.pvc):
    raise LaunchError(f"--workdir '{a.workdir}' is a local path: give exactly one of --gcs_bucket BUCKET or --pvc "
                      "CLAIM to mount storage that every host shares and that outlives the pods (or a restart could "
                      "not resume), or write to Cloud Storage directly with --workdir gs://BUCKET/PATH")
  if a.gcs_bucket and (a.gcs_bucket.startswith("gs://") or "/" in a.gcs_bucket):
    raise LaunchError(f"--gcs_bucket '{a.gcs_bucket}' must be a bare bucket name (no gs://, no path); put the path "
                      "into --workdir")
  mount = a.mount_path.rstrip("/")
  if not a.mount_path.startswith("/") or not mount:
    raise LaunchError(f"--mount_path '{a.mount_path}' must be an absolute path other than /")
  if not remote and not os.path.normpath(a.workdir).startswith(mount + "/"):
    raise LaunchError(f"--workdir '{a.workdir}' must be a directory under --mount_path {mount}, where the shared "
                      "storage is mounted (or a gs://BUCKET/PATH URL)")
  for flag, value, low in (("--max_restarts", a.max_restarts, 0), ("--grace_seconds", a.grace_seconds, 0)):
    if value < low:
      raise LaunchError(f"{flag} must be >= {low}, got {value}")
  for flag, value in (("--port", a.port), ("--megascale_port", a.megascale_port)):
    if not 1 <= value <= 65535:
      raise LaunchError(f"{flag} must be 1..65535, got {value}")
  if a.xpk:
    if not a.cluster:
      raise LaunchError("--xpk needs --cluster (the GKE cluster xpk submits to)")
    if a.pvc or a.tensorboard or a.queue or a.namespace or a.service_account:
      raise LaunchError("--xpk takes the cluster's own storage, queue and namespace: --pvc, --tensorboard, --queue, "
                        "--namespace and --service_account are for the JobSet path (drop --xpk or them)")
  elif a.cluster or a.project or a.zone:
    raise LaunchError("--cluster / --project / --zone go with --xpk; the JobSet path uses kubectl's current context")
  plan = Plan(
      name=a.name, image=a.image, slice=sl, num_slices=a.num_slices, config=a.config, workdir=a.workdir,
      train_args=tuple(_dcn_args(list(train_args), a.num_slices)), namespace=a.namespace, gcs_bucket=a.gcs_bucket,
      pvc=a.pvc, mount_path=mount, gcs_mount_options=a.gcs_mount_options, service_account=a.service_account,
      queue=a.queue, spot=a.spot, max_restarts=a.max_restarts, grace_seconds=a.grace_seconds, port=a.port,
      megascale_port=a.megascale_port, env=tuple(_env_pair(kv) for kv in a.env), tensorboard=a.tensorboard)
  return plan, a


def _run(cmd: list[str], stdin: str | None = None) -> None:
  if shutil.which(cmd[0]) is None:
    raise LaunchError(f"{cmd[0]} is not on PATH; install it (or use --dry-run to print what would run)")
  r = subprocess.run(cmd, input=stdin, text=True, check=False)
  if r.returncode:
    raise LaunchError(f"`{shlex.join(cmd[:3])} ...` failed with status {r.returncode} (its message is above)")


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    plan, a = make_plan(argv)
    s = plan.slice
    print(f"{PROG}: {s.generation}:{s.shape}: {s.chips} chips, {s.hosts} host(s) x {s.chips_per_host} chips "
          f"({s.machine_type}), {plan.num_slices} slice(s) -> {plan.processes} process(es)", file=sys.stderr)
    if a.xpk:
      *setup, create = xpk_commands(plan, a.cluster, a.project, a.zone)
      for c in setup:  # not run here: it fails if the storage is attached already
        print("# once per cluster (xpk mounts the bucket for workloads that name it): " + shlex.join(c))
      print(shlex.join(create))
      sys.stdout.flush()
      if not a.dry_run:
        _run(create)
      print(f"# then: xpk workload list --cluster {shlex.quote(a.cluster)}; logs: kubectl logs -f "
            f"-l jobset.sigs.k8s.io/jobset-name={plan.name},jobset.sigs.k8s.io/job-index=0,"
            "batch.kubernetes.io/job-completion-index=0", file=sys.stderr)
      return 0
    text = render(manifests(plan))
    apply = ["kubectl", "apply", "-f", "-"] + (["-n", plan.namespace] if plan.namespace else [])
    if a.dry_run:
      sys.stdout.write(text)
      sys.stdout.flush()
      print(f"# to submit: python launch/gke_jobset.py ... (without --dry-run), or pipe this into: {shlex.join(apply)}",
            file=sys.stderr)
    else:
      _run(apply, stdin=text)
    print("# then:\n" + "\n".join("  " + line for line in follow_up(plan)), file=sys.stderr)
    return 0
  except LaunchError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
