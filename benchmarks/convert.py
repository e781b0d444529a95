"""Peak host memory of `dlm-convert --from_hf` on a synthetic multi-shard LLaDA-layout checkpoint.

  python benchmarks/convert.py [--gb 2.2] [--shards 8] [--keep DIR]

Builds a random float32 checkpoint with LLaDA's tensor names (config.json, model-0000k-of-0000n.safetensors written
with safetensors.numpy, model.safetensors.index.json) of at least `--gb` GB in a temporary directory, converts it in a
subprocess (`dlm_jax.convert.from_hf`, float32 as stored) and prints one JSON line: checkpoint and largest-tensor sizes,
the RSS of the converting subprocess after its imports (the baseline of Python + JAX + Orbax), its peak RSS during the
conversion (psutil, sampled every 5 ms) and the whole process's ru_maxrss, the conversion's own peak above the
baseline, and that as multiples of the largest tensor and of the checkpoint. Then the same for --to_hf.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD = r"""
import json, resource, sys, threading, time
import psutil
import jax, orbax.checkpoint
from dlm_jax import convert
proc = psutil.Process()
base = proc.memory_info().rss
peak, done = [base], []

def sample():
  while not done:
    peak[0] = max(peak[0], proc.memory_info().rss)
    time.sleep(0.005)

threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
if sys.argv[1] == "from_hf":
  convert.from_hf(sys.argv[2], sys.argv[3])
else:
  convert.to_hf(sys.argv[2], sys.argv[3])
done.append(1)
print(json.dumps({"baseline_rss": base, "peak_rss": max(peak[0], proc.memory_info().rss),
                  "max_rss_whole_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "seconds": time.perf_counter() - t}))
"""

def llada_config(d: int, layers: int, heads: int, mlp: int, vocab: int) -> dict:
  return {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": d, "n_layers": layers, "n_heads": heads,
          "n_kv_heads": heads, "mlp_hidden_size": mlp, "mlp_ratio": 4, "vocab_size": vocab, "embedding_size": vocab,
          "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_sequence_length": 4096, "mask_token_id": vocab - 128,
          "eos_token_id": 1, "pad_token_id": 1, "weight_tying": False, "block_type": "llama",
          "layer_norm_type": "rms", "activation_type": "silu", "rope": True, "include_bias": False}


def build(path: str, gb: float, shards: int) -> tuple[int, int]:
  """Writes the checkpoint; returns (total bytes, largest tensor bytes)."""
  from safetensors.numpy import save_file
  d, heads, mlp, vocab = 2048, 16, 5632, 32000
  per_layer = (4 * d * d + 3 * d * mlp + 2 * d) * 4
  layers = max(1, int(np.ceil((gb * 1e9 - 2 * vocab * d * 4) / per_layer)))
  cfg = llada_config(d, layers, heads, mlp, vocab)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  p = "model.transformer."
  names = [(p + "wte.weight", (vocab, d))]
  for i in range(layers):
    b = f"{p}blocks.{i}."
    names += [(b + "attn_norm.weight", (d,)), (b + "q_proj.weight", (d, d)), (b + "k_proj.weight", (d, d)),
              (b + "v_proj.weight", (d, d)), (b + "attn_out.weight", (d, d)), (b + "ff_norm.weight", (d,)),
              (b + "ff_proj.weight", (mlp, d)), (b + "up_proj.weight", (mlp, d)), (b + "ff_out.weight", (d, mlp))]
  names += [(p + "ln_f.weight", (d,)), (p + "ff_out.weight", (vocab, d))]
  groups = np.array_split(np.arange(len(names)), shards)
  rng = np.random.default_rng(0)
  weight_map, total, largest = {}, 0, 0
  for k, group in enumerate(groups):
    shard = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
    tensors = {}
    for i in group:
      name, shape = names[i]
      tensors[name] = (0.02 * rng.standard_normal(shape, dtype=np.float32))
      weight_map[name] = shard
      total += tensors[name].nbytes
      largest = max(largest, tensors[name].nbytes)
    save_file(tensors, os.path.join(path, shard))
    del tensors
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  return total, largest


def child(*args: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env)
  if r.returncode:
    raise SystemExit(r.stderr)
  return json.loads(r.stdout.strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gb", type=float, default=2.2, help="checkpoint size (float32), at least this many GB")
  p.add_argument("--shards", type=int, default=8)
  p.add_argument("--keep", default=None, help="build in this directory instead of a temporary one (kept)")
  a = p.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    root = a.keep or tmp
    src = os.path.join(root, "hf")
    os.makedirs(src, exist_ok=True)
    t = time.perf_counter()
    total, largest = build(src, a.gb, a.shards)
    built = time.perf_counter() - t
    gib = 2 ** 30
    out = {"checkpoint_gib": total / gib, "shards": a.shards, "largest_tensor_gib": largest / gib,
           "build_seconds": built}
    for what, args in (("from_hf", (src, os.path.join(root, "workdir"))),
                       ("to_hf", (os.path.join(root, "workdir"), os.path.join(root, "hf_out")))):
      r = child(what, *args)
      own = r["peak_rss"] - r["baseline_rss"]
      out[what] = {"peak_rss_gib": r["peak_rss"] / gib, "baseline_rss_gib": r["baseline_rss"] / gib,
                   "max_rss_whole_process_gib": r["max_rss_whole_process"] / gib,
                   "conversion_peak_gib": own / gib, "x_largest_tensor": own / largest, "x_checkpoint": own / total,
                   "seconds": r["seconds"]}
    print(json.dumps(out))


if __name__ == "__main__":
  main()
