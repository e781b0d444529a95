"""Masking schedules alpha_t (probability that a token is still clean at time t; alpha_0 = 1, t = 1 is pure noise).

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
