"""First-hitting sampler for masked diffusion (Zheng et al. 2024, "Masked Diffusion Models are Secretly Time-Agnostic
Masked Models and Exploit Inaccurate Categorical Sampling"; used as BD3-LM's inner sampler, Arriola et al. 2025).

The reverse process of masked diffusion reveals positions one at a time: with n positions still masked at time t, the
next reveal happens at t' = t * u^(1/n) (u ~ U(0, 1), linear schedule) and reveals one uniformly chosen masked
position, whose token is drawn from the model's x0 prediction. This is the exact reverse process with exactly one
network call per revealed token and no discretisation error. A network without time input ignores t.

One `lax.fori_loop` of L steps; a row whose masks are all revealed stops changing (its later steps are no-ops, and a
step in which no row has a mask makes no network call). `logits_fn(tokens [B, L], t [B]) -> [B, L, V]`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dlm_jax.samplers.ancestral import gumbel_argmax, suppress_mask


def first_hitting(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array, canvas: jax.Array, *,
                  mask_id: int, temperature: float = 1.0) -> tuple[jax.Array, dict]:
  """Decodes every `mask_id` position of `canvas` [B, L], one per step. Returns (tokens, {'nfe', 'steps'})."""
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  canvas = jnp.asarray(canvas, jnp.int32)
  b, l = canvas.shape

  def body(i, carry):
    tokens, t, nfe, key = carry
    masked = tokens == mask_id
    n = jnp.sum(masked, axis=-1)
    active = n > 0
    key, k_u, k_pos, k_tok = jax.random.split(key, 4)
    t_next = t * jax.random.uniform(k_u, (b,)) ** (1.0 / jnp.maximum(n, 1).astype(jnp.float32))
    t_next = jnp.where(active, t_next, t)

    def step(_):
      logits = suppress_mask(logits_fn(tokens, t_next), mask_id)
      pos = jnp.argmax(jnp.where(masked, jax.random.uniform(k_pos, (b, l)), -1.0), axis=-1)  # uniform masked slot
      draw = gumbel_argmax(k_tok, jnp.take_along_axis(logits, pos[:, None, None], axis=1)[:, 0], temperature)
      new = tokens.at[jnp.arange(b), pos].set(draw)
      return jnp.where(active[:, None], new, tokens), nfe + 1

    tokens, nfe = jax.lax.cond(jnp.any(active), step, lambda _: (tokens, nfe), None)
    return tokens, t_next, nfe, key

  init = (canvas, jnp.ones((b,), jnp.float32), jnp.array(0, jnp.int32), key)
  tokens, _, nfe, _ = jax.lax.fori_loop(0, l, body, init)
  return tokens, {"nfe": nfe, "steps": nfe}
