"""Checkpoint integrity: damage of every kind is detected, named, and never used; dlm-train falls back to the newest
intact step without touching intact bytes; a save killed midway leaves the earlier checkpoints usable."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, checkpoint_steps, losses, run_cli

from dlm_jax import config as config_lib
from dlm_jax.checkpoint import RECORD_SUFFIX, Checkpointer, DamagedCheckpoint, array_digests
from dlm_jax.train import _set_aside, resume_step, train


def _tree_hashes(root: str) -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _step_files(wd: str, step: int) -> dict[str, int]:
  root = os.path.join(wd, "checkpoints", str(step))
  return {os.path.relpath(os.path.join(d, f), root): os.path.getsize(os.path.join(d, f))
          for d, _, fs in os.walk(root) for f in fs}


def _pick(wd: str, step: int, kind: str) -> str:
  """The file of a step that a damage kind targets (relative to the step directory)."""
  files = _step_files(wd, step)
  if kind == "array":  # the largest array data file (OCDBT data under state/)
    return max((f for f in files if "ocdbt.process_0/d/" in f), key=lambda f: files[f])
  return {"state_metadata": "state/_METADATA", "ocdbt_manifest": "state/manifest.ocdbt",
          "config_item": "config/metadata", "data_item": "data/metadata", "integrity_item": "integrity/metadata",
          "orbax_metadata": "_CHECKPOINT_METADATA"}[kind]


def _flip(path: str) -> None:
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    mid = len(data) // 2
    for i in range(mid, min(mid + 8, len(data))):
      data[i] ^= 0x5A
    f.seek(0)
    f.write(data)


def _damage(wd: str, step: int, how: str, kind: str) -> str:
  """Applies one damage; returns the name the error must carry."""
  if kind == "record":
    path = os.path.join(wd, "checkpoints", f"{step}{RECORD_SUFFIX}")
    _flip(path)
    return f"{step}{RECORD_SUFFIX}"
  rel = _pick(wd, step, kind)
  path = os.path.join(wd, "checkpoints", str(step), rel)
  if how == "flip":
    _flip(path)
  elif how == "truncate":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif how == "delete":
    os.remove(path)
  return rel


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run with complete checkpoints at steps 2, 4 and 6."""
  import conftest
  import markov
  base = tmp_path_factory.mktemp("integrity")
  text = base / "chain.txt"
  text.write_text(markov.generate(20_000, seed=1))
  values = dict(conftest.TINY, **{"data.path": str(text), "train.steps": 6, "train.checkpoint_every": 2,
                                  "train.keep_checkpoints": 3})
  cfg_path = conftest.write_config(str(base / "cfg.py"), values)
  wd = str(base / "wd")
  train(config_lib.load(cfg_path), wd, progress=False)
  assert Checkpointer(wd, read_only=True).steps() == [2, 4, 6]
  return wd, cfg_path


CASES = [("flip", "array"), ("flip", "state_metadata"), ("flip", "ocdbt_manifest"), ("flip", "config_item"),
         ("flip", "data_item"), ("flip", "integrity_item"), ("flip", "orbax_metadata"), ("flip", "record"),
         ("truncate", "array"), ("truncate", "state_metadata"), ("delete", "array"), ("delete", "config_item")]


def test_corruption_matrix(trained, tmp_path):
  """Every damage kind, in the latest and in an older step: verify names the step and the damaged file, the resume
  choice skips exactly the damaged steps newer than the newest intact one, setting them aside moves them (never
  deletes) and leaves every intact checkpoint's bytes as they were."""
  src, _ = trained
  for (how, kind), target in [(case, target) for target in ("latest", "older") for case in CASES]:
    step = 6 if target == "latest" else 4
    wd = str(tmp_path / f"{how}-{kind}-{target}")
    shutil.copytree(src, wd)
    name = _damage(wd, step, how, kind)
    intact = {s: _tree_hashes(os.path.join(wd, "checkpoints", str(s))) for s in (2, 4, 6) if s != step}
    ckpt = Checkpointer(wd, read_only=True)
    with pytest.raises(DamagedCheckpoint) as e:
      ckpt.verify(step)
    assert e.value.step == step and e.value.item == name, (how, kind, str(e.value))
    assert f"checkpoint step {step}" in str(e.value) and name in str(e.value)
    start, aside = resume_step(Checkpointer(wd, read_only=True))
    if target == "latest":
      assert start == 4 and [s for s, _ in aside] == [6], (how, kind, aside)
    else:  # the newest step is intact: nothing to set aside (the older damage waits until someone needs that step)
      assert start == 6 and aside == [], (how, kind, aside)
    _set_aside(wd, aside, start)
    for s, hashes in intact.items():
      assert _tree_hashes(os.path.join(wd, "checkpoints", str(s))) == hashes, (how, kind, s)
    if target == "latest":
      assert os.path.isdir(os.path.join(wd, "checkpoints", "damaged", "6"))
      assert Checkpointer(wd, read_only=True).steps() == [2, 4]
    shutil.rmtree(wd)


