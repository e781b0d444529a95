"""LLaDA generation: semi-autoregressive blocks with low-confidence or random remasking (Nie et al. 2025, "Large
Language Diffusion Models", Sec. 2.4 and App. B), with the training-free parallel-decoding rules of Fast-dLLM (Wu et al.
2025, "Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV Cache and Parallel Decoding": confidence
threshold and factor rule) and classifier-free guidance.

The generated region [gen_start, gen_start + gen_length) is split into blocks of `block_length` that are decoded left
to right. Within the current block, each step takes the network's prediction x0 at every still-masked position,
scores it by a confidence and commits some of the best-scoring positions; committed tokens never change again.

How many positions a step commits:
  * fixed schedule (default): `steps` are shared equally by the blocks (steps_per_block = steps // num_blocks). With
    m masked positions in a row's block at the start of the block, step j of that block commits
    m // steps_per_block + (1 if j < m % steps_per_block else 0) positions (LLaDA's `get_num_transfer_tokens`).
  * `threshold` (Fast-dLLM): every masked position of the block with confidence >= threshold, and always at least the
    most confident one (so decoding cannot stall; threshold = 1.0 therefore commits one token per step unless a
    confidence is exactly 1). The number of steps is data dependent: each block loops until it has no mask left
    (at most block_length steps, as every step commits >= 1).
  * `factor` (Fast-dLLM): sort the block's masked confidences c(1) >= c(2) >= ...; commit the largest prefix n with
    (n + 1) (1 - c(n)) < factor, and at least 1.

Conventions
  * `logits_fn(tokens [B, L] int32, t [B] float32) -> [B, L, V]`, the same signature as the ancestral sampler, so a
    process's logits function plugs in unchanged. LLaDA's network takes no time input; t is passed for convenience and
    is the fraction of each row's generated region still masked. If V > mask_id the mask logit is suppressed.
  * Batching: every row shares the same `gen_start` and `gen_length`. Prompts of different lengths must be
    left-padded by the caller (right-aligned so that each prompt ends at gen_start). Only `mask_id` positions inside the
    generated region are ever written; every other position (prompt, left padding, any suffix after the generated
    region, tokens pre-filled inside the region) is returned unchanged. Because `logits_fn` is opaque, keeping padding
    out of attention is the caller's job (e.g. a logits_fn closing over an attention mask).
  * Randomness: `key` is either one PRNG key, from which row r derives its own key as fold_in(key, r), or a batch of
    B keys (one per row, e.g. jax.random.split(key, B)). A row's draws at its n-th step use fold_in(row_key, n), where
    n counts that row's own steps. Rows are therefore independent: with a row-wise logits_fn, a row decoded inside a
    batch gives exactly the tokens it gives alone with the same row key (also in threshold/factor mode, where rows
    take different numbers of steps).
  * Sampling: temperature 0 is greedy; temperature tau > 0 draws x0 = argmax(logits / tau + Gumbel) in float32
    (LLaDA computes the same draw in float64). Confidences are computed from the softmax of the un-noised (guided)
    logits: max_prob = p(x0), margin = p(top1) - p(top2), neg_entropy = sum p log p. `remasking="random"` uses a
    uniform random confidence instead.
  * Classifier-free guidance (cfg_scale > 0): un = logits_fn(tokens with every position < gen_start masked),
    logits = un + (cfg_scale + 1) (cond - un). Both calls count towards NFE.
  * A step in which no row has anything to commit (fixed schedule with more steps than masked positions) makes no
    network call. `stats['nfe']` counts real logits_fn calls.

The whole decode is one jit-able function with static shapes: a `lax.fori_loop` over blocks containing a `lax.fori_loop`
over steps (fixed schedule) or a `lax.while_loop` (threshold / factor).

Not implemented here: the Fast-dLLM prefix / dual K/V caches (they need the model, not an opaque logits_fn).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from dlm_jax.samplers.ancestral import gumbel_argmax, suppress_mask

REMASKING = ("low_confidence", "random")
CONFIDENCE = ("max_prob", "margin", "neg_entropy")


def commit_counts(masked: int, steps_per_block: int) -> list[int]:
  """LLaDA's per-step commit counts for a block with `masked` masked positions (python ints, for reference/tests)."""
  base, rem = divmod(masked, steps_per_block)
  return [base + (1 if j < rem else 0) for j in range(steps_per_block)]


