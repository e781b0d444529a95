"""Bitstream diffusion (CoBit, "Towards Closing the AR Gap ... Entropy-Gated Continuous Bitstream Diffusion",
arXiv 2605.07013; analog bits, Chen et al. 2022).

Tokens are fixed-width bit strings, most significant bit first (diffusion.bits; 0 = the smallest width that holds the
vocabulary). Forward (EDM, variance exploding): x = b + sigma eps, b in {0, 1}, sigma in [sigma_min, sigma_max].
Preconditioning: the network sees (x - 1/2) c_in, c_in = 1 / sqrt(sigma^2 + sigma_data^2), and log(sigma) / 4 as its
noise level; its input adapter patches a token's bits (value, self-conditioning estimate, bit-index features) into one
trunk token and its head has one logit per bit (O(log V) outputs, `dlm_jax.model`).
Matched-filter residual: logit = NN + clip((x - 1/2) / sigma^2, -30, 30), the exact log-odds of an independent bit;
denoiser D = sigmoid(logit). Loss: the EDM-weighted lambda(sigma) sum_bits (D - b)^2, lambda = (sigma^2 + s_d^2) /
(sigma^2 s_d^2), per token; self-conditioning with probability diffusion.self_cond_prob.

Entropy-rate noise schedule (non-gradient state, saved with checkpoints): until the first rebuild, log sigma ~
N(-1.2, 1.2^2). The loss writes (log sigma, per-example MSE) into a FIFO buffer; every diffusion.schedule_update_every
loss calls the table is rebuilt: 128 bins of log sigma over [sigma_min, sigma_max], rate r = mean MSE / sigma^2 per bin
(an I-MMSE proxy for -dH / dlog sigma; empty bins take their neighbours' values, non-finite entries are dropped),
training density q ~ g(sigma) r^(1/2), g = sigma^3 / (sigma^3 + 0.1^3), sigma log-uniform within a bin.

Samplers (`dlm_jax.samplers.continuous.edm`) on the inverse entropy-CDF grid (sigma_i splits the integral of r over
log sigma into equal parts): "edm_churn" (default: EDM churn sampler.churn where the grid point lies in the gated band
sampler.churn_band of the entropy CDF) and "edm" (deterministic).
Bound: the probability-flow ODE bound with y = (x - 1/2) / sigma = u (b - 1/2) + eps, u = 1 / sigma (decoder: per-bit
Bernoulli at sigma_min; prior N(0, I) at sigma_max) with diffusion.bound_steps Heun steps log-uniform in sigma.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from dlm_jax.errors import DLMError
from dlm_jax.processes.continuous import (ContinuousVocab, batch_layout, canvas_layout, ode_bound, self_conditioned,
                                          uniform_levels)

BINS = 128
LOGNORMAL = (-1.2, 1.2)  # mean, std of log sigma before the first table
MATCHED_CLIP = 30.0


def bits_for(vocab_size: int) -> int:
  return max(1, math.ceil(math.log2(vocab_size)))


@dataclasses.dataclass(frozen=True)
class Bitstream(ContinuousVocab):
  vocab_size: int
  bits: int = 0  # 0 = the smallest width that holds the vocabulary
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  sigma_data: float = 0.5
  antithetic: bool = True
  self_cond_prob: float = 0.5
  update_every: int = 100
  buffer_size: int = 4096
  bound_steps: int = 64
  divergence: str = "hutchinson"
  name: str = "bitstream"

  SAMPLERS = ("edm_churn", "edm")
  DEFAULT_SAMPLER = "edm_churn"
  DEFAULT_PRECISION = "float32"

  def __post_init__(self):
    if self.bits == 0:
      object.__setattr__(self, "bits", bits_for(self.vocab_size))  # the smallest width
    if self.bits > 30 or (1 << self.bits) < self.vocab_size:
      raise DLMError(f"diffusion.bits={self.bits} cannot hold a vocabulary of {self.vocab_size} tokens (it needs "
                     f"{bits_for(self.vocab_size)} bits, at most 30); set diffusion.bits=0 (the smallest width) or "
                     f">= {bits_for(self.vocab_size)}")

  @classmethod
  def from_config(cls, cfg, vocab_size: int) -> "Bitstream":
    d = cfg.diffusion
    return cls(vocab_size=vocab_size, bits=d.bits, sigma_min=d.sigma_min,
               sigma_max=d.sigma_max, sigma_data=d.sigma_data, antithetic=d.antithetic,
               self_cond_prob=d.self_cond_prob, update_every=d.schedule_update_every, buffer_size=d.schedule_buffer,
               bound_steps=d.bound_steps)

  @property
  def vocab_out(self) -> int:
    return self.bits  # one logit per bit (vocab_in is not used: the input is the bit adapter)

  @property
  def model_options(self) -> dict:
    return {**super().model_options, "input_bits": self.bits}

  # --- the entropy-rate schedule ----------------------------------------------------------------------------------------

  @property
  def _edges(self) -> jax.Array:
    return jnp.linspace(math.log(self.sigma_min), math.log(self.sigma_max), BINS + 1)

  def init_state(self, key):
    del key
    n = self.buffer_size
    edges = self._edges
    mass = jax.scipy.stats.norm.cdf(edges[1:], *LOGNORMAL) - jax.scipy.stats.norm.cdf(edges[:-1], *LOGNORMAL)
    return {"log_sigma": jnp.zeros((n,), jnp.float32), "mse": jnp.zeros((n,), jnp.float32),
            "written": jnp.int32(0), "calls": jnp.int32(0), "built": jnp.int32(0),
            "train_probs": (mass / mass.sum()).astype(jnp.float32),
            "rate": (mass / mass.sum()).astype(jnp.float32)}

  def sample_sigma(self, state, u: jax.Array) -> jax.Array:
    """sigma for uniforms u [B]: inverse CDF of the table's piecewise log-uniform density (log-normal before the first
    rebuild)."""
    lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
    cdf = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(state["train_probs"])])
    table = jnp.interp(u * cdf[-1], cdf, self._edges)
    first = jnp.clip(LOGNORMAL[0] + LOGNORMAL[1] * ndtri(u), lo, hi)
    return jnp.exp(jnp.where(state["built"] > 0, table, first))

  def sigma_grid(self, state, steps: int) -> jax.Array:
    """[steps + 1] sigmas from sigma_max to sigma_min splitting the entropy (integral of the rate over log sigma)
    into equal parts: the inverse entropy CDF."""
    w = state["rate"] + 1e-6 * jnp.mean(state["rate"])
    cdf = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(w)]) / jnp.sum(w)
    frac = 1.0 - jnp.arange(steps + 1, dtype=jnp.float32) / steps
    return jnp.exp(jnp.interp(frac, cdf, self._edges))

  def entropy_fraction(self, state, sigma: jax.Array) -> jax.Array:
    """The entropy CDF at sigma: the fraction of the rate's mass below log sigma."""
    w = state["rate"] + 1e-6 * jnp.mean(state["rate"])
    cdf = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(w)]) / jnp.sum(w)
    return jnp.interp(jnp.log(sigma), self._edges, cdf)

  def rebuild(self, state) -> dict:
    """The table from the buffer: per-bin mean MSE (empty bins: nearest filled neighbours), r = MSE / sigma^2,
    q ~ g(sigma) sqrt(r)."""
    n = self.buffer_size
    valid = (jnp.arange(n) < state["written"]) & jnp.isfinite(state["mse"]) & jnp.isfinite(state["log_sigma"])
    edges = self._edges
    idx = jnp.clip(jnp.searchsorted(edges, state["log_sigma"], side="right") - 1, 0, BINS - 1)
    w = valid.astype(jnp.float32)
    total = jax.ops.segment_sum(jnp.where(valid, state["mse"], 0.0), idx, BINS)
    count = jax.ops.segment_sum(w, idx, BINS)
    filled = count > 0
    mean = total / jnp.maximum(count, 1.0)
    ar = jnp.arange(BINS)
    left = jax.lax.cummax(jnp.where(filled, ar, -1))
    right = jax.lax.cummin(jnp.where(filled, ar, BINS), reverse=True)
    lv = mean[jnp.clip(left, 0, BINS - 1)]
    rv = mean[jnp.clip(right, 0, BINS - 1)]
    fill = jnp.where((left >= 0) & (right < BINS), 0.5 * (lv + rv), jnp.where(left >= 0, lv, rv))
    mse = jnp.where(filled, mean, fill)
    centres = 0.5 * (edges[1:] + edges[:-1])
    sigma = jnp.exp(centres)
    rate = jnp.maximum(mse, 0.0) / sigma ** 2
    q = sigma ** 3 / (sigma ** 3 + 0.1 ** 3) * jnp.sqrt(rate)
    ok = jnp.all(jnp.isfinite(q)) & (jnp.sum(q) > 0) & jnp.any(filled)
    return dict(state, train_probs=jnp.where(ok, q / jnp.sum(q), state["train_probs"]),
                rate=jnp.where(ok, rate / jnp.sum(rate), state["rate"]), built=jnp.where(ok, 1, state["built"]))

  def update_schedule(self, state, log_sigma: jax.Array, mse: jax.Array) -> dict:
    n = self.buffer_size
    idx = (state["written"] + jnp.arange(log_sigma.shape[0], dtype=jnp.int32)) % n
    new = dict(state, log_sigma=state["log_sigma"].at[idx].set(log_sigma), mse=state["mse"].at[idx].set(mse),
               written=jnp.minimum(state["written"] + log_sigma.shape[0], jnp.int32(2 ** 30)),
               calls=state["calls"] + 1)
    if not self.update_every:
      return new
    return jax.lax.cond(new["calls"] % self.update_every == 0, self.rebuild, lambda s: s, new)

  # --- network --------------------------------------------------------------------------------------------------------

  def logits(self, apply_fn, params, x, sigma, sc, layout) -> jax.Array:
    """Per-bit logits [B, L, bits] = NN((x - 1/2) c_in, log sigma, sc) + the matched filter."""
    s = sigma[:, None, None]
    c_in = jax.lax.rsqrt(s ** 2 + self.sigma_data ** 2)
    out = apply_fn(params, None, bits=(x - 0.5) * c_in, self_cond=sc, t=jnp.log(sigma) / 4.0, **layout)
    return out + jnp.clip((x - 0.5) / s ** 2, -MATCHED_CLIP, MATCHED_CLIP)

  def _forward(self, apply_fn, params, x, sigma, layout, key):
    def fwd(sc):
      logits = self.logits(apply_fn, params, x, sigma, sc, layout)
      return logits, jax.nn.sigmoid(logits)

    zeros = jnp.zeros(x.shape, jnp.float32)
    if key is None:
      return fwd(fwd(zeros)[1] if self.self_cond_prob > 0 else zeros)[0]
    return self_conditioned(fwd, zeros, self.self_cond_prob, key)[0]

  def corrupt(self, key, tokens, sigma):
    """x = b + sigma eps [B, L, bits] for per-row noise levels sigma [B]."""
    clean = self.to_bits(tokens)
    return clean + sigma[:, None, None] * jax.random.normal(key, clean.shape, jnp.float32)

  def loss_weight(self, sigma: jax.Array) -> jax.Array:
    """EDM's lambda(sigma) = (sigma^2 + s_d^2) / (sigma s_d)^2."""
    return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

  def to_bits(self, tokens):
    from dlm_jax.samplers.continuous import to_bits
    return to_bits(tokens, self.bits)

  # --- training -------------------------------------------------------------------------------------------------------

  def loss(self, apply_fn, params, batch, key, state):
    tokens = batch["tokens"]
    b = tokens.shape[0]
    k_u, k_eps, k_sc = jax.random.split(key, 3)
    sigma = self.sample_sigma(state, uniform_levels(k_u, b, self.antithetic))
    clean = self.to_bits(tokens)
    x = self.corrupt(k_eps, tokens, sigma)
    logits = self._forward(apply_fn, params, x, sigma, batch_layout(batch), k_sc)
    sq = jnp.square(jax.nn.sigmoid(logits) - clean)
    loss = jnp.mean(self.loss_weight(sigma)[:, None] * jnp.sum(sq, axis=-1))
    bce = jnp.mean(jnp.sum(_bce(logits, clean), axis=-1))
    mse = jax.lax.stop_gradient(jnp.mean(sq, axis=(1, 2)))
    new_state = self.update_schedule(state, jax.lax.stop_gradient(jnp.log(sigma)), mse)
    return loss, {"mse": jnp.mean(mse), "bce_nats_per_token": bce}, new_state

  # --- likelihood bound -----------------------------------------------------------------------------------------------

  def bound(self, apply_fn, params, batch, key, state):
    tokens = batch["tokens"]
    layout = batch_layout(batch)
    # log-uniform in sigma, data end (1 / sigma_min) first: the entropy grid leaves steps at both ends that are far
    # too long for the divergence integral (it is a sampling grid)
    u_grid = jnp.exp(-jnp.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.bound_steps + 1))
    clean = self.to_bits(tokens)

    def logits_at(y, u):
      sigma = 1.0 / u
      return self._forward(apply_fn, params, 0.5 + sigma[:, None, None] * y, sigma, layout, None)

    velocity = lambda y, u: jax.nn.sigmoid(logits_at(y, u)) - 0.5
    decoder = lambda y, u: jnp.sum(_bce(logits_at(y, u), clean), axis=(1, 2))
    nats, _ = ode_bound(velocity, decoder, clean - 0.5, u_grid, key, self.divergence)
    return nats, jnp.full(tokens.shape[:1], tokens.shape[1], jnp.float32)

  # --- sampling -------------------------------------------------------------------------------------------------------

  def sample(self, apply_fn, params, key, canvas, sampler_cfg, state, gen_start: int = 0, eos_id=None):
    """CoBit's samplers on the inverse entropy-CDF grid of sampler.steps steps: "edm_churn" (default; churn
    sampler.churn inside sampler.churn_band of the entropy CDF) or "edm" (deterministic)."""
    del gen_start, eos_id
    from dlm_jax.samplers.common import PAD
    from dlm_jax.samplers.continuous import edm

    s = sampler_cfg
    layout = canvas_layout(canvas, self.mask_id, PAD)
    grid = self.sigma_grid(state, s.steps)
    frac = self.entropy_fraction(state, grid[:-1])
    stochastic = (s.name or self.DEFAULT_SAMPLER) == "edm_churn"
    gate = (frac >= s.churn_band_lo) & (frac <= s.churn_band_hi) if stochastic else None
    fn = lambda x, sigma, sc: self.logits(apply_fn, params, x, sigma, sc, layout["net"])
    return edm(fn, key, canvas, mask_id=self.mask_id, vocab_size=self.vocab_size, bits=self.bits, sigma_grid=grid,
               churn_gate=gate, churn=s.churn if stochastic else 0.0, temperature=s.temperature,
               self_condition=self.self_cond_prob > 0)


def _bce(logits: jax.Array, target: jax.Array) -> jax.Array:
  """-log Bernoulli(target | sigmoid(logits)), elementwise."""
  return jax.nn.softplus(logits) - target * logits
