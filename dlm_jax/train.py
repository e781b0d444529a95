"""The one training loop, for every diffusion family, and the hooks that run around it.

State is a plain pytree {params, opt_state, ema, step, process_state}. One jit-compiled step: the objective (by default
the process's loss, corruption on device), gradients (accumulated over micro-batches with `lax.scan`), optax AdamW with
warmup + cosine decay and global-norm clipping, EMA, and a guard that leaves the state untouched when the loss or
gradient is not finite. The step's randomness is fold_in(PRNGKey(train.seed), step), so a resumed run repeats the
uninterrupted one exactly. It runs under a (data, fsdp, tensor) mesh over all devices: parameters and optimizer state
are sharded by logical axis rules, batches (dicts of arrays: 'tokens', 'segment_ids', any extra field) along data x fsdp.

`train()` is three parts:

  setup(cfg, workdir, ...) -> Trainer   run, corpus, optimizer, state (restored or new), checkpointer, data iterator,
                                        metric writer, the compiled step
  run_loop(trainer, hooks)              the step loop: next batch -> step -> every hook's on_step
  default_hooks(extra)                  LogHook (metrics.jsonl, TensorBoard, progress bar), EvalHook (validation bound),
                                        SampleHook (eval samples), CheckpointHook (periodic saves), the caller's extra
                                        hooks, PreemptionHook (SIGTERM: save, exit 143)

A hook is any object with `on_step(step, state, fetch)`; `on_start(trainer)`, `on_end(step, state)` and `close()` are
optional (subclass `Hook` for no-op defaults; its on_start keeps the trainer as `self.trainer`):

  on_start(trainer)         once, before the first step (inside the mesh context)
  on_step(step, state, fetch)
                            after every step, in list order: `step` counts steps done (1-based, as in metrics.jsonl),
                            `state` is the train state after it (device arrays; donated to the next step, so do not
                            keep it), `fetch` is this step's metrics (`Fetch`): `fetch()` copies them to the host (one
                            device sync, at most once per step), `fetch.device` are the device arrays. Metrics stay on
                            the device unless a hook asks, so the built-in hooks sync only at log, eval and checkpoint
                            steps. Rows for metrics.jsonl go through `trainer.log(step, kind, values)`
  on_end(step, state)       after the last step, when the loop finished normally
  close()                   at the end, also after an error or SIGTERM (hooks whose on_start ran, in reverse order)

Non-finite steps: the step itself leaves the state untouched, and the loop keeps the first non-finite step on the
device. `fetch()` and `fetch.check()` raise DLMError naming it, so a hook that writes anything derived from the state
(a checkpoint, an evaluation) must call one of them first; the built-in hooks do, and the loop checks after the last
step. A post-training objective plugs in as `train(cfg, workdir, objective=..., hooks=[...], batch_fn=...)`.

Preemption: SIGTERM makes PreemptionHook save a step and exit 143. With one process, a Python SIGTERM handler sets a
flag read after every step. With several (jax.distributed), every host must save the same step, and SIGTERM may reach
only one: JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`, as in Orbax's
CheckpointManager) handles this. The notice goes through the coordination service, and all hosts return True at the
same agreed step. No collective runs per step.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlm_jax import config as config_lib
from dlm_jax import sharding as sharding_lib
from dlm_jax import storage
from dlm_jax.build import Run, build, init_params, param_dtype
from dlm_jax.checkpoint import Checkpointer, DamagedCheckpoint
from dlm_jax.data import Corpus, Mixture, load_corpus, segment_ids, train_iterator
from dlm_jax.errors import DLMError
from dlm_jax.evaluate import evaluate_bound, generate
from dlm_jax.logs import MetricWriter
from dlm_jax.samplers import PAD

# objective(apply_fn, params, batch, key, process_state[, frozen]) -> (loss, metrics, new_process_state); runs on
# device, in jit. `frozen` (passed only when the run has frozen parameters: a post-training reference, teacher or LoRA
# base) is a dict of device pytrees the step takes as an argument and never updates.
Objective = Callable[..., tuple[Any, dict, Any]]


def lr_schedule(cfg) -> optax.Schedule:
  """Linear warmup from 0 to train.learning_rate, then cosine decay to learning_rate * min_lr_ratio at train.steps."""
  t = cfg.train
  return optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, t.warmup_steps, max(t.steps, t.warmup_steps + 1),
                                            end_value=t.learning_rate * t.min_lr_ratio)


def stochastic_round(x, dtype, key):
  """float32 `x` rounded to bfloat16 up or down with probability given by the distance (unbiased: E[round(x)] = x), so
  increments far below bf16's half-ulp (an EMA's (1 - decay) step) still move the stored value on average. Any other
  target dtype: a plain cast."""
  if jnp.dtype(dtype) != jnp.bfloat16:
    return x.astype(dtype)
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
  rounded = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
  return jnp.where(jnp.isfinite(x), rounded, x).astype(jnp.bfloat16)  # (the low bits of a bf16 value are zero: exact)


def _tree_stochastic_round(tree, dtype, key):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree.unflatten(treedef, [stochastic_round(x, dtype, k) for x, k in zip(leaves, keys)])


_PARAMS_KEY = 0x706172  # bf16 master weights' stochastic rounding: fold_in(the step's key, _PARAMS_KEY)
_EMA_KEY = 0x656d61  # the EMA's stochastic rounding: fold_in(the step's key, _EMA_KEY)
_MOMENTS_KEY = 0x6d6f6d  # the stochastic rounding of bf16 moments: fold_in(PRNGKey(_MOMENTS_KEY), Adam's count)


def scale_by_adam(b1: float, b2: float, moments_dtype, eps: float = 1e-8) -> optax.GradientTransformation:
  """optax.scale_by_adam (same state, ScaleByAdamState, and the same float32 arithmetic) with both moments stored in
  `moments_dtype` whatever the parameters' dtype (optax's nu follows the parameters). Updates are float32. The moment
  update is computed in float32; bfloat16 moments are stochastically rounded (noise from the step count, so a resumed
  run repeats the uninterrupted one), because nu's step (1 - b2) (g^2 - nu) is below bf16's half-ulp for b2 = 0.999
  and round-to-nearest would freeze it."""
  dtype = jnp.dtype(moments_dtype)

  def init_fn(params):
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params, dtype=dtype),
                                  nu=optax.tree.zeros_like(params, dtype=dtype))

  def update_fn(updates, state, params=None):
    del params
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)
    g = f32(updates)
    mu = optax.tree.update_moment(g, f32(state.mu), b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(g, f32(state.nu), b2, 2)
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    key_mu, key_nu = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(_MOMENTS_KEY), count))
    return out, optax.ScaleByAdamState(count=count, mu=_tree_stochastic_round(mu, dtype, key_mu),
                                       nu=_tree_stochastic_round(nu, dtype, key_nu))

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(cfg) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (optax.adamw's chain and state, with scale_by_adam above: moments in
  train.moments_dtype). Gradients reach it in float32 (the step casts them), so its updates are float32 and are
  rounded to train.param_dtype only when added to the parameters."""
  t = cfg.train
  lr = lr_schedule(cfg)
  # identity() has the same (empty) state as clipping, so grad_clip can change between resumes
  clip = optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity()
  adamw = optax.chain(scale_by_adam(t.adam_b1, t.adam_b2, t.moments_dtype),
                      optax.add_decayed_weights(t.weight_decay), optax.scale_by_learning_rate(lr))
  return optax.chain(clip, adamw)


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


