"""Block diffusion (BD3-LM) and the autoregressive baseline: training cost of the 2L input and sampling speed with and
without the K/V cache.

  python benchmarks/block.py [--config configs/bench_25m.py] [--block_size 16] [--length 512] [--batch_size 4]
                             [--train_steps 3] [--repeats 2] [--tile 128]

Prints one JSON line per measurement:
  train_step      the real train step (`dlm-train`'s) of block diffusion ([x_t | x_0], 2L tokens through the trunk)
                  and of masked diffusion at the same L and batch: seconds per step (median) and their ratio.
  mask_tiles      share of the [2L, 2L] score matrix and of its tile x tile tiles that the BD3 mask leaves nonzero
                  (what a block-sparse kernel computes), against the dense 2L attention the XLA path computes now;
                  analytically (L^2 + L b) / (4 L^2) of the entries.
  block_sampling  tokens/s of block sampling (first-hitting inside each block) at --length with --block_size, with the
                  clean-block K/V cache and without it (the whole canvas recomputed at every step), token agreement
                  and NFE; the speedup is measured in this run.
  ar_sampling     the same for the autoregressive model (block size 1): KV-cached decoding vs recomputing the prefix.
Models are randomly initialised (speed does not depend on the weights; no stopping rule is on). Generated tokens only
are counted; batch size is --batch_size; wall time after compilation, best of --repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import config_with as _copy  # noqa: E402


def _best(fn, args, repeats):
  out = jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return out, min(ts), float(np.median(ts))


def train_step_ratio(base_cfg, block_size: int, steps: int) -> dict:
  from common import median_step_seconds
  out = {"masked": median_step_seconds(_copy(base_cfg, {"diffusion.process": "masked"}), steps)[0],
         "block": median_step_seconds(_copy(base_cfg, {"diffusion.process": "block",
                                                       "diffusion.block_size": block_size}), steps)[0]}
  return {"bench": "train_step", "seq_len": base_cfg.data.seq_len, "batch_size": base_cfg.train.batch_size,
          "block_size": block_size, "masked_s": round(out["masked"], 4), "block_s": round(out["block"], 4),
          "block_over_masked": round(out["block"] / out["masked"], 3)}


def mask_tiles(length: int, block_size: int, tile: int) -> dict:
  from dlm_jax.processes.block import bd3_mask
  m = bd3_mask(length, block_size)
  n = 2 * length
  t = min(tile, n)
  tiles = m[:n // t * t, :n // t * t].reshape(n // t, t, n // t, t).any(axis=(1, 3))
  return {"bench": "mask_tiles", "seq_len": length, "block_size": block_size, "tile": t,
          "nonzero_entries": round(float(m.mean()), 4), "nonzero_tiles": round(float(tiles.mean()), 4),
          "analytic_entries": round((length * length + length * block_size) / (4 * length * length), 4)}


def sampling(base_cfg, block_size: int, length: int, batch_size: int, repeats: int, label: str) -> dict:
  from dlm_jax.build import build, init_params
  from dlm_jax.evaluate import sampler_fn
  from dlm_jax.samplers import left_pad
  cfg = _copy(base_cfg, {"diffusion.process": "block", "diffusion.block_size": block_size, "data.seq_len": length,
                         "model.max_seq_len": max(length, base_cfg.model.max_seq_len), "sampler.length": length})
  run = build(cfg)
  params = init_params(run, 0)
  prompt = np.arange(block_size, dtype=np.int32) % 200 + 32  # one block of prompt
  canvas, _ = left_pad([prompt] * batch_size, length, run.process.mask_id)
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(0), r))(jnp.arange(batch_size))
  res = {}
  for cache in ("prefix", "none"):
    sample, _, _ = sampler_fn(dataclasses.replace(run, cfg=_copy(cfg, {"sampler.block.cache": cache})))
    fn = jax.jit(lambda p, k, c, sample=sample: sample(p, k, c, {}))
    with jax.set_mesh(run.mesh):
      (tokens, stats), best, _ = _best(fn, (params, keys, jnp.asarray(canvas)), repeats)
    gen = batch_size * (length - len(prompt))
    res[cache] = {"tokens_per_s": gen / best, "seconds": best, "nfe": int(stats["nfe"]), "tokens": np.asarray(tokens)}
  agree = float((res["prefix"]["tokens"] == res["none"]["tokens"]).mean())
  return {"bench": label, "length": length, "block_size": block_size, "batch_size": batch_size,
          "generated_tokens": batch_size * (length - len(prompt)),
          "cached_tokens_per_s": round(res["prefix"]["tokens_per_s"], 1), "cached_nfe": res["prefix"]["nfe"],
          "uncached_tokens_per_s": round(res["none"]["tokens_per_s"], 1), "uncached_nfe": res["none"]["nfe"],
          "speedup": round(res["none"]["seconds"] / res["prefix"]["seconds"], 2), "token_agreement": agree}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=os.path.join(REPO, "configs/bench_25m.py"), help="model for the train step")
  p.add_argument("--sample_config", default=os.path.join(REPO, "configs/quickstart.py"), help="model for sampling")
  p.add_argument("--block_size", type=int, default=16)
  p.add_argument("--length", type=int, default=512)
  p.add_argument("--batch_size", type=int, default=4)
  p.add_argument("--train_steps", type=int, default=3)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--tile", type=int, default=128)
  p.add_argument("--skip_train", action="store_true")
  a = p.parse_args(argv)
  from dlm_jax import config as config_lib
  train_cfg = config_lib.load(a.config)
  print(json.dumps(mask_tiles(train_cfg.data.seq_len, a.block_size, a.tile)), flush=True)
  if not a.skip_train:
    print(json.dumps(train_step_ratio(train_cfg, a.block_size, a.train_steps)), flush=True)
  sample_cfg = config_lib.load(a.sample_config)
  print(json.dumps(sampling(sample_cfg, a.block_size, a.length, a.batch_size, a.repeats, "block_sampling")),
        flush=True)
  print(json.dumps(sampling(sample_cfg, 1, a.length, a.batch_size, a.repeats, "ar_sampling")), flush=True)


if __name__ == "__main__":
  sys.exit(main())
