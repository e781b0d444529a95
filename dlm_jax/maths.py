"""Shared maths and conventions with no dependencies inside dlm_jax: every layer may import this module.

  Schedule                 masking schedules alpha_t and NELBO weights (masked / block diffusion, the ancestral and
                           ReMDM samplers)
  sample_times             low-discrepancy (antithetic) or i.i.d. noise levels
  token_nll                -log softmax(logits)[target]
  to_bits / from_bits      fixed-width bit codes of token ids (bitstream diffusion and its sampler)
  PAD, pad_layout          the left-padding convention of sampling canvases and the row layout a network needs for it
  shift_logits             the logit shift of networks that predict token i at position i - 1 (Dream, Fast-dLLM v2)

Masking schedules alpha_t (probability that a token is still clean at time t; alpha_0 = 1, t = 1 is pure noise).
Closed forms (MD4, Shi et al. 2024; MDLM, Sahoo et al. 2024):
  linear      alpha = 1 - t                      weight = 1 / t
  cosine      alpha = 1 - cos(pi/2 (1 - t))      weight = (pi/2) tan(pi/2 (1 - t))
  polynomial  alpha = 1 - t^k                    weight = k / t
  loglinear   alpha = 1 - (1 - eps) t            weight = 1 / t   (MDLM; alpha_1 = eps > 0)
where weight = -alpha'_t / (1 - alpha_t), the factor of the continuous-time NELBO.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Schedule:
  name: str = "linear"
  power: float = 2.0
  eps: float = 1e-3

  def alpha(self, t):
    t = jnp.asarray(t, jnp.float32)
    if self.name == "linear":
      return 1.0 - t
    if self.name == "cosine":
      return 1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))
    if self.name == "polynomial":
      return 1.0 - t ** self.power
    if self.name == "loglinear":
      return 1.0 - (1.0 - self.eps) * t
    raise ValueError(f"unknown schedule {self.name!r}")

  def dalpha(self, t):
    """d alpha / dt."""
    t = jnp.asarray(t, jnp.float32)
    if self.name == "linear":
      return -jnp.ones_like(t)
    if self.name == "cosine":
      return -0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))
    if self.name == "polynomial":
      return -self.power * t ** (self.power - 1.0)
    if self.name == "loglinear":
      return -(1.0 - self.eps) * jnp.ones_like(t)
    raise ValueError(f"unknown schedule {self.name!r}")

  def weight(self, t):
    """-alpha'_t / (1 - alpha_t), in a form that is accurate for small t."""
    t = jnp.asarray(t, jnp.float32)
    if self.name in ("linear", "loglinear"):
      return 1.0 / t
    if self.name == "polynomial":
      return self.power / t
    if self.name == "cosine":
      return 0.5 * math.pi * jnp.tan(0.5 * math.pi * (1.0 - t))
    raise ValueError(f"unknown schedule {self.name!r}")

  @property
  def alpha_one(self) -> float:
    """alpha_1: the probability that a token is still clean at t = 1 (0 except for loglinear)."""
    return self.eps if self.name == "loglinear" else 0.0


SCHEDULES = ("linear", "cosine", "polynomial", "loglinear")
PAD = -1  # left padding of sampling canvases (prompts of different lengths); never attended to


def sample_times(key: jax.Array, n: int, t_min: float, antithetic: bool, t_max: float = 1.0) -> jax.Array:
  """n times in [t_min, t_max]: low-discrepancy (u/n + i/n mod 1) when antithetic, else i.i.d. uniform."""
  if antithetic:
    u = jax.random.uniform(key, ())
    e = jnp.mod(u / n + jnp.arange(n, dtype=jnp.float32) / n, 1.0)
  else:
    e = jax.random.uniform(key, (n,))
  return (t_max - t_min) * e + t_min


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log softmax(logits)[target], float32, [B, L]."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return lse - picked


def shift_logits(logits: jax.Array) -> jax.Array:
  """Logits [B, L, V] of a network that predicts token i at position i - 1 (Dream, Fast-dLLM v2: the HF causal-LM
  head) -> the prediction of each position i: [l_0, l_0, l_1, ..., l_{L-2}] (position 0 keeps its own; Dream's
  `generation_utils` and Fast-dLLM v2's `generate` do the same)."""
  return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)


def to_bits(tokens: jax.Array, bits: int) -> jax.Array:
  """Token ids -> [..., bits] float32 in {0, 1}, most significant bit first."""
  shifts = jnp.arange(bits - 1, -1, -1, dtype=jnp.int32)
  return ((tokens[..., None] >> shifts) & 1).astype(jnp.float32)


def from_bits(bits: jax.Array, vocab_size: int) -> jax.Array:
  """[..., bits] in {0, 1} (most significant first) -> ids; codes >= vocab_size wrap modulo vocab_size (CoBit)."""
  n = bits.shape[-1]
  weights = (1 << jnp.arange(n - 1, -1, -1, dtype=jnp.int32))
  return jnp.mod(jnp.sum(bits.astype(jnp.int32) * weights, axis=-1), vocab_size).astype(jnp.int32)


def pad_layout(tokens: jax.Array, pad_id: int = PAD) -> dict:
  """The row layout of a left-padded canvas [B, L]: `ids` (PAD replaced by 0), `kv_segment_ids` (-1 at PAD: never
  attended), `segment_ids` (zeros) and `positions` counted from each row's first real token, so a padded row gives
  the outputs it gives alone."""
  valid = tokens != pad_id
  positions = jnp.maximum(jnp.cumsum(valid, axis=1, dtype=jnp.int32) - 1, 0)
  return {"ids": jnp.where(valid, tokens, 0), "positions": positions,
          "segment_ids": jnp.zeros(tokens.shape, jnp.int32),
          "kv_segment_ids": jnp.where(valid, 0, -1).astype(jnp.int32)}