def init_train_state(run: Run, opt, shardings: dict, params=None) -> dict:
  """A new train state: random parameters (train.seed), or the given ones (fine-tuning), fresh optimizer and EMA."""
  seed = run.cfg.train.seed
  if params is None:
    params = init_params(run, seed)

  @jax.jit
  def rest(params):
    return {"params": params, "opt_state": opt.init(params), "ema": params, "step": jnp.array(0, jnp.int32),
            "process_state": run.process.init_state(jax.random.fold_in(jax.random.PRNGKey(seed), 1))}

  with jax.set_mesh(run.mesh):
    return jax.jit(rest, out_shardings=shardings)(params)


def init_from_params(run: Run, opt, shardings: dict, ckpt: Checkpointer, step: int) -> dict:
  """The train state of a parameters-only checkpoint (what `dlm-convert --from_hf` writes): its parameters, restored
  straight into their shardings and cast to train.param_dtype, a fresh optimizer state and EMA = the parameters; the
  step is the checkpoint's, the data pipeline starts at its beginning."""
  params = ckpt.restore_subset(step, {"params": with_shardings(run.abstract_params, run.param_shardings)})["params"]
  seed = run.cfg.train.seed

  dtype = param_dtype(run.cfg)

  def make(params):
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    return {"params": params, "opt_state": opt.init(params), "ema": params, "step": jnp.array(step, jnp.int32),
            "process_state": run.process.init_state(jax.random.fold_in(jax.random.PRNGKey(seed), 1))}

  with jax.set_mesh(run.mesh):
    return jax.jit(make, out_shardings=shardings)(params)


def _trainable(cfg, run: Run, post) -> tuple[Run, Any, dict | None]:
  """(the run whose abstract_params / param_shardings the train state holds, the initial parameters or None for a
  random init, the frozen pytrees of the step or None). Pretraining: (run, None, None). Post-training: the state starts
  from train.init_from; with LoRA the state holds the adapters (their own run view, `lora.adapter_run`), the base is
  frozen['lora_base'] and the initial adapters are exactly the base (B = 0). An objective with a reference policy gets
  frozen['reference'] = the initial parameters (with LoRA: the initial adapters, i.e. the base)."""
  if post is None:  # (config.validate refuses lora.rank > 0 without a post-training objective and train.init_from)
    return run, None, None
  frozen = dict(post.frozen)
  space, init = run, post.init_params
  if cfg.lora.rank:
    from dlm_jax import lora
    space = lora.adapter_run(run)
    frozen["lora_base"] = init
    init = lora.init_adapter(space, cfg.train.seed)
  if post.needs_reference:
    if init is None:
      raise DLMError(f"train.objective={cfg.train.objective!r} keeps a reference policy: set train.init_from")
    frozen["reference"] = init
  return space, init, frozen or None


def abstract_trainable(cfg, run: Run, needs_reference: bool = False) -> tuple[Run, dict | None]:
  """`_trainable`'s shapes, read from the config alone (dlm-compile; no checkpoint is read, train.init_from may not
  exist): (the run whose parameters the train state holds, the step's frozen pytrees as sharded ShapeDtypeStructs or
  None). With LoRA the state is `lora.adapter_run(run)`'s and frozen['lora_base'] the model's parameters in
  train.param_dtype and `run.param_shardings`; a reference policy (`needs_reference`) is shaped as the state's
  parameters. A distillation teacher is not covered."""
  space, frozen = run, {}
  if cfg.lora.rank:
    from dlm_jax import lora
    space = lora.adapter_run(run)
    frozen["lora_base"] = with_shardings(run.abstract_params, run.param_shardings)
  if needs_reference:
    frozen["reference"] = with_shardings(space.abstract_params, space.param_shardings)
  return space, frozen or None


def restore_params(workdir: str, run: Run, what: str):
  """The newest parameters of another run's `workdir` (its EMA when it keeps one and eval.use_ema), restored with
  `run`'s shardings and train.param_dtype: the start of a fine-tuning run (train.init_from), a distillation teacher.
  `what` names the config key in errors. The workdir's model must be `run`'s (same shape keys)."""
  if not workdir:
    raise DLMError(f"{what} is empty; set it to the workdir of a trained (or dlm-convert) run")
  ckpt, step, saved = _latest_config(storage.resolve(workdir), f"set {what} to the workdir of a trained run",
                                     f"train it first or set {what} to another workdir")
  now, old = config_lib.flat_items(run.cfg), config_lib.flat_items(saved)
  for key in config_lib.SHAPE_KEYS:
    if old[key] != now[key]:
      ckpt.close()
      raise DLMError(f"{what}={workdir!r} holds a model with {key}={old[key]!r} but this config says {now[key]!r}; "
                     f"use that run's model keys")
  keys = ckpt.state_keys(step)
  which = "ema" if "ema" in keys and run.cfg.eval.use_ema and saved.train.ema_decay > 0 else "params"
  target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, param_dtype(saved), sharding=sh),
                        run.abstract_params, run.param_shardings)
  params = ckpt.restore_subset(step, {which: target})[which]
  ckpt.close()
  dtype = param_dtype(run.cfg)
  with jax.set_mesh(run.mesh):
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p), out_shardings=run.param_shardings)(params)


