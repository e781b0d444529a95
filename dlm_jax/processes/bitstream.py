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
log sigma into equal parts): "edm_churn" (default: EDM churn sampler.edm_churn.churn where the grid point lies in the band
sampler.edm_churn.band_lo .. band_hi of the entropy CDF) and "edm" (deterministic).
Bound: the probability-flow ODE bound with y = (x - 1/2) / sigma = u (b - 1/2) + eps, u = 1 / sigma (decoder: per-bit
Bernoulli at sigma_min; prior N(0, I) at sigma_max) with diffusion.bound_steps Heun steps log-uniform in sigma.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri

from dlm_jax import registry
from dlm_jax.errors import DLMError
from dlm_jax.maths import to_bits
from dlm_jax.processes.base import network_layout
from dlm_jax.processes.continuous import (ContinuousVocab, buffer_init, buffer_write, canvas_layout,
                                          check_continuous_keys, ode_bound, uniform_levels)

BINS = 128
LOGNORMAL = (-1.2, 1.2)  # mean, std of log sigma before the first table
MATCHED_CLIP = 30.0


def bits_for(vocab_size: int) -> int:
  return max(1, math.ceil(math.log2(vocab_size)))


@registry.register_process
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

  DEFAULT_SAMPLER = "edm_churn"
  CONFIG_KEYS = ("bits", "sigma_min", "sigma_max", "sigma_data", "antithetic", "self_cond_prob",
                 "schedule_update_every", "schedule_buffer", "bound_steps")

  def default_vocab(self) -> dict:
    return {**super().default_vocab(), "vocab_out": self.bits}  # one logit per bit (the input is the bit adapter)

  def __post_init__(self):
    if self.bits == 0:
      object.__setattr__(self, "bits", bits_for(self.vocab_size))  # the smallest width
    if self.bits > 30 or (1 << self.bits) < self.vocab_size:
      raise DLMError(f"diffusion.bits={self.bits} cannot hold a vocabulary of {self.vocab_size} tokens (it needs "
                     f"{bits_for(self.vocab_size)} bits, at most 30); set diffusion.bits=0 (the smallest width) or "
                     f">= {bits_for(self.vocab_size)}")
    super().__post_init__()

  @classmethod
  def from_config(cls, cfg, vocab_size: int, **vocab) -> "Bitstream":
    d = cfg.diffusion
    return cls(vocab_size=vocab_size, bits=d.bits, sigma_min=d.sigma_min,
               sigma_max=d.sigma_max, sigma_data=d.sigma_data, antithetic=d.antithetic,
               self_cond_prob=d.self_cond_prob, update_every=d.schedule_update_every, buffer_size=d.schedule_buffer,
               bound_steps=d.bound_steps, **vocab)

  @classmethod
  def check_config(cls, cfg) -> None:
    d = cfg.diffusion
    check_continuous_keys(cfg, cls.CONFIG_KEYS)
    if not 0 < d.sigma_min < d.sigma_max:
      raise DLMError(f"the bitstream noise range needs 0 < diffusion.sigma_min < diffusion.sigma_max, got "
                     f"({d.sigma_min}, {d.sigma_max})")
    if not d.sigma_data > 0:
      raise DLMError(f"diffusion.sigma_data must be > 0, got {d.sigma_data}")
    if not 0 <= d.bits <= 30:
      raise DLMError(f"diffusion.bits must be in [0, 30] (0 = the smallest width for the vocabulary), got {d.bits}")

  @property
  def model_options(self) -> dict:
    return {**super().model_options, "input_bits": self.bits}

  # --- the entropy-rate schedule ----------------------------------------------------------------------------------------

  @property
  def _edges(self) -> jax.Array:
    return jnp.linspace(math.log(self.sigma_min), math.log(self.sigma_max), BINS + 1)

  def init_state(self, key):
    del key
    edges = self._edges
    mass = jax.scipy.stats.norm.cdf(edges[1:], *LOGNORMAL) - jax.scipy.stats.norm.cdf(edges[:-1], *LOGNORMAL)
    return {**buffer_init(self.buffer_size, "log_sigma", "mse"), "built": jnp.int32(0),
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

  def rebuild(self, state, valid) -> dict:
    """The table from the buffer's valid entries: per-bin mean MSE (empty bins: nearest filled neighbours),
    r = MSE / sigma^2, q ~ g(sigma) sqrt(r)."""
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
    new, valid = buffer_write(state, log_sigma=log_sigma, mse=mse)
    if not self.update_every:
      return new
    return jax.lax.cond(new["calls"] % self.update_every == 0, lambda s: self.rebuild(s, valid), lambda s: s, new)

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

    return self.forward(fwd, jnp.zeros(x.shape, jnp.float32), key, self.self_cond_prob)

  def corrupt(self, key, tokens, sigma):
    """x = b + sigma eps [B, L, bits] for per-row noise levels sigma [B]."""
    clean = self.to_bits(tokens)
    return clean + sigma[:, None, None] * jax.random.normal(key, clean.shape, jnp.float32)

  def loss_weight(self, sigma: jax.Array) -> jax.Array:
    """EDM's lambda(sigma) = (sigma^2 + s_d^2) / (sigma s_d)^2."""
    return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

  def to_bits(self, tokens):
    return to_bits(tokens, self.bits)

  # --- training -------------------------------------------------------------------------------------------------------

  def loss(self, apply_fn, params, batch, key, state):
    tokens = batch["tokens"]
    b = tokens.shape[0]
    k_u, k_eps, k_sc = jax.random.split(key, 3)
    sigma = self.sample_sigma(state, uniform_levels(k_u, b, self.antithetic))
    clean = self.to_bits(tokens)
    x = self.corrupt(k_eps, tokens, sigma)
    logits = self._forward(apply_fn, params, x, sigma, network_layout(batch), k_sc)
    sq = jnp.square(jax.nn.sigmoid(logits) - clean)
    loss = jnp.mean(self.loss_weight(sigma)[:, None] * jnp.sum(sq, axis=-1))
    bce = jnp.mean(jnp.sum(_bce(logits, clean), axis=-1))
    mse = jax.lax.stop_gradient(jnp.mean(sq, axis=(1, 2)))
    new_state = self.update_schedule(state, jax.lax.stop_gradient(jnp.log(sigma)), mse)
    return loss, {"mse": jnp.mean(mse), "bce_nats_per_token": bce}, new_state

  # --- likelihood bound -----------------------------------------------------------------------------------------------

  def bound(self, apply_fn, params, batch, key, state):
    tokens = batch["tokens"]
    layout = network_layout(batch)
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

  def sampling_net(self, net, params, state, canvas, steps):
    """The per-bit network with the matched filter for CoBit's samplers on the inverse entropy-CDF grid of `steps`
    steps, with each grid point's entropy-CDF fraction (the churn band is a sampler option)."""
    layout = canvas_layout(canvas, self.mask_id)
    grid = self.sigma_grid(state, steps)
    fn = lambda x, sigma, sc: self.logits(net, params, x, sigma, sc, layout)
    return registry.SamplingNet(mask_id=self.mask_id, logits_fn=fn, arguments={
        "vocab_size": self.vocab_size, "bits": self.bits, "sigma_grid": grid,
        "entropy_fraction": self.entropy_fraction(state, grid[:-1]), "self_condition": self.self_cond_prob > 0})


def _bce(logits: jax.Array, target: jax.Array) -> jax.Array:
  """-log Bernoulli(target | sigmoid(logits)), elementwise."""
  return jax.nn.softplus(logits) - target * logits
