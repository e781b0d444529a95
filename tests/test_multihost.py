"""Multi-host robustness, rehearsed with launch/local_multiprocess.sh (2 CPU processes, loopback coordinator).

SIGTERM to one process (a preemption notice): JAX's preemption sync point makes both save the same step and exit 143,
and rerunning the command continues with the losses of an uninterrupted run. SIGKILL of one process (a crashed host)
after a checkpoint: the launcher names the dead process, stops the other and exits non-zero; a save cut short is not
picked up, and rerunning resumes from the last complete checkpoint with the uninterrupted run's losses.

Every wait is on an observable event (a checkpoint directory, the launcher's exit) with a generous timeout, never on
the machine's speed."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY, checkpoint_steps, losses, write_config
import markov

STEPS = 120
LAUNCH_TIMEOUT = 600  # seconds for one launcher run (compiling and 120 tiny steps take well under a minute)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  """(config path, train losses of an uninterrupted 2-process run), shared by the tests of this module."""
  root = tmp_path_factory.mktemp("multihost")
  text = root / "chain.txt"
  text.write_text(markov.generate(20_000, seed=1))
  values = dict(TINY, **{"data.path": str(text), "train.steps": STEPS, "train.checkpoint_every": 5})
  cfg = write_config(str(root / "tiny.py"), values)
  wd = str(root / "straight")
  proc = _launch(cfg, wd, root / "straight.err")
  rc = proc.wait(timeout=LAUNCH_TIMEOUT)
  assert rc == 0, _stderr(root / "straight.err")
  want = losses(wd)
  assert sorted(want) == list(range(1, STEPS + 1))
  return cfg, want


def _launch(cfg: str, workdir: str, err_path, grace: int = 60, **env_vars) -> subprocess.Popen:
  """The launcher with 2 processes in the background; its stderr (and process 0's) goes to err_path."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore", GRACE_SECONDS=str(grace),
             PATH=os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", ""), **env_vars)
  err = open(err_path, "w")
  return subprocess.Popen(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", cfg, workdir,
                           "--no_progress"], stdout=err, stderr=err, env=env, cwd=REPO, text=True)


def _stderr(path) -> str:
  return open(path).read()


def _wait_for_checkpoint(proc: subprocess.Popen, workdir: str, err_path) -> None:
  """Blocks until the running job has completed a checkpoint: Orbax renamed its step directory into place once every
  process wrote its part, and the step's file record is written (a step directory without it is an interrupted save,
  which a resume sets aside)."""
  from dlm_jax.checkpoint import RECORD_SUFFIX
  deadline = time.time() + LAUNCH_TIMEOUT
  records = lambda: [s for s in checkpoint_steps(workdir)
                     if os.path.exists(os.path.join(workdir, "checkpoints", f"{s}{RECORD_SUFFIX}"))]
  while not records():
    assert proc.poll() is None, f"the job ended before its first checkpoint:\n{_stderr(err_path)}"
    assert time.time() < deadline, "no checkpoint within the timeout"
    time.sleep(0.05)


def _pid(workdir: str, process: int) -> int:
  with open(os.path.join(workdir, "multiprocess_logs", f"process_{process}.pid")) as f:
    return int(f.read())


def _train_rows(workdir: str) -> list[tuple[int, float]]:
  """(step, loss) of the 'train' rows of metrics.jsonl, in file order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f.read().splitlines()]
  return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def _rerun_matches(job, workdir: str, err_path, resumed_from: int) -> None:
  """Reruns the same command: it must resume after `resumed_from`, finish, and log the uninterrupted run's losses."""
  cfg, want = job
  proc = _launch(cfg, workdir, err_path)
  assert proc.wait(timeout=LAUNCH_TIMEOUT) == 0, _stderr(err_path)
  rows = _train_rows(workdir)
  assert [s for s, _ in rows] == list(range(1, STEPS + 1))  # each step once: the killed run's later rows were dropped
  got = dict(r for r in rows if r[0] > resumed_from)
  assert all(got[s] == want[s] for s in got), [(s, got[s], want[s]) for s in got if got[s] != want[s]]  # bit-exact
  assert checkpoint_steps(workdir)[-1] == STEPS


