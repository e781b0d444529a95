"""gs:// workdirs end to end against a real Cloud Storage emulator on loopback (tests/gcs_emulator.py): train into
gs://bucket/run, SIGTERM, resume, evaluate and sample from it, and compare every figure with the same run on local
disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, losses, run_cli
from gcs_emulator import Emulator


@pytest.fixture(scope="module")
def gcs():
  em = Emulator()
  em.make_bucket("bucket")
  yield em
  em.close()


def _remote_losses(gcs, name: str) -> dict[int, float]:
  rows = [json.loads(line) for line in gcs.read("bucket", name).decode().splitlines() if line.strip()]
  return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.mark.slow
def test_train_preempt_resume_eval_sample_on_gcs(gcs, tmp_path, tiny_config):
  cfg = tiny_config(train__steps=20, train__checkpoint_every=5)
  local = str(tmp_path / "local")
  r = run_cli("train", "--config", cfg, "--workdir", local, "--no_progress")
  assert r.returncode == 0, r.stderr

  remote = "gs://bucket/run"
  every = "--config.train.checkpoint_every=1"  # saves do not change the losses; one per step gives SIGTERM time to land
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore", **gcs.env)
  proc = subprocess.Popen([sys.executable, "-c", "import sys; from dlm_jax.cli import train_main as m; sys.exit(m())",
                           "--config", cfg, "--workdir", remote, "--no_progress", every], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while "run/checkpoints/3.integrity.json" not in gcs.list("bucket", "run/checkpoints/"):
    assert proc.poll() is None and time.time() < deadline, proc.communicate()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err
  stopped = max(int(n.split("/")[-1].split(".")[0]) for n in gcs.list("bucket", "run/checkpoints/")
                if n.endswith(".integrity.json"))
  assert 3 <= stopped < 20
  assert sorted(_remote_losses(gcs, "run/metrics.jsonl")) == list(range(1, stopped + 1))

  r = run_cli("train", "--config", cfg, "--workdir", remote, "--no_progress", every, env=gcs.env)
  assert r.returncode == 0, r.stderr
  a, b = losses(local), _remote_losses(gcs, "run/metrics.jsonl")
  assert sorted(b) == list(range(1, 21)) and all(a[s] == b[s] for s in b), (a, b)
  names = gcs.list("bucket", "run/")
  assert "run/config.json" in names and any(n.startswith("run/tensorboard/") for n in names)
  complete = sorted(int(n.split("/")[-1].split(".")[0]) for n in names if n.endswith(".integrity.json"))
  assert complete == [18, 19, 20]  # train.keep_checkpoints = 3

  e_local = run_cli("eval", "--workdir", local)
  e_remote = run_cli("eval", "--workdir", remote, env=gcs.env)
  assert e_local.returncode == 0 and e_remote.returncode == 0, e_remote.stderr
  assert json.loads(e_remote.stdout.strip().splitlines()[-1]) == json.loads(e_local.stdout.strip().splitlines()[-1])

  s_local = run_cli("sample", "--workdir", local, "--num_samples", "2", "--output", str(tmp_path / "s.jsonl"))
  s_remote = run_cli("sample", "--workdir", remote, "--num_samples", "2", "--output", "gs://bucket/samples.jsonl",
                     env=gcs.env)
  assert s_local.returncode == 0 and s_remote.returncode == 0, s_remote.stderr
  mine = [json.loads(line)["tokens"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
  theirs = [json.loads(line)["tokens"] for line in gcs.read("bucket", "samples.jsonl").decode().splitlines()]
  assert mine == theirs


def test_convert_into_and_out_of_gcs(gcs, tmp_path):
  """dlm-convert --from_hf into gs://bucket/llada (built locally, uploaded; its checkpoint verifies against the server's
  checksums), dlm-sample reads it with the tokenizer from the bucket, and --to_hf from there writes the source files
  back bit for bit."""
  src = os.path.join(REPO, "tests", "fixtures", "hf", "llada")
  r = run_cli("convert", "--from_hf", src, "--workdir", "gs://bucket/llada", env=gcs.env)
  assert r.returncode == 0, r.stderr
  names = gcs.list("bucket", "llada/")
  assert "llada/checkpoints/0.integrity.json" in names and "llada/hf/tokenizer.json" in names
  s = run_cli("sample", "--workdir", "gs://bucket/llada", "--num_samples", "1", "--output", str(tmp_path / "s.jsonl"),
              "--prompt", "a", "--config.sampler.steps=2", "--config.sampler.length=8", env=gcs.env)
  assert s.returncode == 0, s.stderr
  out = tmp_path / "back"
  r = run_cli("convert", "--workdir", "gs://bucket/llada", "--to_hf", str(out), env=gcs.env)
  assert r.returncode == 0, r.stderr
  from safetensors.numpy import load_file
  for name in os.listdir(src):
    if name.endswith(".safetensors"):  # every tensor bit for bit (the header's key order may differ)
      a, b = load_file(os.path.join(src, name)), load_file(str(out / name))
      assert sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    elif name == "model.safetensors.index.json":
      assert json.loads((out / name).read_text())["weight_map"] == json.load(open(os.path.join(src, name)))["weight_map"]
    elif name not in ("expected.json", "expected.npz"):
      assert (out / name).read_bytes() == open(os.path.join(src, name), "rb").read(), name
