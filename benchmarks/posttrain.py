"""Post-training speed: the SFT and RL (diffu-GRPO, wd1) train steps against the pretraining step, and RL rollout
throughput (generated tokens/s) with and without Fast-dLLM's K/V caches.

  python benchmarks/posttrain.py [--num_layers 4] [--d_model 256] [--seq_len 256] [--batch_size 12] [--steps 10]
                                 [--prompts 4] [--group 6] [--prompt_length 64] [--completion_length 128]
                                 [--block_length 32] [--threshold 0.9] [--repeats 1] [--quick]

One masked diffusion model (default 4 layers, d_model 256, byte tokenizer; random initialisation: speed does not depend
on what the model learned, except for threshold decoding, see below) and one batch of random token ids.

Train steps: the real jitted step of `train.make_train_step` on the same model, batch size and length, median over
--steps calls after compilation (taken in turns):
  pretrain   the family's loss (what dlm-train runs without train.objective)
  sft        `sft.objective_fn(process, "answer")` with batch['target'] = the second half of every row (the response)
  grpo       `rl.objective_fn(..., "grpo", ...)` on a rollout-shaped batch (tokens, logp_mask, scored, reward,
             advantage; first half prompt, second half completion) with frozen={'reference': params}, so the step
             includes the reference policy's forward (rl.beta > 0)
  wd1        the same with 'weight' (w+ - w-) and wd1's loss
Rollouts: `evaluate.sampler_fn(run, gen_start=prompt_length)` jitted, as `rl.Rollouts` runs it, on a group-expanded
canvas (--prompts x --group rows of [prompt | completion masks]); LLaDA sampler, low-confidence remasking in blocks of
--block_length, sampler.temperature 0.9 (d1's rollouts), steps = completion length (one token per step):
  none / prefix / dual    llada's cache option (rebuilt at each block start)
  threshold (+ dual)      Fast-dLLM threshold decoding; with a random model nearly nothing reaches the threshold, so
                          it commits about one token per forward here (tokens_per_forward shows it)
tokens/s = rows x completion length / wall seconds of one decode, compilation excluded (ahead-of-time compiled, best of
--repeats taken in turns), and the speedup against no cache.

Prints a table and one JSON line (keys: machine, model, train_steps {name: seconds}, step_vs_pretrain {name: ratio},
rollout_tokens_per_s {setting: tokens/s}, rollout_speedup {setting: ratio}, rollout_tokens_per_forward).
--quick: a tiny model, short rows, one repetition and no threshold rows (under a minute on a 2-core CPU; a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import config_with  # noqa: E402


def _config(a):
  from dlm_jax import config as config_lib
  cfg = config_lib.default_config()
  overrides = {"data.tokenizer": "bytes", "data.seq_len": a.seq_len,
               "model.max_seq_len": max(a.seq_len, a.prompt_length + a.completion_length),
               "model.num_layers": a.num_layers, "model.d_model": a.d_model, "model.num_heads": a.num_heads,
               "model.mlp_dim": a.mlp_dim, "train.batch_size": a.batch_size, "train.ema_decay": 0.0}
  config_lib.apply_overrides(cfg, list(overrides.items()), origin="benchmark")
  return config_lib.validate(cfg)


def _sampler_config(cfg, steps: int, **llada):
  over = {"sampler.name": "llada", "sampler.steps": steps, "sampler.temperature": 0.9}
  over.update({f"sampler.llada.{k}": v for k, v in llada.items()})
  return config_with(cfg, over)


def _batches(run, a, rng) -> dict:
  """name -> the batch its step reads (host arrays)."""
  b, length = a.batch_size, a.seq_len
  tokens = rng.integers(0, run.tokenizer.vocab_size, (b, length), dtype=np.int32)
  half = length // 2
  second = np.zeros((b, length), bool)
  second[:, half:] = True
  scored = second.copy()
  ends = rng.integers(half, length, b)  # completions stop at random lengths, as rollouts do
  for i, e in enumerate(ends):
    scored[i, e + 1:] = False
  from dlm_jax.posttrain.rl import group_advantages, wd1_weights
  reward = rng.integers(0, 2, b).astype(np.float32)
  adv = group_advantages(reward, a.group).astype(np.float32)
  # d1's estimate masks the whole completion and ~15% of the prompt
  logp_mask = second | (~second & (rng.random((b, length)) < 0.15))
  rl = {"tokens": tokens, "logp_mask": logp_mask, "scored": scored, "reward": reward, "advantage": adv,
        "weight": wd1_weights(adv, a.group).astype(np.float32)}
  return {"pretrain": {"tokens": tokens}, "sft": {"tokens": tokens, "target": second}, "grpo": rl,
          "wd1": {k: v for k, v in rl.items() if k != "advantage"}}


def time_train_steps(cfg, a) -> dict:
  """name -> median seconds of the jitted train step after compilation."""
  from dlm_jax.build import build
  from dlm_jax.posttrain import rl, sft
  from dlm_jax.train import abstract_train_state, init_train_state, make_optimizer, make_train_step, state_shardings
  run = build(cfg)
  opt = make_optimizer(cfg)
  shardings = state_shardings(run, opt, abstract_train_state(run, opt))
  batches = _batches(run, a, np.random.default_rng(0))
  r = cfg.rl  # d1's clip and beta (the defaults)
  objectives = {"pretrain": None, "sft": sft.objective_fn(run.process, "answer"),
                "grpo": rl.objective_fn(run.process, "grpo", r.clip, r.beta, a.group),
                "wd1": rl.objective_fn(run.process, "wd1", r.clip, r.beta, a.group)}
  calls, states = {}, {}
  with jax.set_mesh(run.mesh):
    fresh = init_train_state(run, opt, shardings)
    for name, objective in objectives.items():
      batch = {k: jax.device_put(v, run.batch_sharding(v.ndim)) for k, v in batches[name].items()}
      if name in ("grpo", "wd1"):  # the reference policy = the initial parameters
        frozen = {"reference": jax.tree.map(lambda x: x.copy(), fresh["params"])}
        step = make_train_step(run, opt, shardings, objective=objective, frozen=frozen)
        calls[name] = lambda s, step=step, batch=batch, frozen=frozen: step(s, batch, frozen)
      else:
        step = make_train_step(run, opt, shardings, objective=objective)
        calls[name] = lambda s, step=step, batch=batch: step(s, batch)
      state = jax.tree.map(lambda x: x.copy(), fresh)  # the step donates its state
      states[name], metrics = jax.block_until_ready(calls[name](state))  # compile
      if not bool(metrics["finite"]):
        raise RuntimeError(f"{name}: the step's loss is not finite")
    # round robin, so that a shared machine's load drifts over every objective alike
    ts = {name: [] for name in calls}
    for _ in range(a.steps):
      for name, call in calls.items():
        t = time.perf_counter()
        states[name], _ = jax.block_until_ready(call(states[name]))
        ts[name].append(time.perf_counter() - t)
  out = {name: float(np.median(v)) for name, v in ts.items()}
  for name, v in out.items():
    print(f"# {name} step: {v:.3f} s", file=sys.stderr, flush=True)
  return out


def time_rollouts(cfg, a) -> tuple[dict, dict]:
  """setting -> generated tokens/s, setting -> tokens per network call (one decode of the group-expanded canvas)."""
  from dlm_jax.build import build
  from dlm_jax.evaluate import sampler_fn
  from dlm_jax.build import init_params
  c, p = a.completion_length, a.prompt_length
  settings = {"none": dict(block_length=a.block_length),
              "prefix": dict(block_length=a.block_length, cache="prefix"),
              "dual": dict(block_length=a.block_length, cache="dual")}
  if a.threshold:
    settings[f"threshold {a.threshold}"] = dict(block_length=a.block_length, threshold=a.threshold)
    settings[f"threshold {a.threshold} + dual"] = dict(block_length=a.block_length, threshold=a.threshold,
                                                      cache="dual")
  base = build(_sampler_config(cfg, c))
  params = init_params(base, cfg.train.seed)
  pstate = base.process.init_state(jax.random.PRNGKey(1))
  rng = np.random.default_rng(1)
  rows = a.prompts * a.group
  prompts = rng.integers(0, base.tokenizer.vocab_size, (a.prompts, p), dtype=np.int32)
  canvas = np.concatenate([np.repeat(prompts, a.group, axis=0),
                           np.full((rows, c), base.process.mask_id, np.int32)], axis=1)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(2), i))(jnp.arange(rows))
  compiled, best, out = {}, {}, {}
  for name, opts in settings.items():
    run = build(_sampler_config(cfg, c, **opts))
    sample, x64, _ = sampler_fn(run, gen_start=p, stop_id=run.tokenizer.eos_id)
    with x64, jax.set_mesh(run.mesh):
      args = (params, keys, jax.device_put(canvas, run.batch_sharding()), pstate)
      compiled[name] = (jax.jit(sample).lower(*args).compile(), args, x64, run.mesh)
  for _ in range(a.repeats):  # in turns, as the train steps
    for name, (fn, args, x64, mesh) in compiled.items():
      with x64, jax.set_mesh(mesh):
        t = time.perf_counter()
        out[name] = jax.block_until_ready(fn(*args))
        best[name] = min(best.get(name, float("inf")), time.perf_counter() - t)
  rate, per_forward = {}, {}
  for name, (tokens, stats) in out.items():
    if (np.asarray(tokens)[:, p:] == base.process.mask_id).any():
      raise RuntimeError(f"{name}: the decode left masks")
    rate[name] = rows * c / best[name]
    per_forward[name] = c / max(int(stats["nfe"]), 1)  # generated tokens of a row per network call
    print(f"# rollout {name}: {rate[name]:.1f} tokens/s", file=sys.stderr, flush=True)
  return rate, per_forward


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--num_layers", type=int, default=4)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--num_heads", type=int, default=4)
  p.add_argument("--mlp_dim", type=int, default=1024)
  p.add_argument("--seq_len", type=int, default=256, help="train-step rows")
  p.add_argument("--batch_size", type=int, default=12, help="train-step rows per batch (a multiple of --group)")
  p.add_argument("--steps", type=int, default=10, help="timed train steps per objective (median)")
  p.add_argument("--prompts", type=int, default=4, help="rollout prompts")
  p.add_argument("--group", type=int, default=6, help="completions per prompt (rl.group_size)")
  p.add_argument("--prompt_length", type=int, default=64)
  p.add_argument("--completion_length", type=int, default=128)
  p.add_argument("--block_length", type=int, default=32)
  p.add_argument("--threshold", type=float, default=0.9, help="0 = skip the threshold-decoding rows")
  p.add_argument("--repeats", type=int, default=1, help="timed decodes per rollout setting (best)")
  p.add_argument("--quick", action="store_true", help="a tiny model and short rows: a smoke test (< 60 s)")
  a = p.parse_args(argv)
  if a.quick:
    a.num_layers, a.d_model, a.num_heads, a.mlp_dim, a.seq_len, a.batch_size, a.steps = 1, 32, 2, 64, 32, 4, 2
    a.prompts, a.group, a.prompt_length, a.completion_length, a.block_length, a.repeats = 2, 2, 8, 16, 8, 1
    a.threshold = 0.0  # two compilations fewer
  if a.batch_size % a.group:
    p.error(f"--batch_size ({a.batch_size}) must be a multiple of --group ({a.group})")
  if a.completion_length % a.block_length:
    p.error(f"--completion_length ({a.completion_length}) must be a multiple of --block_length ({a.block_length})")

  cfg = _config(a)
  steps = time_train_steps(cfg, a)
  rate, per_forward = time_rollouts(cfg, a)

  ratio = {k: v / steps["pretrain"] for k, v in steps.items()}
  speedup = {k: v / rate["none"] for k, v in rate.items()}
  b, length = a.batch_size, a.seq_len
  print(f"\nmodel: {a.num_layers} layers, d_model {a.d_model}, byte tokenizer; train batch {b} x {length}; "
        f"{jax.devices()[0].platform}, {os.cpu_count()} cores")
  print(f"{'train step':<26}{'seconds':>10}{'vs pretrain':>13}{'tokens/s':>11}")
  for k, v in steps.items():
    print(f"{k:<26}{v:>10.3f}{ratio[k]:>13.2f}{b * length / v:>11.0f}")
  rows = a.prompts * a.group
  print(f"\nrollouts: {a.prompts} prompts x {a.group} completions, prompt {a.prompt_length}, completion "
        f"{a.completion_length}, block {a.block_length}, steps {a.completion_length}")
  print(f"{'sampler setting':<26}{'tokens/s':>10}{'speedup':>13}{'tok/forward':>13}{'seconds':>10}")
  for k, v in rate.items():
    print(f"{k:<26}{v:>10.1f}{speedup[k]:>13.2f}{per_forward[k]:>13.2f}{rows * a.completion_length / v:>10.2f}")
  r3 = lambda d: {k: round(v, 3) for k, v in d.items()}
  print(json.dumps({
      "machine": f"{platform.machine()} {jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} cores",
      "model": {"num_layers": a.num_layers, "d_model": a.d_model, "batch_size": b, "seq_len": length,
                "prompts": a.prompts, "group": a.group, "prompt_length": a.prompt_length,
                "completion_length": a.completion_length, "block_length": a.block_length},
      "train_steps": r3(steps), "step_vs_pretrain": r3(ratio),
      "rollout_tokens_per_s": {k: round(v, 1) for k, v in rate.items()}, "rollout_speedup": r3(speedup),
      "rollout_tokens_per_forward": r3(per_forward)}))


if __name__ == "__main__":
  main()
