"""LLaDA generation: semi-autoregressive blocks with low-confidence or random remasking (Nie et al. 2025, "Large
Language Diffusion Models", Sec. 2.4 and App. B), with the training-free accelerations of Fast-dLLM (Wu et al. 2025,
"Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV Cache and Parallel Decoding": confidence
threshold, factor rule, prefix and dual K/V caches), Prophet early commit (Li et al. 2025, "Diffusion Language Models
Know the Answer Before Decoding"), Dream's confidence orderings and logit shift (Ye et al. 2025, "Dream 7B"),
classifier-free guidance and EOS stopping.

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
  * `prophet`: at every step, gap = top-1 minus top-2 logit averaged over the block's masked positions; once it reaches
    prophet_gaps[0] (decoded fraction < 1/3), [1] (< 2/3) or [2] (otherwise), the row commits the argmax at every
    masked position it can see in one step (with the dual cache, whose window is one block, each remaining block
    then takes one step).
  * `eos_id`: once a row has committed EOS and decoded nothing but EOS after it, its remaining masks after that EOS are
    set to EOS; a finished row makes no further calls (a batch stops calling the network when all rows are finished).

Which positions: `remasking="low_confidence"` ranks by the confidence of x0 (confidence= "max_prob" = p(x0),
"margin" = p(top1) - p(top2), "neg_entropy" = sum p log p; the latter two are Dream's orderings), `"random"` by a
uniform draw. With `position_temperature` > 0 the k positions are sampled without replacement from
softmax(confidence / position_temperature) instead of taken top-k (Dream's alg_temp).

K/V caches (`cache`, Fast-dLLM Sec. 3): `logits_fn` is then a cache-aware function
  fn(window [B, W], t [B], start, cache) -> (logits [B, W, V], cache);   fn(canvas, t, 0, None) must work (full pass)
such as `dlm_jax.model.cached_logits_fn`. The first step of every block (and, with `cache_refresh` = k > 0, every k-th
step of a block) is a full forward that rebuilds the cache; the other steps feed only a window: "prefix" = from the
block start to the end of the sequence (keys / values before the block come from the cache), "dual" = the block alone
(the suffix's keys / values are stale until the next refresh). cache_refresh = 1 is exactly the uncached sampler.
With CFG the unconditional pass keeps a cache of its own; with the logit shift the window starts one position early
(position i reads the logits of i - 1), which needs gen_start >= 1.

Conventions (see `dlm_jax.samplers.common`): left-padded prompts (PAD = -1), per-row and per-position randomness
(a row decodes the same alone or in any batch), the un-noised logits for confidences, temperature 0 = greedy,
Gumbel-max sampling in float32 or float64 (`precision`). CFG (cfg_scale > 0): un = logits_fn(tokens with every prompt
position masked), logits = un + (cfg_scale + 1) (cond - un); both calls count towards NFE. A step in which no row has
anything to commit makes no network call; `stats['nfe']` counts real calls.

The whole decode is one jit-able function with static shapes: a loop over blocks (a `lax.fori_loop`; unrolled for
the prefix cache, whose window shrinks block by block) around a `lax.fori_loop` over steps (fixed schedule) or a
`lax.while_loop` (threshold / factor / Prophet).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from dlm_jax.samplers.common import (PAD, check_canvas, check_logits_fn, check_precision, eos_fill, gumbel_noise,
                                     positions_from_end, row_keys, sample_tokens, shift_logits, step_keys, subkey,
                                     suppress_mask, uniform_noise)

REMASKING = ("low_confidence", "random")
CONFIDENCE = ("max_prob", "margin", "neg_entropy")
CACHES = ("none", "prefix", "dual")
NOISE = ("step", "position")
PROPHET_GAPS = (7.5, 5.0, 2.5)


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


def top2(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The largest and second-largest value along the last axis (two reductions; XLA:CPU's top_k sorts)."""
  first = jnp.max(x, axis=-1)
  arg = jnp.argmax(x, axis=-1)
  second = jnp.max(jnp.where(jnp.arange(x.shape[-1]) == arg[..., None], -jnp.inf, x), axis=-1)
  return first, second