def abstract_batch(run: Run) -> dict:
  """The global batch the training pipeline produces, as sharded ShapeDtypeStructs (AOT-compile and export targets)."""
  shape = (run.cfg.train.batch_size, run.cfg.data.seq_len)
  batch = {"tokens": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=run.batch_sharding())}
  if run.cfg.data.segment_attention:
    batch["segment_ids"] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=run.batch_sharding())
  return batch


FAMILY_BATCH_FIELDS = ("tokens", "segment_ids")  # what a family's own loss reads


def _family_loss(process) -> Objective:
  """The process's loss as the objective; a batch field it would not read (a batch_fn's loss mask, ...) is an error
  when the step is traced, not silently ignored."""

  def objective(apply_fn, params, batch, key, pstate):
    extra = sorted(set(batch) - set(FAMILY_BATCH_FIELDS))
    if extra:
      raise DLMError(f"the batch carries {extra}, which diffusion.process={process.name!r}'s loss does not read; "
                     "pass an objective that uses them (train(..., objective=...)) or drop them from batch_fn")
    return process.loss(apply_fn, params, batch, key, pstate)

  return objective


def make_train_step(run: Run, opt, shardings: dict, objective: Objective | None = None, frozen: dict | None = None):
  """The jit-compiled step: (state, batch) -> (state, metrics).

  `batch` is a dict of arrays with the global batch as first axis ('tokens' [B, L] int32, 'segment_ids' [B, L] when
  data.segment_attention, any extra field), sharded along it and passed to the objective unchanged; gradient
  accumulation splits every field into train.grad_accum_steps micro-batches. A bare token array is taken as the batch
  the pipeline makes of it ({'tokens'}, plus 'segment_ids' when data.segment_attention).
  `objective(apply_fn, params, batch, key, process_state) -> (loss, metrics, new_process_state)` defaults to the
  process's loss. Metrics: the objective's, plus loss, grad_norm, finite (1.0, or 0.0 when the state was left
  untouched) and learning_rate.
  `frozen` (a dict of device pytrees, e.g. {'reference': params}): the step becomes (state, batch, frozen) -> ...,
  compiled for those arrays' shardings, and the objective gets them as its sixth argument. With LoRA (lora.rank > 0)
  the state's params are the adapters and frozen['lora_base'] the base they adapt: the objective's apply_fn is the
  adapted network, so it sees `params` = adapters like any parameters.
  """
  cfg, process = run.cfg, run.process
  if objective is None:
    objective = _family_loss(process)
  accum = cfg.train.grad_accum_steps
  ema_decay = cfg.train.ema_decay
  eos_id = run.tokenizer.eos_id
  use_segments = cfg.data.segment_attention
  schedule = lr_schedule(cfg)
  base_key = jax.random.PRNGKey(cfg.train.seed)

  def loss_fn(params, batch, key, pstate, frozen):
    if frozen is None:
      loss, metrics, new_pstate = objective(run.apply_fn, params, batch, key, pstate)
    else:
      loss, metrics, new_pstate = objective(network(run, frozen), params, batch, key, pstate, frozen)
    return loss, (metrics, new_pstate)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  pdtype = param_dtype(cfg)
  # gradients come in train.param_dtype; clipping, accumulation and Adam see them in float32
  to_f32 = lambda tree: jax.tree.map(lambda g: g.astype(jnp.float32), tree)

  def step(state, batch, frozen=None):
    if not isinstance(batch, dict):
      batch = {"tokens": batch}
      if use_segments:
        batch["segment_ids"] = segment_ids(batch["tokens"], eos_id)
    key = jax.random.fold_in(base_key, state["step"])
    params, pstate = state["params"], state["process_state"]
    if accum == 1:
      (loss, (metrics, new_pstate)), grads = grad_fn(params, batch, key, pstate, frozen)
      grads = to_f32(grads)
    else:
      micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
      keys = jax.random.split(key, accum)

      def body(carry, xs):
        g_sum, l_sum, m_sum, ps = carry
        mb, k = xs
        (l, (m, ps)), g = grad_fn(params, mb, k, ps, frozen)
        return (jax.tree.map(jnp.add, g_sum, to_f32(g)), l_sum + l, jax.tree.map(jnp.add, m_sum, m), ps), None

      zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      first = jax.tree.map(lambda x: x[0], micro)
      m_shape = jax.eval_shape(lambda: loss_fn(params, first, keys[0], pstate, frozen)[1][0])
      zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
      (grads, loss, metrics, new_pstate), _ = jax.lax.scan(body, (zeros_g, 0.0, zeros_m, pstate), (micro, keys))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
      metrics = jax.tree.map(lambda m: m / accum, metrics)
    grad_norm = optax.tree.norm(grads)
    updates, new_opt = opt.update(grads, state["opt_state"], params)
    if pdtype == jnp.float32:
      new_params = optax.apply_updates(params, updates)
    else:  # added in float32, stochastically rounded (late, small Adam steps are below bf16's half-ulp of a weight)
      new_params = jax.tree.map(lambda p, u: p.astype(jnp.float32) + u, params, updates)
      new_params = _tree_stochastic_round(new_params, pdtype, jax.random.fold_in(key, _PARAMS_KEY))
    if ema_decay > 0:
      # warm-up of the decay (as TF's ExponentialMovingAverage with num_updates): early in a run the average does not
      # sit on the random initialisation; for long runs the decay is ema_decay.
      step_f = state["step"].astype(jnp.float32)
      decay = jnp.minimum(ema_decay, (1.0 + step_f) / (10.0 + step_f))
      # in float32, stored in train.param_dtype: stochastically rounded to bf16 ((1 - decay) (p - e) is below its
      # half-ulp), with noise from the step's key
      new_ema = jax.tree.map(lambda e, p: decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32),
                             state["ema"], new_params)
      new_ema = _tree_stochastic_round(new_ema, pdtype, jax.random.fold_in(key, _EMA_KEY))
    else:
      new_ema = new_params
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = {"params": new_params, "opt_state": new_opt, "ema": new_ema, "step": state["step"] + 1,
                 "process_state": new_pstate}
    new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=ok.astype(jnp.float32),
                   learning_rate=schedule(state["step"]))
    return new_state, metrics

  # one sharding for every batch field (a prefix of the batch pytree): rows split along data x fsdp, the rest replicated
  if frozen is None:
    return jax.jit(lambda state, batch: step(state, batch), in_shardings=(shardings, run.batch_sharding(1)),
                   out_shardings=(shardings, run.replicated), donate_argnums=0)
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
  return jax.jit(step, in_shardings=(shardings, run.batch_sharding(1), frozen_shardings),
                 out_shardings=(shardings, run.replicated), donate_argnums=0)


