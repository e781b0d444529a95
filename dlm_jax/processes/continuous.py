"""What the continuous families (flow, embedding_flow, bitstream) share: noise-level draws, self-conditioning, the
row layout of sampling canvases, and the probability-flow ODE likelihood bound with its divergence estimators.

Common frame. Each family writes its forward process, per token, in "y coordinates" as a Gaussian path

    y = u e_x + eps,  eps ~ N(0, I_N),  u >= 0 the signal amplitude (u = 0: pure noise),

with e_x the token's clean state (one-hot flow: the one-hot vector, N = V, y = x_g / (1 - g), u = g / (1 - g);
embedding flow: the normalised embedding, N = D, y = z / sigma, u = sqrt(SNR) = exp(-g / 2); bitstream: the centred
bits b - 1/2, N = bits, y = (x - 1/2) / sigma, u = 1 / sigma). The posterior mean xhat(y, u) = E[e_x | y] is the
probability-flow velocity, dy/du = xhat (Lipman et al. 2023; the LangFlow form of the ODE).

The likelihood bound (`ode_bound`; Song et al. 2021, Kingma et al. 2021 for the variational form, LangFlow / CoBit for
its use in language) for a decoder p(x | y_hi) at the data end u_hi and the model density of y_hi given by pushing
N(0, I) at u_lo through the ODE:

    -log p(x) <= E_q [ -log p(x | y_hi) + int_{u_lo}^{u_hi} div_y xhat du + 1/2 ||y_lo||^2 - 1/2 ||eps||^2 ],

(the last two terms: -log N(y_lo; 0, I) + log q(y_hi | x) with the 2 pi terms cancelled), integrated with Heun steps
(trapezoid rule for the divergence) on the family's noise grid and the divergence from Hutchinson's estimator (one Rademacher probe per step, unbiased) or
exactly (`divergence="exact"`, a Jacobian per step: small cases and tests).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from dlm_jax.errors import DLMError
from dlm_jax.maths import PAD, pad_layout, sample_times
from dlm_jax.processes.base import Vocab
from dlm_jax.sharding import constrain


def uniform_levels(key: jax.Array, n: int, antithetic: bool) -> jax.Array:
  """n draws in (0, 1): low-discrepancy over the batch when antithetic, else i.i.d."""
  u = sample_times(key, n, 0.0, antithetic)
  return jnp.clip(u, 1e-6, 1.0 - 1e-6)


def self_conditioned(forward: Callable, zeros: jax.Array, prob: float, key: jax.Array):
  """Self-conditioning (Chen et al. 2022) inside jit: `forward(sc) -> (out, estimate)`; with probability `prob` per
  example the network gets its own stop-gradient estimate from a first pass with sc = 0, else zeros. Static shapes:
  the first pass runs for the whole batch (skipped entirely when prob == 0)."""
  if prob <= 0:
    return forward(zeros)
  first = jax.lax.stop_gradient(forward(zeros)[1])
  use = jax.random.bernoulli(key, prob, (zeros.shape[0],))
  sc = jnp.where(use.reshape((-1,) + (1,) * (zeros.ndim - 1)), first, zeros)
  return forward(sc)


def hutchinson_divergence(f: Callable, y: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(f(y), div_y f per row [B]) with one Rademacher probe v: E[v^T J v] = tr J (Hutchinson 1990). One VJP (reverse
  mode: the attention kernels define custom VJPs, not JVPs)."""
  v = jax.random.rademacher(key, y.shape, jnp.float32).astype(y.dtype)
  out, vjp = jax.vjp(f, y)
  (vj,) = vjp(v)
  return out, jnp.sum((v * vj).reshape(y.shape[0], -1), axis=-1)


