"""Dream's generation procedure (Ye et al. 2025, "Dream 7B: Diffusion Large Language Models"; the `diffusion_generate`
of HKUNLP/Dream's `generation_utils.py`), reproduced token for token for greedy settings.

Every step runs the network on the whole canvas (no cache, no EOS stop: NFE = steps). The time grid is
t_i = linspace(1, eps, steps + 1) (computed in float32 as torch.linspace does) and step i goes from t = t_i to
s = t_{i+1}. The logits are shifted when the model predicts token i at position i - 1 (`logit_shift`, Dream's
convention), then scaled by 1 / temperature (temperature > 0), truncated to the nucleus top_p and then to the top_k
tokens (Dream's order: top-p before top-k), and x0 is drawn from the resulting softmax (argmax at temperature 0). Then,
by `alg`:

  origin        each masked position takes its x0 with probability 1 - s / t (every one of them on the last step);
  maskgit_plus  confidence = the probability of x0; topk_margin = top-1 minus top-2 probability; entropy = sum p log(p
                + 1e-10) (negative entropy), all of the truncated distribution. The row commits the
                k = floor(n (1 - s / t)) most confident masked positions, n = its masked positions at the start of the
                step (all of them on the last step); with `alg_temp` > 0 the k positions are drawn without replacement
                from softmax(confidence / alg_temp) instead (Gumbel top-k, the distribution of torch.multinomial).

A committed x0 that is the mask id itself (possible when the mask class is kept in the softmax, `suppress_mask=False`,
as Dream's reference does) leaves the position masked. Differences from the reference, deliberately: k is computed per
row (the reference averages the masked count over the batch, which is the same whenever every row has as many masks,
as in its right-padded batches); confidence ties are broken towards the lower position (torch.topk leaves the order
unspecified); random draws use JAX's per-row, per-position keys (`dlm_jax.samplers.common`), so only greedy settings
(temperature 0 with alg_temp 0, any confidence algorithm) can match the reference token for token.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax import registry
from dlm_jax.samplers.common import (filter_logits, gumbel_noise, model_logits, prepare_checks, row_keys,
                                     positions_from_end, sample_tokens, step_keys, subkey, uniform_noise)

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")


def torch_linspace(start: float, end: float, n: int) -> np.ndarray:
  """float32 linspace as torch computes it on the CPU: start + i step for the first half, end - (n - 1 - i) step for
  the second, step = (end - start) / (n - 1), all in float32."""
  start32, end32 = np.float32(start), np.float32(end)
  if n == 1:
    return np.array([start32], np.float32)
  step = np.float32((end32 - start32) / np.float32(n - 1))
  i = np.arange(n)
  first = start32 + step * i.astype(np.float32)
  second = end32 - step * (n - 1 - i).astype(np.float32)
  return np.where(i < n // 2, first, second).astype(np.float32)


def transfer_fractions(steps: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
  """(t_i [steps] float32, 1 - t_{i+1} / t_i [steps] float32 with 1 on the last step): Dream's grid and the fraction of
  the masked positions step i unmasks."""
  ts = torch_linspace(1.0, eps, steps + 1)
  frac = (np.float32(1.0) - (ts[1:] / ts[:-1]).astype(np.float32)).astype(np.float32)
  frac[-1] = 1.0
  return ts[:-1], frac


def transfer_counts(n_masked, steps: int, eps: float) -> list[int]:
  """Dream's per-step commit counts for a row with `n_masked` masks under a confidence algorithm (python ints, for
  reference and tests): int(n (1 - s / t)) of the masks left at each step, all on the last."""
  _, frac = transfer_fractions(steps, eps)
  out, n = [], int(n_masked)
  for i in range(steps):
    k = n if i == steps - 1 else int(np.float32(n) * frac[i])
    out.append(k)
    n -= k
  return out


def dream_filter(logits: jax.Array, temperature: float, top_p: float, top_k: int) -> jax.Array:
  """Dream's sampling distribution as logits: / temperature (if > 0), then nucleus top_p, then top_k."""
  logits = logits.astype(jnp.float32)
  if temperature > 0:
    logits = logits / temperature
  if top_p < 1.0:
    logits = filter_logits(logits, top_p=top_p)
  if top_k:
    logits = filter_logits(logits, top_k=top_k)
  return logits


def confidence(probs: jax.Array, x0: jax.Array, alg: str) -> jax.Array:
  """Dream's confidence of x0 under the (truncated) distribution probs [..., V]."""
  if alg == "topk_margin":
    top2 = jax.lax.top_k(probs, 2)[0]
    return top2[..., 0] - top2[..., 1]
  if alg == "entropy":
    return jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
  return jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]  # maskgit_plus