def network(run: Run, frozen: dict | None):
  """The network the objective and evaluation apply to the state's params: the model, or with LoRA the model adapted
  around the frozen base (frozen['lora_base'])."""
  if frozen is None or "lora_base" not in frozen:
    return run.apply_fn
  from dlm_jax import lora
  return lora.Adapted(run.apply_fn.graphdef, run.apply_fn.logit_shift, base=frozen["lora_base"],
                      scale=lora.scale(run.cfg.lora))


def check_workdir_compatible(ckpt: Checkpointer, cfg, step: int | None) -> None:
  """A workdir that holds a checkpoint (`step`: the one the run resumes from) may only be resumed with the same model
  shape."""
  if step is None:
    return
  saved = config_lib.flat_items(config_lib.config_from_dict(ckpt.restore_config(step)))
  now = config_lib.flat_items(cfg)
  for key in config_lib.SHAPE_KEYS:
    if saved[key] != now[key]:
      raise DLMError(f"workdir {storage.parent(ckpt.directory)} holds a checkpoint (step {step}) with {key}={saved[key]!r} "
                     f"but the config says {now[key]!r}; use a new --workdir or the checkpoint's config")


class _Preemption:
  """Whether to save and stop after this step because of SIGTERM (the notice a scheduler gives before preempting).

  One process: our own SIGTERM handler sets a flag that the loop reads after every step.

  Several processes (jax.distributed): every host must save the same step, since a save is a collective. JAX's
  preemption sync point does this without a per-step collective (`multihost_utils.reached_preemption_sync_point`,
  the mechanism Orbax's CheckpointManager.should_save uses): jax.distributed.initialize starts the coordination
  service's preemption sync manager (config jax_enable_preemption_service, on by default), which installs its own
  C-level SIGTERM handler. A SIGTERM on any host is posted to the coordination service; in the background all hosts
  then agree on the step after the largest step any of them has reached, and the call returns True on every host at
  that step. Until a notice arrives the call is a local check, with no communication. So in this mode we install no
  Python handler: one would replace the service's handler and the notice would never leave this host."""

  def __init__(self):
    self.requested = False
    self._old = None
    self._sync_point = False

  def __enter__(self):
    if jax.process_count() > 1:
      self._sync_point = True
      return self
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no preemption handling
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def requested_anywhere(self, step: int) -> bool:
    """True when this process got SIGTERM (one process), or (several) when all hosts reached the step they agreed to
    save after a SIGTERM on any of them; must then be called after every step, with the same steps on every host."""
    if not self._sync_point:
      return self.requested
    from jax.experimental import multihost_utils
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:
      if "not been initialized" not in str(e):  # e.g. the agreement failed because a host died: a runtime error
        raise
      # the service is off: the same on every host, so all stop here
      raise DLMError("multi-process training needs JAX's preemption service, which is off (config "
                     "jax_enable_preemption_service / JAX_ENABLE_PREEMPTION_SERVICE); leave it on (the default) so "
                     "that SIGTERM on any host saves the same step on all") from e

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None


def _use_ema(cfg) -> bool:
  return cfg.eval.use_ema and cfg.train.ema_decay > 0


# ----------------------------------------------------------------------------------------------------------------------
# Setup


