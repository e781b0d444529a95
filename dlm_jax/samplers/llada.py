"""LLaDA generation: semi-autoregressive blocks with low-confidence or random remasking (Nie et al. 2025, "Large
Language Diffusion Models", Sec. 2.4 and App. B), with the training-free accelerations of Fast-dLLM (Wu et al. 2025,
"Fast-dLLM: Training-free Acceleration of Diffusion LLM by Enabling KV Cache and Parallel Decoding": confidence
threshold, factor rule, prefix and dual K/V caches), Prophet early commit (Li et al. 2025, "Diffusion Language Models
Know the Answer Before Decoding"), Dream's confidence orderings and logit shift (Ye et al. 2025, "Dream 7B"),
classifier-free guidance and EOS stopping.

The generated region [gen_start, gen_start + gen_length) is split into blocks of `block_length` that are decoded left
to right. Within the current block, each step takes the network's prediction x0 at every still-masked position,
scores it by a confidence and commits some of the best-scoring positions; committed tokens never change again.

How many positions a step commits (`CommitPolicy`):
  * fixed schedule (default): `steps` are shared equally by the blocks (steps_per_block = steps // num_blocks). With
    m masked positions in a row's block at the start of the block, step j of that block commits
    m // steps_per_block + (1 if j < m % steps_per_block else 0) positions (LLaDA's `get_num_transfer_tokens`).
  * `threshold` (Fast-dLLM): every masked position of the block with confidence >= threshold, and always at least the
    most confident one (so decoding cannot stall; threshold = 1.0 therefore commits one token per step unless a
    confidence is exactly 1). The number of steps is data dependent: each block loops until it has no mask left
    (at most block_length steps, as every step commits >= 1).
  * `factor` (Fast-dLLM): sort the block's masked confidences c(1) >= c(2) >= ...; commit the leading ones up to the
    first n >= 2 with c(n) < 1 - factor / (n + 1), and at least 1 (`factor_count`: the reference's exact rule, including
    its commit-all when the first failure is the last candidate).
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

K/V caches (`cache`, Fast-dLLM Sec. 3; `CacheWindow`): `logits_fn` is then a cache-aware function
  fn(window [B, W], t [B], start, cache) -> (logits [B, W, V], cache);   fn(canvas, t, 0, None) must work (full pass)
such as `dlm_jax.model.cached_logits_fn`. The first step of every block (and, with `cache_refresh` = k > 0, every k-th
step of a block) is a full forward that rebuilds the cache; the other steps feed only a window: "prefix" = from the
block start to the end of the sequence (keys / values before the block come from the cache), "dual" = the block alone
(the suffix's keys / values are stale until the next refresh). cache_refresh = 1 is exactly the uncached sampler.
With CFG the unconditional pass keeps a cache of its own; with the logit shift the window starts one position early
(position i reads the logits of i - 1), which needs gen_start >= 1.
  Right padding with the prefix cache: so that every block's window has the same static width (L - gen_start), the
sampler appends gen_length - block_length PAD (-1) positions to the canvas (only with cache="prefix" and more than
one block). The cache-aware function then sees canvases [B, L + gen_length - block_length] whose tail is PAD and
windows that run into that tail; it must keep PAD positions out of attention wherever they are (on the right as well
as the usual left padding), as `dlm_jax.model.cached_logits_fn` does. Their logits are never used and the tail is cut
off before the tokens are returned. The price of one compiled program for any number of blocks: full passes cover the
longer canvas, and later blocks' windows do not shrink.

Conventions (see `dlm_jax.samplers.common`): left-padded prompts (PAD = -1), per-row and per-position randomness
(a row decodes the same alone or in any batch), the un-noised logits for confidences, temperature 0 = greedy,
Gumbel-max sampling in float32 or float64 (`precision`). CFG (cfg_scale > 0): un = logits_fn(tokens with every prompt
position masked), logits = un + (cfg_scale + 1) (cond - un); both calls count towards NFE. A step in which no row has
anything to commit makes no network call; `stats['nfe']` counts real calls.

The whole decode is one jit-able function with static shapes (`decode`): a `lax.fori_loop` over blocks around a
`lax.fori_loop` over steps (fixed schedule) or a `lax.while_loop` (threshold / factor / Prophet), so the compiled
program does not grow with the number of blocks or steps.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax import registry
from dlm_jax.samplers.block import discrete

from dlm_jax.samplers.common import (PAD, check_canvas, check_logits_fn, check_precision, eos_fill, gumbel_noise,
                                     positions_from_end, row_keys, sample_tokens, shift_logits, step_keys, subkey,
                                     uniform_noise)
from dlm_jax.samplers.common import suppress_mask as remove_mask_class

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
  """Fast-dLLM factor rule on confidences sorted in descending order along the last axis (-inf = not a candidate), as
  Fast-dLLM's `get_transfer_index_dynamic` computes it: with N candidates and thresholds 1 - factor / (n + 1) for
  n = 2 .. N (none for n = 1), the count is the number of leading confidences before the first one below its threshold;
  when that first one is the last candidate, or none is below, all N (the reference's `top_i == len - 1` rule); at
  least 1 when there is any candidate and 0 otherwise.
  """
  w = sorted_conf.shape[-1]
  n = np.arange(1, w + 1, dtype=np.float64)
  thresh = jnp.asarray(np.where(n == 1, -1.0, 1.0 - factor / (n + 1.0)).astype(np.float32))
  valid = jnp.isfinite(sorted_conf)
  total = jnp.sum(valid, axis=-1).astype(jnp.int32)
  fail = valid & (sorted_conf < thresh)
  first = jnp.where(jnp.any(fail, axis=-1), jnp.argmax(fail, axis=-1), total - 1).astype(jnp.int32)
  count = jnp.where((first == 0) | (first == total - 1), first + 1, first)
  return jnp.where(total > 0, count, 0)


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


# --- (1) the commit policy: how many and which positions a step commits ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class CommitPolicy:
  """How many of the current block's masked positions a step commits, which ones, and to which tokens.

  steps_per_block: the fixed schedule's steps per block, or None (threshold / factor / Prophet alone: data-dependent
  steps). threshold, factor: Fast-dLLM's rules (at most one is set). prophet_gaps: Prophet's thresholds, None = off.
  The other fields are `llada`'s arguments of the same name.
  """
  steps_per_block: Optional[int]
  remasking: str
  confidence: str
  position_temperature: float
  temperature: float
  precision: str
  threshold: Optional[float]
  factor: Optional[float]
  prophet_gaps: Optional[tuple]
  noise: str

  def scheduled(self, masked_at_start: jax.Array, block_step) -> jax.Array:
    """[B] fixed-schedule count of a block's step `block_step` (the jnp form of `commit_counts`)."""
    spb = self.steps_per_block
    return masked_at_start // spb + (block_step < masked_at_start % spb).astype(jnp.int32)

  def active(self, eligible: jax.Array, want: Optional[jax.Array], rush: jax.Array) -> jax.Array:
    """[B]: rows that can commit at this step (a masked block position, and a non-zero scheduled count unless Prophet
    has fired for the row)."""
    active = jnp.any(eligible, axis=1)
    return active if want is None else active & ((want > 0) | rush)

  def count(self, score: jax.Array, order: jax.Array, want: Optional[jax.Array]) -> jax.Array:
    """[B] number of positions to commit: the schedule's `want`, or the threshold / factor rule on the scores (-inf
    off the eligible positions; `order` sorts them best first), or one (Prophet without a schedule, until it fires)."""
    if want is not None:
      return want
    if self.threshold is not None:
      return jnp.maximum(jnp.sum(score >= self.threshold, axis=1), 1)
    if self.factor is not None:
      return factor_count(jnp.take_along_axis(score, order, axis=1), self.factor)
    return jnp.ones(score.shape[:1], jnp.int32)

  def prophet_fires(self, logits: jax.Array, eligible: jax.Array, progress: jax.Array) -> jax.Array:
    """[B]: Prophet's mean top-1 minus top-2 logit gap over the eligible positions reaches its threshold."""
    l1, l2 = top2(logits)
    gap = jnp.where(eligible, l1 - l2, 0.0)
    mean_gap = jnp.sum(gap, axis=1) / jnp.maximum(jnp.sum(eligible, axis=1), 1)
    return mean_gap >= prophet_threshold(progress, self.prophet_gaps)

  def decide(self, logits: jax.Array, keys: jax.Array, row_step: jax.Array, from_end: jax.Array, eligible: jax.Array,
             visible: jax.Array, active: jax.Array, want: Optional[jax.Array], rush: jax.Array, progress: jax.Array
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One step's decision over a window of W positions.

    logits [B, W, V] (mask class suppressed); keys [B] row keys; row_step [B] each row's step number; from_end [W]
    the positions' per-position noise index; eligible [B, W] the block's masked positions; visible [B, W] every
    masked position of the generated region (what Prophet commits); active [B] (`active`); want [B] the fixed
    schedule's counts or None; rush [B] Prophet fired at an earlier step; progress [B] decoded fraction of the region.
    Returns (commit [B, W] bool, tokens [B, W] to write there, now [B]: the row commits everything it sees).
    """
    k_step = step_keys(keys, row_step)
    # noise="position": one Gumbel draw per position for the whole decode (the draw is then a deterministic function
    # of the logits, so decodes that differ only in their step schedule or cache can be compared token by token)
    k_tok = subkey(k_step if self.noise == "step" else keys, 0)
    k_pos = subkey(k_step, 1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x0 = greedy if self.temperature == 0 else sample_tokens(k_tok, from_end, logits, self.temperature, self.precision)
    if self.remasking == "random":
      score = uniform_noise(k_pos, from_end)
    else:
      score = confidence_of(logits, x0, self.confidence)
    if self.position_temperature > 0:
      score = score / self.position_temperature + gumbel_noise(k_pos, from_end, 1)[..., 0]
    score = jnp.where(eligible, score, -jnp.inf)
    order = jnp.argsort(-score, axis=1, stable=True)  # best first; ties -> lower position first
    rank = jnp.argsort(order, axis=1)
    n = self.count(score, order, want)
    commit = eligible & (rank < n[:, None])
    now = rush
    if self.prophet_gaps is not None:
      now = rush | (active & self.prophet_fires(logits, eligible, progress))
    commit = jnp.where(now[:, None], visible, commit) & active[:, None]
    return commit, jnp.where(now[:, None], greedy, x0), now


# --- (2) the window / cache strategy: which positions a network call computes -----------------------------------------


@dataclasses.dataclass(frozen=True)
class CacheWindow:
  """The positions a step's network call computes, and how: cache None = a full forward of the canvas, read at the
  whole generated region; "prefix" = a window [block start, block start + L - gen_start) over a canvas padded on the
  right (see the module docstring); "dual" = the block. With a cache, the first step of a block and every
  `cache_refresh`-th step are full forwards that rebuild it. CFG adds the unconditional pass (prompt masked), with a
  cache of its own; the logit shift reads position i's logits at i - 1.

  The cache state `kv` is the pair (conditional cache, unconditional cache); unused entries are int32 placeholders.
  """
  logits_fn: Callable
  cache: Optional[str]
  cache_refresh: int
  cfg_scale: float
  logit_shift: bool
  mask_id: int
  length: int  # L, the caller's canvas length
  gen_start: int
  gen_length: int
  block_length: int

  @property
  def pad(self) -> int:
    """PAD positions appended on the right so that the prefix window of the last block fits."""
    return self.gen_length - self.block_length if self.cache == "prefix" else 0

  @property
  def width(self) -> int:
    """The static width W of every window."""
    if self.cache is None:
      return self.gen_length
    return self.length - self.gen_start if self.cache == "prefix" else self.block_length

  def start(self, block_lo: jax.Array) -> jax.Array:
    """Where the window of the block starting at `block_lo` begins."""
    return jnp.asarray(self.gen_start if self.cache is None else block_lo, jnp.int32)

  def init(self, canvas: jax.Array) -> tuple[jax.Array, tuple]:
    """(the working canvas [B, L + pad], the initial kv state)."""
    tokens = jnp.pad(canvas, ((0, 0), (0, self.pad)), constant_values=PAD) if self.pad else canvas
    none = jnp.zeros((), jnp.int32)
    if self.cache is None:
      return tokens, (none, none)
    shape = jax.eval_shape(lambda c, t: self.logits_fn(c, t, 0, None)[1], tokens,
                           jnp.zeros(tokens.shape[:1], jnp.float32))
    kv = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
    return tokens, (kv, kv if self.cfg_scale > 0 else none)

  def finish(self, tokens: jax.Array) -> jax.Array:
    """The caller's [B, L] canvas from the working one."""
    return tokens[:, :self.length]

  def _guided(self, tokens: jax.Array, t: jax.Array, kv: tuple, lo=None, width: Optional[int] = None):
    """float32 (guided) logits of the canvas, or of its window [lo, lo + width), and the new kv state."""

    def call(x, cache):
      if lo is not None:
        x = jax.lax.dynamic_slice_in_dim(x, lo, width, axis=1)
      if self.cache is None:
        return self.logits_fn(x, t), cache
      return self.logits_fn(x, t, 0 if lo is None else lo, cache)

    cond, new = call(tokens, kv[0])
    cond = cond.astype(jnp.float32)
    if self.cfg_scale == 0:
      return cond, (new, kv[1])
    idx = jnp.arange(tokens.shape[1])
    un, new_un = call(jnp.where((idx[None] < self.gen_start) & (tokens != PAD), self.mask_id, tokens), kv[1])
    un = un.astype(jnp.float32)
    return un + (self.cfg_scale + 1.0) * (cond - un), (new, new_un)

  def _full(self, tokens, t, kv, lo):
    logits, kv = self._guided(tokens, t, kv)
    if self.logit_shift:
      logits = shift_logits(logits)
    return jax.lax.dynamic_slice_in_dim(logits, lo, self.width, axis=1), kv

  def _part(self, tokens, t, kv, lo):
    if not self.logit_shift:
      return self._guided(tokens, t, kv, lo, self.width)
    # position i reads the logits of i - 1, so the window starts one position earlier
    logits, kv = self._guided(tokens, t, kv, lo - 1, self.width + 1)
    return logits[:, :self.width], kv

  def logits(self, tokens: jax.Array, t: jax.Array, kv: tuple, block_lo: jax.Array, block_step: jax.Array
             ) -> tuple[jax.Array, tuple, jax.Array]:
    """(logits [B, W, V] for the window of the block starting at `block_lo`, the new kv state, whether this was a
    full pass) at step `block_step` of the block."""
    lo = self.start(block_lo)
    if self.cache is None:
      logits, kv = self._full(tokens, t, kv, lo)
      return logits, kv, jnp.array(True)
    refresh = block_step == 0
    if self.cache_refresh > 0:
      refresh = refresh | (block_step % self.cache_refresh == 0)
    logits, kv = jax.lax.cond(refresh, lambda: self._full(tokens, t, kv, lo), lambda: self._part(tokens, t, kv, lo))
    return logits, kv, refresh


# --- (3) the loop over blocks and steps -------------------------------------------------------------------------------


class _State(NamedTuple):
  tokens: jax.Array  # [B, L + pad] working canvas
  kv: tuple  # CacheWindow's cache state
  nfe: jax.Array
  nfe_full: jax.Array
  n_iter: jax.Array  # steps that called the network
  row_step: jax.Array  # [B]
  committed: jax.Array  # [B, max_steps]
  rush: jax.Array  # [B] Prophet has fired: commit everything visible
  fired: jax.Array  # [B] row step at which Prophet fired, -1 = never


def decode(policy: CommitPolicy, window: CacheWindow, keys: jax.Array, canvas: jax.Array, *, mask_id: int,
           eos_id: Optional[int], max_steps: int, suppress_mask: bool = True) -> tuple[jax.Array, dict]:
  """Decodes the blocks left to right (one `lax.fori_loop`), each with the policy's steps, seen through the window;
  returns (tokens [B, L], stats) as `llada` documents them. `suppress_mask` False keeps the mask class in the
  softmax (the reference code of checkpoints whose mask id lies inside the vocabulary)."""
  b = canvas.shape[0]
  gen_start, gen_length, block_length = window.gen_start, window.gen_length, window.block_length
  gen_end = gen_start + gen_length
  tokens, kv = window.init(canvas)
  idx = jnp.arange(tokens.shape[1], dtype=jnp.int32)
  gen_region = (idx >= gen_start) & (idx < gen_end)
  n_gen = jnp.sum((tokens == mask_id) & gen_region[None], axis=1)  # [B] positions to generate
  rows = jnp.arange(b)
  width = window.width
  calls_per_step = 2 if window.cfg_scale > 0 else 1

  def still_masked(tokens):
    return jnp.sum((tokens == mask_id) & gen_region[None], axis=1)

  def step(s: _State, blo, block_step, want) -> _State:
    """One step for the block [blo, blo + block_length); `want` [B] is the fixed-schedule count or None."""
    lo = window.start(blo)
    pos = lo + jnp.arange(width, dtype=jnp.int32)
    win = jax.lax.dynamic_slice_in_dim(s.tokens, lo, width, axis=1)
    masked = win == mask_id
    eligible = masked & ((pos >= blo) & (pos < blo + block_length))[None]
    active = policy.active(eligible, want, s.rush)
    run = jnp.any(active)

    def compute():
      t = still_masked(s.tokens).astype(jnp.float32) / jnp.maximum(n_gen, 1).astype(jnp.float32)
      logits, new_kv, was_full = window.logits(s.tokens, t, s.kv, blo, block_step)
      visible = masked & ((pos >= gen_start) & (pos < gen_end))[None]
      logits = remove_mask_class(logits, mask_id) if suppress_mask else logits
      commit, values, now = policy.decide(
          logits, keys, s.row_step, positions_from_end(window.length, lo, width), eligible, visible, active, want,
          s.rush, 1.0 - t)
      new_tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, jnp.where(commit, values, win), lo, axis=1)
      new_tokens = eos_fill(new_tokens, eos_id, mask_id, gen_start, gen_end)
      return new_tokens, new_kv, jnp.sum(commit, axis=1).astype(jnp.int32), now, was_full

    tokens, kv, count, now, was_full = jax.lax.cond(
        run, compute, lambda: (s.tokens, s.kv, jnp.zeros((b,), jnp.int32), s.rush, jnp.array(False)))
    calls = jnp.where(run, calls_per_step, 0).astype(jnp.int32)
    # Fixed schedule: rows step in lock-step (step j of a block has the same key in every row). Otherwise a row only
    # counts the steps in which it could commit.
    return _State(tokens=tokens, kv=kv, nfe=s.nfe + calls, nfe_full=s.nfe_full + jnp.where(was_full, calls, 0),
                  n_iter=s.n_iter + run.astype(jnp.int32),
                  row_step=s.row_step + (1 if want is not None else active.astype(jnp.int32)),
                  committed=s.committed.at[rows, jnp.minimum(s.row_step, max_steps - 1)].add(count),
                  rush=now, fired=jnp.where(now & ~s.rush, s.row_step, s.fired))

  def block(blk, s: _State) -> _State:
    blo = gen_start + blk * block_length
    in_block = (idx >= blo) & (idx < blo + block_length)
    if policy.steps_per_block is not None:
      m = jnp.sum((s.tokens == mask_id) & in_block[None], axis=1)  # [B] masked at block start
      return jax.lax.fori_loop(0, policy.steps_per_block, lambda j, c: step(c, blo, j, policy.scheduled(m, j)), s)

    def unfinished(state):
      c, i = state
      return (i < block_length) & jnp.any((c.tokens == mask_id) & in_block[None])

    return jax.lax.while_loop(unfinished, lambda state: (step(state[0], blo, state[1], None), state[1] + 1),
                              (s, jnp.array(0, jnp.int32)))[0]

  zero = jnp.array(0, jnp.int32)
  s = _State(tokens=eos_fill(tokens, eos_id, mask_id, gen_start, gen_end), kv=kv, nfe=zero, nfe_full=zero, n_iter=zero,
             row_step=jnp.zeros((b,), jnp.int32), committed=jnp.zeros((b, max_steps), jnp.int32),
             rush=jnp.zeros((b,), bool), fired=jnp.full((b,), -1, jnp.int32))
  s = jax.lax.fori_loop(0, gen_length // block_length, block, s)
  done = n_gen - still_masked(s.tokens)
  stats = {"nfe": s.nfe, "nfe_full": s.nfe_full, "steps": s.n_iter, "row_steps": s.row_step,
           "committed": s.committed,
           "tokens_per_step": done.astype(jnp.float32) / jnp.maximum(s.row_step, 1).astype(jnp.float32),
           "prophet_step": s.fired}
  return window.finish(s.tokens), stats


def llada(logits_fn: Callable, key: jax.Array, canvas: jax.Array, *, mask_id: int, gen_start: int,
          gen_length: Optional[int] = None, block_length: Optional[int] = None, steps: Optional[int] = None,
          remasking: str = "low_confidence", confidence: str = "max_prob", position_temperature: float = 0.0,
          temperature: float = 0.0, precision: str = "float32", threshold: Optional[float] = None,
          factor: Optional[float] = None, cfg_scale: float = 0.0, logit_shift: bool = False,
          cache: Optional[str] = None, cache_refresh: int = 0, prophet: bool = False,
          prophet_gaps: Sequence[float] = PROPHET_GAPS, eos_id: Optional[int] = None,
          noise: str = "step", suppress_mask: bool = True) -> tuple[jax.Array, dict]:
  """Decodes the `mask_id` positions of canvas[:, gen_start:gen_start + gen_length] (see the module docstring).

  Args:
    logits_fn: (tokens [B, L] int32, t [B] float32) -> logits [B, L, V]; with `cache`, the cache-aware form (with
      cache="prefix" it also sees PAD positions appended on the right; see the module docstring).
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
    suppress_mask: give the mask class probability 0 (default); False keeps it in the softmax as LLaDA's and
      Fast-dLLM's reference code do (a predicted mask then leaves the position masked).

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
  _check_arguments(length, gen_start, gen_length, block_length, steps, adaptive, remasking, confidence,
                   position_temperature, temperature, precision, threshold, factor, cfg_scale, logit_shift, cache,
                   cache_refresh, prophet, prophet_gaps, eos_id, mask_id, noise)
  if cache is None:
    check_logits_fn(logits_fn, canvas, mask_id)
  else:
    check_logits_fn(lambda c, t: logits_fn(c, t, 0, None), canvas, mask_id)

  fixed = steps is not None and not adaptive  # Prophet alone rides on the fixed schedule when steps is given
  policy = CommitPolicy(
      steps_per_block=steps // (gen_length // block_length) if fixed else None, remasking=remasking,
      confidence=confidence, position_temperature=position_temperature, temperature=temperature, precision=precision,
      threshold=threshold, factor=factor, prophet_gaps=tuple(prophet_gaps) if prophet else None, noise=noise)
  window = CacheWindow(logits_fn=logits_fn, cache=cache, cache_refresh=cache_refresh, cfg_scale=cfg_scale,
                       logit_shift=logit_shift, mask_id=mask_id, length=length, gen_start=gen_start,
                       gen_length=gen_length, block_length=block_length)
  return decode(policy, window, row_keys(key, b), canvas, mask_id=mask_id, eos_id=eos_id,
                max_steps=steps if fixed else gen_length, suppress_mask=suppress_mask)


def _check_arguments(length, gen_start, gen_length, block_length, steps, adaptive, remasking, confidence,
                     position_temperature, temperature, precision, threshold, factor, cfg_scale, logit_shift, cache,
                     cache_refresh, prophet, prophet_gaps, eos_id, mask_id, noise) -> None:
  """`llada`'s static-argument checks, in order (the first problem is the ValueError)."""
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


# --- registry entry ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LladaOptions(registry.Draw, registry.Shift):
  """sampler.llada.*: semi-autoregressive blocks and remasking, Fast-dLLM parallel decoding and K/V caches, Prophet,
  classifier-free guidance, EOS stopping (module docstring)."""
  block_length: int = 0  # 0 = the whole generated region is one block
  remasking: str = "low_confidence"  # or "random"
  confidence: str = "max_prob"  # or "margin", "neg_entropy"
  threshold: float = 0.0  # 0 = off; in (0, 1]: commit every position at least this confident (always >= 1)
  factor: float = 0.0  # 0 = off; > 0: Fast-dLLM factor rule
  cfg_scale: float = 0.0  # classifier-free guidance (prompt masked for the unconditional call)
  position_temperature: float = 0.0  # > 0: sample the committed positions from softmax(confidence / this)
  cache: str = "none"  # "prefix" / "dual": Fast-dLLM K/V caches, rebuilt at every block start
  cache_refresh: int = 0  # also rebuild the cache every k steps within a block (0 = only at block starts)
  prophet: bool = False  # Prophet early commit: decode everything once the top-1/top-2 logit gap is large
  noise: str = "step"  # or "position": one Gumbel draw per position for the whole decode
  stop_at_eos: bool = False  # a row that committed EOS fills the rest with EOS

  def check(self, key, family, block_size):
    super().check(key, family, block_size)
    need = registry.need
    need(self.block_length >= 0, f"{key('block_length')} must be >= 0 (0 = one block), got {self.block_length}")
    need(self.remasking in REMASKING, f"{key('remasking')} must be one of {REMASKING}, got {self.remasking!r}")
    need(self.confidence in CONFIDENCE, f"{key('confidence')} must be one of {CONFIDENCE}, got {self.confidence!r}")
    need(0 <= self.threshold <= 1, f"{key('threshold')} must be in (0, 1] (0 = off), got {self.threshold}")
    need(self.factor >= 0, f"{key('factor')} must be >= 0 (0 = off), got {self.factor}")
    need(not (self.threshold and self.factor), f"set at most one of {key('threshold')} and {key('factor')}")
    need(not (self.threshold or self.factor) or (self.remasking == "low_confidence" and self.confidence != "neg_entropy"
                                                  and self.position_temperature == 0),
         f"{key('threshold')} / {key('factor')} decoding needs {key('remasking')}='low_confidence', {key('confidence')} "
         f"'max_prob' or 'margin' and {key('position_temperature')}=0")
    need(self.cfg_scale >= 0, f"{key('cfg_scale')} must be >= 0, got {self.cfg_scale}")
    need(self.position_temperature >= 0, f"{key('position_temperature')} must be >= 0, got {self.position_temperature}")
    need(self.cache in CACHES, f"{key('cache')} must be one of {CACHES}, got {self.cache!r}")
    need(self.cache_refresh >= 0, f"{key('cache_refresh')} must be >= 0 (0 = once per block), got {self.cache_refresh}")
    need(self.cache != "none" or self.cache_refresh == 0,
         f"{key('cache_refresh')} refreshes a K/V cache; set {key('cache')}=prefix or dual, or drop it")
    need(self.noise in NOISE, f"{key('noise')} must be one of {NOISE}, got {self.noise!r}")
    if block_size is not None:  # inside block diffusion's blocks
      for field, off, why in (("cache", "none", "block diffusion caches its clean blocks itself (sampler.block.cache)"),
                              ("cache_refresh", 0, "there is no LLaDA cache inside a block"),
                              ("cfg_scale", 0.0, "not available inside block diffusion's blocks"),
                              ("noise", "step", "not available inside block diffusion's blocks"),
                              ("stop_at_eos", False, "block diffusion stops rows itself: use sampler.block.stop_at_eos")):
        need(getattr(self, field) == off, f"{key(field)}: {why}; drop it")


def llada_steps(steps: int, block: int, sub_block: int) -> int:
  """sampler.steps counts steps per block under block diffusion; LLaDA inside a block of `block` tokens needs at most
  one step per token, and a multiple of its number of sub-blocks."""
  subs = block // sub_block if sub_block and block % sub_block == 0 else 1
  steps = min(steps, block)
  return max(subs, steps - steps % subs)


def _bind(net, opts, shared, *, length, gen_start, eos_id):
  gen_length = length - gen_start
  block_length = opts.block_length or gen_length
  if opts.threshold or opts.factor:
    steps = None
  elif net.block_size is None:
    steps = shared.steps
  else:
    steps = llada_steps(shared.steps, gen_length, block_length)
  sampler = functools.partial(
      llada, mask_id=net.mask_id, gen_start=gen_start, gen_length=gen_length, block_length=block_length, steps=steps,
      remasking=opts.remasking, confidence=opts.confidence, position_temperature=opts.position_temperature,
      temperature=shared.temperature, precision=opts.precision, threshold=opts.threshold or None,
      factor=opts.factor or None, cfg_scale=opts.cfg_scale, logit_shift=opts.logit_shift or net.logit_shift,
      cache=opts.cache, cache_refresh=opts.cache_refresh, prophet=opts.prophet, noise=opts.noise,
      eos_id=eos_id if opts.stop_at_eos else None, suppress_mask=net.suppress_mask)
  return sampler, opts.cache != "none"


registry.register_sampler(registry.SamplerSpec(
    "llada", ("masked", "block"), LladaOptions, discrete(_bind),
    "LLaDA semi-AR remasking, Dream orderings, Fast-dLLM threshold / factor decoding and prefix / dual K/V caches, "
    "Prophet early commit, CFG, EOS stopping",
    uses_steps=lambda opts: not (opts.threshold or opts.factor),
    steps_note="threshold / factor decoding runs until each block is decoded", greedy=True))
