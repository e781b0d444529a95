"""launch/gke_jobset.py: the JobSet it prints with --dry-run (parsed back from YAML) has the GKE slice shape of each
topology (hosts, chips per host, node selectors; the host counts also checked against libtpu's own topology
descriptions), the multi-host / multislice environment, the storage mount and the restart policy; its worker script,
run by bash with a stand-in dlm-train, hands the overrides over verbatim and computes the process id; the xpk command
carries the same dlm-train command; a gs:// workdir needs no mount (JobSet, TensorBoard, xpk, and tpu_pod.sh, whose
worker script runs here with a stand-in dlm-train), a local one still does; bad input is one line and exit status 2."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, checkpoint_steps, require_libtpu

SCRIPT = os.path.join(REPO, "launch", "gke_jobset.py")
_spec = importlib.util.spec_from_file_location("gke_jobset", SCRIPT)
gke = importlib.util.module_from_spec(_spec)
sys.modules["gke_jobset"] = gke  # dataclasses look their module up
_spec.loader.exec_module(gke)

BASE = ["--name", "run1", "--image", "us-docker.pkg.dev/p/r/dlm-jax:1", "--config", "configs/bench_25m.py",
        "--workdir", "/data/runs/run1", "--gcs_bucket", "my-bucket", "--dry-run"]
# what a user might put in an override: spaces, both quotes, $, backticks, ;, glob characters, a newline
NASTY = ["--config.train.steps=20", "--config.data.path=/data/my corpus/it's \"here\"",
         "--config.model.name=$HOME`id`;*",
         "--config.sampler.prompt=line one\nline two"]


def run(capsys, *argv):
  code = gke.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def manifest(capsys, *extra, train_args=()):
  code, out, err = run(capsys, *BASE, *extra, "--", *train_args)
  assert code == 0, err
  return list(yaml.safe_load_all(out)), err


def parts(js):
  rjob = js["spec"]["replicatedJobs"][0]
  job = rjob["template"]["spec"]
  pod = job["template"]["spec"]
  return rjob, job, pod, pod["containers"][0]


def env_of(container):
  return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# (topology, chips, hosts, chips per host, GKE accelerator label): Google's GKE TPU tables (plan-tpus), 4 chips per VM
# on multi-host slices (ct4p / ct5p / ct5lp / ct6e -4t), one VM for 1x1 and 2x2 / 2x2x1
SHAPES = [
    ("v5e:1x1", 1, 1, 1, "tpu-v5-lite-podslice"),
    ("v5e:2x2", 4, 1, 4, "tpu-v5-lite-podslice"),
    ("v5e:2x4", 8, 2, 4, "tpu-v5-lite-podslice"),
    ("v5e:4x4", 16, 4, 4, "tpu-v5-lite-podslice"),
    ("v5e:16x16", 256, 64, 4, "tpu-v5-lite-podslice"),
    ("v5litepod:4x8", 32, 8, 4, "tpu-v5-lite-podslice"),
    ("v5p:2x2x1", 4, 1, 4, "tpu-v5p-slice"),
    ("v5p:2x2x2", 8, 2, 4, "tpu-v5p-slice"),
    ("v5p:4x4x8", 128, 32, 4, "tpu-v5p-slice"),
    ("v4:2x2x2", 8, 2, 4, "tpu-v4-podslice"),
    ("v4:4x4x4", 64, 16, 4, "tpu-v4-podslice"),
    ("v6e:4x4", 16, 4, 4, "tpu-v6e-slice"),
    ("v6e:8x8", 64, 16, 4, "tpu-v6e-slice"),
]


@pytest.mark.parametrize("topology,chips,hosts,per_host,accelerator", SHAPES)
def test_slice_shape(capsys, topology, chips, hosts, per_host, accelerator):
  (js,), err = manifest(capsys, "--topology", topology)
  assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and js["kind"] == "JobSet"
  rjob, job, pod, c = parts(js)
  assert rjob["replicas"] == 1
  assert job["parallelism"] == job["completions"] == hosts
  assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
  assert c["resources"]["limits"]["google.com/tpu"] == per_host
  shape = topology.split(":")[1]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                                 "cloud.google.com/gke-tpu-topology": shape}
  assert f"{chips} chips, {hosts} host(s) x {per_host} chips" in err
  env = env_of(c)
  if hosts > 1:
    assert env["JAX_COORDINATOR_ADDRESS"] == "run1-slice-0-0.run1:8476"
    assert env["JAX_NUM_PROCESSES"] == str(hosts)
    assert js["spec"]["network"]["enableDNSHostnames"] is True
  else:  # one process: no distributed start
    assert "JAX_COORDINATOR_ADDRESS" not in env and "JAX_PROCESS_ID" not in c["command"][2]
  assert not any(k.startswith("MEGASCALE_") for k in env)
  sl = gke.parse_topology(topology)
  assert (sl.chips, sl.hosts, sl.chips_per_host) == (chips, hosts, per_host)


def test_host_counts_match_libtpu():
  """libtpu's topology descriptions (what dlm-compile compiles for) put the same number of hosts in each slice."""
  require_libtpu()
  from jax.experimental import topologies
  for topology, _, hosts, _, _ in SHAPES:
    if topology in ("v5e:1x1",) or topology.startswith("v5litepod"):
      continue
    devices = topologies.get_topology_desc(topology, platform="tpu").devices
    assert len({d.process_index for d in devices}) == hosts, topology


