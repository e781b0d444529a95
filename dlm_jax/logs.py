"""Run logs: metrics as JSON lines (`<workdir>/metrics.jsonl`) and TensorBoard event files (`<workdir>/tensorboard/`)."""

from __future__ import annotations

import json
import math
import os
import time

import jax


class MetricWriter:
  """Writes on process 0 only; numbers are converted to Python floats, text goes to JSON only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
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


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