class Throughput:
  """Steps and wall time since the last reset: the logged tokens_per_second. A hook that does slow work between steps
  (evaluation, sampling) calls `reset()` afterwards, so the rate measures training alone."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.start, self.steps = time.perf_counter(), 0

  def tick(self) -> None:
    self.steps += 1

  def rate(self, tokens_per_step: int) -> float:
    return self.steps * tokens_per_step / max(time.perf_counter() - self.start, 1e-9)


@dataclasses.dataclass
class Trainer:
  """What the loop and its hooks share, built by `setup`. `state` is the current train state (the loop replaces it
  after every step); `start` the number of steps done before this call (the restored checkpoint's step, or 0)."""

  cfg: Any
  workdir: str
  run: Run
  corpus: Corpus | Mixture
  opt: optax.GradientTransformation
  shardings: dict
  state: dict
  start: int
  iterator: Any  # grain.DatasetIterator of host batch dicts; its get_state() goes into every checkpoint
  checkpointer: Checkpointer
  writer: MetricWriter
  step_fn: Callable  # the jit-compiled (state, batch) -> (state, metrics)
  config_dict: dict
  pbar: Any = None  # the tqdm progress bar on process 0 when progress=True, else None
  # post-training: frozen device pytrees passed to every step (reference / teacher / LoRA base), and
  # prepare(trainer, host batch, step) -> device batch instead of `device_batch` (RL rollouts); None for pretraining
  frozen: dict | None = None
  prepare: Callable | None = None
  # post-training's validation (trainer, step, eval params) -> metrics of the 'eval' row, instead of the family bound
  # of corpus.val and unconditional samples
  evaluate: Callable | None = None
  throughput: Throughput = dataclasses.field(default_factory=Throughput)
  _rows: dict = dataclasses.field(default_factory=dict)

  def device_batch(self, host: dict) -> dict:
    """A host-local batch dict (this process's rows, `sharding.host_batch_rows`) -> global arrays, every field split
    along the batch over data x fsdp."""
    n = self.cfg.train.batch_size
    return {k: jax.make_array_from_process_local_data(self.run.batch_sharding(np.ndim(v)), v, (n,) + np.shape(v)[1:])
            for k, v in host.items()}

  def policy_params(self, state: dict):
    """The parameters being trained, as parameters of `run.apply_fn` (with LoRA: the adapters merged into the base):
    what RL samples its rollouts with."""
    return self._merged(state["params"])

  def _merged(self, params):
    if self.frozen is not None and "lora_base" in self.frozen:
      from dlm_jax import lora
      params = self.run.jitted("lora_merge", functools.partial(lora.merge, scale=lora.scale(self.cfg.lora)))(
          self.frozen["lora_base"], params)
    return params

  def eval_params(self, state: dict):
    """The parameters evaluation and sampling use (with `run.apply_fn`): the EMA when eval.use_ema and
    train.ema_decay > 0; with LoRA, those adapters merged into the frozen base."""
    return self._merged(state["ema"] if _use_ema(self.cfg) else state["params"])

  def log(self, step: int, kind: str, values: dict) -> None:
    """Adds values to the metrics row (step, kind); the loop writes the step's rows once all hooks ran, so several
    hooks can fill one row (EvalHook and SampleHook fill the 'eval' row)."""
    self._rows.setdefault((int(step), kind), {}).update(values)

  def flush(self) -> None:
    rows, self._rows = self._rows, {}
    for (step, kind), values in rows.items():
      self.writer.write(step, kind, values)

  def note(self, message: str) -> None:
    """A line for the user, printed above the progress bar (nothing without one)."""
    if self.pbar is not None:
      self.pbar.write(message)

  def close(self) -> None:
    if self.pbar is not None:
      self.pbar.close()
    if hasattr(self.iterator, "close"):  # stops the input pipeline's threads / worker processes
      self.iterator.close()
    self.checkpointer.close()
    self.flush()
    self.writer.close()


def resume_step(ckpt: Checkpointer, below: int | None = None) -> tuple[int | None, list[tuple[int, str]]]:
  """(the newest intact complete step, older than `below` when given, or None; the steps to set aside with their
  reasons: damaged complete steps newer than it, and incomplete step directories, i.e. interrupted saves)."""
  aside = [(s, f"checkpoint step {s} in {ckpt.directory} is incomplete (no integrity record: its save was "
               f"interrupted, or a dlm_jax older than checkpoint records wrote it)") for s in ckpt.incomplete_steps()]
  for step in reversed(ckpt.steps()):
    if below is not None and step >= below:
      continue
    try:
      ckpt.verify(step)
      return step, aside
    except DamagedCheckpoint as e:
      aside.append((step, e.summary))
  return None, aside


def _set_aside(workdir: str, steps: list[tuple[int, str]], start: int | None) -> None:
  """Moves damaged and incomplete steps out of the way (to checkpoints/damaged/, never deleted) with a warning each,
  on process 0; every process waits until it is done."""
  if not steps:
    return
  if jax.process_index() == 0:
    mover = Checkpointer(workdir, read_only=True)
    for step, reason in steps:
      dest = mover.quarantine(step)
      then = f"resuming from step {start}" if start is not None else "no intact checkpoint is left: starting anew"
      print(f"dlm-train: warning: {reason}; moved it to {dest}; {then}",
            file=sys.stderr, flush=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("dlm_jax: damaged checkpoints set aside")


def data_iterator(cfg, run, corpus, batch_fn: Callable[[dict], dict] | None = None, batch_size: int = 0,
                  whole: bool = False):
  """This process's training batches: its rows of each global batch (of train.batch_size rows, or `batch_size`: RL
  reads one prompt per group) under the run's batch sharding, or every row with `whole` (RL: each host reads the
  whole prompt batch and builds the rollout batch from it), read by the data.* pipeline settings
  (`data.train_iterator`)."""
  d = cfg.data
  batch_size = batch_size or cfg.train.batch_size
  rows = (0, batch_size) if whole else sharding_lib.host_batch_rows(run.mesh, batch_size)
  return train_iterator(corpus, batch_size, d.shuffle_seed, rows=rows,
                        segment_attention=d.segment_attention, batch_fn=batch_fn, read_threads=d.read_threads,
                        prefetch=d.prefetch, workers=d.workers)


def setup(cfg, workdir: str, *, objective: Objective | None = None, batch_fn: Callable[[dict], dict] | None = None,
          progress: bool = True) -> Trainer:
  """Checks the config and the workdir, builds the run, corpus, optimizer, data iterator and compiled step, and restores
  the latest checkpoint in `workdir` (or initialises a new state). Nothing is written to `workdir` before every check
  passed. `objective` and `batch_fn` as in `train`."""
  config_lib.validate(cfg)
  workdir = storage.resolve(workdir)
  existing = Checkpointer(workdir, read_only=True)  # creates nothing
  start, set_aside = resume_step(existing)
  check_workdir_compatible(existing, cfg, start)
  existing.close()
  run = build(cfg)
  post = None
  if cfg.train.objective != "pretrain":
    from dlm_jax import posttrain
    post = posttrain.make(cfg, run, lambda path, what: restore_params(path, run, what))
    objective = objective or post.objective
  corpus = post.corpus if post is not None else load_corpus(cfg, run.tokenizer)
  space, init, frozen = _trainable(cfg, run, post)
  opt = make_optimizer(cfg)
  abstract = abstract_train_state(space, opt)
  shardings = state_shardings(space, opt, abstract)
  check_batch(run)
  it = data_iterator(cfg, run, corpus, batch_fn, post.batch_size if post is not None else 0,
                     whole=post is not None and post.prepare is not None)
  # Everything the user can get wrong has been checked: only now is anything written to the workdir.
  storage.makedirs(workdir)
  while True:
    _set_aside(workdir, set_aside, start)
    ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
    try:
      if start is not None and "opt_state" not in ckpt.state_keys(start):  # a converted checkpoint: parameters only
        reader = Checkpointer(workdir, read_only=True)  # (a manager that saved with StandardSave cannot also restore a subset)
        state = init_from_params(run, opt, shardings, reader, start)
        reader.close()
      elif start is not None:
        state, data_state = ckpt.restore(start, with_shardings(abstract, shardings))
        it.set_state(data_state)
      elif init is not None:  # fine-tuning: start from train.init_from (or LoRA's initial adapters)
        state = init_train_state(space, opt, shardings, params=init)
        start = 0
      else:
        state = init_train_state(run, opt, shardings)
        start = 0
      break
    except DamagedCheckpoint as e:  # arrays read back differently from their digests: try the next older step
      ckpt.close()
      set_aside = [(start, e.summary)]
      start, more = resume_step(Checkpointer(workdir, read_only=True), below=start)
      set_aside += more
  step_fn = make_train_step(space, opt, shardings, objective, frozen)
  writer = MetricWriter(workdir, resume_step=start if start else None)
  cfg_dict = config_lib.to_dict(cfg)
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, "config.json"), json.dumps(cfg_dict, indent=2))
  pbar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm
    pbar = tqdm(total=cfg.train.steps, initial=start, desc="train", dynamic_ncols=True, file=sys.stderr)
  return Trainer(cfg, workdir, run, corpus, opt, shardings, state, start, it, ckpt, writer, step_fn, cfg_dict, pbar,
                 frozen=frozen, prepare=post.prepare if post is not None else None,
                 evaluate=post.evaluate if post is not None else None)


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def _non_finite_error(guard: dict) -> DLMError | None:
  step = int(guard["first_bad"])
  if not step:
    return None
  return DLMError(f"non-finite loss or gradient at step {step} (loss={float(guard['loss'])}); the state was not "
                  f"updated and no checkpoint was written - lower train.learning_rate or set train.grad_clip, "
                  f"then rerun to resume from the last checkpoint")


