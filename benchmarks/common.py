"""Shared benchmark helpers: the machine's float32 matmul peak and analytic model FLOPs."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from dlm_jax.aot import train_flops_per_token  # noqa: F401  (one FLOP count for dlm-compile and the benchmarks)


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
  """Best achieved FLOP/s of an n x n x n float32 matmul through XLA on the default device."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def train_step_setup(cfg):
  """The real train step of `cfg` (dlm-train's) with a fresh state and one batch of random token ids, as the data
  pipeline would give it (with segment ids when data.segment_attention): (run, state, step, batch dict)."""
  import numpy as np
  from dlm_jax.build import build
  from dlm_jax.data import segment_ids
  from dlm_jax.train import abstract_train_state, init_train_state, make_optimizer, make_train_step, state_shardings
  run = build(cfg)
  opt = make_optimizer(cfg)
  shardings = state_shardings(run, opt, abstract_train_state(run, opt))
  state = init_train_state(run, opt, shardings)
  step = make_train_step(run, opt, shardings)
  b, l = cfg.train.batch_size, cfg.data.seq_len
  tokens = np.random.default_rng(0).integers(0, run.tokenizer.vocab_size, (b, l), dtype=np.int32)
  batch = {"tokens": tokens}
  if cfg.data.segment_attention:
    batch["segment_ids"] = segment_ids(tokens, run.tokenizer.eos_id)
  return run, state, step, {k: jax.device_put(v, run.batch_sharding(v.ndim)) for k, v in batch.items()}


def config_with(cfg, overrides: dict):
  """A validated copy of `cfg` with dotted-key overrides (the benchmarks' variants of one base config)."""
  from dlm_jax import config as config_lib
  c = config_lib.config_from_dict(config_lib.to_dict(cfg))
  config_lib.apply_overrides(c, overrides.items(), origin="benchmark")
  return config_lib.validate(c)


def median_step_seconds(cfg, steps: int) -> tuple[float, int]:
  """(median seconds of the real train step of `cfg` after compilation, tokens per step)."""
  import numpy as np
  run, state, step, batch = train_step_setup(cfg)
  with jax.set_mesh(run.mesh):
    state, _ = jax.block_until_ready(step(state, batch))  # compile
    ts = []
    for _ in range(steps):
      t = time.perf_counter()
      state, _ = jax.block_until_ready(step(state, batch))
      ts.append(time.perf_counter() - t)
  return float(np.median(ts)), int(batch["tokens"].size)
