"""The one training loop, for every diffusion family.

State is a plain pytree {params, opt_state, ema, step, process_state}. One jit-compiled step: the process's loss
(corruption on device), gradients (accumulated over micro-batches with `lax.scan`), optax AdamW with warmup + cosine
decay and global-norm clipping, EMA, and a guard that leaves the state untouched when the loss or gradient is not finite.
The step's randomness is fold_in(PRNGKey(train.seed), step), so a resumed run repeats the uninterrupted one exactly.
It runs under a (data, fsdp, tensor) mesh over all devices: parameters and optimizer state are sharded by logical axis
rules, batches along data x fsdp.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlm_jax import config as config_lib
from dlm_jax.build import Run, build, init_params
from dlm_jax.checkpoint import Checkpointer
from dlm_jax.data import load_corpus, segment_ids, train_iterator
from dlm_jax.errors import DLMError
from dlm_jax.evaluate import evaluate_bound, generate
from dlm_jax.logs import MetricWriter
from dlm_jax.samplers.common import PAD


def make_optimizer(cfg) -> optax.GradientTransformation:
  t = cfg.train
  decay_steps = max(t.steps, t.warmup_steps + 1)
  lr = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps, decay_steps,
                                          end_value=t.learning_rate * t.min_lr_ratio)
  # identity() has the same (empty) state as clipping, so grad_clip can change between resumes
  clip = optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity()
  return optax.chain(clip, optax.adamw(lr, b1=t.adam_b1, b2=t.adam_b2, weight_decay=t.weight_decay))


def learning_rate(cfg, step):
  t = cfg.train
  return optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps, max(t.steps, t.warmup_steps + 1),
                                            end_value=t.learning_rate * t.min_lr_ratio)(step)


def state_shardings(run: Run, opt: optax.GradientTransformation, abstract_state: dict) -> dict:
  ps = run.param_shardings
  opt_sh = optax.tree_map_params(opt, lambda _, s: s, abstract_state["opt_state"], ps,
                                 transform_non_params=lambda _: run.replicated)
  return {"params": ps, "opt_state": opt_sh, "ema": ps, "step": run.replicated,
          "process_state": jax.tree.map(lambda _: run.replicated, abstract_state["process_state"])}


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry their shardings (restore and AOT-compile targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def check_batch(run: Run) -> None:
  """The global batch and each micro-batch must split evenly over the mesh's batch shards."""
  t, shards = run.cfg.train, run.batch_shards
  if t.batch_size % shards or (t.batch_size // t.grad_accum_steps) % shards:
    raise DLMError(f"train.batch_size ({t.batch_size}) / train.grad_accum_steps ({t.grad_accum_steps}) must be "
                   f"divisible by mesh data x fsdp ({shards}) on {run.mesh.devices.size} devices")


def abstract_train_state(run: Run, opt) -> dict:
  def init_fn():
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), run.abstract_params)
    return {"params": params, "opt_state": opt.init(params), "ema": params, "step": jnp.array(0, jnp.int32),
            "process_state": run.process.init_state(jax.random.PRNGKey(0))}
  return jax.eval_shape(init_fn)


def init_train_state(run: Run, opt, shardings: dict) -> dict:
  seed = run.cfg.train.seed
  params = init_params(run, seed)

  @jax.jit
  def rest(params):
    return {"params": params, "opt_state": opt.init(params), "ema": params, "step": jnp.array(0, jnp.int32),
            "process_state": run.process.init_state(jax.random.fold_in(jax.random.PRNGKey(seed), 1))}

  with jax.set_mesh(run.mesh):
    return jax.jit(rest, out_shardings=shardings)(params)