class Fetch:
  """One step's metrics, left on the device until a hook asks.

  `fetch()`: the metrics on the host (a dict of numpy scalars), copied on the first call (one device sync per step at
  most). `fetch.check()`: copies only the loop's record of the first non-finite step. Both raise DLMError naming that
  step when this step or any earlier one had a non-finite loss or gradient. `fetch.device`: the metrics as device
  arrays (no sync). `fetch.step`: the step they belong to.
  """

  def __init__(self, step: int, metrics: dict, guard: dict):
    self.step, self.device, self._guard = step, metrics, guard
    self._host: dict | None = None
    self._checked = False

  def __call__(self) -> dict:
    if self._host is None:
      host, guard = jax.device_get((self.device, self._guard))
      if (e := _non_finite_error(guard)) is not None:
        raise e
      self._host, self._checked = host, True
    return self._host

  def check(self) -> None:
    if not self._checked:
      if (e := _non_finite_error(jax.device_get(self._guard))) is not None:
        raise e
      self._checked = True

  @property
  def fetched(self) -> bool:
    """Whether a hook copied this step's metrics to the host."""
    return self._host is not None


def _record_non_finite(guard: dict, metrics: dict) -> dict:
  """The device-side record of the first non-finite step (0 = none yet) and its loss; `count` counts steps."""
  count = guard["count"] + 1
  first = (guard["first_bad"] == 0) & (metrics["finite"] == 0)
  return {"count": count, "first_bad": jnp.where(first, count, guard["first_bad"]),
          "loss": jnp.where(first, metrics["loss"].astype(jnp.float32), guard["loss"])}


def run_loop(trainer: Trainer, hooks: Sequence[Any]) -> None:
  """Runs the steps trainer.start + 1 .. train.steps: next batch -> compiled step -> every hook's on_step. Then the
  non-finite check of the last step and every hook's on_end. Hooks are closed (those whose on_start ran, in reverse
  order) and the trainer is closed at the end, also after an error or SIGTERM."""
  run = trainer.run
  started: list = []
  try:
    with jax.set_mesh(run.mesh):
      for h in hooks:
        if hasattr(h, "on_start"):
          h.on_start(trainer)
        started.append(h)
      start = trainer.start
      guard = jax.jit(lambda: {"count": jnp.int32(start), "first_bad": jnp.int32(0), "loss": jnp.float32(0.0)},
                      out_shardings=run.replicated)()
      record = jax.jit(_record_non_finite, out_shardings=run.replicated)
      trainer.throughput.reset()
      done, fetch = start, None
      for done in range(start + 1, trainer.cfg.train.steps + 1):
        if trainer.prepare is None:
          batch = trainer.device_batch(next(trainer.iterator))
        else:  # (the host batch, every row on every host: the prepare stage makes the global batch)
          batch = trainer.prepare(trainer, next(trainer.iterator), done)
        if trainer.frozen is None:
          trainer.state, metrics = trainer.step_fn(trainer.state, batch)
        else:
          trainer.state, metrics = trainer.step_fn(trainer.state, batch, trainer.frozen)
        guard = record(guard, metrics)
        fetch = Fetch(done, metrics, guard)
        for h in hooks:
          h.on_step(done, trainer.state, fetch)
        trainer.flush()
      if fetch is not None:
        fetch.check()
      for h in hooks:
        if hasattr(h, "on_end"):
          h.on_end(done, trainer.state)
  finally:
    try:
      for h in reversed(started):
        if hasattr(h, "close"):
          h.close()
    finally:
      trainer.close()


# ----------------------------------------------------------------------------------------------------------------------
# Hooks