@pytest.mark.slow(minutes=2)
def test_sigterm_to_one_process_saves_the_same_step_on_both(tmp_path, job):
  cfg, want = job
  wd = str(tmp_path / "wd")
  err = tmp_path / "run.err"
  proc = _launch(cfg, wd, err)
  _wait_for_checkpoint(proc, wd, err)
  os.kill(_pid(wd, 1), signal.SIGTERM)
  rc = proc.wait(timeout=LAUNCH_TIMEOUT)
  out = _stderr(err)
  assert rc == 143, out
  assert "process 1 exited with status 143 (stopped on SIGTERM)" in out, out
  saved = {p: re.findall(r"SIGTERM: saved checkpoint at step (\d+)", text)
           for p, text in ((0, out), (1, open(os.path.join(wd, "multiprocess_logs", "process_1.log")).read()))}
  assert len(saved[0]) == len(saved[1]) == 1 and saved[0] == saved[1], saved  # both saved, the same step
  step = int(saved[0][0])
  assert step < STEPS, "SIGTERM arrived too late to test resumption"
  assert checkpoint_steps(wd)[-1] == step
  stopped = losses(wd)
  assert max(stopped) == step and all(stopped[s] == want[s] for s in stopped)
  _rerun_matches(job, wd, tmp_path / "rerun.err", resumed_from=step)


@pytest.mark.slow(minutes=2)
@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_sigkill_of_one_process_stops_the_job_and_a_rerun_resumes(tmp_path, job, victim):
  """A crashed host (process 1, or process 0 which also hosts the coordination service)."""
  cfg, want = job
  wd = str(tmp_path / "wd")
  err = tmp_path / "run.err"
  proc = _launch(cfg, wd, err, grace=30)
  _wait_for_checkpoint(proc, wd, err)
  pid = _pid(wd, victim)
  others = [_pid(wd, p) for p in (0, 1) if p != victim]
  os.kill(pid, signal.SIGKILL)
  rc = proc.wait(timeout=LAUNCH_TIMEOUT)
  out = _stderr(err)
  assert rc != 0, out
  assert f"process {victim} (pid {pid}) was killed by signal KILL (status 137); stopping the others" in out, out
  for p in others:  # reaped by the launcher
    with pytest.raises(ProcessLookupError):
      os.kill(p, 0)

  # The newest complete checkpoint (a later step directory may be an interrupted save: the kill can land between
  # Orbax's rename and the file record); what the job logged before the kill matches the straight run.
  from dlm_jax.checkpoint import Checkpointer
  complete = Checkpointer(wd, read_only=True).steps()
  assert complete and set(checkpoint_steps(wd)) >= set(complete)
  last = complete[-1]
  logged = dict(_train_rows(wd))
  assert last <= max(logged) < STEPS, "the job finished before the kill"
  assert all(logged[s] == want[s] for s in logged)
  _rerun_matches(job, wd, tmp_path / "rerun.err", resumed_from=last)


@pytest.mark.slow(minutes=1)
def test_preemption_service_off_is_a_clear_error(tmp_path, tiny_config):
  """Without JAX's preemption service a multi-process run could not agree on a SIGTERM step: one line, exit 2."""
  cfg = tiny_config(train__steps=3)
  err = tmp_path / "run.err"
  proc = _launch(cfg, str(tmp_path / "wd"), err, JAX_ENABLE_PREEMPTION_SERVICE="false")
  assert proc.wait(timeout=LAUNCH_TIMEOUT) == 2, _stderr(err)
  assert "dlm-train: error: multi-process training needs JAX's preemption service" in _stderr(err)
