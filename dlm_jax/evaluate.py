"""Likelihood-bound evaluation and sample generation, shared by the training loop and the `dlm-eval` / `dlm-sample` CLIs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.data import eval_batches
from dlm_jax.errors import DLMError


def evaluate_bound(run, params, val: np.ndarray, process_state=None, *, batch_size: int, max_batches: int = 0,
                   seed: int = 0) -> dict:
  """Upper bound on the validation NLL: bits per token and perplexity, deterministic given `seed`.

  Batch i uses the key fold_in(PRNGKey(seed), i), so the number is the same for any device count.
  """
  if len(val) == 0:
    raise DLMError("the validation split is empty; set data.val_fraction > 0")
  process = run.process
  bsh = run.batch_sharding()
  batch_size = _round_to_batch_shards(run, batch_size)

  def bound(params, tokens, valid, key, pstate):
    nats, ntok = process.bound(run.apply_fn, params, {"tokens": tokens}, key, pstate)
    return jnp.sum(jnp.where(valid, nats, 0.0)), jnp.sum(jnp.where(valid, ntok, 0.0))

  bound_fn = run.jitted("bound", bound)

  total_nats, total_tokens = 0.0, 0.0
  base = jax.random.PRNGKey(seed)
  with jax.set_mesh(run.mesh):
    for i, (tokens, valid) in enumerate(eval_batches(val, batch_size, max_batches)):
      tokens = jax.device_put(tokens, bsh)
      valid = jax.device_put(valid, run.batch_sharding(1))
      nats, ntok = bound_fn(params, tokens, valid, jax.random.fold_in(base, i), process_state or {})
      total_nats += float(nats)
      total_tokens += float(ntok)
  nats_per_token = total_nats / total_tokens
  return {"nelbo_bits_per_token": nats_per_token / math.log(2.0), "nelbo_nats_per_token": nats_per_token,
          "perplexity_bound": math.exp(nats_per_token), "num_tokens": int(total_tokens)}


def _round_to_batch_shards(run, batch_size: int) -> int:
  """Batches are split over the mesh's data x fsdp axes: round up (the extra rows are padding)."""
  return -(-batch_size // run.batch_shards) * run.batch_shards


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole array on every host (samples span all processes' devices in multi-host runs)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def make_canvas(run, num: int, length: int, prompt_ids: np.ndarray | None = None) -> np.ndarray:
  """A [num, length] canvas of the process's mask id with the prompt (if any) at the start of every row."""
  mask_id = run.process.mask_id
  canvas = np.full((num, length), mask_id, dtype=np.int32)
  if prompt_ids is not None and len(prompt_ids):
    if len(prompt_ids) >= length:
      raise DLMError(f"the prompt is {len(prompt_ids)} tokens but the canvas holds {length}; shorten --prompt or raise "
                     "sampler.length")
    canvas[:, :len(prompt_ids)] = prompt_ids
  return canvas


def generate(run, params, process_state=None, *, num_samples: int, length: int, seed: int,
             prompt_ids: np.ndarray | None = None, batch_size: int | None = None) -> tuple[np.ndarray, dict]:
  """Samples with the process's default sampler (sampler.* keys). Returns (tokens [num_samples, length], stats)."""
  scfg = run.cfg.sampler
  batch_size = _round_to_batch_shards(run, min(batch_size or scfg.batch_size, num_samples))
  process = run.process

  gen_start = 0 if prompt_ids is None else len(prompt_ids)

  def sample(params, key, canvas, pstate):
    return process.sample(run.apply_fn, params, key, canvas, scfg, pstate, gen_start=gen_start)

  sample_fn = run.jitted(f"sample:{gen_start}", sample)

  out, nfe = [], []
  base = jax.random.PRNGKey(seed)
  with jax.set_mesh(run.mesh):
    for i in range(-(-num_samples // batch_size)):
      canvas = jax.device_put(make_canvas(run, batch_size, length, prompt_ids), run.batch_sharding())
      try:
        tokens, stats = sample_fn(params, jax.random.fold_in(base, i), canvas, process_state or {})
      except ValueError as err:  # the sampler's own checks (block / step divisibility, ...) run before compiling
        raise DLMError(f"sampler.name={scfg.name!r}: {err} (the generated length is sampler.length minus the prompt; "
                       "adjust sampler.block_length, sampler.steps or sampler.length)") from None
      out.append(_to_host(tokens))
      nfe.append(int(stats["nfe"]))
  return np.concatenate(out)[:num_samples], {"nfe_per_batch": float(np.mean(nfe)), "steps": scfg.steps}