class Hook:
  """No-op base of the hook protocol (module docstring): override what you need."""

  def on_start(self, trainer: Trainer) -> None:
    self.trainer = trainer

  def on_step(self, step: int, state: dict, fetch: Fetch) -> None:
    pass

  def on_end(self, step: int, state: dict) -> None:
    pass

  def close(self) -> None:
    pass


def _every(step: int, every: int, steps: int) -> bool:
  """Periodic hooks run every `every` steps and at the last step (never when every == 0)."""
  return bool(every) and (step % every == 0 or step == steps)


class LogHook(Hook):
  """Train metrics every train.log_every steps and at the last step: a 'train' row in metrics.jsonl / TensorBoard
  (the step's metrics and tokens_per_second) and the progress bar. `last` is the latest row (what train() returns)."""

  def __init__(self):
    self.last: dict = {}

  def on_step(self, step, state, fetch):
    t = self.trainer
    t.throughput.tick()
    if _every(step, t.cfg.train.log_every, t.cfg.train.steps):
      m = fetch()
      tps = t.throughput.rate(t.cfg.train.batch_size * t.cfg.data.seq_len)
      self.last = {k: float(v) for k, v in m.items()}
      self.last["tokens_per_second"] = tps
      t.log(step, "train", self.last)
      if t.pbar is not None:
        t.pbar.set_postfix(loss=f"{self.last['loss']:.4f}", tok_s=f"{tps:,.0f}")
      t.throughput.reset()
    if t.pbar is not None:
      t.pbar.update(1)


class EvalHook(Hook):
  """The validation bound (eval.* settings, EMA parameters when configured) every train.eval_every steps and at the
  last step, into the 'eval' row; the progress bar prints it."""

  def on_step(self, step, state, fetch):
    t = self.trainer
    cfg = t.cfg
    if not _every(step, cfg.train.eval_every, cfg.train.steps):
      return
    fetch.check()
    if t.evaluate is not None:  # post-training's own validation (SFT: the responses' bound; RL: the reward)
      ev = t.evaluate(t, step, t.eval_params(state))
    else:
      ev = evaluate_bound(t.run, t.eval_params(state), t.corpus.val, state["process_state"],
                          batch_size=cfg.eval.batch_size, max_batches=cfg.eval.max_batches,
                          seed=cfg.eval.seed) if len(t.corpus.val) else {}
    t.log(step, "eval", ev)
    if "nelbo_bits_per_token" in ev:
      t.note(f"step {step}: validation bound {ev['nelbo_bits_per_token']:.4f} bits/token "
             f"(perplexity <= {ev['perplexity_bound']:.3f})")
    t.throughput.reset()


class SampleHook(Hook):
  """train.eval_samples samples (sampler.* settings, seed sampler.seed + step) at every evaluation step, decoded
  into the 'eval' row as 'samples'."""

  def on_step(self, step, state, fetch):
    t = self.trainer
    cfg = t.cfg
    if not (cfg.train.eval_samples and _every(step, cfg.train.eval_every, cfg.train.steps)):
      return
    if t.evaluate is not None:  # (post-training's own validation samples replies to validation prompts)
      return
    fetch.check()
    toks, _ = generate(t.run, t.eval_params(state), state["process_state"], num_samples=cfg.train.eval_samples,
                       length=cfg.sampler.length or cfg.data.seq_len, seed=cfg.sampler.seed + step)
    t.log(step, "eval", {"samples": [t.run.tokenizer.decode(row[row != PAD]) for row in toks]})
    t.throughput.reset()


class CheckpointHook(Hook):
  """Saves the state and the data iterator's position every train.checkpoint_every steps, when train.checkpoint_minutes
  have passed since the last save, and at the last step (asynchronously: training goes on while it is written; the
  trainer's close waits). A step is saved once, and never after a non-finite step.

  The time rule must pick the same step on every host (a save is collective): with several processes, process 0's
  clock decides at train.log_every steps (one broadcast of a flag there); with one process, at every step."""

  def on_start(self, trainer):
    super().on_start(trainer)
    self.saved = trainer.start
    self.last_save = time.monotonic()

  def _time_is_up(self, step: int) -> bool:
    cfg = self.trainer.cfg.train
    if cfg.checkpoint_minutes <= 0:
      return False
    up = time.monotonic() - self.last_save >= 60.0 * cfg.checkpoint_minutes
    if jax.process_count() == 1:
      return up
    if not _every(step, cfg.log_every, cfg.steps):
      return False
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(up)))

  def save(self, step: int, state: dict, fetch: Fetch, wait: bool = False) -> None:
    fetch.check()
    t = self.trainer
    if self.saved != step:  # a step is saved once (SIGTERM right after a periodic save only waits for it)
      t.checkpointer.save(step, state, t.iterator.get_state(), t.config_dict)
      self.saved, self.last_save = step, time.monotonic()
    if wait:
      t.checkpointer.wait()

  def on_step(self, step, state, fetch):
    if _every(step, self.trainer.cfg.train.checkpoint_every, self.trainer.cfg.train.steps) or self._time_is_up(step):
      self.save(step, state, fetch)


class PreemptionHook(Hook):
  """SIGTERM (on any host): after the step's other hooks, saves it through `checkpoint`, waits for the save and exits
  with status 143; rerunning the same command resumes. Runs last, so the other hooks have seen the saved step. With
  several processes the step is the one all hosts agreed on (a step or more after the signal; see `_Preemption`), and
  a run whose last step comes first simply finishes."""

  def __init__(self, checkpoint: CheckpointHook):
    self.checkpoint = checkpoint
    self._preempt = _Preemption()

  def on_start(self, trainer):
    super().on_start(trainer)
    self._preempt.__enter__()

  def on_step(self, step, state, fetch):
    if self._preempt.requested_anywhere(step):
      self.checkpoint.save(step, state, fetch, wait=True)
      message = f"SIGTERM: saved checkpoint at step {step}; rerun the same command to resume"
      if self.trainer.pbar is not None:
        self.trainer.note(message)
      else:
        print(message, file=sys.stderr, flush=True)
      raise SystemExit(143)

  def close(self):
    self._preempt.__exit__()


