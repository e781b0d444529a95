"""Run logs: metrics as JSON lines (`<workdir>/metrics.jsonl`) and TensorBoard event files (`<workdir>/tensorboard/`)."""

from __future__ import annotations

import json
import math
import time

import jax

from dlm_jax import storage


class MetricWriter:
  """Writes on process 0 only; numbers are converted to Python floats, text goes to JSON only.

  `resume_step`: the checkpoint step a run resumes from. Rows that an interrupted run wrote after it (steps it ran
  but never checkpointed, which the resumed run repeats) are dropped from metrics.jsonl, and TensorBoard is told to
  purge its events after that step, so each step appears once in both.
  """

  UPLOAD_SECONDS = 30.0  # a remote metrics.jsonl is rewritten at most this often (and at close)

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    storage.makedirs(workdir)
    self._path = storage.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      _drop_rows_after(self._path, resume_step)
    # A local file is appended line by line; an object (gs://) cannot be appended to, so its lines are kept here and
    # the whole object rewritten every UPLOAD_SECONDS and at close.
    self._remote = storage.is_remote(self._path)
    self._lines: list[str] = []
    if self._remote:
      self._lines = storage.read_text(self._path).splitlines(keepends=True) if storage.exists(self._path) else []
      self._uploaded = time.monotonic()
    else:
      self._jsonl = storage.open_file(self._path, "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(storage.join(workdir, "tensorboard"),
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
    line = json.dumps(row, allow_nan=False) + "\n"
    if not self._remote:
      self._jsonl.write(line)
      self._jsonl.flush()
      return
    self._lines.append(line)
    if time.monotonic() - self._uploaded >= self.UPLOAD_SECONDS:
      self._upload()

  def _upload(self) -> None:
    storage.write_text(self._path, "".join(self._lines))
    self._uploaded = time.monotonic()

  def close(self) -> None:
    if not self.active:
      return
    if self._remote:
      self._upload()
    else:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _drop_rows_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without the rows of steps after `step` (atomically: a crash leaves the old file)."""
  if not storage.exists(path):
    return
  lines = storage.read_text(path).splitlines(keepends=True)
  keep = [line for line in lines if not line.strip() or _row_step(line) <= step]
  if len(keep) != len(lines):
    storage.write_text(path, "".join(keep))


def _row_step(line: str) -> int:
  try:
    return int(json.loads(line).get("step", 0))
  except (ValueError, AttributeError):  # a torn last line of a killed run
    return 1 << 62


def read_metrics(workdir: str) -> list[dict]:
  path = storage.join(workdir, "metrics.jsonl")
  if not storage.exists(path):
    return []
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
