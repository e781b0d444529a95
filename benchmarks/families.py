"""The four diffusion families at the same trunk: training speed, sampling speed, and the memory of the output head
and loss at a large vocabulary.

  python benchmarks/families.py [--config configs/quickstart.py] [--batch_size 8] [--seq_len 128]
                                [--train_steps 3] [--sample_batch 4] [--repeats 2]
                                [--head_vocab 65536] [--head_seq_len 1024] [--head_batch 1]

Prints one JSON line per measurement:
  train           tokens/s of the real train step (`dlm-train`'s) of masked, flow, embedding_flow and bitstream with the
                  trunk of --config, --batch_size x --seq_len random tokens of the config's tokenizer (median of
                  --train_steps steps after compilation)
  sampling        generated tokens/s of each family's default sampler at its default step count (sampler.steps of the
                  config; masked: ancestral, flow: Euler, embedding_flow: DDIM (float64 state), bitstream: EDM with
                  churn), a batch of --sample_batch rows of --seq_len, with NFE (best of --repeats)
  head_memory     XLA's temporary memory (compiled, this host) of the output head and loss, forward and backward, for a
                  --head_vocab vocabulary at --head_seq_len tokens per row from trunk outputs of width d_model: the V-way
                  head (masked / flow: hidden @ W [D, V] then cross entropy; embedding_flow: plus the skip term z E^T)
                  against bitstream's per-bit head (ceil(log2 V) logits, matched filter, EDM-weighted loss); with the
                  size of one float32 [B, L, V] logits array and bitstream's peak as a fraction of it (target <= 0.1)
Models are randomly initialised (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
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

FAMILIES = ("masked", "flow", "embedding_flow", "bitstream")


def train_speed(cfg, steps: int) -> dict:
  from common import median_step_seconds
  out = {}
  for family in FAMILIES:
    seconds, tokens = median_step_seconds(_copy(cfg, {"diffusion.process": family}), steps)
    out[family] = tokens / seconds
  return {"kind": "train", "tokens_per_second": out, "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len}


def sampling_speed(cfg, batch: int, repeats: int) -> dict:
  from dlm_jax.build import build, init_params
  from dlm_jax.evaluate import generate
  out, nfe = {}, {}
  for family in FAMILIES:
    c = _copy(cfg, {"diffusion.process": family, "sampler.batch_size": batch})
    run = build(c)
    params = init_params(run, 0)
    pstate = run.process.init_state(jax.random.PRNGKey(0))
    generate(run, params, pstate, num_samples=batch, length=c.data.seq_len, seed=0)  # compile
    best = float("inf")
    for r in range(repeats):
      t = time.perf_counter()
      _, stats = generate(run, params, pstate, num_samples=batch, length=c.data.seq_len, seed=r + 1)
      best = min(best, time.perf_counter() - t)
    out[family] = batch * c.data.seq_len / best
    nfe[family] = stats["nfe_per_batch"]
  return {"kind": "sampling", "tokens_per_second": out, "nfe": nfe, "steps": cfg.sampler.steps, "batch_size": batch,
          "seq_len": cfg.data.seq_len}


def head_memory(d_model: int, vocab: int, seq_len: int, batch: int) -> dict:
  """Temporary bytes of value_and_grad(head + loss) w.r.t. the head and the trunk output, compiled for this host."""
  from dlm_jax.processes.bitstream import Bitstream
  from dlm_jax.processes.embedding_flow import EmbeddingFlow
  from dlm_jax.processes.masked import token_nll

  hidden = jax.ShapeDtypeStruct((batch, seq_len, d_model), jnp.float32)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

  def v_way(params, h, tok):
    return jnp.mean(token_nll(h @ params["head"], tok))

  class Stub:  # the network adapter with the trunk replaced by its output h
    def __init__(self, h):
      self.h = h

    def __call__(self, p, _, **kw):
      return self.h @ p["head"]

    def input_table(self, p):
      return p["embed"].astype(jnp.float32)

  lf = EmbeddingFlow(vocab_size=vocab)

  def langflow(params, h, tok):
    stub = Stub(h)
    z = jnp.ones_like(h)  # stands for the noisy embeddings (same shape as the trunk input)
    logits = lf.logits(stub, params, z, jnp.full((batch,), 4.0), None, {})
    return jnp.mean(token_nll(logits, tok))

  bs = Bitstream(vocab_size=vocab)

  def bitstream(params, h, tok):
    stub = Stub(h)
    clean = bs.to_bits(tok)
    sigma = jnp.full((batch,), 0.5)
    x = clean + 0.5
    logits = bs.logits(stub, params, x, sigma, None, {})
    return jnp.mean(bs.loss_weight(sigma)[:, None] * jnp.sum(jnp.square(jax.nn.sigmoid(logits) - clean), -1))

  def temp_bytes(fn, params):
    grad = jax.value_and_grad(fn, argnums=(0, 1))
    compiled = jax.jit(grad).lower(params, hidden, tokens).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)

  head = {"head": jax.ShapeDtypeStruct((d_model, vocab), jnp.float32)}
  out = {"masked": temp_bytes(v_way, head), "flow": temp_bytes(v_way, head),
         "embedding_flow": temp_bytes(langflow, {**head, "embed": jax.ShapeDtypeStruct((vocab, d_model), jnp.float32)}),
         "bitstream": temp_bytes(bitstream, {"head": jax.ShapeDtypeStruct((d_model, bs.bits), jnp.float32)})}
  logits_bytes = batch * seq_len * vocab * 4
  return {"kind": "head_memory", "temp_bytes": out, "v_way_logits_bytes": logits_bytes, "vocab": vocab,
          "bits": bs.bits, "seq_len": seq_len, "batch": batch, "d_model": d_model,
          "bitstream_fraction_of_logits": out["bitstream"] / logits_bytes,
          "bitstream_fraction_of_masked_head": out["bitstream"] / out["masked"]}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default=os.path.join(REPO, "configs", "quickstart.py"))
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--train_steps", type=int, default=3)
  p.add_argument("--sample_batch", type=int, default=4)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--head_vocab", type=int, default=65536)
  p.add_argument("--head_seq_len", type=int, default=1024)
  p.add_argument("--head_batch", type=int, default=1)
  p.add_argument("--skip", default="", help="comma-separated measurements to skip (train, sampling, head_memory)")
  a = p.parse_args(argv)
  from dlm_jax import config as config_lib
  cfg = _copy(config_lib.load(a.config), {"train.batch_size": a.batch_size, "data.seq_len": a.seq_len,
                                          "model.max_seq_len": max(a.seq_len, 8), "sampler.length": 0,
                                          "train.grad_accum_steps": 1})
  skip = set(filter(None, a.skip.split(",")))
  if "head_memory" not in skip:
    print(json.dumps(head_memory(cfg.model.d_model, a.head_vocab, a.head_seq_len, a.head_batch)), flush=True)
  if "train" not in skip:
    print(json.dumps(train_speed(cfg, a.train_steps)), flush=True)
  if "sampling" not in skip:
    print(json.dumps(sampling_speed(cfg, a.sample_batch, a.repeats)), flush=True)


if __name__ == "__main__":
  main()