def test_v5e_2x4_on_one_8_chip_host(capsys):
  (js,), _ = manifest(capsys, "--topology", "v5e:2x4", "--chips_per_host", "8")
  _, job, _, c = parts(js)
  assert job["parallelism"] == 1 and c["resources"]["limits"]["google.com/tpu"] == 8
  assert gke.parse_topology("v6e:2x4", 8).machine_type == "ct6e-standard-8t"


def test_storage_restarts_and_options(capsys):
  (js, tb), _ = manifest(capsys, "--topology", "v5p:2x2x2", "--service_account", "dlm-ksa", "--spot", "--queue", "lq",
                         "--namespace", "ml", "--max_restarts", "7", "--grace_seconds", "120", "--env", "FOO=a=b c",
                         "--tensorboard")
  rjob, job, pod, c = parts(js)
  assert js["metadata"]["namespace"] == "ml" and js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "lq"
  assert js["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"
  fp = js["spec"]["failurePolicy"]
  assert fp["maxRestarts"] == 7 and fp["rules"][0]["action"] == "FailJobSet"
  # only dlm-train's user error (2) stops the JobSet; 1 (also a survivor of a dead peer), 137, 143 restart it
  assert job["podFailurePolicy"]["rules"][0]["onExitCodes"] == {"containerName": "dlm-train", "operator": "In",
                                                                "values": [2]}
  assert pod["restartPolicy"] == "Never" and pod["terminationGracePeriodSeconds"] == 120
  assert pod["serviceAccountName"] == "dlm-ksa" and pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
  assert job["template"]["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
  vol = {v["name"]: v for v in pod["volumes"]}["workdir"]
  assert vol["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
  assert vol["csi"]["volumeAttributes"]["bucketName"] == "my-bucket"
  assert {"name": "workdir", "mountPath": "/data", "readOnly": False} in c["volumeMounts"]
  assert env_of(c)["FOO"] == "a=b c"
  # TensorBoard reads the directory dlm_jax/logs.py writes its event files to
  assert tb["kind"] == "Deployment" and tb["metadata"]["name"] == "run1-tensorboard"
  tc = tb["spec"]["template"]["spec"]["containers"][0]
  assert tc["command"][:3] == ["tensorboard", "--logdir", "/data/runs/run1/tensorboard"]
  assert tc["volumeMounts"][0]["readOnly"] is True
  src = open(os.path.join(REPO, "dlm_jax", "logs.py")).read()
  assert 'storage.join(workdir, "tensorboard")' in src
  # a PersistentVolumeClaim instead of the bucket
  code, out, err = run(capsys, *[a for a in BASE if a not in ("--gcs_bucket", "my-bucket")], "--pvc", "filestore",
                       "--topology", "v5e:2x2")
  assert code == 0, err
  pod = parts(yaml.safe_load(out))[2]
  assert {v["name"]: v for v in pod["volumes"]}["workdir"]["persistentVolumeClaim"]["claimName"] == "filestore"


def test_multislice(capsys):
  (js,), err = manifest(capsys, "--topology", "v5e:4x4", "--num_slices", "3", train_args=["--config.train.steps=5"])
  rjob, job, _, c = parts(js)
  assert rjob["replicas"] == 3 and job["parallelism"] == 4
  env = env_of(c)
  assert env["JAX_NUM_PROCESSES"] == "12"
  assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "run1-slice-0-0.run1"
  assert env["MEGASCALE_NUM_SLICES"] == "3" and env["MEGASCALE_PORT"] == "8080"
  assert env["MEGASCALE_SLICE_ID"]["fieldRef"]["fieldPath"] == "metadata.annotations['jobset.sigs.k8s.io/job-index']"
  assert "-> 12 process(es)" in err
  assert c["command"][2].rstrip().endswith("--config.train.steps=5 --config.mesh.dcn_data=3")  # added for the mesh
  # given and equal: kept once; given and different: an error
  (js,), _ = manifest(capsys, "--topology", "v5e:4x4", "--num_slices", "3", train_args=["--config.mesh.dcn_data=3"])
  assert parts(js)[3]["command"][2].count("dcn_data") == 1
  code, _, err = run(capsys, *BASE, "--topology", "v5e:4x4", "--num_slices", "3", "--", "--config.mesh.dcn_data=2")
  assert code == 2 and "dcn_data" in err


def _run_worker(tmp_path, script, job_index, completion_index):
  """bash runs the container's script with a dlm-train that prints its argv and the JAX variables as JSON."""
  bindir = tmp_path / "bin"
  bindir.mkdir(exist_ok=True)
  fake = bindir / "dlm-train"
  fake.write_text(f"#!{sys.executable}\nimport json, os, sys\nprint(json.dumps({{'argv': sys.argv[1:], 'env': "
                  "{k: v for k, v in os.environ.items() if k.startswith('JAX_')}}))\n")
  fake.chmod(0o755)
  env = {"PATH": f"{bindir}:{os.environ['PATH']}", "JOB_INDEX": str(job_index),
         "JOB_COMPLETION_INDEX": str(completion_index), "JAX_COORDINATOR_ADDRESS": "run1-slice-0-0.run1:8476"}
  r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True)
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_worker_script_passes_overrides_verbatim(capsys, tmp_path):
  (js,), _ = manifest(capsys, "--topology", "v5e:4x4", "--num_slices", "2", train_args=NASTY)
  c = parts(js)[3]
  assert c["command"][:2] == ["bash", "-c"]
  got = _run_worker(tmp_path, c["command"][2], job_index=1, completion_index=2)
  assert got["argv"] == ["--config", "configs/bench_25m.py", "--workdir", "/data/runs/run1", *NASTY,
                         "--config.mesh.dcn_data=2"]
  assert got["env"]["JAX_PROCESS_ID"] == "6"  # slice 1 x 4 hosts + host 2
  # one host: dlm-train alone, same argv
  (js,), _ = manifest(capsys, "--topology", "v5p:2x2x1", train_args=NASTY)
  got = _run_worker(tmp_path, parts(js)[3]["command"][2], job_index=0, completion_index=0)
  assert got["argv"][4:] == NASTY and "JAX_PROCESS_ID" not in got["env"]


def test_xpk_command(capsys):
  code, out, err = run(capsys, *BASE, "--topology", "v5p:4x4x8", "--num_slices", "2", "--xpk", "--cluster", "c1",
                       "--zone", "us-east5-a", "--project", "proj", "--", *NASTY)
  assert code == 0, err
  attach, rest = out.split("\n", 1)  # (the create command spans lines: an override has a newline, quoted)
  assert attach.startswith("# once per cluster") and "xpk storage attach my-bucket --type gcsfuse" in attach
  create = shlex.split(rest)
  assert create[:3] == ["xpk", "workload", "create"]
  opts = {create[i]: create[i + 1] for i in range(3, len(create) - 1) if create[i].startswith("--")}
  assert opts["--tpu-type"] == "v5p-4x4x8" and opts["--num-slices"] == "2" and opts["--cluster"] == "c1"
  assert opts["--docker-image"] == "us-docker.pkg.dev/p/r/dlm-jax:1" and opts["--storage"] == "my-bucket"
  assert opts["--env"] == "DLM_DISTRIBUTED=auto" and opts["--restart-on-exit-codes"] == "1,3-126"
  assert shlex.split(opts["--command"]) == ["dlm-train", "--config", "configs/bench_25m.py", "--workdir",
                                            "/data/runs/run1", *NASTY, "--config.mesh.dcn_data=2"]
  assert gke.parse_topology("v5e:8x8").xpk_tpu_type == "v5litepod-8x8"


GS_WORKDIR = "gs://my-bucket/runs/run1"
GS_BASE = ["--name", "run1", "--image", "us-docker.pkg.dev/p/r/dlm-jax:1", "--config", "configs/bench_25m.py",
           "--workdir", GS_WORKDIR, "--dry-run"]  # no --gcs_bucket / --pvc


def test_gs_workdir_needs_no_mount(capsys, tmp_path):
  """A gs:// workdir: dlm-train writes it through Cloud Storage's API, so the JobSet has no workdir volume and no gcsfuse
  annotation, the command carries the URL verbatim, and TensorBoard reads gs://.../tensorboard itself, with no volume."""
  code, out, err = run(capsys, *GS_BASE, "--topology", "v5e:4x4", "--service_account", "dlm-ksa", "--tensorboard",
                       "--", "--config.train.steps=5")
  assert code == 0, err
  assert "gcsfuse" not in out
  js, tb = yaml.safe_load_all(out)
  _, job, pod, c = parts(js)
  assert job["template"]["metadata"] == {}  # no gke-gcsfuse/* annotations
  assert [v["name"] for v in pod["volumes"]] == ["dshm"]
  assert c["volumeMounts"] == [{"name": "dshm", "mountPath": "/dev/shm"}]
  assert pod["serviceAccountName"] == "dlm-ksa"
  got = _run_worker(tmp_path, c["command"][2], job_index=0, completion_index=3)
  assert got["argv"] == ["--config", "configs/bench_25m.py", "--workdir", GS_WORKDIR, "--config.train.steps=5"]
  assert got["env"]["JAX_PROCESS_ID"] == "3"
  tpod = tb["spec"]["template"]["spec"]
  tc = tpod["containers"][0]
  assert tc["command"][:3] == ["tensorboard", "--logdir", GS_WORKDIR + "/tensorboard"]
  assert "volumes" not in tpod and "volumeMounts" not in tc and "annotations" not in tb["spec"]["template"]["metadata"]
  assert tpod["serviceAccountName"] == "dlm-ksa"
  assert f"resume from {GS_WORKDIR}" in err
  # a mount may still come along (data, tokenizer files): read-only, named `data`, not the workdir's; TensorBoard
  # still reads the bucket directly
  (js, tb), _ = manifest(capsys, "--workdir", GS_WORKDIR, "--topology", "v5e:2x2", "--tensorboard")  # BASE: my-bucket
  _, job, pod, c = parts(js)
  vols = {v["name"]: v for v in pod["volumes"]}
  assert set(vols) == {"data", "dshm"} and vols["data"]["csi"]["readOnly"] is True
  assert vols["data"]["csi"]["volumeAttributes"]["bucketName"] == "my-bucket"
  assert {"name": "data", "mountPath": "/data", "readOnly": True} in c["volumeMounts"]
  assert job["template"]["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
  assert tb["spec"]["template"]["spec"]["containers"][0]["command"][2] == GS_WORKDIR + "/tensorboard"
  assert "volumes" not in tb["spec"]["template"]["spec"]
  code, out, err = run(capsys, *GS_BASE, "--topology", "v5e:2x2", "--pvc", "filestore")
  assert code == 0, err
  vols = {v["name"]: v for v in parts(yaml.safe_load(out))[2]["volumes"]}
  assert vols["data"]["persistentVolumeClaim"] == {"claimName": "filestore", "readOnly": True}


def test_local_workdir_still_needs_a_mount(capsys):
  code, out, err = run(capsys, *[a for a in BASE if a not in ("--gcs_bucket", "my-bucket")], "--topology", "v5e:4x4")
  assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
  assert "is a local path: give exactly one of --gcs_bucket BUCKET or --pvc CLAIM" in err and "gs://" in err
  code, out, err = run(capsys, *BASE, "--topology", "v5e:4x4", "--mount_path", "/mnt/shared")
  assert code == 2 and "under --mount_path /mnt/shared" in err
  # mounted: the claim holds the workdir, read-write
  code, out, err = run(capsys, *[a for a in BASE if a not in ("--gcs_bucket", "my-bucket")], "--pvc", "filestore",
                       "--topology", "v5e:4x4")
  assert code == 0, err
  pod = parts(yaml.safe_load(out))[2]
  assert {v["name"]: v for v in pod["volumes"]}["workdir"]["persistentVolumeClaim"] == {"claimName": "filestore",
                                                                                       "readOnly": False}


def test_xpk_gs_workdir(capsys):
  """No storage to attach or name: the create command alone, with the gs:// workdir in dlm-train's arguments."""
  code, out, err = run(capsys, *GS_BASE, "--topology", "v5e:4x4", "--xpk", "--cluster", "c1", "--", "--x=1")
  assert code == 0, err
  assert "storage attach" not in out and not out.startswith("#")
  create = shlex.split(out)
  assert create[:3] == ["xpk", "workload", "create"] and "--storage" not in create
  assert shlex.split(create[create.index("--command") + 1]) == ["dlm-train", "--config", "configs/bench_25m.py",
                                                                "--workdir", GS_WORKDIR, "--x=1"]
  # a bucket for data beside it: attached read-only
  code, out, err = run(capsys, *GS_BASE, "--gcs_bucket", "data-bucket", "--topology", "v5e:4x4", "--xpk", "--cluster",
                       "c1")
  assert code == 0, err
  attach, create = out.split("\n", 1)
  assert "xpk storage attach data-bucket" in attach and "--readonly true" in attach
  assert shlex.split(create)[shlex.split(create).index("--storage") + 1] == "data-bucket"


def test_apply_runs_kubectl(tmp_path):
  """Without --dry-run the manifest goes to `kubectl apply -f -` (a stand-in kubectl records its stdin)."""
  bindir = tmp_path / "bin"
  bindir.mkdir()
  (bindir / "kubectl").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\ncat > {tmp_path}/stdin\n")
  (bindir / "kubectl").chmod(0o755)
  env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")
  argv = [a for a in BASE if a != "--dry-run"] + ["--topology", "v5e:4x4", "--namespace", "ml"]
  r = subprocess.run([sys.executable, SCRIPT, *argv], env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  assert (tmp_path / "args").read_text().split() == ["apply", "-f", "-", "-n", "ml"]
  assert yaml.safe_load((tmp_path / "stdin").read_text())["metadata"]["name"] == "run1"
  assert "kubectl delete jobset run1 -n ml" in r.stderr


def test_json_without_pyyaml(monkeypatch):
  monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
  plan, _ = gke.make_plan(BASE + ["--topology", "v5e:2x2"])
  doc = json.loads(gke.render(gke.manifests(plan)))
  assert doc["kind"] == "List" and doc["items"][0]["kind"] == "JobSet"


@pytest.mark.parametrize("argv,needle", [
    (["--topology", "v5e:3x3"], "v5e slices on GKE are"),
    (["--topology", "v5p:3x4x4"], "multiples of 4"),
    (["--topology", "v7x:2x2x2"], "unknown TPU generation"),
    (["--topology", "4x4"], "GENERATION:SHAPE"),
    (["--topology", "v5e:4x4", "--chips_per_host", "8"], "--chips_per_host 8 does not fit"),
    (["--topology", "v5e:2x2", "--num_slices", "2"], "multi-host slices"),
    (["--topology", "v5e:4x4", "--num_slices", "0"], "--num_slices must be >= 1"),
    (["--topology", "v5e:4x4", "--pvc", "c"], "exactly one of --gcs_bucket"),
    (["--topology", "v5e:4x4", "--workdir", "/tmp/run"], "under --mount_path /data"),
    (["--topology", "v5e:4x4", "--workdir", "gs://B/run"], "is not gs://BUCKET/PATH"),
    (["--topology", "v5e:4x4", "--workdir", "s3://bucket/run"], "give a gs://BUCKET/PATH URL"),
    (["--topology", "v5e:4x4", "--workdir", "gs://bucket/run", "--pvc", "c"], "at most one of --gcs_bucket"),
    (["--topology", "v5e:4x4", "--gcs_bucket", "gs://b"], "bare bucket name"),
    (["--topology", "v5e:4x4", "--name", "Run_1"], "--name 'Run_1'"),
    (["--topology", "v5e:4x4", "--env", "1X=2"], "KEY=VALUE"),
    (["--topology", "v5e:4x4", "--env", "JAX_PROCESS_ID=3"], "the launcher sets JAX_PROCESS_ID"),
    (["--topology", "v5e:4x4", "--port", "0"], "--port must be 1..65535"),
    (["--topology", "v5e:4x4", "--xpk"], "--xpk needs --cluster"),
    (["--topology", "v5e:4x4", "--cluster", "c"], "go with --xpk"),
    (["--topology", "v5e:4x4", "--xpk", "--cluster", "c", "--tensorboard"], "for the JobSet path"),
    (["--topology", "v5e:4x4", "--bogus"], "unrecognized arguments"),
])
def test_bad_input_is_one_line(capsys, argv, needle):
  base = list(BASE)
  for flag in ("--workdir", "--gcs_bucket", "--name"):  # an override of a BASE flag replaces it
    if flag in argv:
      i = base.index(flag)
      del base[i:i + 2]
  code, out, err = run(capsys, *base, *argv)
  assert code == 2 and out == ""
  assert len(err.strip().splitlines()) == 1 and err.startswith("gke_jobset.py: error: ") and needle in err, err


def test_missing_flag_cli():
  r = subprocess.run([sys.executable, SCRIPT, "--image", "i", "--topology", "v5e:2x2"], capture_output=True, text=True)
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.strip().splitlines() == [
      "gke_jobset.py: error: the following arguments are required: --name, --config, --workdir; see --help"]


def _pods(plan_argv, port):
  """The (script, env) of each pod of the JobSet, as Kubernetes would start them, with the coordinator's service name
  replaced by this machine's loopback address."""
  plan, _ = gke.make_plan(plan_argv)
  js = gke.jobset(plan)
  rjob, job, pod, c = parts(js)
  static = {e["name"]: e["value"] for e in c["env"] if "value" in e}
  static["JAX_COORDINATOR_ADDRESS"] = static["JAX_COORDINATOR_ADDRESS"].replace(plan.coordinator_host, "127.0.0.1")
  static["JAX_COORDINATOR_ADDRESS"] = static["JAX_COORDINATOR_ADDRESS"].rsplit(":", 1)[0] + f":{port}"
  out = []
  for s in range(rjob["replicas"]):
    for h in range(job["parallelism"]):
      env = dict(os.environ, **static, JOB_INDEX=str(s), JOB_COMPLETION_INDEX=str(h), JAX_PLATFORMS="cpu",
                 PYTHONWARNINGS="ignore", PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
      out.append((c["command"], env))
  return out


def _start(pods, workdir):
  procs = []
  for i, (cmd, env) in enumerate(pods):
    with open(os.path.join(workdir, f"pod{i}.log"), "a") as log:
      procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log))
  return procs


@pytest.mark.slow(minutes=1)
def test_jobset_pods_train_stop_and_resume(tmp_path, tiny_config):
  """The pods of a 2-host slice, run here: the generated script starts dlm-train as 2 JAX processes; a SIGTERM to one
  (what a node drain or preemption sends) makes both save the same step and exit 143; starting the same pods again
  (what the JobSet restart does) resumes from that checkpoint and finishes."""
  import socket
  import time
  from conftest import losses
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  cfg = tiny_config(train__steps=400, train__checkpoint_every=1000, train__log_every=1)
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  pods = _pods(["--name", "rehearsal", "--image", "img", "--topology", "v5e:2x4", "--config", cfg, "--workdir",
                workdir, "--pvc", "claim", "--mount_path", str(tmp_path), "--", "--no_progress"], port)
  assert len(pods) == 2
  procs = _start(pods, workdir)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and not (os.path.exists(metrics) and len(losses(workdir)) >= 3):
    assert all(p.poll() is None for p in procs), open(os.path.join(workdir, "pod0.log")).read()[-3000:]
    time.sleep(0.05)
  procs[1].terminate()  # SIGTERM to process 1 only
  codes = [p.wait(timeout=300) for p in procs]
  saved = checkpoint_steps(workdir)
  assert codes == [143, 143], (codes, open(os.path.join(workdir, "pod0.log")).read()[-3000:])
  assert saved and saved[-1] < 400, saved
  stop = saved[-1]
  procs = _start(pods, workdir)  # the restart: the same pods, the same command
  codes = [p.wait(timeout=600) for p in procs]
  assert codes == [0, 0], open(os.path.join(workdir, "pod0.log")).read()[-3000:]
  with open(metrics) as f:
    steps = [json.loads(line)["step"] for line in f if json.loads(line)["kind"] == "train"]
  assert steps[-1] == 400 and stop + 1 in steps[steps.index(stop) + 1:]  # continued after the saved step
  assert sorted(set(s for s in steps if s > stop)) == list(range(stop + 1, 401))


def test_help():
  r = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True)
  assert r.returncode == 0 and "--dry-run" in r.stdout and "ct5lp-hightpu-4t" in r.stdout  # options and the slice table


TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")


def _tpu_pod(*argv, env=None):
  return subprocess.run(["bash", TPU_POD, "--name", "my-v4-32", "--zone", "us-central2-b", *argv], capture_output=True,
                        text=True, env=env)


def _tpu_worker_script(dry_run_stdout: str) -> str:
  """The script tpu_pod.sh sends to every worker, decoded from the ssh command its --dry-run prints."""
  ssh = shlex.split(dry_run_stdout.strip().splitlines()[-1])
  assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in ssh
  import base64
  import re
  b64 = re.search(r"echo (\S+) \| base64 -d", ssh[ssh.index("--command") + 1]).group(1)
  return base64.b64decode(b64).decode()


def test_tpu_pod_gs_workdir(tmp_path):
  """tpu_pod.sh takes a gs:// workdir: the install line brings the gcs extra, and the worker script, run here by bash
  with a stand-in venv, starts dlm-train with the URL verbatim and the worker's JAX variables."""
  r = _tpu_pod("--config", "configs/quickstart.py", "--workdir", GS_WORKDIR, "--repo", "https://example.com/dlm_jax.git",
               "--dry-run", "--", "--config.train.steps=20")
  assert r.returncode == 0, r.stderr
  assert '-m pip install --quiet -e ".[tpu,gcs]" "jax[tpu]"' in _tpu_worker_script(r.stdout)
  assert f"WORKDIR={GS_WORKDIR}" in r.stdout and "gcsfuse" not in r.stdout
  # --no-install: run the worker script against a checkout and a venv under tmp_path
  repo, venv = tmp_path / "repo", tmp_path / "venv"
  (repo / "configs").mkdir(parents=True)
  (repo / "configs" / "quickstart.py").write_text("")
  (venv / "bin").mkdir(parents=True)
  fake = venv / "bin" / "dlm-train"
  fake.write_text(f"#!{sys.executable}\nimport json, os, sys\nprint(json.dumps({{'argv': sys.argv[1:], 'env': "
                  "{k: v for k, v in os.environ.items() if k.startswith('JAX_')}}))\n")
  python = venv / "bin" / "python"  # the venv's interpreter: this one, which has gcsfs (the gcs extra)
  python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
  for f in (fake, python):
    f.chmod(0o755)
  r = _tpu_pod("--config", "configs/quickstart.py", "--workdir", GS_WORKDIR, "--no-install", "--remote-dir", str(repo),
               "--venv", str(venv), "--dry-run", "--", "--config.train.steps=20")
  assert r.returncode == 0, r.stderr
  script = _tpu_worker_script(r.stdout)
  env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TPU_WORKER_ID": "1"}
  w = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
  assert w.returncode == 0, w.stderr
  got = json.loads(w.stdout.strip().splitlines()[-1])
  assert got["argv"] == ["--config", "configs/quickstart.py", "--workdir", GS_WORKDIR, "--config.train.steps=20"]
  assert got["env"] == {"JAX_COORDINATOR_ADDRESS": "WORKER0_IP:8476", "JAX_NUM_PROCESSES": "NUM_WORKERS",
                        "JAX_PROCESS_ID": "1"}  # (--dry-run does not ask gcloud for the workers)
  # a venv installed without the gcs extra: one clear line instead of a failing dlm-train on every worker
  python.write_text("#!/bin/sh\nexit 1\n")
  w = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
  assert w.returncode == 1 and w.stdout == ""
  assert w.stderr.strip() == (f"[worker 1] a gs:// workdir needs the gcs extra in {venv}; run without --no-install "
                              "(it installs .[tpu,gcs])")


@pytest.mark.parametrize("workdir,needle", [
    ("runs/x", "must be a gs://BUCKET/PATH URL or an absolute path"),
    ("gs://My_Bucket/x", "is not gs://BUCKET/PATH"),
    ("s3://bucket/x", "the workers get the gcs extra only"),
])
def test_tpu_pod_bad_workdir(workdir, needle):
  r = _tpu_pod("--config", "configs/quickstart.py", "--workdir", workdir, "--no-install", "--dry-run")
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("tpu_pod.sh: error: ")
  assert needle in r.stderr, r.stderr
  # a shared filesystem path is still fine
  r = _tpu_pod("--config", "configs/quickstart.py", "--workdir", "/mnt/filestore/runs/x", "--no-install", "--dry-run")
  assert r.returncode == 0, r.stderr
