"""Embedding flow (LangFlow, arXiv 2604.11748): variance-preserving diffusion over normalised token embeddings.

State: E in R^{V x D} (the model's input table, rows normalised to norm sqrt(D); D = model width). With g the log
noise-to-signal ratio: z = alpha e_x + sigma eps, alpha^2 = sigmoid(-g), sigma^2 = sigmoid(g) (SNR = e^-g).

Network: conditioned on g (fed as g / G_SCALE to the time embedding); self-conditioning z <- z + W_sc [z || xhat_sc]
(W_sc zero-initialised in the model, xhat_sc = softmax(first-pass logits)^T E, stop-gradient, with probability
diffusion.self_cond_prob per example). Logits = NN(z) + c_skip(g) z E^T with c_skip = alpha / sigma^2 =
exp((softplus(-g) - g) / 2): the exact log-posterior of each token given z under a uniform prior (all rows have the same
norm), so the network learns only the contextual residual. Loss: per-token cross entropy.

Noise schedule (non-gradient state, saved with checkpoints): g = F^-1(u; mu, beta), the Gumbel inverse CDF
mu - beta log(-log u), with u in [c, 1 - c], c = 1e-5 (so g lies in [mu - beta log(-log c), mu - beta log c]; always within [-15, 30]). The
loss records (g, cross entropy) of every example in a FIFO buffer; every diffusion.schedule_update_every loss calls
(once the buffer holds 256 entries, or is full), mu and beta are refitted (Levenberg-Marquardt on CE(g) ~ H exp(-exp(-(g - mu) / beta))) so that drawing g from the
Gumbel is uniform in information lost (CDCD's time warping in parametric form). Starts from diffusion.gumbel_mu /
gumbel_beta (LangFlow's released OWT values 4.723 / 0.852).

Sampler: the DDIM / x0-Euler step on g_i = F^-1(linspace(1 - c, c, S + 1)) in float64 (`samplers.continuous.ddim`).
Bound: the probability-flow ODE bound with y = z / sigma = u e_x + eps, u = exp(-g / 2), with diffusion.bound_steps
Heun steps uniform in g between the schedule's ends (decoder: the cross entropy at g_min; prior N(0, I) at g_max).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dlm_jax.processes.continuous import (ContinuousVocab, batch_layout, canvas_layout, lookup, ode_bound,
                                          self_conditioned, uniform_levels)
from dlm_jax.processes.masked import token_nll

C_CLAMP = 1e-5
G_SCALE = 16.0  # the network's time input is g / G_SCALE
BETA_RANGE = (0.02, 20.0)  # a refit outside these ranges is rejected
MU_RANGE = (-10.0, 25.0)
G_RANGE = (-15.0, 30.0)  # g is clamped here (c_skip = e^7.5 at g = -15 keeps the logits finite in float32)
MIN_FIT_POINTS = 256


def gumbel_g(u: jax.Array, mu, beta) -> jax.Array:
  """g = F^-1(u) of Gumbel(mu, beta) for u clamped to [c, 1 - c]."""
  u = jnp.clip(u, C_CLAMP, 1.0 - C_CLAMP)
  return jnp.clip(mu - beta * jnp.log(-jnp.log(u)), *G_RANGE)


def gumbel_curve(g: jax.Array, height, mu, beta) -> jax.Array:
  """The fitted cross-entropy curve H exp(-exp(-(g - mu) / beta))."""
  return height * jnp.exp(-jnp.exp(-(g - mu) / beta))


def c_skip(g: jax.Array) -> jax.Array:
  """alpha / sigma^2 for alpha^2 = sigmoid(-g), sigma^2 = sigmoid(g)."""
  return jnp.exp(0.5 * (jax.nn.softplus(-g) - g))


def fit_gumbel(g: jax.Array, ce: jax.Array, valid: jax.Array, mu, beta, iters: int = 40):
  """Least-squares fit of CE(g) ~ H exp(-exp(-(g - mu) / beta)) over the valid entries (Levenberg-Marquardt on
  (log H, mu, log beta), started at the current mu, beta). Returns (mu, beta, ok)."""
  w = valid.astype(jnp.float32)
  h0 = jnp.maximum(jnp.max(jnp.where(valid, ce, 0.0)), 1e-3)
  theta = jnp.stack([jnp.log(h0), jnp.asarray(mu, jnp.float32), jnp.log(jnp.asarray(beta, jnp.float32))])

  def resid(th):
    return jnp.sqrt(w) * (gumbel_curve(g, jnp.exp(th[0]), th[1], jnp.exp(th[2])) - ce)

  def body(_, carry):
    th, lam = carry
    r = resid(th)
    j = jax.jacfwd(resid)(th)
    jtj = j.T @ j
    step = jnp.linalg.solve(jtj + lam * (jnp.diag(jnp.diag(jtj)) + 1e-9 * jnp.eye(3)), -j.T @ r)
    new = th + step
    better = jnp.sum(resid(new) ** 2) < jnp.sum(r ** 2)
    better = better & jnp.all(jnp.isfinite(new))
    return jnp.where(better, new, th), jnp.where(better, lam * 0.3, lam * 4.0)

  theta, _ = jax.lax.fori_loop(0, iters, body, (theta, jnp.float32(1e-2)))
  new_mu, new_beta = theta[1], jnp.exp(theta[2])
  ok = (jnp.isfinite(new_mu) & jnp.isfinite(new_beta) & (new_beta > BETA_RANGE[0]) & (new_beta < BETA_RANGE[1])
        & (new_mu > MU_RANGE[0]) & (new_mu < MU_RANGE[1]))
  return new_mu, new_beta, ok


@dataclasses.dataclass(frozen=True)
class EmbeddingFlow(ContinuousVocab):
  vocab_size: int
  antithetic: bool = True
  self_cond_prob: float = 0.5
  gumbel_mu: float = 4.723
  gumbel_beta: float = 0.852
  update_every: int = 100  # refit the Gumbel schedule every this many loss calls (0 = keep it fixed)
  buffer_size: int = 4096
  bound_steps: int = 64
  divergence: str = "hutchinson"
  name: str = "embedding_flow"

  SAMPLERS = ("ddim",)
  DEFAULT_SAMPLER = "ddim"
  DEFAULT_PRECISION = "float64"

  @classmethod
  def from_config(cls, cfg, vocab_size: int) -> "EmbeddingFlow":
    d = cfg.diffusion
    return cls(vocab_size=vocab_size, antithetic=d.antithetic, self_cond_prob=d.self_cond_prob,
               gumbel_mu=d.gumbel_mu, gumbel_beta=d.gumbel_beta, update_every=d.schedule_update_every,
               buffer_size=d.schedule_buffer, bound_steps=d.bound_steps)

  @property
  def model_options(self) -> dict:
    return {**super().model_options, "self_conditioning": True}

  def init_state(self, key):
    del key
    n = self.buffer_size
    return {"mu": jnp.float32(self.gumbel_mu), "beta": jnp.float32(self.gumbel_beta),
            "g": jnp.zeros((n,), jnp.float32), "ce": jnp.zeros((n,), jnp.float32),
            "written": jnp.int32(0), "calls": jnp.int32(0)}

  # --- network --------------------------------------------------------------------------------------------------------

  def embeddings(self, params) -> jax.Array:
    """E [V, D]: the input table's rows normalised to norm sqrt(D)."""
    e = params["embed"].astype(jnp.float32)
    return e * (math.sqrt(e.shape[1]) / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-6))

  def logits(self, apply_fn, params, z, g, sc, layout) -> jax.Array:
    """NN(z, g, sc) + c_skip(g) z E^T  [B, L, V]."""
    e = self.embeddings(params)
    out = apply_fn(params, None, embeddings=z, self_cond=sc, t=g / G_SCALE, **layout)
    return out + c_skip(g)[:, None, None] * (z.astype(jnp.float32) @ e.T)

  def _forward(self, apply_fn, params, z, g, layout, key):
    """Logits with self-conditioning (probability self_cond_prob per example; key None = always)."""
    e = self.embeddings(params)

    def fwd(sc):
      logits = self.logits(apply_fn, params, z, g, sc, layout)
      return logits, jax.nn.softmax(logits, axis=-1) @ e

    zeros = jnp.zeros(z.shape, jnp.float32)
    if key is None:
      return fwd(fwd(zeros)[1] if self.self_cond_prob > 0 else zeros)[0]
    return self_conditioned(fwd, zeros, self.self_cond_prob, key)[0]

  def levels(self, state, u: jax.Array) -> jax.Array:
    return gumbel_g(u, state["mu"], state["beta"])

  # --- training -------------------------------------------------------------------------------------------------------

  def corrupt(self, key, tokens, g, params):
    """z = alpha e_x + sigma eps [B, L, D] for per-row log noise-to-signal ratios g [B]."""
    e = self.embeddings(params)
    gb = g[:, None, None]
    eps = jax.random.normal(key, tokens.shape + (e.shape[1],), jnp.float32)
    return jnp.sqrt(jax.nn.sigmoid(-gb)) * lookup(e, tokens) + jnp.sqrt(jax.nn.sigmoid(gb)) * eps

  def loss(self, apply_fn, params, batch, key, state):
    tokens = batch["tokens"]
    b = tokens.shape[0]
    k_u, k_eps, k_sc = jax.random.split(key, 3)
    g = self.levels(state, uniform_levels(k_u, b, self.antithetic))
    z = self.corrupt(k_eps, tokens, g, params)
    logits = self._forward(apply_fn, params, z, g, batch_layout(batch), k_sc)
    ce = token_nll(logits, tokens)
    loss = jnp.mean(ce)
    new_state = self.update_schedule(state, jax.lax.stop_gradient(g), jax.lax.stop_gradient(jnp.mean(ce, axis=-1)))
    return loss, {"cross_entropy": loss, "gumbel_mu": new_state["mu"], "gumbel_beta": new_state["beta"]}, new_state

  def update_schedule(self, state, g: jax.Array, ce: jax.Array) -> dict:
    """Writes (g, CE) of each example into the FIFO buffer; every update_every calls refits mu and beta."""
    n = self.buffer_size
    idx = (state["written"] + jnp.arange(g.shape[0], dtype=jnp.int32)) % n
    new = dict(state, g=state["g"].at[idx].set(g), ce=state["ce"].at[idx].set(ce),
               written=jnp.minimum(state["written"] + g.shape[0], jnp.int32(2 ** 30)), calls=state["calls"] + 1)
    if not self.update_every:
      return new
    valid = (jnp.arange(n) < new["written"]) & jnp.isfinite(new["ce"]) & jnp.isfinite(new["g"])

    def refit(s):
      mu, beta, ok = fit_gumbel(s["g"], s["ce"], valid, s["mu"], s["beta"])
      return dict(s, mu=jnp.where(ok, mu, s["mu"]), beta=jnp.where(ok, beta, s["beta"]))

    due = (new["calls"] % self.update_every == 0) & (jnp.sum(valid) >= min(MIN_FIT_POINTS, n))
    return jax.lax.cond(due, refit, lambda s: s, new)

  # --- likelihood bound -----------------------------------------------------------------------------------------------

  def bound(self, apply_fn, params, batch, key, state):
    tokens = batch["tokens"]
    layout = batch_layout(batch)
    e_tab = self.embeddings(params)
    # uniform in log-SNR between the schedule's ends g_min (data) and g_max: Heun's error there is a third of that on
    # the Gumbel quantile grid at the same step count (a sampling grid, coarse in the tails)
    g_lo, g_hi = self.levels(state, jnp.array([0.0, 1.0]))
    u_grid = jnp.exp(-0.5 * jnp.linspace(g_lo, g_hi, self.bound_steps + 1))

    def logits_at(y, u):
      g = -2.0 * jnp.log(u)
      return self._forward(apply_fn, params, jnp.sqrt(jax.nn.sigmoid(g))[:, None, None] * y, g, layout, None)

    velocity = lambda y, u: jax.nn.softmax(logits_at(y, u), axis=-1) @ e_tab
    decoder = lambda y, u: jnp.sum(token_nll(logits_at(y, u), tokens), axis=-1)
    nats, _ = ode_bound(velocity, decoder, lookup(e_tab, tokens), u_grid, key, self.divergence)
    return nats, jnp.full(tokens.shape[:1], tokens.shape[1], jnp.float32)

  # --- sampling -------------------------------------------------------------------------------------------------------

  def sample(self, apply_fn, params, key, canvas, sampler_cfg, state, gen_start: int = 0, eos_id=None):
    """LangFlow's DDIM / x0-Euler sampler (`dlm_jax.samplers.continuous.ddim`) on the Gumbel grid of sampler.steps
    steps, self-conditioning carried, state arithmetic in sampler.precision (float64 by default)."""
    del gen_start, eos_id
    from dlm_jax.samplers.common import PAD
    from dlm_jax.samplers.continuous import ddim

    s = sampler_cfg
    layout = canvas_layout(canvas, self.mask_id, PAD)
    g_grid = self.levels(state, jnp.linspace(1.0 - C_CLAMP, C_CLAMP, s.steps + 1))
    fn = lambda z, g, sc: self.logits(apply_fn, params, z, g, sc, layout["net"])
    return ddim(fn, key, canvas, mask_id=self.mask_id, g_grid=g_grid, embed=self.embeddings(params),
                temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                precision=s.precision or self.DEFAULT_PRECISION, self_condition=self.self_cond_prob > 0)