def make_train_step(run: Run, opt, shardings: dict):
  """The jit-compiled step: (state, tokens [B, L]) -> (state, metrics)."""
  cfg, process = run.cfg, run.process
  accum = cfg.train.grad_accum_steps
  ema_decay = cfg.train.ema_decay
  eos_id = run.tokenizer.eos_id
  use_segments = cfg.data.segment_attention
  base_key = jax.random.PRNGKey(cfg.train.seed)

  def batch_of(tokens):
    batch = {"tokens": tokens}
    if use_segments:
      is_eos = (tokens == eos_id).astype(jnp.int32)
      batch["segment_ids"] = jnp.cumsum(is_eos, axis=-1) - is_eos
    return batch

  def loss_fn(params, tokens, key, pstate):
    loss, metrics, new_pstate = process.loss(run.apply_fn, params, batch_of(tokens), key, pstate)
    return loss, (metrics, new_pstate)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, tokens):
    key = jax.random.fold_in(base_key, state["step"])
    params, pstate = state["params"], state["process_state"]
    if accum == 1:
      (loss, (metrics, new_pstate)), grads = grad_fn(params, tokens, key, pstate)
    else:
      micro = tokens.reshape(accum, tokens.shape[0] // accum, *tokens.shape[1:])
      keys = jax.random.split(key, accum)

      def body(carry, xs):
        g_sum, l_sum, m_sum, ps = carry
        mb, k = xs
        (l, (m, ps)), g = grad_fn(params, mb, k, ps)
        return (jax.tree.map(jnp.add, g_sum, g), l_sum + l, jax.tree.map(jnp.add, m_sum, m), ps), None

      zeros_g = jax.tree.map(jnp.zeros_like, params)
      m_shape = jax.eval_shape(lambda: loss_fn(params, micro[0], keys[0], pstate)[1][0])
      zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
      (grads, loss, metrics, new_pstate), _ = jax.lax.scan(body, (zeros_g, 0.0, zeros_m, pstate), (micro, keys))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
      metrics = jax.tree.map(lambda m: m / accum, metrics)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = opt.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    if ema_decay > 0:
      # warm-up of the decay (as TF's ExponentialMovingAverage with num_updates): early in a run the average does not
      # sit on the random initialisation; for long runs the decay is ema_decay.
      step_f = state["step"].astype(jnp.float32)
      decay = jnp.minimum(ema_decay, (1.0 + step_f) / (10.0 + step_f))
      new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], new_params)
    else:
      new_ema = new_params
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = {"params": new_params, "opt_state": new_opt, "ema": new_ema, "step": state["step"] + 1,
                 "process_state": new_pstate}
    new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=ok.astype(jnp.float32),
                   learning_rate=learning_rate(cfg, state["step"]))
    return new_state, metrics

  return jax.jit(step, in_shardings=(shardings, run.batch_sharding()),
                 out_shardings=(shardings, run.replicated), donate_argnums=0)


def check_workdir_compatible(ckpt: Checkpointer, cfg) -> None:
  """A workdir that holds a checkpoint may only be resumed with the same model shape."""
  step = ckpt.latest_step()
  if step is None:
    return
  saved = config_lib.flat_items(config_lib.config_from_dict(ckpt.restore_config(step)))
  now = config_lib.flat_items(cfg)
  for key in config_lib.SHAPE_KEYS:
    if saved[key] != now[key]:
      raise DLMError(f"workdir {os.path.dirname(ckpt.directory)} holds a checkpoint (step {step}) with {key}={saved[key]!r} "
                     f"but the config says {now[key]!r}; use a new --workdir or the checkpoint's config")


class _Preemption:
  """Turns SIGTERM into a flag that the loop checks after every step."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no preemption handling
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def requested_anywhere(self) -> bool:
    """True when any host got SIGTERM; all hosts agree, so they save the same step together."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.asarray(flags).any())

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _use_ema(cfg) -> bool:
  return cfg.eval.use_ema and cfg.train.ema_decay > 0


