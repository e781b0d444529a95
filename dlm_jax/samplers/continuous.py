"""Samplers of the continuous families: jit-compiled loops with static shapes over any network function.

  flow_euler   one-hot flow (FLM): Euler steps of the rectified-flow ODE on the discrete-signal-level grid, the state
               in R^V or carried in the embedding dimension (h = z E)
  ddim         embedding flow (LangFlow): the DDIM / x0-Euler step on the Gumbel grid, self-conditioning carried,
               state arithmetic in float64 (precision="float64")
  edm          bitstream (CoBit): Euler steps of the variance-exploding ODE on the inverse entropy-CDF grid, optionally
               with EDM churn where a gate is set (the entropy-gated stochastic sampler)

Canvas conventions are those of `dlm_jax.samplers.common`: [B, L] ids, `mask_id` at free positions, left padding PAD
(kept), every other id fixed. Fixed tokens are imposed by replacement: before each network call their state is set
to the forward process's draw at the current noise level. Each row's noise comes from its own key (one key, or one
per row), so a row's sample does not depend on the batch. The network function receives the state and the noise
level; it must itself keep PAD out of attention (the processes build such functions from the canvas).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from dlm_jax import registry
from dlm_jax.maths import from_bits, to_bits
from dlm_jax.samplers.common import PAD, check_canvas, check_precision, filter_logits, row_keys, step_keys


def _row_normal(keys: jax.Array, step, shape, dtype=jnp.float32) -> jax.Array:
  """[B, *shape] standard normals, row r from fold_in(keys[r], step)."""
  return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(step_keys(keys, step))


def _probs(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  logits = filter_logits(logits.astype(jnp.float32), top_k, top_p, temperature)
  return jax.nn.softmax(logits / temperature, axis=-1)


def _check(canvas, key, temperature: float, grid: jax.Array, name: str):
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if grid.ndim != 1 or grid.shape[0] < 2:
    raise ValueError(f"{name} needs a grid of at least 2 noise levels (1 step), got shape {grid.shape}")
  canvas = check_canvas(canvas, PAD)
  return canvas, row_keys(key, canvas.shape[0])


def flow_euler(logits_fn: Callable, key: jax.Array, canvas, *, mask_id: int, vocab_size: int, g_grid, t_grid,
               basis: Optional[jax.Array] = None, noise_factor: Optional[jax.Array] = None, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, precision: str = "float32") -> tuple[jax.Array, dict]:
  """FLM's Euler sampler (Lee et al. 2026, arXiv 2602.16813). Path x_g = (1 - g) eps + g e_x, g from 0 (noise) to 1.

  logits_fn(h [B, L, N], t [B]) -> [B, L, V]: the network at state h and time t. g_grid [S + 1] rises from 0 and
  t_grid [S + 1] are the network times of those levels (FLM: t_i = i / S, g_i = A^-1(t_i)). Each of the S steps:
  xhat = softmax(logits / temperature) (top-k / top-p truncated), v = (xhat - z) / (1 - g_i), z += (g_{i+1} - g_i) v;
  the last step's prediction is decoded by argmax. NFE = S.

  State: with basis=None the one-hot space (N = V, h = z). With basis E [V, D] the state is carried as h = z E in R^D
  (the update is linear in z and the network sees only z E): xhat E replaces xhat, and the initial noise eps E is drawn
  as n C^T with noise_factor C [D, D] (C C^T = E^T E), so no [B, L, V] Gaussian is ever drawn.
  precision="float64": the state and its updates in float64 (needs 64-bit JAX); the network sees float32.
  """
  canvas, keys = _check(canvas, key, temperature, jnp.asarray(g_grid), "flow_euler")
  check_precision(precision)
  dt = jnp.float64 if precision == "float64" else jnp.float32
  g_grid, t_grid = jnp.asarray(g_grid, dt), jnp.asarray(t_grid, jnp.float32)
  b, length = canvas.shape
  n_state = vocab_size if basis is None else basis.shape[1]
  fixed = (canvas != mask_id) & (canvas != PAD)
  safe = jnp.where(fixed, canvas, 0)

  def clean():
    return (jax.nn.one_hot(safe, vocab_size, dtype=jnp.float32) if basis is None
            else basis[safe].astype(jnp.float32)).astype(dt)

  def noise(step):
    n = _row_normal(keys, step, (length, n_state))
    return (n if noise_factor is None else n @ noise_factor.T).astype(dt)

  def readout(p):
    return (p if basis is None else p @ basis.astype(jnp.float32)).astype(dt)

  e = clean()
  steps = g_grid.shape[0] - 1

  def body(h, i):
    g, g_next, t = g_grid[i], g_grid[i + 1], t_grid[i]
    h = jnp.where(fixed[..., None], (1.0 - g) * noise(2 * i + 1) + g * e, h)
    logits = logits_fn(h.astype(jnp.float32), jnp.full((b,), t))
    xhat = readout(_probs(logits, temperature, top_k, top_p))
    h_next = h + (g_next - g) * (xhat - h) / (1.0 - g)
    return h_next, jnp.argmax(logits, axis=-1).astype(jnp.int32)

  _, decoded = jax.lax.scan(body, noise(0), jnp.arange(steps))
  tokens = jnp.where(canvas == mask_id, decoded[-1], canvas)
  return tokens, {"nfe": jnp.asarray(steps, jnp.int32)}


def ddim(logits_fn: Callable, key: jax.Array, canvas, *, mask_id: int, g_grid, embed: jax.Array,
         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, precision: str = "float64",
         self_condition: bool = True) -> tuple[jax.Array, dict]:
  """LangFlow's sampler (arXiv 2604.11748): the DDIM / x0-Euler step of a variance-preserving embedding diffusion.

  z = alpha e_x + sigma eps with alpha^2 = sigmoid(-g), sigma^2 = sigmoid(g) (g = log noise-to-signal ratio).
  logits_fn(z [B, L, D], g [B], sc [B, L, D]) -> [B, L, V]; `sc` is the self-conditioning input (the previous step's
  xhat; zeros at the first step or with self_condition=False). g_grid [S + 1] falls from pure noise to the data end.
  Each of the S steps: xhat = softmax(logits / temperature)^T E, then z <- alpha_s xhat + (sigma_s / sigma_t)
  (z - alpha_t xhat), computed in `precision` (float64 as in LangFlow; needs 64-bit JAX); a final forward at the last
  level decodes by argmax. NFE = S + 1. z starts as N(0, I) (the model's prior at the noisiest level).
  """
  canvas, keys = _check(canvas, key, temperature, jnp.asarray(g_grid), "ddim")
  check_precision(precision)
  dt = jnp.float64 if precision == "float64" else jnp.float32
  g_grid = jnp.asarray(g_grid, dt)
  embed = embed.astype(jnp.float32)
  b, length = canvas.shape
  d = embed.shape[1]
  fixed = (canvas != mask_id) & (canvas != PAD)
  e = embed[jnp.where(fixed, canvas, 0)].astype(dt)
  alpha = lambda g: jnp.sqrt(jax.nn.sigmoid(-g))
  sigma = lambda g: jnp.sqrt(jax.nn.sigmoid(g))
  steps = g_grid.shape[0] - 1

  def net(z, g, sc, i):
    z = jnp.where(fixed[..., None], alpha(g) * e + sigma(g) * _row_normal(keys, 2 * i + 1, (length, d), dt), z)
    logits = logits_fn(z.astype(jnp.float32), jnp.full((b,), g, jnp.float32), sc)
    return z, logits

  def body(carry, i):
    z, sc = carry
    g, g_next = g_grid[i], g_grid[i + 1]
    z, logits = net(z, g, sc, i)
    xhat32 = _probs(logits, temperature, top_k, top_p) @ embed
    xhat = xhat32.astype(dt)
    z = alpha(g_next) * xhat + (sigma(g_next) / sigma(g)) * (z - alpha(g) * xhat)
    return (z, xhat32 if self_condition else sc), None

  z0 = _row_normal(keys, 0, (length, d), dt)
  sc0 = jnp.zeros((b, length, d), jnp.float32)
  (z, sc), _ = jax.lax.scan(body, (z0, sc0), jnp.arange(steps))
  _, logits = net(z, g_grid[-1], sc, steps)
  tokens = jnp.where(canvas == mask_id, jnp.argmax(logits, axis=-1).astype(jnp.int32), canvas)
  return tokens, {"nfe": jnp.asarray(steps + 1, jnp.int32)}


def edm(logits_fn: Callable, key: jax.Array, canvas, *, mask_id: int, vocab_size: int, bits: int, sigma_grid,
        churn_gate=None, churn: float = 0.0, s_noise: float = 1.003, temperature: float = 1.0,
        self_condition: bool = True, precision: str = "float32") -> tuple[jax.Array, dict]:
  """CoBit's sampler (arXiv 2605.07013) for bits under variance-exploding noise x = b + sigma eps.

  logits_fn(x [B, L, bits], sigma [B], sc [B, L, bits]) -> per-bit logits [B, L, bits] (the denoiser is
  D = sigmoid(logits / temperature); `sc` the previous D, self-conditioning). sigma_grid [S + 1] falls from sigma_max
  to sigma_min. Step i: where churn_gate[i] (bool [S]), EDM churn sigma_hat = sigma_i (1 + churn), x_hat = x +
  sqrt(sigma_hat^2 - sigma_i^2) s_noise eps (Karras et al. 2022); then the Euler step x <- x_hat + (sigma_{i+1} -
  sigma_hat) (x_hat - D(x_hat)) / sigma_hat. A final call at sigma_min decodes bits D > 1/2 (ids wrap modulo V).
  NFE = S + 1. Without a gate (or churn = 0) the sampler is deterministic given the initial noise.
  precision="float64": the state x and its updates in float64 (needs 64-bit JAX); the network sees float32.
  """
  check_precision(precision)
  dt = jnp.float64 if precision == "float64" else jnp.float32
  sigma_grid = jnp.asarray(sigma_grid, dt)
  canvas, keys = _check(canvas, key, temperature, sigma_grid, "edm")
  if churn < 0:
    raise ValueError(f"churn must be >= 0, got {churn}")
  steps = sigma_grid.shape[0] - 1
  gate = jnp.zeros((steps,), bool) if churn_gate is None else jnp.asarray(churn_gate, bool)
  b, length = canvas.shape
  fixed = (canvas != mask_id) & (canvas != PAD)
  clean = to_bits(jnp.where(fixed, canvas, 0), bits).astype(dt)

  def normal(step):
    return _row_normal(keys, step, (length, bits)).astype(dt)

  def impose(x, sigma, step):
    return jnp.where(fixed[..., None], clean + sigma * normal(step), x)

  def denoise(x, sigma, sc):
    out = logits_fn(x.astype(jnp.float32), jnp.full((b,), sigma, jnp.float32), sc).astype(jnp.float32)
    return jax.nn.sigmoid(out / temperature).astype(dt)

  def body(carry, i):
    x, sc = carry
    sigma, sigma_next = sigma_grid[i], sigma_grid[i + 1]
    sigma_hat = sigma * (1.0 + jnp.where(gate[i], churn, 0.0))
    x = impose(x, sigma, 3 * i + 1)
    x_hat = x + jnp.sqrt(jnp.maximum(sigma_hat ** 2 - sigma ** 2, 0.0)) * s_noise * normal(3 * i + 2)
    x_hat = impose(x_hat, sigma_hat, 3 * i + 3)
    d = denoise(x_hat, sigma_hat, sc)
    x = x_hat + (sigma_next - sigma_hat) * (x_hat - d) / sigma_hat
    return (x, d.astype(jnp.float32) if self_condition else sc), None

  x0 = 0.5 + sigma_grid[0] * normal(0)
  (x, sc), _ = jax.lax.scan(body, (x0, jnp.zeros((b, length, bits), jnp.float32)), jnp.arange(steps))
  d = denoise(impose(x, sigma_grid[-1], 3 * steps + 1), sigma_grid[-1], sc)
  tokens = jnp.where(canvas == mask_id, from_bits(d > 0.5, vocab_size), canvas)
  return tokens, {"nfe": jnp.asarray(steps + 1, jnp.int32)}


# --- registry entries ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EulerOptions(registry.Draw):
  """sampler.euler.*: precision of the flow state, truncation of each step's token distribution."""


@dataclasses.dataclass(frozen=True)
class DdimOptions(registry.Draw):
  """sampler.ddim.*: precision of the embedding state (float64 as in LangFlow), truncation of each step's xhat."""
  precision: str = "float64"


@dataclasses.dataclass(frozen=True)
class EdmOptions(registry.Precision):
  """sampler.edm.*: precision of the bit state (per-bit denoisers have no token distribution to truncate)."""


@dataclasses.dataclass(frozen=True)
class EdmChurnOptions(registry.Precision):
  """sampler.edm_churn.*: EDM churn gamma and the band of the entropy CDF where it applies (CoBit)."""
  churn: float = 0.2  # CoBit: 0.2 (LM1B), 0.13 (OWT); at most sqrt(2) - 1 (EDM's cap)
  band_lo: float = 0.1  # CoBit's default entropy quantiles of the churn window
  band_hi: float = 0.9

  def check(self, key, family, block_size):
    super().check(key, family, block_size)
    registry.need(0 <= self.churn <= 2 ** 0.5 - 1,
                  f"{key('churn')} must be in [0, sqrt(2) - 1] (EDM's cap on gamma), got {self.churn}")
    registry.need(0 <= self.band_lo <= self.band_hi <= 1,
                  f"the churn band ({key('band_lo')}, {key('band_hi')}) = ({self.band_lo}, {self.band_hi}) must "
                  "satisfy 0 <= lo <= hi <= 1")


def _truncating(sampler: Callable) -> Callable:
  """`SamplerSpec.run` for flow_euler / ddim: the family's network and inputs, the shared temperature, the options."""

  def run(net, opts, shared, key, canvas, *, gen_start, eos_id, family_options=None):
    del gen_start, eos_id, family_options
    return sampler(net.logits_fn, key, canvas, mask_id=net.mask_id, temperature=shared.temperature, top_k=opts.top_k,
                   top_p=opts.top_p, precision=opts.precision, **net.arguments)

  return run


def _run_edm(net, opts, shared, key, canvas, *, gen_start, eos_id, family_options=None):
  """edm and edm_churn: the churn band (edm_churn's options) gates churn by the grid points' entropy-CDF fraction."""
  del gen_start, eos_id, family_options
  args = dict(net.arguments)
  frac = args.pop("entropy_fraction")
  if isinstance(opts, EdmChurnOptions):
    args.update(churn_gate=(frac >= opts.band_lo) & (frac <= opts.band_hi), churn=opts.churn)
  return edm(net.logits_fn, key, canvas, mask_id=net.mask_id, temperature=shared.temperature,
             precision=opts.precision, **args)


for _spec in (
    ("euler", ("flow",), EulerOptions, _truncating(flow_euler),
     "FLM's Euler ODE sampler on the discrete-signal-level grid"),
    ("ddim", ("embedding_flow",), DdimOptions, _truncating(ddim),
     "LangFlow's DDIM / x0-Euler step on the Gumbel grid, self-conditioning carried"),
    ("edm_churn", ("bitstream",), EdmChurnOptions, _run_edm,
     "CoBit's Euler steps on the inverse entropy-CDF grid with EDM churn inside an entropy band"),
    ("edm", ("bitstream",), EdmOptions, _run_edm, "CoBit's deterministic Euler steps on the inverse entropy-CDF grid")):
  registry.register_sampler(registry.SamplerSpec(*_spec))