def confidence_of(logits: jax.Array, x0: jax.Array, kind: str) -> jax.Array:
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  if kind == "max_prob":
    return jnp.take_along_axis(p, x0[..., None], axis=-1)[..., 0]
  if kind == "margin":
    p1, p2 = top2(p)
    return p1 - p2
  return jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)  # neg_entropy


def prophet_threshold(progress: jax.Array, gaps: Sequence[float]) -> jax.Array:
  """Prophet's gap threshold for a decoded fraction `progress`: gaps[0] below 1/3, gaps[1] below 2/3, else gaps[2]."""
  return jnp.where(progress < 1 / 3, gaps[0], jnp.where(progress < 2 / 3, gaps[1], gaps[2]))


def llada(logits_fn: Callable, key: jax.Array, canvas: jax.Array, *, mask_id: int, gen_start: int,
          gen_length: Optional[int] = None, block_length: Optional[int] = None, steps: Optional[int] = None,
          remasking: str = "low_confidence", confidence: str = "max_prob", position_temperature: float = 0.0,
          temperature: float = 0.0, precision: str = "float32", threshold: Optional[float] = None,
          factor: Optional[float] = None, cfg_scale: float = 0.0, logit_shift: bool = False,
          cache: Optional[str] = None, cache_refresh: int = 0, prophet: bool = False,
          prophet_gaps: Sequence[float] = PROPHET_GAPS, eos_id: Optional[int] = None,
          noise: str = "step") -> tuple[jax.Array, dict]:
  """Decodes the `mask_id` positions of canvas[:, gen_start:gen_start + gen_length] (see the module docstring).

  Args:
    logits_fn: (tokens [B, L] int32, t [B] float32) -> logits [B, L, V]; with `cache`, the cache-aware form.
    key: one PRNG key, or B keys (one per row).
    canvas: [B, L] int32; (left-padded) prompt before gen_start, mask_id in the generated region.
    gen_length: default L - gen_start. block_length: default gen_length (one block).
    steps: total number of steps for the fixed schedule (required then; steps % num_blocks == 0). With `threshold`,
      `factor` or `prophet` the loop runs until each block is decoded; steps (if given) is checked and otherwise
      only used by the fixed schedule.
    threshold: Fast-dLLM confidence threshold in (0, 1]; factor: Fast-dLLM factor (> 0); both need
      remasking="low_confidence" with confidence max_prob or margin, and exclude each other.
    cache: None / "none", "prefix" or "dual"; cache_refresh: full forward every k steps within a block (0 = only at
      the block start).

  Returns (tokens [B, L] int32, stats) with stats:
    nfe: logits_fn calls (two per guided step); nfe_full: of which full-sequence passes; steps: decoding iterations
    that called the network; row_steps [B]: steps in which a row committed or could commit; committed [B, max_steps]:
    tokens committed by a row at each of its steps (zero padded; max_steps = steps for the fixed schedule, gen_length
    otherwise); tokens_per_step [B]; prophet_step [B]: the row step at which Prophet fired (-1 = never).
  Every static argument is validated (ValueError) before anything is traced.
  """
  canvas = check_canvas(canvas, mask_id)
  b, length = canvas.shape
  cache = None if cache in (None, "none") else cache
  if gen_length is None:
    gen_length = length - gen_start
  if block_length is None or block_length == 0:
    block_length = gen_length
  adaptive = threshold is not None or factor is not None
  if gen_start < 0 or gen_length < 1 or gen_start + gen_length > length:
    raise ValueError(f"generated region [{gen_start}, {gen_start + gen_length}) does not fit canvas length {length} "
                     "(is the prompt longer than the canvas?)")
  if block_length < 1 or gen_length % block_length:
    raise ValueError(f"gen_length ({gen_length}) must be a positive multiple of block_length ({block_length})")
  num_blocks = gen_length // block_length
  if steps is None:
    if not (adaptive or prophet):
      raise ValueError("steps is required unless threshold, factor or prophet is given")
  elif steps < 1 or steps % num_blocks:
    raise ValueError(f"steps ({steps}) must be a positive multiple of the number of blocks ({num_blocks})")
  fixed = steps is not None and not adaptive  # Prophet alone rides on the fixed schedule when steps is given
  if remasking not in REMASKING:
    raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")
  if confidence not in CONFIDENCE:
    raise ValueError(f"confidence must be one of {CONFIDENCE}, got {confidence!r}")
  if temperature < 0 or position_temperature < 0:
    raise ValueError(f"temperature and position_temperature must be >= 0, got {temperature}, {position_temperature}")
  check_precision(precision)
  if cfg_scale < 0:
    raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
  if threshold is not None and factor is not None:
    raise ValueError("give threshold or factor, not both")
  if threshold is not None and not 0.0 < threshold <= 1.0:
    raise ValueError(f"threshold must be in (0, 1], got {threshold}")
  if factor is not None and not factor > 0.0:
    raise ValueError(f"factor must be > 0, got {factor}")
  if adaptive and (remasking != "low_confidence" or confidence == "neg_entropy" or position_temperature > 0):
    raise ValueError("threshold/factor decoding needs remasking='low_confidence', confidence 'max_prob' or 'margin' "
                     "and position_temperature=0")
  if noise not in NOISE:
    raise ValueError(f"noise must be one of {NOISE}, got {noise!r}")
  if cache not in (None, "prefix", "dual"):
    raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
  if cache_refresh < 0:
    raise ValueError(f"cache_refresh must be >= 0 (0 = once per block), got {cache_refresh}")
  if cache is not None and logit_shift and gen_start < 1:
    raise ValueError("logit_shift with a K/V cache needs at least one token before gen_start (a prompt or BOS): "
                     "position gen_start reads the logits of position gen_start - 1")
  if prophet and len(prophet_gaps) != 3:
    raise ValueError(f"prophet_gaps must be three thresholds (early, middle, late), got {prophet_gaps}")
  if eos_id is not None and not 0 <= eos_id != mask_id:
    raise ValueError(f"eos_id must be a token id other than mask_id, got {eos_id}")

  if cache is None:
    check_logits_fn(logits_fn, canvas, mask_id)
  else:
    check_logits_fn(lambda c, t: logits_fn(c, t, 0, None), canvas, mask_id)

  keys = row_keys(key, b)
  spb = steps // num_blocks if fixed else None
  max_steps = steps if fixed else gen_length
  gen_end = gen_start + gen_length
  idx = jnp.arange(length, dtype=jnp.int32)
  gen_region = (idx >= gen_start) & (idx < gen_end)
  n_gen = jnp.sum((canvas == mask_id) & gen_region[None], axis=1)  # [B] positions to generate
  prompt_pos = (idx[None] < gen_start) & (canvas != PAD)
  rows = jnp.arange(b)
  calls_per_step = 2 if cfg_scale > 0 else 1
  if cache is not None:
    cache_shape = jax.eval_shape(lambda c, t: logits_fn(c, t, 0, None)[1], canvas, jnp.zeros((b,), jnp.float32))
    cache0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shape)
    cache0 = (cache0, cache0 if cfg_scale > 0 else jnp.zeros((), jnp.int32))
  else:
    cache0 = jnp.zeros((), jnp.int32)  # placeholder carry

  def time_of(tokens):
    still = jnp.sum((tokens == mask_id) & gen_region[None], axis=1)
    return still.astype(jnp.float32) / jnp.maximum(n_gen, 1).astype(jnp.float32)

  def guided(cond, un):
    return cond if un is None else un + (cfg_scale + 1.0) * (cond - un)

  def unconditional(tokens):
    return jnp.where(prompt_pos, mask_id, tokens)

  def window_logits(tokens, kv, w_lo, width, block_step):
    """Logits [B, W, V] for positions [w_lo, w_lo + W), the new cache, and whether this was a full pass."""
    t = time_of(tokens)
    if cache is None:
      cond = logits_fn(tokens, t).astype(jnp.float32)
      un = logits_fn(unconditional(tokens), t).astype(jnp.float32) if cfg_scale > 0 else None
      logits = guided(cond, un)
      if logit_shift:
        logits = shift_logits(logits)
      return jax.lax.dynamic_slice_in_dim(logits, w_lo, width, axis=1), kv, jnp.array(True)
    refresh = block_step == 0
    if cache_refresh > 0:
      refresh = refresh | (block_step % cache_refresh == 0)
    # With CFG the unconditional pass keeps its own cache: kv = (conditional cache, unconditional cache).

    def full():
      cond, new = logits_fn(tokens, t, 0, kv[0])
      un, new_un = logits_fn(unconditional(tokens), t, 0, kv[1]) if cfg_scale > 0 else (None, kv[1])
      logits = guided(cond.astype(jnp.float32), None if un is None else un.astype(jnp.float32))
      if logit_shift:
        logits = shift_logits(logits)
      return jax.lax.dynamic_slice_in_dim(logits, w_lo, width, axis=1), (new, new_un)

    def part():
      # logit shift: position i reads the logits of i - 1, so the window starts one position earlier
      lo, w = (w_lo - 1, width + 1) if logit_shift else (w_lo, width)
      cond, new = logits_fn(jax.lax.dynamic_slice_in_dim(tokens, lo, w, axis=1), t, lo, kv[0])
      un, new_un = None, kv[1]
      if cfg_scale > 0:
        un, new_un = logits_fn(jax.lax.dynamic_slice_in_dim(unconditional(tokens), lo, w, axis=1), t, lo, kv[1])
        un = un.astype(jnp.float32)
      logits = guided(cond.astype(jnp.float32), un)
      return (logits[:, :width] if logit_shift else logits), (new, new_un)

    logits, kv = jax.lax.cond(refresh, full, part)
    return logits, kv, refresh

  def decode_step(carry, blo, w_lo, width, block_step, want):
    """One step for the block [blo, blo + block_length) seen through the window [w_lo, w_lo + width).
    `want` [B] is the fixed-schedule count, or None for threshold / factor / Prophet-only decoding."""
    tokens, kv, nfe, nfe_full, n_iter, row_step, committed, rush, fired = carry
    pos = w_lo + jnp.arange(width, dtype=jnp.int32)
    win = jax.lax.dynamic_slice_in_dim(tokens, w_lo, width, axis=1)
    masked = win == mask_id
    in_block = (pos >= blo) & (pos < blo + block_length)
    eligible = masked & in_block[None]
    active = jnp.any(eligible, axis=1)
    if want is not None:
      active = active & ((want > 0) | rush)
    run = jnp.any(active)

    def compute():
      logits, new_kv, was_full = window_logits(tokens, kv, w_lo, width, block_step)
      logits = suppress_mask(logits, mask_id)
      k_step = step_keys(keys, row_step)
      # noise="position": one Gumbel draw per position for the whole decode (the draw is then a deterministic function
      # of the logits, so decodes that differ only in their step schedule or cache can be compared token by token)
      k_tok = subkey(k_step if noise == "step" else keys, 0)
      k_pos = subkey(k_step, 1)
      from_end = positions_from_end(length, w_lo, width)
      greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      x0 = greedy if temperature == 0 else sample_tokens(k_tok, from_end, logits, temperature, precision)
      if remasking == "random":
        score = uniform_noise(k_pos, from_end)
      else:
        score = confidence_of(logits, x0, confidence)
      if position_temperature > 0:
        score = score / position_temperature + gumbel_noise(k_pos, from_end, 1)[..., 0]
      score = jnp.where(eligible, score, -jnp.inf)
      order = jnp.argsort(-score, axis=1, stable=True)  # best first; ties -> lower position first
      rank = jnp.argsort(order, axis=1)
      if want is not None:
        n = want
      elif threshold is not None:
        n = jnp.maximum(jnp.sum(score >= threshold, axis=1), 1)
      elif factor is not None:
        n = factor_count(jnp.take_along_axis(score, order, axis=1), factor)
      else:
        n = jnp.ones((b,), jnp.int32)  # Prophet without a schedule: one token per step until it fires
      commit = eligible & (rank < n[:, None])
      now = rush
      if prophet:
        l1, l2 = top2(logits)
        gap = jnp.where(eligible, l1 - l2, 0.0)
        mean_gap = jnp.sum(gap, axis=1) / jnp.maximum(jnp.sum(eligible, axis=1), 1)
        left = jnp.sum((tokens == mask_id) & gen_region[None], axis=1)
        progress = 1.0 - left.astype(jnp.float32) / jnp.maximum(n_gen, 1).astype(jnp.float32)
        now = rush | (active & (mean_gap >= prophet_threshold(progress, prophet_gaps)))
      everything = masked & ((pos >= gen_start) & (pos < gen_end))[None]
      commit = jnp.where(now[:, None], everything, commit) & active[:, None]
      new_win = jnp.where(commit, jnp.where(now[:, None], greedy, x0), win)
      new_tokens = eos_fill(jax.lax.dynamic_update_slice_in_dim(tokens, new_win, w_lo, axis=1), eos_id, mask_id,
                            gen_start, gen_end)
      return new_tokens, new_kv, jnp.sum(commit, axis=1).astype(jnp.int32), now, was_full

    zero = jnp.zeros((b,), jnp.int32)
    tokens, kv, count, now, was_full = jax.lax.cond(
        run, compute, lambda: (tokens, kv, zero, rush, jnp.array(False)))
    nfe = nfe + jnp.where(run, calls_per_step, 0).astype(jnp.int32)
    nfe_full = nfe_full + jnp.where(run & was_full, calls_per_step, 0).astype(jnp.int32)
    n_iter = n_iter + run.astype(jnp.int32)
    committed = committed.at[rows, jnp.minimum(row_step, max_steps - 1)].add(count)
    fired = jnp.where(now & ~rush, row_step, fired)
    # Fixed schedule: rows step in lock-step (step j of a block has the same key in every row). Otherwise a row only
    # counts the steps in which it could commit.
    row_step = row_step + (1 if want is not None else active.astype(jnp.int32))
    return tokens, kv, nfe, nfe_full, n_iter, row_step, committed, now, fired

  def block_body(blk, carry, w_lo=None, width=None):
    blo = gen_start + blk * block_length
    if w_lo is None:  # uncached: the whole region; dual: the block
      w_lo, width = (gen_start, gen_length) if cache is None else (blo, block_length)
    if fixed:
      in_block = (idx >= blo) & (idx < blo + block_length)
      m = jnp.sum((carry[0] == mask_id) & in_block[None], axis=1)  # [B] masked at block start
      base, rem = m // spb, m % spb
      return jax.lax.fori_loop(
          0, spb, lambda j, c: decode_step(c, blo, w_lo, width, j, base + (j < rem).astype(jnp.int32)), carry)

    def cond(state):
      c, i = state
      in_block = (idx >= blo) & (idx < blo + block_length)
      return (i < block_length) & jnp.any((c[0] == mask_id) & in_block[None])

    def body(state):
      c, i = state
      return decode_step(c, blo, w_lo, width, i, None), i + 1

    carry, _ = jax.lax.while_loop(cond, body, (carry, jnp.array(0, jnp.int32)))
    return carry

  zeros_b = jnp.zeros((b,), jnp.int32)
  carry = (eos_fill(canvas, eos_id, mask_id, gen_start, gen_end), cache0, jnp.array(0, jnp.int32), jnp.array(0, jnp.int32),
           jnp.array(0, jnp.int32), zeros_b, jnp.zeros((b, max_steps), jnp.int32), jnp.zeros((b,), bool),
           jnp.full((b,), -1, jnp.int32))
  if cache == "prefix":  # the window [block start, L) shrinks block by block: one static shape per block
    for blk in range(num_blocks):
      lo = gen_start + blk * block_length
      carry = block_body(blk, carry, lo, length - lo)
  else:
    carry = jax.lax.fori_loop(0, num_blocks, block_body, carry)
  tokens, _, nfe, nfe_full, n_iter, row_steps, committed, _, fired = carry
  done = n_gen - jnp.sum((tokens == mask_id) & gen_region[None], axis=1)
  stats = {"nfe": nfe, "nfe_full": nfe_full, "steps": n_iter, "row_steps": row_steps, "committed": committed,
           "tokens_per_step": done.astype(jnp.float32) / jnp.maximum(row_steps, 1).astype(jnp.float32),
           "prophet_step": fired}
  return tokens, stats
