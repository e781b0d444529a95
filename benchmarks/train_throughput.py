"""Training throughput and MFU of the real train step (the one `dlm-train` runs), with a time breakdown.

  python benchmarks/train_throughput.py --config configs/bench_25m.py [--steps 8] [--config.KEY=VALUE ...]

Prints one JSON line per variant: tokens/s, achieved model FLOP/s (analytic count, bidirectional attention), this
machine's measured float32 matmul peak, MFU against it, and where the step's time goes (forward, forward + backward,
whole step with optimizer and EMA). Variants: the shipped step, and the same step with `model.attention=reference`
(autodiff through jax.nn.dot_product_attention), so the ratio is measured in one run. Batches are random token ids.
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

from common import matmul_peak_flops, train_flops_per_token, train_step_setup
from dlm_jax import config as config_lib


def _time(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts)), float(min(ts))


def measure(cfg, steps: int, peak: float) -> dict:
  run, state, step, batch = train_step_setup(cfg)
  b, l = cfg.train.batch_size, cfg.data.seq_len
  key = jax.random.PRNGKey(0)

  def loss(params, batch):
    return run.process.loss(run.apply_fn, params, batch, key, state["process_state"])[0]

  with jax.set_mesh(run.mesh):
    fwd_med, _ = _time(jax.jit(loss), state["params"], batch, repeats=max(2, steps // 2))
    grad_med, _ = _time(jax.jit(jax.grad(loss)), state["params"], batch, repeats=max(2, steps // 2))
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  mc = run.model_config
  flops_tok = train_flops_per_token(mc, l)
  achieved = flops_tok * b * l / step_s
  return {
      "attention": cfg.model.attention, "batch": b, "seq_len": l, "devices": jax.device_count(),
      "train_flops_per_token_M": round(flops_tok / 1e6, 2), "compile_s": round(compile_s, 1),
      "step_s_median": round(step_s, 4), "step_s_best": round(min(times), 4),
      "forward_s": round(fwd_med, 4), "forward_backward_s": round(grad_med, 4),
      "optimizer_ema_s": round(max(step_s - grad_med, 0.0), 4),
      "tokens_per_s": round(b * l / step_s, 1), "model_tflops_per_s": round(achieved / 1e12, 4),
      "matmul_peak_tflops_per_s": round(peak / 1e12, 4), "mfu": round(achieved / peak, 4),
      "mfu_best_step": round(flops_tok * b * l / min(times) / peak, 4),
  }


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser()
  p.add_argument("--config", default="configs/bench_25m.py")
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--no_baseline", action="store_true", help="skip the model.attention=reference variant")
  a = p.parse_args(config_lib.strip_override_args(argv))
  overrides = config_lib.parse_override_args(argv)
  peak = matmul_peak_flops()
  results = []
  variants = ["xla"] if a.no_baseline else ["xla", "reference"]
  for impl in variants:
    cfg = config_lib.load(a.config, overrides + [("model.attention", impl)])
    r = measure(cfg, a.steps, peak)
    r["config"] = a.config
    results.append(r)
    print(json.dumps(r), flush=True)
  if len(results) == 2:
    print(json.dumps({"speedup_vs_reference_attention": round(results[1]["step_s_median"] / results[0]["step_s_median"], 3),
                      "mfu": results[0]["mfu"], "mfu_reference_attention": results[1]["mfu"]}))


if __name__ == "__main__":
  main()