def dream(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array, canvas: jax.Array, *,
          mask_id: int, steps: int, alg: str = "origin", eps: float = 1e-3, alg_temp: float = 0.0,
          temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, precision: str = "float32",
          logit_shift: bool = False, suppress_mask: bool = True) -> tuple[jax.Array, dict]:
  """Decodes every `mask_id` position of `canvas` [B, L] with Dream's procedure (module docstring) in `steps` network
  calls. Returns (tokens [B, L], {'nfe', 'steps', 'committed' [B, steps]: positions committed per step})."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if alg not in ALGS:
    raise ValueError(f"alg must be one of {ALGS}, got {alg!r}")
  if not 0 < eps < 1:
    raise ValueError(f"eps must be in (0, 1), got {eps}")
  if alg_temp < 0 or temperature < 0:
    raise ValueError(f"alg_temp and temperature must be >= 0, got {alg_temp}, {temperature}")
  if top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got {top_k}, {top_p}")
  canvas = prepare_checks(logits_fn, canvas, mask_id, precision)
  b, length = canvas.shape
  keys = row_keys(key, b)
  from_end = positions_from_end(length, 0, length)
  ts, frac = transfer_fractions(steps, eps)
  ts, frac = jnp.asarray(ts), jnp.asarray(frac)

  def body(i, carry):
    tokens, committed = carry
    masked = tokens == mask_id
    logits = model_logits(logits_fn, tokens, jnp.full((b,), ts[i], jnp.float32), mask_id, logit_shift, suppress_mask)
    logits = dream_filter(logits, temperature, top_p, top_k)
    probs = jax.nn.softmax(logits, axis=-1)
    k = step_keys(keys, i)
    x0 = sample_tokens(subkey(k, 0), from_end, logits, 1.0 if temperature > 0 else 0.0, precision)
    if alg == "origin":
      take = masked & (uniform_noise(subkey(k, 1), from_end) < frac[i])
    else:
      conf = jnp.where(masked, confidence(probs, x0, alg), -jnp.inf)
      if alg_temp > 0:
        conf = conf / alg_temp + gumbel_noise(subkey(k, 1), from_end, 1, precision)[..., 0].astype(jnp.float32)
      n = jnp.sum(masked, axis=1)
      count = jnp.where(i == steps - 1, n, jnp.floor(n.astype(jnp.float32) * frac[i]).astype(jnp.int32))
      rank = jnp.argsort(jnp.argsort(-conf, axis=1, stable=True), axis=1, stable=True)  # 0 = most confident
      take = masked & (rank < count[:, None])
    tokens = jnp.where(take, x0, tokens)
    return tokens, committed.at[:, i].set(jnp.sum(take, axis=1).astype(jnp.int32))

  tokens, committed = jax.lax.fori_loop(0, steps, body, (canvas, jnp.zeros((b, steps), jnp.int32)))
  return tokens, {"nfe": jnp.array(steps, jnp.int32), "steps": jnp.array(steps, jnp.int32), "committed": committed}


@dataclasses.dataclass(frozen=True)
class DreamOptions(registry.Draw, registry.Shift):
  """sampler.dream.*: Dream's unmasking algorithm, its time grid's end and the position-sampling temperature."""
  alg: str = "origin"  # or "maskgit_plus", "topk_margin", "entropy"
  eps: float = 1e-3  # the time grid linspace(1, eps, steps + 1)
  alg_temp: float = 0.0  # > 0: draw the committed positions from softmax(confidence / alg_temp) (not with origin)

  def check(self, key, family, block_size):
    super().check(key, family, block_size)
    registry.need(self.alg in ALGS, f"{key('alg')} must be one of {ALGS}, got {self.alg!r}")
    registry.need(0 < self.eps < 1, f"{key('eps')} must be in (0, 1), got {self.eps}")
    registry.need(self.alg_temp >= 0, f"{key('alg_temp')} must be >= 0, got {self.alg_temp}")
    registry.need(self.alg_temp == 0 or self.alg != "origin",
                  f"{key('alg_temp')} samples the positions of a confidence algorithm; {key('alg')}='origin' has none "
                  "(set alg to maskgit_plus, topk_margin or entropy, or drop it)")


def _run(net, opts, shared, key, canvas, *, gen_start, eos_id, family_options=None):
  del gen_start, eos_id, family_options
  return dream(net.logits_fn, key, canvas, mask_id=net.mask_id, steps=shared.steps, alg=opts.alg, eps=opts.eps,
               alg_temp=opts.alg_temp, temperature=shared.temperature, top_p=opts.top_p, top_k=opts.top_k,
               precision=opts.precision, logit_shift=opts.logit_shift or net.logit_shift,
               suppress_mask=net.suppress_mask)


registry.register_sampler(registry.SamplerSpec(
    "dream", ("masked",), DreamOptions, _run,
    "Dream's diffusion_generate: its time grid, origin / maskgit_plus / topk_margin / entropy unmasking", greedy=True))