def default_hooks(extra: Sequence[Any] = ()) -> list:
  """[LogHook, EvalHook, SampleHook, CheckpointHook, *extra, PreemptionHook]: extra hooks see every step after the
  periodic save and before a SIGTERM exit."""
  checkpoint = CheckpointHook()
  return [LogHook(), EvalHook(), SampleHook(), checkpoint, *extra, PreemptionHook(checkpoint)]


def train(cfg, workdir: str, *, progress: bool = True, objective: Objective | None = None, hooks: Sequence[Any] = (),
          batch_fn: Callable[[dict], dict] | None = None) -> dict:
  """Trains (or resumes) in `workdir`. Returns the last logged train metrics. Exits via DLMError on user errors.

  objective  (apply_fn, params, batch, key, process_state) -> (loss, metrics, new_process_state), run in the compiled
             step instead of the process's loss (the default); metrics must be scalars (they are logged)
  hooks      extra hooks (see the module docstring), run after the built-in ones at every step
  batch_fn   host-side batch dict -> batch dict, applied to every batch in the data pipeline (e.g. to add a 'loss_mask'
             [B, L] the objective reads); every field must have the batch as first axis, and it must be deterministic
             so that a resumed run sees the same batches
  """
  trainer = setup(cfg, workdir, objective=objective, batch_fn=batch_fn, progress=progress)
  all_hooks = default_hooks(hooks)
  run_loop(trainer, all_hooks)
  return all_hooks[0].last


def workdir_config(workdir: str, overrides=()):
  """The config saved in the latest checkpoint of `workdir` with `--config.KEY=VALUE` overrides, validated (dlm-train
  without --config: continue a run, or train a converted checkpoint further)."""
  ckpt, step, cfg = _latest_config(workdir, "pass --config to start a new run",
                                   "pass --config to start a new run there")
  ckpt.close()
  config_lib.apply_overrides(cfg, overrides)
  return config_lib.validate(cfg)


def _latest_config(workdir: str, if_missing: str, if_empty: str):
  """(read-only Checkpointer, latest step, its saved config) of `workdir`; a missing workdir or checkpoint is a
  DLMError ending with the given advice."""
  if not storage.isdir(workdir):
    raise DLMError(f"workdir '{workdir}' does not exist; {if_missing}")
  ckpt = Checkpointer(workdir, read_only=True)
  step = ckpt.latest_step()
  if step is None:
    ckpt.close()
    raise DLMError(f"workdir '{workdir}' holds no checkpoint; {if_empty}")
  return ckpt, step, config_lib.config_from_dict(ckpt.restore_config(step))


NO_TOKENIZER = ("workdir '{}' has no tokenizer (converted from a directory without tokenizer.json, data.tokenizer="
                "'none'): {} needs text; convert a directory with tokenizer files, or use the model at the token-id "
                "level from Python (dlm_jax.train.load_for_inference, model.logits_fn, the samplers)")


# model keys that change how the same parameters run, not what they are (restores convert the layer layout)
HOW_TO_RUN_KEYS = ("model.scan_layers", "model.remat", "model.attention", "model.attention_block_q",
                   "model.attention_block_kv", "model.attention_interpret")


def load_for_inference(workdir: str, overrides=(), *, need_tokenizer: str = "", details: dict | None = None
                       ) -> tuple[Any, Run, Any, Any]:
  """(cfg, run, params, process_state) from the latest checkpoint in `workdir`; EMA parameters when configured.
  A LoRA run's (lora.rank > 0) checkpoint holds adapters: they are merged into its base (train.init_from, read by
  `restore_params`), so `params` is always the whole model's.
  `need_tokenizer` (a command name): a workdir without tokenizer is a DLMError before any parameter is read.
  `details`, if given, receives the restored step and which parameters were read ("step", "weights")."""
  ckpt, step, cfg = _latest_config(workdir, "pass the --workdir of a dlm-train run",
                                   f"run dlm-train --workdir {workdir} first")
  if need_tokenizer and cfg.data.tokenizer == "none":
    raise DLMError(NO_TOKENIZER.format(workdir, need_tokenizer))
  overrides = list(overrides)
  for key, value in overrides:
    if (key in config_lib.SHAPE_KEYS or key.startswith(("model.", "lora."))) and key not in HOW_TO_RUN_KEYS:
      probe = config_lib.config_from_dict(cfg.to_dict())
      config_lib.apply_overrides(probe, [(key, value)])
      if probe.to_dict() == cfg.to_dict():
        continue  # the trained value itself: nothing changes
      raise DLMError(f"--config.{key} changes the model of a trained checkpoint; only data/eval/sampler/mesh keys "
                     f"and how the model runs ({', '.join(HOW_TO_RUN_KEYS)}) can be overridden here")
  config_lib.apply_overrides(cfg, overrides)
  config_lib.validate(cfg)
  run = build(cfg)
  space = run
  if cfg.lora.rank:
    from dlm_jax import lora
    space = lora.adapter_run(run)
  opt = make_optimizer(cfg)
  abstract = abstract_train_state(space, opt)
  shardings = state_shardings(space, opt, abstract)
  which = "ema" if _use_ema(cfg) else "params"
  names = (which, "process_state") if "process_state" in ckpt.state_keys(step) else (which,)
  subset = {k: with_shardings(abstract[k], shardings[k]) for k in names}
  state = ckpt.restore_subset(step, subset)
  ckpt.close()
  if details is not None:
    details.update(step=int(step), weights=which)
  params = state[which]
  if cfg.lora.rank:
    base = restore_params(cfg.train.init_from, run, "train.init_from")
    merge = functools.partial(lora.merge, scale=lora.scale(cfg.lora))
    params = jax.jit(merge, out_shardings=run.param_shardings, donate_argnums=0)(base, params)
  return cfg, run, params, state.get("process_state", abstract["process_state"])
