"""Run logs: metrics as JSON lines (`<workdir>/metrics.jsonl`) and TensorBoard event files (`<workdir>/tensorboard/`)."""

from __future__ import annotations

import json
import math
import os
import time

import jax


class MetricWriter:
  """Writes on process 0 only; numbers are converted to Python floats, text goes to JSON only.

  `resume_step`: the checkpoint step a run resumes from. Rows that an interrupted run wrote after it (steps it ran
  but never checkpointed, which the resumed run repeats) are dropped from metrics.jsonl, and TensorBoard is told to
  purge its events after that step, so each step appears once in both.
  """

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      _drop_rows_after(path, resume_step)
    self._jsonl = open(path, "a", buffering=1)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                               purge_step=None if resume_step is None else resume_step + 1)
    except ImportError:  # TensorBoard files are optional; JSON lines are always written
      self._tb = None

  def write(self, step: int, kind: str, values: dict) -> None:
    if not self.active:
      return
    row = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
    for k, v in values.items():
      if isinstance(v, str) or isinstance(v, list):
        row[k] = v
      else:
        f = float(v)
        row[k] = f if math.isfinite(f) else str(f)
        if self._tb is not None:
          self._tb.add_scalar(f"{kind}/{k}", f, step)
    self._jsonl.write(json.dumps(row) + "\n")

  def close(self) -> None:
    if not self.active:
      return
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without the rows of steps after `step` (atomically: a crash leaves the old file)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = [line for line in lines if not line.strip() or _row_step(line) <= step]
  if len(keep) == len(lines):
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def _row_step(line: str) -> int:
  try:
    return int(json.loads(line).get("step", 0))
  except (ValueError, AttributeError):  # a torn last line of a killed run
    return 1 << 62


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
