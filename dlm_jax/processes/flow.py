"""One-hot flow (FLM: "One-step Language Modeling via Continuous Denoising", arXiv 2602.16813).

State: the one-hot vector e_x in R^V. Rectified-flow path x_g = (1 - g) eps + g e_x, eps ~ N(0, I_V), g = 0 noise,
g = 1 data. The network sees x_g through the dense projection x_g E (E = the model's input table) and the time t,
and predicts the clean token with V logits; the loss is the per-token cross entropy without time weighting.

Time reparameterisation: the network's time t is the discrete signal level alpha(g) = K/(K-1) (q(g) - 1/K),
q(g) = P(argmax x_g = x) = E_{z ~ N(0,1)} [Phi(z + g / (1 - g))^(K-1)], K = V. Training draws t ~ U[0, 1)
(antithetic) and g = A^-1(t); A is tabulated by 100-node Gauss-Hermite quadrature on 10k points of g (up to alpha = 1 - 1e-6) and
inverted by interpolation (`signal_level_table`).

Embedding-dimension state (diffusion.flow_embed_state): the network only sees x_g E and the sampler's update is linear
in x_g, so training and sampling can carry h = x_g E in R^D, drawing eps E ~ N(0, E^T E) as n C^T with C the Cholesky
factor of E^T E: no [B, L, V] Gaussian is drawn. (Valid for this family only; a model whose targets live in R^V, such
as FLM's flow-map distillation, needs the full state.)

Bound: the probability-flow ODE bound of `dlm_jax.processes.continuous` with y = x_g / (1 - g) = u e_x + eps,
u = g / (1 - g) from u = 0 (t = 0, exactly the N(0, I) prior) to t = 1 - diffusion.t_min (decoder: the network's
softmax there), on the uniform t grid of diffusion.bound_steps points.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax import registry
from dlm_jax.maths import token_nll
from dlm_jax.processes.base import network_layout
from dlm_jax.processes.continuous import (ContinuousVocab, canvas_layout, check_continuous_keys, lookup, ode_bound,
                                          uniform_levels)

GH_NODES = 100
TABLE_POINTS = 10_000
G_MAX = 1.0 - 1e-4


def signal_level(g: np.ndarray, k: int, nodes: int = GH_NODES) -> np.ndarray:
  """alpha(g) = K/(K-1) (q(g) - 1/K), q(g) = E_z[Phi(z + g/(1-g))^(K-1)] by Gauss-Hermite quadrature (float64)."""
  from scipy.special import log_ndtr
  x, w = np.polynomial.hermite.hermgauss(nodes)
  g = np.asarray(g, np.float64)
  a = g / (1.0 - g)
  q = (w[None] * np.exp((k - 1) * log_ndtr(np.sqrt(2.0) * x[None] + a[:, None]))).sum(-1) / np.sqrt(np.pi)
  return k / (k - 1) * (q - 1.0 / k)


@functools.lru_cache(maxsize=8)
def signal_level_table(k: int, points: int = TABLE_POINTS, nodes: int = GH_NODES) -> tuple[np.ndarray, np.ndarray]:
  """(g, alpha(g)) float32 on `points` uniform g in [0, g*], alpha(g*) = 1 - 1e-6 (found by bisection); points whose
  alpha does not increase in float32 are dropped, so the table inverts by interpolation."""
  lo, hi = 0.0, G_MAX
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if signal_level(np.array([mid]), k, nodes)[0] < 1.0 - 1e-6 else (lo, mid)
  g = np.linspace(0.0, hi, points)
  alpha = np.clip(signal_level(g, k, nodes), 0.0, 1.0)
  alpha[0] = 0.0
  a32 = alpha.astype(np.float32)
  keep = np.concatenate([[True], np.diff(a32) > 0])
  return g[keep].astype(np.float32), a32[keep]


@registry.register_process
@dataclasses.dataclass(frozen=True)
class OneHotFlow(ContinuousVocab):
  vocab_size: int
  antithetic: bool = True
  embed_state: bool = False  # carry h = x_g E in R^D (training and sampling)
  t_end: float = 1e-3  # the bound's data end is t = 1 - t_end
  bound_steps: int = 64
  divergence: str = "hutchinson"
  name: str = "flow"

  DEFAULT_SAMPLER = "euler"
  CONFIG_KEYS = ("antithetic", "flow_embed_state", "t_min", "bound_steps")

  @classmethod
  def from_config(cls, cfg, vocab_size: int, **vocab) -> "OneHotFlow":
    d = cfg.diffusion
    return cls(vocab_size=vocab_size, antithetic=d.antithetic, embed_state=d.flow_embed_state, t_end=d.t_min,
               bound_steps=d.bound_steps, **vocab)

  @classmethod
  def check_config(cls, cfg) -> None:
    check_continuous_keys(cfg, cls.CONFIG_KEYS)

  # --- the time reparameterisation ----------------------------------------------------------------------------------

  def g_of_t(self, t: jax.Array) -> jax.Array:
    g_tab, a_tab = signal_level_table(self.vocab_size)
    return jnp.interp(t, jnp.asarray(a_tab), jnp.asarray(g_tab))

  def t_of_g(self, g: jax.Array) -> jax.Array:
    g_tab, a_tab = signal_level_table(self.vocab_size)
    return jnp.interp(g, jnp.asarray(g_tab), jnp.asarray(a_tab))

  # --- corruption ---------------------------------------------------------------------------------------------------

  def noise_factor(self, net, params) -> jax.Array:
    """C [D, D] with C C^T = E^T E (plus a 1e-6 relative jitter): eps E ~ n C^T for n ~ N(0, I_D)."""
    e = net.input_table(params)
    gram = e.T @ e
    jitter = 1e-6 * jnp.trace(gram) / gram.shape[0]
    return jnp.linalg.cholesky(gram + jitter * jnp.eye(gram.shape[0], dtype=gram.dtype))

  def corrupt(self, key, tokens, g, net, params):
    """The network input h = x_g E [B, L, D] for per-row levels g [B]."""
    e = net.input_table(params)
    gb = g[:, None, None]
    if self.embed_state:
      n = jax.random.normal(key, tokens.shape + (e.shape[1],), jnp.float32)
      return (1.0 - gb) * (n @ self.noise_factor(net, params).T) + gb * lookup(e, tokens)
    eps = jax.random.normal(key, tokens.shape + (self.vocab_size,), jnp.float32)
    x_g = (1.0 - gb) * eps + gb * jax.nn.one_hot(tokens, self.vocab_size, dtype=jnp.float32)
    return x_g @ e

  def loss(self, apply_fn, params, batch, key, state):
    tokens = batch["tokens"]
    k_t, k_eps = jax.random.split(key)
    t = uniform_levels(k_t, tokens.shape[0], self.antithetic)
    h = self.corrupt(k_eps, tokens, self.g_of_t(t), apply_fn, params)
    logits = apply_fn(params, None, embeddings=h, t=t, **network_layout(batch))
    ce = token_nll(logits, tokens)
    loss = jnp.mean(ce)
    return loss, {"cross_entropy": loss}, state

  # --- likelihood bound ---------------------------------------------------------------------------------------------

  def bound(self, apply_fn, params, batch, key, state):
    tokens = batch["tokens"]
    e_tab = apply_fn.input_table(params)
    layout = network_layout(batch)
    t_grid = jnp.linspace(1.0 - self.t_end, 0.0, self.bound_steps + 1)
    g = self.g_of_t(t_grid)
    u_grid = g / (1.0 - g)

    def logits_at(y, u):
      gg = u / (1.0 + u)
      return apply_fn(params, None, embeddings=(y / (1.0 + u)[:, None, None]) @ e_tab, t=self.t_of_g(gg), **layout)

    velocity = lambda y, u: jax.nn.softmax(logits_at(y, u), axis=-1)
    decoder = lambda y, u: jnp.sum(token_nll(logits_at(y, u), tokens), axis=-1)
    e = jax.nn.one_hot(tokens, self.vocab_size, dtype=jnp.float32)
    nats, _ = ode_bound(velocity, decoder, e, u_grid, key, self.divergence)
    return nats, jnp.full(tokens.shape[:1], tokens.shape[1], jnp.float32)

  # --- sampling -----------------------------------------------------------------------------------------------------

  def sampling_net(self, net, params, state, canvas, steps):
    """The network over the flow state for FLM's Euler sampler on t_i = i / S, g_i = A^-1(t_i) (S = steps); the state
    carried in R^D when diffusion.flow_embed_state."""
    del state
    layout = canvas_layout(canvas, self.mask_id)
    e_tab = net.input_table(params)
    t_grid = jnp.arange(steps + 1, dtype=jnp.float32) / steps
    arguments = {"vocab_size": self.vocab_size, "g_grid": self.g_of_t(t_grid), "t_grid": t_grid}
    if self.embed_state:
      fn = lambda h, t: net(params, None, embeddings=h, t=t, **layout)
      arguments.update(basis=e_tab, noise_factor=self.noise_factor(net, params))
    else:
      fn = lambda z, t: net(params, None, embeddings=z @ e_tab, t=t, **layout)
    return registry.SamplingNet(mask_id=self.mask_id, logits_fn=fn, arguments=arguments)