def factor_count(sorted_conf: jax.Array, factor: float) -> jax.Array:
  """Fast-dLLM factor rule on confidences sorted in descending order along the last axis (-inf = not a candidate).

  Returns the largest n with (n + 1) (1 - c(n)) < factor (c 1-indexed), at least 1 when there is any candidate and 0
  otherwise.
  """
  n = jnp.arange(1, sorted_conf.shape[-1] + 1, dtype=jnp.float32)
  valid = jnp.isfinite(sorted_conf)
  ok = valid & ((n + 1.0) * (1.0 - sorted_conf) < factor)
  best = jnp.max(jnp.where(ok, n, 0.0), axis=-1).astype(jnp.int32)
  return jnp.where(jnp.any(valid, axis=-1), jnp.maximum(best, 1), 0)


def _confidence(logits: jax.Array, x0: jax.Array, kind: str) -> jax.Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  if kind == "max_prob":
    return jnp.take_along_axis(p, x0[..., None], axis=-1)[..., 0]
  if kind == "margin":
    top2 = jax.lax.top_k(p, 2)[0]
    return top2[..., 0] - top2[..., 1]
  return jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)  # neg_entropy


def _row_keys(key: jax.Array, b: int) -> jax.Array:
  """One key per row: a batch of B keys is used as is, a single key gives fold_in(key, r) to row r."""
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  single_ndim = 0 if typed else 1
  if key.ndim == single_ndim:
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(b))
  if key.ndim == single_ndim + 1 and key.shape[0] == b:
    return key
  raise ValueError(f"key must be one PRNG key or a batch of {b} keys, got shape {key.shape}")


