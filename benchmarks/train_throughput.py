"""Training throughput and MFU of the real train step (the one `dlm-train` runs).

  python benchmarks/train_throughput.py --config configs/bench_25m.py [--steps 10] [--config.KEY=VALUE ...]

Prints tokens/s, achieved model FLOP/s (analytic count, bidirectional attention), this machine's measured float32
matmul peak, and MFU against it. Batches are random token ids (the step's cost does not depend on their values).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np

from common import matmul_peak_flops, train_flops_per_token
from dlm_jax import config as config_lib
from dlm_jax.build import build
from dlm_jax.train import abstract_train_state, init_train_state, make_optimizer, make_train_step, state_shardings


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/bench_25m.py")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--warmup", type=int, default=2)
  a = p.parse_args(config_lib.strip_override_args(argv))
  cfg = config_lib.load(a.config, config_lib.parse_override_args(argv))
  run = build(cfg)
  opt = make_optimizer(cfg)
  shardings = state_shardings(run, opt, abstract_train_state(run, opt))
  state = init_train_state(run, opt, shardings)
  step = make_train_step(run, opt, shardings)
  b, l = cfg.train.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  batches = [jax.device_put(rng.integers(0, run.tokenizer.vocab_size, (b, l), dtype=np.int32), run.batch_sharding())
             for _ in range(4)]
  with jax.set_mesh(run.mesh):
    t0 = time.perf_counter()
    state, m = step(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for i in range(a.warmup):
      state, m = step(state, batches[i % 4])
    jax.block_until_ready(m)
    times = []
    for i in range(a.steps):
      t = time.perf_counter()
      state, m = step(state, batches[i % 4])
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  tokens = b * l
  flops_tok = train_flops_per_token(run.model_config, l)
  achieved = flops_tok * tokens / step_s
  peak = matmul_peak_flops()
  out = {
      "config": a.config, "devices": jax.device_count(), "batch": b, "seq_len": l,
      "params_matmul_M": round((flops_tok / 6 - run.model_config.num_layers * 2 * l * run.model_config.d_model) / 1e6, 2),
      "compile_s": round(compile_s, 1), "step_s_median": round(step_s, 4), "step_s_best": round(min(times), 4),
      "tokens_per_s": round(tokens / step_s, 1), "model_tflops_per_s": round(achieved / 1e12, 4),
      "matmul_peak_tflops_per_s": round(peak / 1e12, 4), "mfu": round(achieved / peak, 4),
      "mfu_best_step": round(flops_tok * tokens / min(times) / peak, 4),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
