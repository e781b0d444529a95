"""ReMDM: remasking sampler for masked diffusion (Wang et al. 2025, "Remasking Discrete Diffusion Models with
Inference-Time Scaling", arXiv:2503.00307).

Unlike the ancestral sampler, decoded tokens may be masked again and re-predicted later, which lets a model correct
early mistakes at a fixed step budget. For a step from t to s < t (alpha the schedule's signal level) and a remasking
probability sigma_t in [0, sigma_max], sigma_max = min(1, (1 - alpha_s) / alpha_t):
  decoded position:  stays with probability 1 - sigma_t, is masked again with probability sigma_t;
  masked position:   is revealed with probability (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t), taking a token
                     drawn from the network's x0 prediction; otherwise stays masked.
sigma_t = 0 is the MDLM ancestral sampler; the marginals q(z_s | x) are the same for every admissible sigma_t.
Strategies (`strategy`, with `eta`):
  "cap":      sigma_t = min(eta, sigma_max)                         (ReMDM-cap)
  "rescale":  sigma_t = eta * sigma_max                             (ReMDM-rescale)
  "conf":     decoded position l gets sigma_t^l = softmax_l(-psi_l) sigma_max over the row's decoded positions, psi_l
              the model probability of token l when it was decoded (less confident tokens are remasked first);
              masked positions use the row's mean sigma_t^l.                                     (ReMDM-conf)
Remasking is active for t <= t_on only (t_on = 1: always); only positions that were masked in the input canvas are
ever remasked (prompts, infilling context and PAD stay fixed). The final step goes to alpha = 1, where sigma_max = 0, so
every position ends decoded.

Per-row, per-position randomness as in `dlm_jax.samplers.common`; one `lax.fori_loop` of `steps` network calls.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from dlm_jax import registry
from dlm_jax.maths import Schedule
from dlm_jax.samplers.block import discrete
from dlm_jax.samplers.common import model_logits, prepare, sample_tokens, step_keys, subkey, uniform_noise

STRATEGIES = ("cap", "rescale", "conf")


def remdm(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array, canvas: jax.Array, *,
          mask_id: int, steps: int, eta: float = 0.02, strategy: str = "cap", t_on: float = 1.0,
          schedule: Schedule = Schedule("linear"), temperature: float = 1.0, precision: str = "float32",
          logit_shift: bool = False, suppress_mask: bool = True
          ) -> tuple[jax.Array, dict]:
  """Decodes the `mask_id` positions of `canvas` [B, L] with remasking. Returns (tokens, stats) with stats
  {'nfe': steps, 'steps', 'remasked' [B]: tokens masked again over the run}."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if not 0.0 <= eta <= 1.0:
    raise ValueError(f"eta must be in [0, 1], got {eta}")
  if not 0.0 <= t_on <= 1.0:
    raise ValueError(f"t_on must be in [0, 1], got {t_on}")
  canvas, keys, from_end = prepare(logits_fn, key, canvas, mask_id, temperature, precision)
  b, length = canvas.shape
  free = canvas == mask_id  # the positions this sampler owns

  def body(i, carry):
    tokens, psi, remasked = carry
    t = 1.0 - i / steps
    s = 1.0 - (i + 1) / steps
    logits = model_logits(logits_fn, tokens, jnp.full((b,), t, jnp.float32), mask_id, logit_shift, suppress_mask)
    k = step_keys(keys, i)
    k_tok, k_u, k_r = (subkey(k, j) for j in range(3))
    a_t, a_s = schedule.alpha(jnp.float32(t)), schedule.alpha(jnp.float32(s))
    a_s = jnp.where(i == steps - 1, 1.0, a_s)
    sigma_max = jnp.where(a_t > 0, jnp.minimum(1.0, (1.0 - a_s) / jnp.maximum(a_t, 1e-12)), 1.0)
    sigma_max = jnp.where(t <= t_on, sigma_max, 0.0)
    masked = tokens == mask_id
    decoded = free & ~masked
    if strategy == "cap":
      sigma = jnp.broadcast_to(jnp.minimum(eta, sigma_max), (b, length))
    elif strategy == "rescale":
      sigma = jnp.broadcast_to(eta * sigma_max, (b, length))
    else:
      w = jax.nn.softmax(jnp.where(decoded, -psi, -jnp.inf), axis=1)
      w = jnp.where(jnp.any(decoded, axis=1, keepdims=True), w, 0.0)
      n_dec = jnp.maximum(jnp.sum(decoded, axis=1, keepdims=True), 1)
      sigma = jnp.where(decoded, w, 1.0 / n_dec) * sigma_max
    draw = sample_tokens(k_tok, from_end, logits, temperature, precision)
    p_reveal = jnp.clip((a_s - (1.0 - sigma) * a_t) / jnp.maximum(1.0 - a_t, 1e-12), 0.0, 1.0)
    u = uniform_noise(k_u, from_end)
    reveal = free & masked & (u < p_reveal)
    remask = decoded & (uniform_noise(k_r, from_end) < sigma)
    p_draw = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), draw[..., None], axis=-1)[..., 0]
    new_tokens = jnp.where(reveal, draw, jnp.where(remask, mask_id, tokens))
    psi = jnp.where(reveal, p_draw, psi)
    return new_tokens, psi, remasked + jnp.sum(remask, axis=1).astype(jnp.int32)

  init = (canvas, jnp.zeros((b, length), jnp.float32), jnp.zeros((b,), jnp.int32))
  tokens, _, remasked = jax.lax.fori_loop(0, steps, body, init)
  return tokens, {"nfe": jnp.array(steps, jnp.int32), "steps": jnp.array(steps, jnp.int32), "remasked": remasked}


@dataclasses.dataclass(frozen=True)
class RemdmOptions(registry.Draw, registry.Shift):
  """sampler.remdm.*: the remasking strategy, its strength and the time it switches on."""
  strategy: str = "cap"  # "cap", "rescale" or "conf"
  eta: float = 0.02  # remasking strength
  t_on: float = 1.0  # remask only for t <= t_on

  def check(self, key, family, block_size):
    super().check(key, family, block_size)
    registry.need(self.strategy in STRATEGIES, f"{key('strategy')} must be one of {STRATEGIES}, got {self.strategy!r}")
    registry.need(0 <= self.eta <= 1, f"{key('eta')} must be in [0, 1], got {self.eta}")
    registry.need(0 <= self.t_on <= 1, f"{key('t_on')} must be in [0, 1], got {self.t_on}")


def _bind(net, opts, shared, *, length, gen_start, eos_id):
  del length, gen_start, eos_id
  return functools.partial(remdm, mask_id=net.mask_id, steps=shared.steps, eta=opts.eta, strategy=opts.strategy,
                           t_on=opts.t_on, schedule=net.arguments["schedule"], temperature=shared.temperature,
                           precision=opts.precision, logit_shift=opts.logit_shift or net.logit_shift,
                           suppress_mask=net.suppress_mask), False


registry.register_sampler(registry.SamplerSpec(
    "remdm", ("masked", "block"), RemdmOptions, discrete(_bind),
    "ReMDM remasking: decoded tokens can be masked again and revised (cap / rescale / conf)"))