def test_array_digests_catch_damage_the_file_record_misses(trained, tmp_path):
  """Bytes damaged on the way (the file record matches what is stored, the arrays do not match what was saved):
  the restore's own digests name the array. Digests on the host (dlm-convert's save) equal those on the device."""
  src, _ = trained
  wd = str(tmp_path / "wd")
  shutil.copytree(src, wd)
  for rel in _step_files(wd, 6):  # every array data file, so whichever arrays inference reads are hit
    if "ocdbt.process_0/d/" in rel:
      _flip(os.path.join(wd, "checkpoints", "6", rel))
  ckpt = Checkpointer(wd, read_only=True)
  ckpt._write_record(6)  # the record now describes the damaged bytes
  ckpt._verified.clear()
  ckpt.verify(6)
  from dlm_jax.train import load_for_inference
  with pytest.raises(DamagedCheckpoint) as e:
    load_for_inference(wd)
  assert e.value.step == 6 and e.value.item.startswith("array "), str(e.value)
  import jax
  import jax.numpy as jnp
  tree = {"f32": jnp.linspace(-3, 3, 1000).reshape(10, 100), "bf16": jnp.arange(77, dtype=jnp.bfloat16),
          "i32": jnp.arange(-5, 5, dtype=jnp.int32), "b": jnp.array([True, False, True])}
  assert array_digests(tree) == array_digests(jax.tree.map(np.asarray, tree))
  changed = dict(tree, f32=tree["f32"].at[3, 7].add(1e-6))
  assert array_digests(changed)["f32"] != array_digests(tree)["f32"]
  swapped = dict(tree, i32=tree["i32"][::-1])  # same elements, other places
  assert array_digests(swapped)["i32"] != array_digests(tree)["i32"]


def test_commands_refuse_or_fall_back(trained, tmp_path):
  """A damaged latest step: dlm-eval and dlm-sample print one error line naming it and the file (exit 2); dlm-train
  warns, sets it aside, resumes from step 4 and repeats the uninterrupted run's losses."""
  src, cfg_path = trained
  wd = str(tmp_path / "wd")
  shutil.copytree(src, wd)
  name = _damage(wd, 6, "flip", "array")
  for cmd, extra in (("eval", ()), ("sample", ("--num_samples", "1", "--output", str(tmp_path / "s.jsonl")))):
    r = run_cli(cmd, "--workdir", wd, *extra)
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"dlm-{cmd}: error: checkpoint step 6 in ") and name in err[0], err
  assert not os.path.exists(tmp_path / "s.jsonl")
  intact = {s: _tree_hashes(os.path.join(wd, "checkpoints", str(s))) for s in (2, 4)}
  r = run_cli("train", "--config", cfg_path, "--workdir", wd, "--no_progress")
  assert r.returncode == 0, r.stderr
  warn = [line for line in r.stderr.splitlines() if line.startswith("dlm-train: warning:")]
  assert len(warn) == 1 and "checkpoint step 6" in warn[0] and "resuming from step 4" in warn[0], r.stderr
  assert os.path.isdir(os.path.join(wd, "checkpoints", "damaged", "6"))
  for s, hashes in intact.items():
    assert _tree_hashes(os.path.join(wd, "checkpoints", str(s))) == hashes
  a, b = losses(src), losses(wd)
  assert [b[s] for s in (5, 6)] == [a[s] for s in (5, 6)]
  assert checkpoint_steps(wd) == [2, 4, 6]


def test_kill_during_save_leaves_earlier_checkpoints_usable(tmp_path, tiny_config):
  """dlm-train saving every step is killed (SIGKILL) while saves are in flight: every complete step that remains
  verifies, the rerun sets the interrupted save aside (if the kill caught one) and finishes with the losses of an
  uninterrupted run. Kills are repeated at different moments until one lands inside a save (a step directory
  without its record, or Orbax's temporary directory)."""
  cfg = tiny_config(train__steps=40, train__checkpoint_every=1, train__keep_checkpoints=2, train__log_every=1,
                    model__d_model=64, model__mlp_dim=256)
  straight = str(tmp_path / "straight")  # (saves do not change the losses: this one saves only at the end)
  assert run_cli("train", "--config", cfg, "--workdir", straight, "--no_progress",
                 "--config.train.checkpoint_every=40").returncode == 0
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
  caught = False
  for attempt in range(6):
    wd = str(tmp_path / f"killed{attempt}")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from dlm_jax.cli import train_main as m; sys.exit(m())",
                             "--config", cfg, "--workdir", wd, "--no_progress"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # kill once step 3 + 2 * attempt has been reached (each attempt a little later), or when the run ends by itself
    while proc.poll() is None and time.time() < deadline and max(checkpoint_steps(wd) or [0]) < 3 + 2 * attempt:
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = Checkpointer(wd, read_only=True)
    tmp = [n for n in os.listdir(os.path.join(wd, "checkpoints")) if "tmp" in n]
    caught = bool(ckpt.incomplete_steps() or tmp)
    for s in ckpt.steps():
      ckpt.verify(s)  # every complete step is intact
    if caught:
      break
  assert caught, "no kill landed inside a save"
  assert ckpt.steps(), "the kill left no complete checkpoint"
  r = run_cli("train", "--config", cfg, "--workdir", wd, "--no_progress")
  assert r.returncode == 0, r.stderr
  a, b = losses(straight), losses(wd)
  assert all(a[s] == b[s] for s in range(ckpt.steps()[-1] + 1, 41)), (a, b)


def test_time_based_saves_and_retention(tmp_path, tiny_config):
  """train.checkpoint_minutes saves whenever that much time has passed (here: always), independently of
  train.checkpoint_every; train.keep_checkpoints complete steps remain, each with its record, and all verify."""
  cfg = config_lib.load(tiny_config(train__steps=6, train__checkpoint_every=1000, train__checkpoint_minutes=1e-9,
                                    train__keep_checkpoints=2))
  wd = str(tmp_path / "wd")
  train(cfg, wd, progress=False)
  ckpt = Checkpointer(wd, read_only=True)
  assert ckpt.steps() == [5, 6] and checkpoint_steps(wd) == [5, 6] and not ckpt.incomplete_steps()
  for s in ckpt.steps():
    ckpt.verify(s)