def llada(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array, canvas: jax.Array, *,
          mask_id: int, gen_start: int, gen_length: int, block_length: int, steps: Optional[int] = None,
          remasking: str = "low_confidence", confidence: str = "max_prob", temperature: float = 0.0,
          threshold: Optional[float] = None, factor: Optional[float] = None,
          cfg_scale: float = 0.0) -> tuple[jax.Array, dict]:
  """Decodes the `mask_id` positions of canvas[:, gen_start:gen_start + gen_length] (see the module docstring).

  Args:
    logits_fn: (tokens [B, L] int32, t [B] float32) -> logits [B, L, V].
    key: one PRNG key, or B keys (one per row).
    canvas: [B, L] int32; prompt (left-padded) before gen_start, mask_id in the generated region.
    steps: total number of steps for the fixed schedule (required then; steps % num_blocks == 0). With `threshold` or
      `factor` it may be None; if given it is validated and otherwise unused.
    threshold: Fast-dLLM confidence threshold in (0, 1]; needs remasking="low_confidence" and a probability-valued
      confidence (max_prob or margin).
    factor: Fast-dLLM factor (> 0); same requirements as threshold; exclusive with threshold.

  Returns (tokens [B, L] int32, stats) with stats:
    nfe: number of logits_fn calls (two per guided step); steps: decoding iterations run (batch-wide);
    row_steps [B]: steps taken by each row; committed [B, max_steps]: tokens committed by a row at each of its steps
    (zero padded; max_steps = steps for the fixed schedule, gen_length with threshold/factor);
    tokens_per_step [B]: generated tokens / row_steps.
  All static arguments are validated (ValueError) before anything is traced.
  """
  canvas = jnp.asarray(canvas, jnp.int32)
  if canvas.ndim != 2:
    raise ValueError(f"canvas must be [B, L], got shape {canvas.shape}")
  b, length = canvas.shape
  adaptive = threshold is not None or factor is not None
  if gen_length < 1 or block_length < 1:
    raise ValueError(f"gen_length and block_length must be >= 1, got {gen_length}, {block_length}")
  if gen_start < 0 or gen_start + gen_length > length:
    raise ValueError(f"generated region [{gen_start}, {gen_start + gen_length}) does not fit canvas length {length}")
  if gen_length % block_length:
    raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
  num_blocks = gen_length // block_length
  if steps is None:
    if not adaptive:
      raise ValueError("steps is required unless threshold or factor is given")
  elif steps < 1 or steps % num_blocks:
    raise ValueError(f"steps ({steps}) must be a positive multiple of the number of blocks ({num_blocks})")
  if remasking not in REMASKING:
    raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
  if confidence not in CONFIDENCE:
    raise ValueError(f"confidence must be one of {CONFIDENCE}, got {confidence!r}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if cfg_scale < 0:
    raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
  if threshold is not None and factor is not None:
    raise ValueError("give threshold or factor, not both")
  if threshold is not None and not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must be in (0, 1], got {threshold}")
  if factor is not None and not factor > 0.0:
    raise ValueError(f"factor must be > 0, got {factor}")
  if adaptive and (remasking != "low_confidence" or confidence == "neg_entropy"):
    raise ValueError("threshold/factor decoding needs remasking='low_confidence' and confidence 'max_prob' or 'margin'")

  row_keys = _row_keys(key, b)
  spb = None if adaptive else steps // num_blocks
  max_steps = gen_length if adaptive else steps
  pos = jnp.arange(length)
  gen_region = (pos >= gen_start) & (pos < gen_start + gen_length)
  n_gen = jnp.sum((canvas == mask_id) & gen_region[None], axis=1)  # [B] positions to generate
  rows = jnp.arange(b)

  def model_logits(tokens):
    still = jnp.sum((tokens == mask_id) & gen_region[None], axis=1)
    t = still.astype(jnp.float32) / jnp.maximum(n_gen, 1).astype(jnp.float32)
    cond = logits_fn(tokens, t).astype(jnp.float32)
    if cfg_scale > 0:
      un = logits_fn(jnp.where(pos[None] < gen_start, mask_id, tokens), t).astype(jnp.float32)
      cond = un + (cfg_scale + 1.0) * (cond - un)
    return suppress_mask(cond, mask_id)

  calls_per_step = 2 if cfg_scale > 0 else 1

  def block_mask(blk):
    lo = gen_start + blk * block_length
    return (pos >= lo) & (pos < lo + block_length)

  def decode_step(carry, in_block, want):
    """One step: `want` [B] is the fixed-schedule count, or None for threshold/factor."""
    tokens, nfe, row_step, committed, n_iter = carry
    eligible = (tokens == mask_id) & in_block[None]
    active = jnp.any(eligible, axis=1)
    if want is None:
      run = jnp.any(active)
    else:
      run = jnp.any(active & (want > 0))

    def compute():
      logits = model_logits(tokens)
      step_keys = jax.vmap(jax.random.fold_in)(row_keys, row_step)
      k_tok, k_conf = jnp.moveaxis(jax.vmap(lambda k: jax.random.split(k, 2))(step_keys), 1, 0)
      if temperature > 0:
        x0 = jax.vmap(gumbel_argmax, in_axes=(0, 0, None))(k_tok, logits, temperature)
      else:
        x0 = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      if remasking == "random":
        conf = jax.vmap(lambda k: jax.random.uniform(k, (length,)))(k_conf)
      else:
        conf = _confidence(logits, x0, confidence)
      conf = jnp.where(eligible, conf, -jnp.inf)
      order = jnp.argsort(-conf, axis=1, stable=True)  # best first; ties -> lower position first
      rank = jnp.argsort(order, axis=1)
      if want is not None:
        n = want
      elif threshold is not None:
        n = jnp.maximum(jnp.sum(conf >= threshold, axis=1), 1)
      else:
        n = factor_count(jnp.take_along_axis(conf, order, axis=1), factor)
      commit = eligible & (rank < n[:, None])
      return jnp.where(commit, x0, tokens), jnp.sum(commit, axis=1).astype(jnp.int32)

    new_tokens, count = jax.lax.cond(run, compute, lambda: (tokens, jnp.zeros((b,), jnp.int32)))
    nfe = nfe + jnp.where(run, calls_per_step, 0).astype(jnp.int32)
    committed = committed.at[rows, jnp.minimum(row_step, max_steps - 1)].add(count)
    # Fixed schedule: every row steps in lock-step. Threshold/factor: a row only counts steps where it had masks.
    row_step = row_step + (1 if want is not None else active.astype(jnp.int32))
    return new_tokens, nfe, row_step, committed, n_iter + 1

  def block_body(blk, carry):
    in_block = block_mask(blk)
    if adaptive:
      def cond(state):
        c, i = state
        return (i < block_length) & jnp.any((c[0] == mask_id) & in_block[None])

      def body(state):
        c, i = state
        return decode_step(c, in_block, None), i + 1

      carry, _ = jax.lax.while_loop(cond, body, (carry, jnp.array(0, jnp.int32)))
      return carry
    m = jnp.sum((carry[0] == mask_id) & in_block[None], axis=1)  # [B] masked at block start
    base, rem = m // spb, m % spb
    return jax.lax.fori_loop(0, spb, lambda j, c: decode_step(c, in_block, base + (j < rem).astype(jnp.int32)), carry)

  init = (canvas, jnp.array(0, jnp.int32), jnp.zeros((b,), jnp.int32), jnp.zeros((b, max_steps), jnp.int32),
          jnp.array(0, jnp.int32))
  tokens, nfe, row_steps, committed, n_iter = jax.lax.fori_loop(0, num_blocks, block_body, init)
  done = n_gen - jnp.sum((tokens == mask_id) & gen_region[None], axis=1)
  stats = {"nfe": nfe, "steps": n_iter, "row_steps": row_steps, "committed": committed,
           "tokens_per_step": done.astype(jnp.float32) / jnp.maximum(row_steps, 1).astype(jnp.float32)}
  return tokens, stats
