"""MaskGIT confidence decoding (Chang et al. 2022, "MaskGIT: Masked Generative Image Transformer", Sec. 3.2) for masked
diffusion language models.

With N masked positions in a row at the start, step i of S (r = (i + 1) / S) predicts every masked position at once
(x0 drawn from the model at the sampling temperature), scores each prediction by its log-probability plus annealed
Gumbel noise, choice_temperature * (1 - r) * Gumbel, and keeps the n = floor(N gamma(r)) lowest-scoring positions masked
(at least one fewer than are masked now, and at least one while steps remain); the others are committed and never
change. gamma is the mask schedule: "cosine" cos(pi/2 r) (MaskGIT's choice) or "linear" 1 - r. The last step commits
everything. One network call per step, `lax.fori_loop` with static shapes; the network's t is the row's masked
fraction. Randomness is per row and position as in `dlm_jax.samplers.common` (a row decodes the same alone or in any
batch).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from dlm_jax import registry
from dlm_jax.samplers.block import discrete
from dlm_jax.samplers.common import (gumbel_noise, model_logits, prepare, sample_tokens, step_keys, subkey)

MASK_SCHEDULES = ("cosine", "linear")


def mask_ratio(r, schedule: str):
  """gamma(r): the fraction of the initially masked positions still masked after a fraction r of the steps."""
  return jnp.cos(0.5 * math.pi * r) if schedule == "cosine" else 1.0 - r


def maskgit(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array, canvas: jax.Array, *,
            mask_id: int, steps: int, schedule: str = "cosine", choice_temperature: float = 4.5,
            temperature: float = 1.0, precision: str = "float32", logit_shift: bool = False,
            suppress_mask: bool = True) -> tuple[jax.Array, dict]:
  """Decodes every `mask_id` position of `canvas` [B, L] in `steps` network calls (module docstring). Returns (tokens,
  {'nfe', 'steps'})."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if schedule not in MASK_SCHEDULES:
    raise ValueError(f"schedule must be one of {MASK_SCHEDULES}, got {schedule!r}")
  if choice_temperature < 0:
    raise ValueError(f"choice_temperature must be >= 0, got {choice_temperature}")
  canvas, keys, from_end = prepare(logits_fn, key, canvas, mask_id, temperature, precision)
  b, _ = canvas.shape
  n0 = jnp.sum(canvas == mask_id, axis=1)  # [B]

  def body(i, tokens):
    masked = tokens == mask_id
    n_now = jnp.sum(masked, axis=1)
    t = n_now.astype(jnp.float32) / jnp.maximum(n0, 1).astype(jnp.float32)
    logits = model_logits(logits_fn, tokens, t, mask_id, logit_shift, suppress_mask)
    k = step_keys(keys, i)
    x0 = sample_tokens(subkey(k, 0), from_end, logits, temperature, precision)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), x0[..., None], axis=-1)[..., 0]
    r = (i + 1) / steps
    score = logp + choice_temperature * (1.0 - r) * gumbel_noise(subkey(k, 1), from_end, 1)[..., 0]
    score = jnp.where(masked, score, jnp.inf)
    keep = jnp.floor(n0.astype(jnp.float32) * mask_ratio(jnp.float32(r), schedule)).astype(jnp.int32)
    keep = jnp.where(i == steps - 1, 0, jnp.clip(keep, jnp.minimum(1, n_now - 1), jnp.maximum(n_now - 1, 0)))
    rank = jnp.argsort(jnp.argsort(score, axis=1, stable=True), axis=1)  # 0 = least confident
    commit = masked & (rank >= keep[:, None])
    return jnp.where(commit, x0, tokens)

  tokens = jax.lax.fori_loop(0, steps, body, canvas)
  return tokens, {"nfe": jnp.array(steps, jnp.int32), "steps": jnp.array(steps, jnp.int32)}


@dataclasses.dataclass(frozen=True)
class MaskGitOptions(registry.Draw, registry.Shift):
  """sampler.maskgit.*: the mask schedule and the confidence noise's temperature."""
  schedule: str = "cosine"  # or "linear"
  choice_temperature: float = 4.5  # MaskGIT's default; 0 = commit strictly by confidence

  def check(self, key, family, block_size):
    super().check(key, family, block_size)
    registry.need(self.schedule in MASK_SCHEDULES,
                  f"{key('schedule')} must be one of {MASK_SCHEDULES}, got {self.schedule!r}")
    registry.need(self.choice_temperature >= 0,
                  f"{key('choice_temperature')} must be >= 0, got {self.choice_temperature}")


def _bind(net, opts, shared, *, length, gen_start, eos_id):
  del length, gen_start, eos_id
  return functools.partial(maskgit, mask_id=net.mask_id, steps=shared.steps, schedule=opts.schedule,
                           choice_temperature=opts.choice_temperature, temperature=shared.temperature,
                           precision=opts.precision, logit_shift=opts.logit_shift or net.logit_shift,
                           suppress_mask=net.suppress_mask), False


registry.register_sampler(registry.SamplerSpec(
    "maskgit", ("masked", "block"), MaskGitOptions, discrete(_bind),
    "MaskGIT: commit the most confident predictions on a cosine / linear mask schedule"))
