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

from dlm_jax.errors import DLMError

from dlm_jax import registry
from dlm_jax.maths import token_nll
from dlm_jax.processes.base import network_layout
from dlm_jax.processes.continuous import (ContinuousVocab, buffer_init, buffer_write, canvas_layout,
                                          check_continuous_keys, lookup, ode_bound, uniform_levels)

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


@registry.register_process
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

  DEFAULT_SAMPLER = "ddim"
  CONFIG_KEYS = ("antithetic", "self_cond_prob", "gumbel_mu", "gumbel_beta", "schedule_update_every",
                 "schedule_buffer", "bound_steps")

  @classmethod
  def from_config(cls, cfg, vocab_size: int, **vocab) -> "EmbeddingFlow":
    d = cfg.diffusion
    return cls(vocab_size=vocab_size, antithetic=d.antithetic, self_cond_prob=d.self_cond_prob,
               gumbel_mu=d.gumbel_mu, gumbel_beta=d.gumbel_beta, update_every=d.schedule_update_every,
               buffer_size=d.schedule_buffer, bound_steps=d.bound_steps, **vocab)

  @classmethod
  def check_config(cls, cfg) -> None:
    check_continuous_keys(cfg, cls.CONFIG_KEYS)
    if not cfg.diffusion.gumbel_beta > 0:
      raise DLMError(f"diffusion.gumbel_beta (the Gumbel schedule's scale) must be > 0, got "
                     f"{cfg.diffusion.gumbel_beta}")

  @property
  def model_options(self) -> dict:
    return {**super().model_options, "self_conditioning": True}

  def init_state(self, key):
    del key
    return {"mu": jnp.float32(self.gumbel_mu), "beta": jnp.float32(self.gumbel_beta),
            **buffer_init(self.buffer_size, "g", "ce")}

  # --- network --------------------------------------------------------------------------------------------------------

  def embeddings(self, net, params) -> jax.Array:
    """E [V, D]: the input table's rows normalised to norm sqrt(D)."""
    e = net.input_table(params)
    return e * (math.sqrt(e.shape[1]) / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-6))

  def logits(self, apply_fn, params, z, g, sc, layout) -> jax.Array:
    """NN(z, g, sc) + c_skip(g) z E^T  [B, L, V]."""
    e = self.embeddings(apply_fn, params)
    out = apply_fn(params, None, embeddings=z, self_cond=sc, t=g / G_SCALE, **layout)
    return out + c_skip(g)[:, None, None] * (z.astype(jnp.float32) @ e.T)

  def _forward(self, apply_fn, params, z, g, layout, key):
    """Logits with self-conditioning (probability self_cond_prob per example; key None = always)."""
    e = self.embeddings(apply_fn, params)

    def fwd(sc):
      logits = self.logits(apply_fn, params, z, g, sc, layout)
      return logits, jax.nn.softmax(logits, axis=-1) @ e

    return self.forward(fwd, jnp.zeros(z.shape, jnp.float32), key, self.self_cond_prob)

  def levels(self, state, u: jax.Array) -> jax.Array:
    return gumbel_g(u, state["mu"], state["beta"])

  # --- training -------------------------------------------------------------------------------------------------------

  def corrupt(self, key, tokens, g, net, params):
    """z = alpha e_x + sigma eps [B, L, D] for per-row log noise-to-signal ratios g [B]."""
    e = self.embeddings(net, params)
    gb = g[:, None, None]
    eps = jax.random.normal(key, tokens.shape + (e.shape[1],), jnp.float32)
    return jnp.sqrt(jax.nn.sigmoid(-gb)) * lookup(e, tokens) + jnp.sqrt(jax.nn.sigmoid(gb)) * eps

  def loss(self, apply_fn, params, batch, key, state):
    tokens = batch["tokens"]
    b = tokens.shape[0]
    k_u, k_eps, k_sc = jax.random.split(key, 3)
    g = self.levels(state, uniform_levels(k_u, b, self.antithetic))
    z = self.corrupt(k_eps, tokens, g, apply_fn, params)
    logits = self._forward(apply_fn, params, z, g, network_layout(batch), k_sc)
    ce = token_nll(logits, tokens)
    loss = jnp.mean(ce)
    new_state = self.update_schedule(state, jax.lax.stop_gradient(g), jax.lax.stop_gradient(jnp.mean(ce, axis=-1)))
    return loss, {"cross_entropy": loss, "gumbel_mu": new_state["mu"], "gumbel_beta": new_state["beta"]}, new_state

  def update_schedule(self, state, g: jax.Array, ce: jax.Array) -> dict:
    """Writes (g, CE) of each example into the FIFO buffer; every update_every calls refits mu and beta."""
    new, valid = buffer_write(state, g=g, ce=ce)
    if not self.update_every:
      return new

    def refit(s):
      mu, beta, ok = fit_gumbel(s["g"], s["ce"], valid, s["mu"], s["beta"])
      return dict(s, mu=jnp.where(ok, mu, s["mu"]), beta=jnp.where(ok, beta, s["beta"]))

    due = (new["calls"] % self.update_every == 0) & (jnp.sum(valid) >= min(MIN_FIT_POINTS, self.buffer_size))
    return jax.lax.cond(due, refit, lambda s: s, new)

  # --- likelihood bound -----------------------------------------------------------------------------------------------

  def bound(self, apply_fn, params, batch, key, state):
    tokens = batch["tokens"]
    layout = network_layout(batch)
    e_tab = self.embeddings(apply_fn, params)
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

  def sampling_net(self, net, params, state, canvas, steps):
    """The network with the skip term over embedding states for LangFlow's DDIM sampler on the Gumbel grid of
    `steps` steps (self-conditioning carried when trained with it)."""
    layout = canvas_layout(canvas, self.mask_id)
    fn = lambda z, g, sc: self.logits(net, params, z, g, sc, layout)
    return registry.SamplingNet(mask_id=self.mask_id, logits_fn=fn, arguments={
        "g_grid": self.levels(state, jnp.linspace(1.0 - C_CLAMP, C_CLAMP, steps + 1)),
        "embed": self.embeddings(net, params), "self_condition": self.self_cond_prob > 0})
