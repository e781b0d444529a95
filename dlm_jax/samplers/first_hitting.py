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

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from dlm_jax import registry
from dlm_jax.samplers.block import discrete
from dlm_jax.samplers.common import model_logits, prepare, sample_tokens, step_keys, subkey, uniform_noise


def first_hitting(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array, canvas: jax.Array, *,
                  mask_id: int, temperature: float = 1.0, precision: str = "float32", logit_shift: bool = False,
                  suppress_mask: bool = True) -> tuple[jax.Array, dict]:
  """Decodes every `mask_id` position of `canvas` [B, L], one per step and row (per-row, per-position randomness:
  a row decodes the same alone or in any batch). Returns (tokens, {'nfe', 'steps'})."""
  canvas, keys, from_end = prepare(logits_fn, key, canvas, mask_id, temperature, precision)
  b, l = canvas.shape

  def body(i, carry):
    tokens, t, nfe = carry
    masked = tokens == mask_id
    n = jnp.sum(masked, axis=-1)
    active = n > 0
    k = step_keys(keys, i)
    k_u, k_pos, k_tok = (subkey(k, j) for j in range(3))
    u = jax.vmap(lambda kk: jax.random.uniform(kk, (), jnp.float32))(k_u)
    t_next = t * u ** (1.0 / jnp.maximum(n, 1).astype(jnp.float32))
    t_next = jnp.where(active, t_next, t)

    def step(_):
      logits = model_logits(logits_fn, tokens, t_next, mask_id, logit_shift, suppress_mask)
      pos = jnp.argmax(jnp.where(masked, uniform_noise(k_pos, from_end), -1.0), axis=-1)  # uniform masked slot
      picked = jnp.take_along_axis(logits, pos[:, None, None], axis=1)  # [B, 1, V]
      # the same per-position draw as sample_tokens, for one position per row
      draw = jax.vmap(lambda kk, p, lg: sample_tokens(kk[None], p[None], lg[None, None], temperature, precision)[0, 0])(
          k_tok, from_end[pos], picked[:, 0])
      new = tokens.at[jnp.arange(b), pos].set(draw)
      return jnp.where(active[:, None], new, tokens), nfe + 1

    tokens, nfe = jax.lax.cond(jnp.any(active), step, lambda _: (tokens, nfe), None)
    return tokens, t_next, nfe

  init = (canvas, jnp.ones((b,), jnp.float32), jnp.array(0, jnp.int32))
  tokens, _, nfe = jax.lax.fori_loop(0, l, body, init)
  return tokens, {"nfe": nfe, "steps": nfe}


@dataclasses.dataclass(frozen=True)
class FirstHittingOptions(registry.Draw, registry.Shift):
  """sampler.first_hitting.*: the draw's precision and truncation, the logit shift."""


def _bind(net, opts, shared, *, length, gen_start, eos_id):
  del length, gen_start, eos_id
  return functools.partial(first_hitting, mask_id=net.mask_id, temperature=shared.temperature,
                           precision=opts.precision, logit_shift=opts.logit_shift or net.logit_shift,
                           suppress_mask=net.suppress_mask), False


registry.register_sampler(registry.SamplerSpec(
    "first_hitting", ("masked", "block"), FirstHittingOptions, discrete(_bind),
    "one uniformly chosen position per network call: exact, no discretisation",
    uses_steps=lambda opts: False, steps_note="one network call per generated token"))
