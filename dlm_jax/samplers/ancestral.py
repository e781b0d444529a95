"""MDLM ancestral sampler: the exact reverse process of masked diffusion (Sahoo et al. 2024, "Simple and Effective
Masked Diffusion Language Models", Sec. 3.2; Shi et al. 2024, MD4).

From time s to t < s each still-masked position is revealed with probability (alpha_t - alpha_s) / (1 - alpha_s) and,
if revealed, takes a token drawn from the model's x0 prediction (SUBS: revealed tokens never change). The final step
goes to t = 0 where alpha = 1, so every position is decoded. With a time-independent network the logits only change
when some token changed, so the sampler reuses them otherwise ("no-change cache"); `stats['nfe']` counts real calls.

The whole decode is one `lax.fori_loop` with static shapes. `logits_fn(tokens [B, L], t [B]) -> [B, L, V]` can be any
JAX function; if V > mask_id the mask logit is suppressed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from dlm_jax import registry
from dlm_jax.maths import Schedule
from dlm_jax.samplers.block import discrete
from dlm_jax.samplers.common import model_logits, prepare, sample_tokens, step_keys, subkey, uniform_noise


def ancestral(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array, canvas: jax.Array, *,
              mask_id: int, steps: int, schedule: Schedule = Schedule("linear"), temperature: float = 1.0,
              time_conditioned: bool = False, precision: str = "float32", logit_shift: bool = False,
              suppress_mask: bool = True) -> tuple[jax.Array, dict]:
  """Decodes every `mask_id` position of `canvas` [B, L]; other positions (prompts, infilling context, PAD) stay fixed.

  Randomness is per row and position (`dlm_jax.samplers.common`): a row decodes the same alone or in any batch.
  Returns (tokens [B, L] int32, stats) with stats = {'nfe': number of logits_fn calls, 'steps': steps}.
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  canvas, keys, from_end = prepare(logits_fn, key, canvas, mask_id, temperature, precision)
  b, length = canvas.shape

  def logits_at(tokens, t):
    return model_logits(logits_fn, tokens, jnp.full((b,), t, jnp.float32), mask_id, logit_shift, suppress_mask)

  def body(i, carry):
    tokens, logits, fresh, nfe = carry
    s = 1.0 - i / steps
    t = 1.0 - (i + 1) / steps
    recompute = jnp.logical_or(time_conditioned, jnp.logical_not(fresh))
    logits, nfe = jax.lax.cond(recompute, lambda: (logits_at(tokens, s), nfe + 1), lambda: (logits, nfe))
    k = step_keys(keys, i)
    k_tok, k_rev = subkey(k, 0), subkey(k, 1)
    a_s, a_t = schedule.alpha(s), schedule.alpha(t)
    p_reveal = jnp.where(i == steps - 1, 1.0, (a_t - a_s) / (1.0 - a_s))
    draw = sample_tokens(k_tok, from_end, logits, temperature, precision)
    masked = tokens == mask_id
    reveal = masked & (uniform_noise(k_rev, from_end) < p_reveal)
    new_tokens = jnp.where(reveal, draw, tokens)
    return new_tokens, logits, jnp.logical_not(jnp.any(reveal)), nfe

  v = jax.eval_shape(logits_at, canvas, 1.0).shape[-1]
  init = (canvas, jnp.zeros((b, length, v), jnp.float32), jnp.array(False), jnp.array(0, jnp.int32))
  tokens, _, _, nfe = jax.lax.fori_loop(0, steps, body, init)
  return tokens, {"nfe": nfe, "steps": jnp.array(steps, jnp.int32)}


@dataclasses.dataclass(frozen=True)
class AncestralOptions(registry.Draw, registry.Shift):
  """sampler.ancestral.*: the draw's precision and truncation, the logit shift."""


def _bind(net, opts, shared, *, length, gen_start, eos_id):
  del length, gen_start, eos_id
  return functools.partial(ancestral, mask_id=net.mask_id, steps=shared.steps, schedule=net.arguments["schedule"],
                           time_conditioned=net.arguments["time_conditioned"], temperature=shared.temperature,
                           precision=opts.precision, logit_shift=opts.logit_shift or net.logit_shift,
                           suppress_mask=net.suppress_mask), False


registry.register_sampler(registry.SamplerSpec(
    "ancestral", ("masked", "block"), AncestralOptions, discrete(_bind),
    "MDLM ancestral sampler: the exact reverse process on a time grid, no-change cache"))
