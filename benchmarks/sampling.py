"""Sampling speed of the sampler library on a trained model: Fast-dLLM caches and parallel decoding, Prophet, jit.

  python benchmarks/sampling.py [--workdir DIR] [--gen_length 256] [--block_length 32] [--prompt_length 64]
                                [--num_prompts 4] [--batch_size 1] [--threshold 0.9] [--repeats 2]

Without --workdir it first trains configs/quickstart.py at sequence length 320 (so that a 64-token prompt plus 256
generated tokens is in the trained range) for 2400 steps instead of 600 (after 600 steps the model is rarely confident
enough for threshold decoding to commit more than one token per step); that takes about 40 minutes on a 2-core CPU,
goes to $DLM_BENCH_DIR (default /tmp/dlm_bench_sampling) and is reused afterwards. Prompts are the first tokens of validation
sequences. Every setting decodes the same prompts greedily with the LLaDA sampler (dlm_jax.samplers.llada) through
the model's sampler-facing forwards (dlm_jax.model.logits_fn / cached_logits_fn) and prints one JSON line:
  tokens_per_s      generated tokens only, wall time after compilation (best of --repeats)
  nfe               network calls per prompt batch (full passes in nfe_full); tokens_per_forward = generated / nfe
  agreement         share of generated tokens identical to the baseline (one token per step, low confidence)
  speedup           tokens_per_s relative to the baseline, measured in this run
  distinct_tokens   distinct token ids per generated sequence (a degenerate model repeats one token: agreement is
                    then meaningless; --show prints the samples)
Three lines measure what a stale cache changes where samples are not degenerate (random decoding order at temperature
0.8, one Gumbel draw per position): agreement of the prefix / dual cache runs with the uncached run.
A final line compares the jit-compiled baseline with a plain eager Python-loop implementation of the same algorithm
on the same model (op-by-op dispatch, no jit) and with a Python loop around a jitted forward, checking identical tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _trained_workdir(args) -> str:
  if args.workdir:
    return args.workdir
  wd = os.path.join(os.environ.get("DLM_BENCH_DIR", "/tmp/dlm_bench_sampling"), "quickstart_320")
  from dlm_jax.checkpoint import Checkpointer
  if not (os.path.isdir(wd) and Checkpointer(wd, read_only=True).latest_step() == 2400):
    print(f"# training configs/quickstart.py at seq_len 320 into {wd} (once)", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "import sys; from dlm_jax.cli import train_main; sys.exit(train_main())",
                    "--config", os.path.join(REPO, "configs/quickstart.py"),
                    "--workdir", wd, "--config.data.seq_len=320", "--config.model.max_seq_len=512",
                    "--config.train.batch_size=12", "--config.train.steps=2400", "--config.train.checkpoint_every=400",
                    "--config.train.eval_every=800", "--no_progress"], check=True)
  return wd


def _timed(fn, args, repeats):
  out = jax.block_until_ready(fn(*args))  # compile + first run
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return out, best


def eager_low_confidence(logits_fn, canvas, mask_id, gen_start, gen_length, block_length):
  """The baseline algorithm as PyTorch repos write it: a Python loop, one token per step, eager ops (no jit)."""
  tokens = jnp.asarray(canvas)
  for lo in range(gen_start, gen_start + gen_length, block_length):
    for _ in range(block_length):
      logits = logits_fn(tokens, None)
      if logits.shape[-1] > mask_id:
        logits = logits.at[..., mask_id].set(-jnp.inf)
      x0 = jnp.argmax(logits, axis=-1)
      p = jax.nn.softmax(logits, axis=-1)
      conf = jnp.take_along_axis(p, x0[..., None], axis=-1)[..., 0]
      pos = jnp.arange(tokens.shape[1])
      ok = (tokens == mask_id) & (pos >= lo) & (pos < lo + block_length)
      conf = jnp.where(ok, conf, -jnp.inf)
      best = jnp.argmax(conf, axis=1)
      rows = jnp.arange(tokens.shape[0])
      tokens = tokens.at[rows, best].set(jnp.where(ok[rows, best], x0[rows, best], tokens[rows, best]))
  return tokens


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default=None)
  p.add_argument("--gen_length", type=int, default=256)
  p.add_argument("--block_length", type=int, default=32)
  p.add_argument("--prompt_length", type=int, default=64)
  p.add_argument("--num_prompts", type=int, default=4)
  p.add_argument("--batch_size", type=int, default=1)
  p.add_argument("--threshold", type=float, default=0.9)
  p.add_argument("--temperature", type=float, default=0.0,
                 help="0 = greedy; > 0 samples with one Gumbel draw per position (llada noise='position'), so the "
                 "settings stay comparable token by token")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--skip_eager", action="store_true")
  p.add_argument("--show", action="store_true", help="print the start of each setting's first sample")
  args = p.parse_args()

  from dlm_jax import model as model_lib
  from dlm_jax.data import load_corpus
  from dlm_jax.samplers import llada
  from dlm_jax.train import load_for_inference

  wd = _trained_workdir(args)
  cfg, run, params, _ = load_for_inference(wd)
  corpus = load_corpus(cfg, run.tokenizer)
  mask_id = run.process.mask_id
  n, b, g, blk = args.num_prompts, args.batch_size, args.gen_length, args.block_length
  prompts = np.asarray(corpus.val[:n, :args.prompt_length], np.int32)
  canvas = np.concatenate([prompts, np.full((n, g), mask_id, np.int32)], axis=1)
  plain = model_lib.logits_fn(run.apply_fn, params)
  cached = model_lib.cached_logits_fn(run.apply_fn, params)
  base = dict(mask_id=mask_id, gen_start=args.prompt_length, gen_length=g, block_length=blk,
              temperature=args.temperature, noise="position")
  settings = [
      ("baseline: low confidence, 1 token/step", plain, dict(steps=g)),
      ("prefix cache", cached, dict(steps=g, cache="prefix")),
      ("dual cache", cached, dict(steps=g, cache="dual")),
      (f"threshold {args.threshold}", plain, dict(threshold=args.threshold)),
      ("factor 1.0", plain, dict(factor=1.0)),
      (f"threshold {args.threshold} + prefix cache", cached, dict(threshold=args.threshold, cache="prefix")),
      (f"threshold {args.threshold} + dual cache", cached, dict(threshold=args.threshold, cache="dual")),
      ("factor 1.0 + dual cache", cached, dict(factor=1.0, cache="dual")),
      ("prophet (1 token/step until the gap fires)", plain, dict(steps=g, prophet=True)),
      (f"prophet + threshold {args.threshold} + dual cache", cached,
       dict(threshold=args.threshold, cache="dual", prophet=True)),
  ]
  key = jax.random.PRNGKey(0)
  baseline_tokens, baseline_rate, baseline_nfe = None, None, None
  header = {"workdir": wd, "gen_length": g, "block_length": blk, "prompt_length": args.prompt_length,
            "num_prompts": n, "batch_size": b, "devices": str(jax.devices()[0].platform),
            "params": model_lib.num_params(params)}
  print(json.dumps(header))
  for name, fn, kw in settings:
    sample = jax.jit(lambda k, c, fn=fn, kw=kw: llada(fn, k, c, **base, **kw))
    outs, total, nfe, nfe_full, steps = [], 0.0, 0, 0, 0
    for i in range(0, n, b):
      (tokens, stats), sec = _timed(sample, (key, jnp.asarray(canvas[i:i + b])), args.repeats)
      outs.append(np.asarray(tokens))
      total += sec
      nfe += int(stats["nfe"])
      nfe_full += int(stats["nfe_full"])
      steps += int(np.sum(stats["row_steps"]))
    tokens = np.concatenate(outs)[:, args.prompt_length:]
    rate = n * g / total
    if baseline_tokens is None:
      baseline_tokens, baseline_rate, baseline_nfe = tokens, rate, nfe
    rec = {"setting": name, "tokens_per_s": round(rate, 1), "seconds": round(total, 3),
           "nfe": nfe / (n // b), "nfe_full": nfe_full / (n // b), "tokens_per_forward": round(n * g / nfe / b, 2),
           "agreement": round(float(np.mean(tokens == baseline_tokens)), 4),
           "speedup": round(rate / baseline_rate, 2), "step_saving": round(baseline_nfe / max(nfe, 1), 2),
           "distinct_tokens": round(float(np.mean([len(set(r.tolist())) for r in tokens])), 1)}
    print(json.dumps(rec), flush=True)
    if args.show:
      print("#   " + repr(run.tokenizer.decode(tokens[0]))[:300], flush=True)

  # Cache fidelity where samples are not degenerate: random decoding order at temperature 0.8 with one Gumbel draw per
  # position, so a cached run differs from the uncached one only through the logits its stale cache produces.
  fid = dict(base, temperature=0.8, remasking="random", steps=g)
  ref = None
  for name, fn, kw in (("uncached", plain, {}), ("prefix cache", cached, dict(cache="prefix")),
                       ("dual cache", cached, dict(cache="dual"))):
    sample = jax.jit(lambda k, c, fn=fn, kw=kw: llada(fn, k, c, **fid, **kw))
    tokens = np.concatenate([np.asarray(sample(key, jnp.asarray(canvas[i:i + b]))[0]) for i in range(0, n, b)])
    tokens = tokens[:, args.prompt_length:]
    ref = tokens if ref is None else ref
    print(json.dumps({"setting": f"random order, T=0.8, one token/step, {name}",
                      "agreement_with_uncached": round(float(np.mean(tokens == ref)), 4),
                      "distinct_tokens": round(float(np.mean([len(set(r.tolist())) for r in tokens])), 1)}),
          flush=True)
    if args.show:
      print("#   " + repr(run.tokenizer.decode(tokens[0]))[:300], flush=True)

  if args.skip_eager:
    return
  c0 = jnp.asarray(canvas[:b])
  t = time.perf_counter()
  eager = np.asarray(eager_low_confidence(plain, c0, mask_id, args.prompt_length, g, blk))
  t_eager = time.perf_counter() - t
  jit_fwd = jax.jit(plain)
  eager_low_confidence(jit_fwd, c0, mask_id, args.prompt_length, g, blk)  # compile the forward
  t = time.perf_counter()
  loop_jit = np.asarray(eager_low_confidence(jit_fwd, c0, mask_id, args.prompt_length, g, blk))
  t_loop = time.perf_counter() - t
  sample = jax.jit(lambda k, c: llada(plain, k, c, **{**base, "temperature": 0.0}, steps=g))  # greedy, as the loops
  (tokens, _), t_jit = _timed(sample, (key, c0), args.repeats)
  tokens = np.asarray(tokens)
  print(json.dumps({"setting": "jit-compiled sampler vs Python loops (same algorithm, same model, same prompt)",
                    "jit_seconds": round(t_jit, 3), "eager_python_loop_seconds": round(t_eager, 3),
                    "python_loop_around_jitted_forward_seconds": round(t_loop, 3),
                    "speedup_vs_eager": round(t_eager / t_jit, 2), "speedup_vs_loop_jitted_forward": round(t_loop / t_jit, 2),
                    "same_tokens_eager": bool((eager == tokens).all()),
                    "same_tokens_loop": bool((loop_jit == tokens).all())}), flush=True)


if __name__ == "__main__":
  main()
