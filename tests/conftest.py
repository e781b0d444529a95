"""Shared helpers: small configs written as files, Markov-chain text, and running the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import markov  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite compiles hundreds of small programs, in this process and in CLI subprocesses (which inherit the setting):
# XLA's CPU backend at LLVM optimisation level 1 instead of 2 compiles them about a quarter faster, and the long
# statistical tests run as fast as at level 2. Semantics do not change; a level set in XLA_FLAGS by the caller wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()


# libtpu (installed by the test extra) compiles for TPU topologies on this CPU host. Without a TPU it logs worker-host
# errors unless told the host is alone, and its process lock file would let only one test process load it at a time.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def require_libtpu() -> None:
  """Skips the calling test when libtpu (the TPU compiler the compile tests run on this CPU host) is not installed."""
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  except ImportError:
    pytest.skip("libtpu is not installed: it is the TPU compiler these tests run (no TPU needed); "
                "pip install -e '.[test]' brings it")


def pytest_collection_modifyitems(items):
  """Tests marked `slow` run first, longest (`slow(minutes=...)`) first, so the parallel workers share them and the
  short tests fill in around them."""
  def order(item):
    mark = item.get_closest_marker("slow")
    return (mark is None, -(mark.kwargs.get("minutes", 1) if mark else 0))
  items.sort(key=order)


TINY = {
    "model.num_layers": 1, "model.d_model": 32, "model.num_heads": 2, "model.mlp_dim": 64, "model.max_seq_len": 32,
    "data.seq_len": 16, "data.val_fraction": 0.1, "train.steps": 6, "train.batch_size": 8, "train.warmup_steps": 2,
    "train.log_every": 1, "train.checkpoint_every": 3, "train.eval_every": 0, "train.learning_rate": 1e-3,
    "eval.batch_size": 8, "eval.max_batches": 2, "sampler.steps": 8, "sampler.batch_size": 4,
}


def write_config(path: str, values: dict) -> str:
  lines = ["from dlm_jax.config import default_config", "", "", "def get_config():", "  c = default_config()"]
  for k, v in values.items():
    lines.append(f"  c.{k} = {v!r}")
  lines.append("  return c")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


@pytest.fixture
def markov_text(tmp_path):
  path = tmp_path / "chain.txt"
  path.write_text(markov.generate(20_000, seed=1))
  return str(path)


@pytest.fixture
def tiny_config(tmp_path, markov_text):
  """Factory: tiny_config(**overrides) -> path of a config file over the Markov text."""

  def make(name="tiny.py", **overrides):
    values = dict(TINY)
    values["data.path"] = markov_text
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return write_config(str(tmp_path / name), values)

  return make


def run_cli(cmd: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
  full_env = dict(os.environ)
  full_env.setdefault("JAX_PLATFORMS", "cpu")
  full_env["PYTHONWARNINGS"] = "ignore"
  if env:
    full_env.update(env)
    if "XLA_FLAGS" in env:  # added to the session's flags, not instead of them
      full_env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + env["XLA_FLAGS"]).strip()
  return subprocess.run([sys.executable, "-c", f"import sys; from dlm_jax.cli import {cmd}_main as m; sys.exit(m())",
                         *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO)


def train_and_resume(cfg, tmp_path, stop: int, last: int) -> tuple[str, str]:
  """Trains `cfg` to step `last` in tmp_path/straight (checkpoints at `stop` and `last`), copies that run as it was when
  stopped after step `stop` to tmp_path/resumed, resumes it, and checks the resumed steps' losses equal the
  uninterrupted ones bit for bit. Returns (straight, resumed)."""
  import shutil
  from dlm_jax.train import train
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train(cfg, straight, progress=False)
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", str(last)))
  os.remove(os.path.join(resumed, "metrics.jsonl"))
  train(cfg, resumed, progress=False)
  a, b = losses(straight), losses(resumed)
  assert sorted(b) == list(range(stop + 1, last + 1))
  assert all(a[s] == b[s] for s in b), (a, b)
  return straight, resumed


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the complete checkpoints in a workdir, ascending ([] when it has none)."""
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def losses(workdir: str) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if row["kind"] == "train":
        out[row["step"]] = row["loss"]
  return out


def train_bpe(path, texts, special_tokens=("<|endoftext|>",)) -> str:
  """A small byte-level BPE tokenizer.json trained with the tokenizers library on `texts`; returns its path."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(special_tokens),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  tok.save(str(path))
  return str(path)


def counting(fn):
  """Wraps a logits function: returns (wrapped, calls); every real call, also inside jit and lax loops, appends to
  `calls`, so NFE statistics can be checked against the truth."""
  import jax
  calls = []

  def counted(tokens, t):
    jax.debug.callback(lambda: calls.append(1))
    return fn(tokens, t)

  return counted, calls


def random_transformer(vocab: int = 12):
  """A tiny random dlm_jax transformer over `vocab` tokens plus a mask id (= vocab), init_std 0.4 so its logits are
  far from uniform: (apply_fn, params). Sampler and block-diffusion tests run on it."""
  from dlm_jax import model as model_lib
  c = model_lib.ModelConfig(vocab_in=vocab + 1, vocab_out=vocab, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                            head_dim=8, mlp_dim=64, max_seq_len=64, init_std=0.4)
  graphdef, params = model_lib.init(c, 0)
  return model_lib.make_apply(graphdef), params


def exact_cache(fn):
  """A toy cache-aware form of `fn` whose 'cache' is the whole token array: a window call sees exactly the current
  sequence, so a cached decode must equal the uncached one (tests the sampler's window and cache bookkeeping)."""
  import jax

  def cached(window, t, start, cache):
    if cache is None or window.shape[1] == cache.shape[1]:
      return fn(window, t), window
    tokens = jax.lax.dynamic_update_slice_in_dim(cache, window, start, axis=1)
    return jax.lax.dynamic_slice_in_dim(fn(tokens, t), start, window.shape[1], axis=1), tokens

  return cached