def exact_divergence(f: Callable, y: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(f(y), exact div_y f per row) via the full Jacobian of each row; only for small states (tests, small cases).
  `f` must act on rows independently."""
  del key
  b = y.shape[0]
  flat = y.reshape(b, -1)

  def row(yr):
    fr = lambda z: f(z.reshape((1,) + y.shape[1:])).reshape(-1)
    return jnp.trace(jax.jacrev(fr)(yr))

  return f(y), jax.vmap(row)(flat)


DIVERGENCES = {"hutchinson": hutchinson_divergence, "exact": exact_divergence}


def ode_bound(velocity: Callable, decoder_nll: Callable, e: jax.Array, u_grid: jax.Array, key: jax.Array,
              divergence: str = "hutchinson") -> tuple[jax.Array, dict]:
  """Upper bound on -log p(x) per row (nats [B]) by the probability-flow ODE (module docstring).

  velocity(y [B, L, N], u [B]) -> xhat [B, L, N]; decoder_nll(y, u) -> [B] nats of the clean tokens under the decoder
  at u; e [B, L, N] the clean states; u_grid [K + 1] from the data end u_hi down to the noise end u_lo.
  Returns (nats [B], parts: decoder / divergence / prior terms, each [B]).
  """
  k_eps, k_div = jax.random.split(key)
  b = e.shape[0]
  eps = jax.random.normal(k_eps, e.shape, jnp.float32)
  u_hi = u_grid[0]
  y0 = u_hi * e + eps
  dec = decoder_nll(y0, jnp.full((b,), u_hi))
  div_fn = DIVERGENCES[divergence]

  def field(y, u, k):
    return div_fn(lambda yy: velocity(yy, jnp.full(yy.shape[:1], u)), y, k)

  def step(carry, xs):
    """Heun's method (second order) for the trajectory, the trapezoid rule for the divergence integral: Euler's
    first-order error biases the log-density low by several percent at 100 steps; Heun's is far smaller."""
    y, acc = carry
    u, u_next, k = xs
    k0, k1 = jax.random.split(k)
    f0, d0 = field(y, u, k0)
    f1, d1 = field(y + (u_next - u) * f0, u_next, k1)
    return (y + 0.5 * (u_next - u) * (f0 + f1), acc + 0.5 * (u - u_next) * (d0 + d1)), None

  keys = jax.random.split(k_div, u_grid.shape[0] - 1)
  (y_lo, div_total), _ = jax.lax.scan(step, (y0, jnp.zeros((b,), jnp.float32)), (u_grid[:-1], u_grid[1:], keys))
  prior = 0.5 * (jnp.sum(jnp.square(y_lo).reshape(b, -1), -1) - jnp.sum(jnp.square(eps).reshape(b, -1), -1))
  return dec + div_total + prior, {"decoder": dec, "divergence": div_total, "prior": prior}


def canvas_layout(canvas: jax.Array, mask_id: int) -> dict:
  """A sampling canvas [B, L] (free positions = mask_id, left padding = PAD, anything else fixed) -> the network's
  row layout (`maths.pad_layout`: PAD never attended, positions counted from each row's first token)."""
  layout = pad_layout(canvas, PAD)
  return {k: layout[k] for k in ("positions", "segment_ids", "kv_segment_ids")}


def lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
  """table[tokens] for a parameter-derived table: gathered to every device first (as the model's own embedding
  lookup), so its vocab / embed sharding does not leak into the batch-sharded result."""
  return jnp.take(constrain(table, (None, None)), tokens, axis=0)


@dataclasses.dataclass(frozen=True)
class ContinuousVocab(Vocab):
  """Vocabulary conventions of the continuous families: the network's input is a vector, not an id; sampling
  canvases mark free positions with `mask_id` = vocab_size (never fed to the network). The network is always
  conditioned on the noise level (model.time_conditioning is implied). The input table and the output classes are the
  tokenizer's `vocab_size` tokens unless a family says otherwise (bitstream: one output per bit)."""

  capabilities = frozenset({"infilling"})

  def default_vocab(self) -> dict:
    return {"mask_id": self.vocab_size, "vocab_in": self.vocab_size, "vocab_out": self.vocab_size}

  @property
  def time_conditioned(self) -> bool:
    return True

  @property
  def model_options(self) -> dict:
    return {"time_conditioning": True}

  def forward(self, fwd, zeros: jax.Array, key, prob: float):
    """`fwd(sc) -> (logits, estimate)` with self-conditioning: during training (key given) with probability `prob`
    per example (`self_conditioned`); for the bound and sampling (key None) always, from a first pass at sc = 0."""
    if key is None:
      return fwd(fwd(zeros)[1] if prob > 0 else zeros)[0]
    return self_conditioned(fwd, zeros, prob, key)[0]


def check_continuous_keys(cfg, keys) -> None:
  """Range checks of the continuous families' diffusion.* keys that `keys` names."""
  d = cfg.diffusion
  checks = {
      "self_cond_prob": (0 <= d.self_cond_prob <= 1, f"diffusion.self_cond_prob is a probability; it must be in "
                         f"[0, 1], got {d.self_cond_prob}"),
      "bound_steps": (d.bound_steps >= 1, f"diffusion.bound_steps must be >= 1, got {d.bound_steps}"),
      "schedule_update_every": (d.schedule_update_every >= 0, f"diffusion.schedule_update_every must be >= 0 "
                                f"(0 = fixed schedule), got {d.schedule_update_every}"),
      "schedule_buffer": (d.schedule_buffer >= 16, f"diffusion.schedule_buffer must be >= 16, got "
                          f"{d.schedule_buffer}"),
      "t_min": (0 < d.t_min < 1, f"diffusion.t_min must be in (0, 1), got {d.t_min}"),
  }
  for key in keys:
    if key in checks and not checks[key][0]:
      raise DLMError(checks[key][1])
    value = d[key]
    if isinstance(value, float) and not math.isfinite(value):
      raise DLMError(f"diffusion.{key} must be a finite number, got {value}")


def buffer_init(size: int, *columns: str) -> dict:
  """An empty FIFO buffer of (noise level, error) records for the learned schedules: one float32 [size] array per
  column, the number of records written and of loss calls."""
  return {**{c: jnp.zeros((size,), jnp.float32) for c in columns}, "written": jnp.int32(0), "calls": jnp.int32(0)}


def buffer_write(state: dict, **columns: jax.Array) -> tuple[dict, jax.Array]:
  """Appends one record per example to the FIFO buffer in `state` and counts the loss call. Returns (new state, valid
  [size]: the written, finite entries)."""
  first = next(iter(columns.values()))
  size = state[next(iter(columns))].shape[0]
  idx = (state["written"] + jnp.arange(first.shape[0], dtype=jnp.int32)) % size
  new = dict(state, **{k: state[k].at[idx].set(v) for k, v in columns.items()},
             written=jnp.minimum(state["written"] + first.shape[0], jnp.int32(2 ** 30)), calls=state["calls"] + 1)
  valid = jnp.arange(size) < new["written"]
  for k in columns:
    valid = valid & jnp.isfinite(new[k])
  return new, valid
