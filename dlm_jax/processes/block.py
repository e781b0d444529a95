"""Block diffusion (BD3-LM, Arriola et al. 2025, "Block Diffusion: Interpolating Between Autoregressive and Diffusion
Language Models") and, at block size 1, the autoregressive baseline.

The sequence is cut into L / b blocks. The model is autoregressive over blocks and a masked diffusion model inside
each block, conditioned on the clean earlier blocks:  -log p(x) <= sum_k NELBO_k, each block's NELBO being the masked
diffusion bound of that block given x_<k.

Training (vectorised, one forward): the input is [x_t | x_0] of length 2L, both halves at positions 0..L-1, with the
attention mask `bd3_mask` = M_BD | M_OBC | M_BC (a noisy block sees itself and the clean blocks before it; the clean
half is block-causal). Logits come from the x_t half only (the head is not applied to x_0). Each (sequence, block)
draws its own t ~ U[beta, omega] = [diffusion.t_min, diffusion.t_max] (antithetic over batch x blocks), masks each of
its tokens with probability t and weights their cross entropy by 1/t (the linear schedule). Only (beta, omega) with
omega = 1 and small beta estimates the NELBO; narrower intervals lower the gradient variance (BD3-LM's clipped
schedules, chosen by `clip_search`). Block size 1 masks everything with weight 1: the exact causal-LM NLL.

`bound()` does not depend on the training interval: each block's NELBO integrated exactly over t in [0, 1] in the
masked-count form (`MaskedDiffusion._bound_masked_count`, per block): E_{m ~ U{1..b}} E_{|S| = m} [(b / m) sum_{i in
S} -log p(x_i | x_<k, block with S masked)]. At block size 1 it is the exact NLL of every sequence.

Converted checkpoints (Fast-dLLM v2: `Network.logit_shift`, its loss is a causal-LM cross entropy on the x_t half;
SDAR: no shift): the logits of the x_t half are shifted before the cross entropy when the network declares it, and the
mask class stays in the softmax when `suppress_mask` is False (`AbsorbingVocab.predictions`).

Sampling: `dlm_jax.samplers.block` (block by block with a K/V cache of the clean blocks; any masked sampler inside a
block; at block size 1 a KV-cached autoregressive sampler).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax import masks, registry
from dlm_jax.errors import DLMError
from dlm_jax.maths import Schedule, sample_times, token_nll
from dlm_jax.processes.base import AbsorbingVocab, bound_targets, choose_masked, network_layout


def bd3_mask(length: int, block_size: int) -> np.ndarray:
  """[2L, 2L] bool attention mask of the [x_t | x_0] training input (True = may attend): `dlm_jax.masks.bd3`'s dense
  form (M_BD | M_OBC | M_BC); the forward itself passes the spec, so kernels skip the empty tiles."""
  return masks.bd3(block_size).dense(2 * length, 2 * length)


@registry.register_process
@dataclasses.dataclass(frozen=True)
class BlockDiffusion(AbsorbingVocab):
  vocab_size: int  # tokenizer vocabulary
  block_size: int = 16
  t_min: float = 1e-3  # beta
  t_max: float = 1.0  # omega
  antithetic: bool = True
  name: str = "block"

  DEFAULT_SAMPLER = "first_hitting"
  CONFIG_KEYS = ("block_size", "t_min", "t_max", "antithetic", "mask_id", "suppress_mask_logit")

  @property
  def capabilities(self) -> frozenset:
    """Block size 1 is an autoregressive model (exact NLL); larger blocks have BD3-LM's clipped-interval search.
    Generation is left to right (no infilling)."""
    return frozenset({"exact_nll", "conditional"} if self.autoregressive else {"clip_search", "conditional"})

  @classmethod
  def from_config(cls, cfg, vocab_size: int, **vocab) -> "BlockDiffusion":
    d = cfg.diffusion
    return cls(vocab_size=vocab_size, block_size=d.block_size, t_min=d.t_min, t_max=d.t_max, antithetic=d.antithetic,
               suppress_mask=d.suppress_mask_logit, **vocab)

  @classmethod
  def check_config(cls, cfg) -> None:
    d, df, s = cfg.data, cfg.diffusion, cfg.sampler

    def need(ok, msg):
      if not ok:
        raise DLMError(msg)
    need(df.block_size >= 1, f"diffusion.block_size must be >= 1, got {df.block_size}")
    need(0 < df.t_min < 1, f"diffusion.t_min must be in (0, 1), got {df.t_min}")
    need(0 < df.t_max <= 1 and df.t_min < df.t_max,
         f"the clipped noise interval (diffusion.t_min, diffusion.t_max) = ({df.t_min}, {df.t_max}) must lie in (0, 1] "
         "and be non-empty (t_min < t_max)")
    need(d.seq_len % df.block_size == 0,
         f"diffusion.block_size ({df.block_size}) must divide data.seq_len ({d.seq_len}); change one of them")
    need((s.length or d.seq_len) % df.block_size == 0,
         f"sampler.length ({s.length or d.seq_len}) must be a multiple of diffusion.block_size ({df.block_size})")
    need(not cfg.model.time_conditioning, "diffusion.process='block' trains one sequence with a noise level per "
         "block, so the network cannot take a single t; set model.time_conditioning=False")

  @classmethod
  def decode_block_size(cls, cfg) -> int:
    return cfg.diffusion.block_size

  def describe(self) -> dict:
    return {"block_size": self.block_size, "exact_nll": self.autoregressive}

  @property
  def time_conditioned(self) -> bool:
    return False

  @property
  def autoregressive(self) -> bool:
    return self.block_size == 1

  def _check(self, length: int) -> int:
    if length % self.block_size:
      raise ValueError(f"block size {self.block_size} does not divide the sequence length {length}")
    return length // self.block_size

  # --- the network on [x_t | x_0] ---------------------------------------------------------------------------------

  def token_nll(self, apply_fn, params, batch, z: jax.Array) -> jax.Array:
    """-log p(x_i | z) [B, L] for every position, from one forward of [z | x] with `bd3_mask`."""
    x = batch["tokens"]
    b, l = x.shape
    self._check(l)
    pos = jnp.arange(l, dtype=jnp.int32)
    kwargs = {k: jnp.concatenate([v] * 2, axis=1) for k, v in network_layout(batch).items()}
    logits = apply_fn(params, jnp.concatenate([z, x], axis=1),
                      positions=jnp.broadcast_to(jnp.concatenate([pos, pos])[None], (b, 2 * l)),
                      mask=masks.bd3(self.block_size), output_len=l, **kwargs)
    return token_nll(self.predictions(apply_fn, logits), x)

  def causal_nll(self, apply_fn, params, batch) -> jax.Array:
    """Block size 1: -log p(x_i | x_<i) [B, L], the exact autoregressive NLL of every token."""
    x = batch["tokens"]
    return self.token_nll(apply_fn, params, batch, jnp.full_like(x, self.mask_id))

  def block_times(self, key: jax.Array, b: int, n: int) -> jax.Array:
    """t [B, n] in [t_min, t_max], one per (sequence, block). Antithetic: the B * n strata are dealt out row by row
    (row i gets strata i*n .. i*n + n - 1) and shuffled within each row, so every block position gets one draw from
    each row's stratum range and the estimate stays unbiased for every block. With one block this is exactly
    `masked.sample_times` (block size L = masked diffusion for the same key)."""
    e = sample_times(key, b * n, self.t_min, self.antithetic, self.t_max).reshape(b, n)
    if n == 1:
      return e
    order = jnp.argsort(jax.random.uniform(jax.random.fold_in(key, 1), (b, n)), axis=1)
    return jnp.take_along_axis(e, order, axis=1)

  def per_block_loss(self, apply_fn, params, batch, key, t_min=None, t_max=None):
    """The training estimator per (sequence, block): ([B, n] sum over the block's masked tokens of CE / t, masked
    fraction). Block size 1: every token masked, weight 1 (the exact NLL). `t_min` / `t_max` override the interval
    (clipped-schedule search)."""
    x = batch["tokens"]
    b, l = x.shape
    n = self._check(l)
    if self.autoregressive:
      return self.causal_nll(apply_fn, params, batch), jnp.ones(())
    k_t, k_m = jax.random.split(key)
    proc = self if t_min is None else dataclasses.replace(self, t_min=t_min, t_max=t_max)
    t = jnp.repeat(proc.block_times(k_t, b, n), self.block_size, axis=1)  # [B, L]
    masked = jax.random.uniform(k_m, x.shape) < t
    nll = self.token_nll(apply_fn, params, batch, jnp.where(masked, self.mask_id, x))
    per_token = jnp.where(masked, nll / t, 0.0)
    return per_token.reshape(b, n, self.block_size).sum(-1), jnp.mean(masked)

  # --- process interface -------------------------------------------------------------------------------------------

  def loss(self, apply_fn, params, batch, key, state):
    b, l = batch["tokens"].shape
    per_block, frac = self.per_block_loss(apply_fn, params, batch, key)
    loss = jnp.sum(per_block) / (b * l)
    metrics = {"loss": loss, "bits_per_token": loss / math.log(2.0), "masked_fraction": frac}
    return loss, metrics, state

  def bound(self, apply_fn, params, batch, key, state):
    """Per-sequence upper bound on -log p(x) (exact NLL at block size 1); see the module docstring. With
    batch['target'] (the "conditional" capability): the bound on -log p(targets | the other tokens), each block's
    masked-count draw made among its target tokens (a block without targets is only a condition); batch['strata']
    [B] gives block k of a row the draw (u + k / golden ratio) mod 1, uniform for every block."""
    del state
    x = batch["tokens"]
    b, l = x.shape
    n = self._check(l)
    target, ntok = bound_targets(batch)
    if self.autoregressive:
      return jnp.sum(jnp.where(target, self.causal_nll(apply_fn, params, batch), 0.0), axis=-1), ntok
    bs = self.block_size
    k_u, k_perm, k_set = jax.random.split(key, 3)
    if "strata" in batch:
      u = jnp.mod(batch["strata"].astype(jnp.float32)[:, None] + jnp.arange(n, dtype=jnp.float32) * 0.6180339887, 1.0)
    else:  # stratified over batch x blocks
      strata = (jax.random.uniform(k_u, ()) + jnp.arange(b * n, dtype=jnp.float32)) / (b * n)
      u = jax.random.permutation(k_perm, strata).reshape(b, n)
    blocks = target.reshape(b, n, bs)
    per = jnp.sum(blocks, axis=-1).astype(jnp.float32)  # target tokens per block
    masked = choose_masked(k_set, blocks, per, u)  # m of each block's targets, uniformly chosen
    m = jnp.maximum(jnp.sum(masked, axis=-1), 1).astype(jnp.float32)
    masked = masked.reshape(b, l)
    nll = self.token_nll(apply_fn, params, batch, jnp.where(masked, self.mask_id, x))
    per_block = jnp.where(masked, nll, 0.0).reshape(b, n, bs).sum(-1) * (per / m)
    return jnp.sum(per_block, axis=-1), ntok

  def sampling_net(self, net, params, state, canvas, steps):
    """Block-causal forwards (uncached, and cached over the clean blocks' K/V) for block-by-block generation
    (`dlm_jax.samplers.block`); inside a block the masked samplers see the linear schedule."""
    del state, canvas, steps
    b = self.block_size
    return registry.SamplingNet(
        mask_id=self.mask_id, logits_fn=net.logits_fn(params, block_size=b),
        cached_logits_fn=net.cached_logits_fn(params, block_size=b), block_size=b,
        arguments={"schedule": Schedule("linear"), "time_conditioned": False},
        logit_shift=bool(getattr(net, "logit_shift", False)), suppress_mask=self.suppress_mask)