def train(cfg, workdir: str, *, progress: bool = True) -> dict:
  """Trains (or resumes) in `workdir`. Returns the final metrics. Exits via DLMError on user errors."""
  config_lib.validate(cfg)
  existing = Checkpointer(workdir, read_only=True)  # creates nothing
  check_workdir_compatible(existing, cfg)
  existing.close()
  run = build(cfg)
  corpus = load_corpus(cfg, run.tokenizer)
  opt = make_optimizer(cfg)
  abstract = abstract_train_state(run, opt)
  shardings = state_shardings(run, opt, abstract)
  check_batch(run)
  n_batch = cfg.train.batch_size

  it = train_iterator(corpus, n_batch, cfg.data.shuffle_seed, jax.process_index(), jax.process_count())
  # Everything the user can get wrong has been checked: only now is anything written to the workdir.
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  start = ckpt.latest_step()
  if start is not None:
    state, data_state = ckpt.restore(start, with_shardings(abstract, shardings))
    it.set_state(data_state)
  else:
    state = init_train_state(run, opt, shardings)
    start = 0
  step_fn = make_train_step(run, opt, shardings)
  writer = MetricWriter(workdir)
  cfg_dict = config_lib.to_dict(cfg)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(cfg_dict, f, indent=2)

  tokens_per_step = n_batch * cfg.data.seq_len
  last: dict = {}
  pbar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm
    pbar = tqdm(total=cfg.train.steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)

  saved = {"step": start}

  def save(step, wait=False):
    if saved["step"] != step:  # a step is saved once (SIGTERM right after a periodic save only waits for it)
      ckpt.save(step, state, it.get_state(), cfg_dict)
      saved["step"] = step
    if wait:
      ckpt.wait()

  t_window, n_window = time.perf_counter(), 0
  try:
    with _Preemption() as preempt, jax.set_mesh(run.mesh):
      for step in range(start, cfg.train.steps):
        host = next(it)["tokens"]
        batch = jax.make_array_from_process_local_data(run.batch_sharding(), host)
        state, metrics = step_fn(state, batch)
        m = jax.device_get(metrics)
        n_window += 1
        done = step + 1
        if not m["finite"]:
          raise DLMError(f"non-finite loss or gradient at step {done} (loss={float(m['loss'])}); the state was not "
                         f"updated and no checkpoint was written - lower train.learning_rate or set train.grad_clip, "
                         f"then rerun to resume from the last checkpoint")
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
          dt = time.perf_counter() - t_window
          tps = n_window * tokens_per_step / max(dt, 1e-9)
          last = {k: float(v) for k, v in m.items()}
          last["tokens_per_second"] = tps
          writer.write(done, "train", last)
          if pbar is not None:
            pbar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tps:,.0f}")
          t_window, n_window = time.perf_counter(), 0
        if pbar is not None:
          pbar.update(1)
        if cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
          params = state["ema"] if _use_ema(cfg) else state["params"]
          ev = evaluate_bound(run, params, corpus.val, state["process_state"], batch_size=cfg.eval.batch_size,
                              max_batches=cfg.eval.max_batches, seed=cfg.eval.seed) if len(corpus.val) else {}
          if cfg.train.eval_samples:
            toks, _ = generate(run, params, state["process_state"], num_samples=cfg.train.eval_samples,
                               length=cfg.sampler.length or cfg.data.seq_len, seed=cfg.sampler.seed + done)
            ev["samples"] = [run.tokenizer.decode(t[t != PAD]) for t in toks]
          writer.write(done, "eval", ev)
          if pbar is not None and "nelbo_bits_per_token" in ev:
            pbar.write(f"step {done}: validation bound {ev['nelbo_bits_per_token']:.4f} bits/token "
                       f"(perplexity <= {ev['perplexity_bound']:.3f})")
          t_window, n_window = time.perf_counter(), 0
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
          save(done)
        if preempt.requested_anywhere():
          save(done, wait=True)
          if pbar is not None:
            pbar.write(f"SIGTERM: saved checkpoint at step {done}; rerun the same command to resume")
          raise SystemExit(143)
  finally:
    if pbar is not None:
      pbar.close()
    ckpt.close()
    writer.close()
  return last


def load_for_inference(workdir: str, overrides=()) -> tuple[Any, Run, Any, Any]:
  """(cfg, run, params, process_state) from the latest checkpoint in `workdir`; EMA parameters when configured."""
  if not os.path.isdir(workdir):
    raise DLMError(f"workdir '{workdir}' does not exist; pass the --workdir of a dlm-train run")
  ckpt = Checkpointer(workdir, read_only=True)
  step = ckpt.latest_step()
  if step is None:
    raise DLMError(f"workdir '{workdir}' holds no checkpoint; run dlm-train --workdir {workdir} first")
  cfg = config_lib.config_from_dict(ckpt.restore_config(step))
  overrides = list(overrides)
  for key, _ in overrides:
    if key in config_lib.SHAPE_KEYS or key.startswith("model."):
      raise DLMError(f"--config.{key} changes the model of a trained checkpoint; only data/eval/sampler/mesh keys "
                     "can be overridden here")
  config_lib.apply_overrides(cfg, overrides)
  config_lib.validate(cfg)
  run = build(cfg)
  opt = make_optimizer(cfg)
  abstract = abstract_train_state(run, opt)
  shardings = state_shardings(run, opt, abstract)
  which = "ema" if _use_ema(cfg) else "params"
  subset = {k: with_shardings(abstract[k], shardings[k]) for k in (which, "process_state")}
  state = ckpt.restore_subset(step, subset)
  ckpt.close()
  return cfg, run, state[which], state["process_state"]
