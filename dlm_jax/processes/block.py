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

Sampling: `dlm_jax.samplers.block` (block by block with a K/V cache of the clean blocks; any masked sampler inside a
block; at block size 1 a KV-cached autoregressive sampler).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.processes.masked import sample_times, token_nll
from dlm_jax.processes.base import AbsorbingVocab
from dlm_jax.processes.schedules import Schedule


def bd3_mask(length: int, block_size: int) -> np.ndarray:
  """[2L, 2L] bool attention mask of the [x_t | x_0] training input (True = may attend); numpy, so it is a
  compile-time constant. With blk = (index mod L) // b and x0 = index >= L:
    M_BD  = (blk_q == blk_kv) & (x0_q == x0_kv)     each noisy block sees itself, each clean block itself
    M_OBC = (blk_q >  blk_kv) & x0_kv & ~x0_q       a noisy block sees the clean blocks before it
    M_BC  = (blk_q >= blk_kv) & x0_kv & x0_q        the clean half is block-causal
  """
  idx = np.arange(2 * length)
  x0 = idx >= length
  blk = (idx % length) // block_size
  bq, bk = blk[:, None], blk[None, :]
  xq, xk = x0[:, None], x0[None, :]
  return ((bq == bk) & (xq == xk)) | ((bq > bk) & xk & ~xq) | ((bq >= bk) & xk & xq)


def _llada_steps(steps: int, block: int, sub_block: int) -> int:
  """sampler.steps counts steps per block; LLaDA inside a block of `block` tokens needs at most one step per token,
  and a multiple of its number of sub-blocks."""
  subs = block // sub_block if sub_block and block % sub_block == 0 else 1
  steps = min(steps, block)
  return max(subs, steps - steps % subs)


@dataclasses.dataclass(frozen=True)
class BlockDiffusion(AbsorbingVocab):
  vocab_size: int  # tokenizer vocabulary; the mask id is vocab_size
  block_size: int = 16
  t_min: float = 1e-3  # beta
  t_max: float = 1.0  # omega
  antithetic: bool = True
  name: str = "block"

  SAMPLERS = ("ancestral", "first_hitting", "llada", "remdm")
  DEFAULT_SAMPLER = "first_hitting"
  DEFAULT_PRECISION = "float32"

  @classmethod
  def from_config(cls, cfg, vocab_size: int) -> "BlockDiffusion":
    d = cfg.diffusion
    return cls(vocab_size=vocab_size, block_size=d.block_size, t_min=d.t_min, t_max=d.t_max, antithetic=d.antithetic)

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
    kwargs = {}
    if "segment_ids" in batch:
      kwargs["segment_ids"] = jnp.concatenate([batch["segment_ids"]] * 2, axis=1)
    logits = apply_fn(params, jnp.concatenate([z, x], axis=1),
                      positions=jnp.broadcast_to(jnp.concatenate([pos, pos])[None], (b, 2 * l)),
                      mask=jnp.asarray(bd3_mask(l, self.block_size))[None, None], output_len=l, **kwargs)
    return token_nll(logits, x)

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
    """Per-sequence upper bound on -log p(x) (exact NLL at block size 1); see the module docstring."""
    del state
    x = batch["tokens"]
    b, l = x.shape
    n = self._check(l)
    ntok = jnp.full((b,), l, jnp.float32)
    if self.autoregressive:
      return jnp.sum(self.causal_nll(apply_fn, params, batch), axis=-1), ntok
    bs = self.block_size
    k_u, k_perm, k_set = jax.random.split(key, 3)
    strata = (jax.random.uniform(k_u, ()) + jnp.arange(b * n, dtype=jnp.float32)) / (b * n)
    m = jnp.clip(jnp.floor(jax.random.permutation(k_perm, strata) * bs).astype(jnp.int32) + 1, 1, bs)
    m = m.reshape(b, n, 1)  # masked tokens per block, stratified over batch x blocks
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(k_set, (b, n, bs)), axis=-1), axis=-1)
    masked = (ranks < m).reshape(b, l)  # exactly m uniformly chosen positions in each block
    nll = self.token_nll(apply_fn, params, batch, jnp.where(masked, self.mask_id, x))
    per_block = jnp.where(masked, nll, 0.0).reshape(b, n, bs).sum(-1) * (bs / m[..., 0].astype(jnp.float32))
    return jnp.sum(per_block, axis=-1), ntok

  def sample(self, apply_fn, params, key, canvas, sampler_cfg, state, gen_start: int = 0, eos_id=None):
    """Block-by-block generation (`dlm_jax.samplers.block`): `sampler_cfg.name` picks the masked sampler used inside
    each block ("first_hitting" by default, "ancestral", "llada" or "remdm"); sampler.cache "prefix" (default) keeps
    the clean blocks' K/V. Rows come back left-aligned (prompt first); a stopped row ends with PAD."""
    del state, gen_start
    from dlm_jax import model as model_lib
    from dlm_jax.samplers import ancestral, block_diffusion, first_hitting, llada, remdm
    from dlm_jax.samplers.common import truncated

    s, b = sampler_cfg, self.block_size
    name, cache = s.name or "first_hitting", s.cache or "prefix"
    trunc = dict(top_k=s.top_k, top_p=s.top_p, temperature=s.temperature, mask_id=self.mask_id)
    logits_fn = truncated(model_lib.logits_fn(apply_fn, params, block_size=b), **trunc)
    cached = None
    if cache == "prefix":
      cached = truncated(model_lib.cached_logits_fn(apply_fn, params, block_size=b), **trunc)
    common = dict(mask_id=self.mask_id, temperature=s.temperature, precision=s.precision or self.DEFAULT_PRECISION)
    linear = Schedule("linear")
    if name == "llada":
      inner = functools.partial(
          llada, gen_start=0, gen_length=b, block_length=s.block_length or b,
          steps=None if (s.threshold or s.factor) else _llada_steps(s.steps, b, s.block_length or b),
          remasking=s.remasking, confidence=s.confidence,
          position_temperature=s.position_temperature, threshold=s.threshold or None, factor=s.factor or None,
          prophet=s.prophet, **common)
    elif name == "ancestral":
      inner = functools.partial(ancestral, steps=s.steps, schedule=linear, **common)
    elif name == "remdm":
      inner = functools.partial(remdm, steps=s.steps, eta=s.eta, strategy=s.remdm_strategy, t_on=s.t_on,
                                schedule=linear, **common)
    else:
      inner = functools.partial(first_hitting, **common) if b > 1 else None
    return block_diffusion(logits_fn, key, canvas, block_size=b, inner=inner, cached_fn=cached,
                           eos_id=eos_id if s.stop_at_eos else None, entropy_stop=s.entropy_stop,
                           entropy_window=s.entropy_window, **common)
