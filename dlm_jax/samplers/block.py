"""Block diffusion sampling (BD3-LM, Arriola et al. 2025) and, at block size 1, KV-cached autoregressive sampling.

Blocks are generated left to right. Inside block k any masked sampler of this library decodes the block's masks
(`inner`: first-hitting by default, as in BD3-LM; ancestral with its no-change cache; LLaDA / Fast-dLLM with
sub-blocks and thresholds; ReMDM), seeing the clean blocks before it. Two ways to compute a block's logits:

  uncached  `logits_fn(tokens [B, L], t) -> [B, L, V]` on the whole canvas with block-causal attention (a block sees
            its own block and earlier ones; `dlm_jax.model.logits_fn(..., block_size=b)`), read at the block.
  cached    `cached_fn(window, t, start, cache) -> (logits, cache)` (`dlm_jax.model.cached_logits_fn(..., block_size=
            b)`): one prefill forward stores the K/V of the prompt; each denoising step feeds only the block, which
            attends to the cached clean blocks and itself; when the block is finished, one more forward stores its
            clean K/V (skipped after the last block).
With the same keys both give the same tokens (tested). At block size 1 each block is one token and every exact masked
sampler reduces to one draw from the model's distribution, so the loop draws it directly: a prefill, then one forward
per token over the window [previous token | current position] (which stores the previous token's K/V and predicts the
current one): KV-cached autoregressive decoding. Temperature, top-k and nucleus truncation (`common.truncated`) are
applied by the caller to the logits functions.

Rows: the canvas follows the library's convention (left padding with PAD, masks to generate after the prompt), but
blocks are counted from each row's first real token, so rows are left-aligned first: the result has every row's prompt
at position 0 and its generated tokens after it (a shorter prompt leaves room for more tokens). Prompts cannot hold
masks before their last token: generation is left to right (infilling needs the masked process).

Variable length (BD3-LM): with `eos_id`, a row stops after its first generated EOS; with `entropy_stop` > 0, a row
stops when the unigram entropy (nats) of its last `entropy_window` generated tokens falls below it, and that window is
dropped. A stopped row's remaining positions are PAD and it makes no more changes; the loop ends when every row has
stopped. Randomness is per row (block k of a row uses fold_in(row_key, k)), so a row decodes the same alone or in any
batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax import registry
from dlm_jax.errors import DLMError
from dlm_jax.samplers.common import (PAD, check_canvas, check_logits_fn, check_precision, row_keys, sample_tokens,
                                     step_keys, subkey, suppress_mask, truncated)


def left_align(canvas: jax.Array, mask_id: int) -> jax.Array:
  """[PAD ... | prompt | masks] rows -> [prompt | masks ...]: leading PAD moved to the end as masks."""
  b, length = canvas.shape
  npad = jnp.sum(canvas == PAD, axis=1)
  idx = jnp.arange(length, dtype=jnp.int32)[None] + npad[:, None]
  moved = jnp.take_along_axis(canvas, jnp.minimum(idx, length - 1), axis=1)
  return jnp.where(idx < length, moved, mask_id).astype(jnp.int32)


def unigram_entropy(tokens: jax.Array) -> jax.Array:
  """Entropy (nats) of the empirical token distribution of each row of tokens [B, W]."""
  w = tokens.shape[1]
  counts = jnp.sum(tokens[:, :, None] == tokens[:, None, :], axis=-1).astype(jnp.float32)  # count of each token's id
  return jnp.log(float(w)) - jnp.mean(jnp.log(counts), axis=-1)


def _check_prompts(tokens, mask_id: int) -> None:
  if isinstance(tokens, jax.core.Tracer):
    return
  t = np.asarray(tokens)
  is_mask = t == mask_id
  seen = np.cumsum(is_mask, axis=1) > 0
  bad = seen & ~is_mask & (t != PAD)
  if bad.any():
    r = int(np.argwhere(bad)[0][0])
    raise ValueError(f"row {r} has prompt tokens after a masked position; block diffusion generates left to right and "
                     "cannot infill (use the masked process for <|mask:N|> templates)")


def block_diffusion(logits_fn: Callable, key: jax.Array, canvas: jax.Array, *, block_size: int, mask_id: int,
                    inner: Optional[Callable] = None, temperature: float = 1.0, precision: str = "float32",
                    cached_fn: Optional[Callable] = None, eos_id: Optional[int] = None, entropy_stop: float = 0.0,
                    entropy_window: int = 256, suppress_mask: bool = True) -> tuple[jax.Array, dict]:
  """Generates the masks of `canvas` [B, L] block by block (see the module docstring).

  Args:
    logits_fn: uncached block-causal forward (tokens [B, L], t [B]) -> [B, L, V]; also used for the shape check.
    inner: a masked sampler `(logits_fn, keys, block [B, b]) -> (block, stats)` for block_size > 1, e.g.
      `functools.partial(first_hitting, mask_id=..., temperature=...)`; ignored at block size 1.
    temperature, precision: the draw at block size 1 (0 = greedy).
    cached_fn: the cache-aware forward; None = uncached.
    eos_id, entropy_stop, entropy_window: variable-length stopping (off when None / 0).
    suppress_mask: the autoregressive draw gives the mask class probability 0 (False: keep it, as a checkpoint's
      reference code whose mask id lies inside the vocabulary does).
  Returns: (tokens [B, L] left-aligned, PAD after a stop; stats {'nfe', 'steps', 'lengths'}).
  """
  check_precision(precision)
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  canvas = check_canvas(canvas, mask_id)
  b, length = canvas.shape
  if block_size < 1 or length % block_size:
    raise ValueError(f"the block size ({block_size}) must divide the canvas length ({length})")
  if block_size > 1 and inner is None:
    raise ValueError("block_size > 1 needs an inner masked sampler (e.g. functools.partial(first_hitting, ...))")
  if entropy_stop < 0 or entropy_window < 2:
    raise ValueError(f"entropy_stop must be >= 0 and entropy_window >= 2, got {entropy_stop}, {entropy_window}")
  if entropy_stop > 0 and entropy_window > canvas.shape[1]:
    raise ValueError(f"the entropy window ({entropy_window} tokens) is longer than the canvas ({canvas.shape[1]}), so "
                     "the entropy stop could never fire; lower the window (sampler.block.entropy_window)")
  check_logits_fn(logits_fn, canvas, mask_id)
  if cached_fn is not None:
    check_logits_fn(cached_fn, canvas, mask_id, (canvas, jnp.zeros((b,), jnp.float32), 0, None))
  _check_prompts(canvas, mask_id)
  keys = row_keys(key, b)
  tokens = left_align(canvas, mask_id)
  has_mask = jnp.any(tokens == mask_id, axis=1)
  first = jnp.where(has_mask, jnp.argmax(tokens == mask_id, axis=1), length).astype(jnp.int32)
  stop = _stopper(length, first, eos_id, entropy_stop, entropy_window)
  state = (tokens, ~has_mask)
  if block_size == 1:
    tokens, done, nfe, steps = _autoregressive(logits_fn, cached_fn, keys, state, first, mask_id, temperature,
                                               precision, stop, suppress_mask)
  else:
    tokens, done, nfe, steps = _blocks(logits_fn, cached_fn, inner, keys, state, first, block_size, stop)
  return tokens, {"nfe": nfe, "steps": steps, "lengths": jnp.sum(tokens != PAD, axis=1)}


def stop_ids_of(eos_id) -> tuple[int, ...]:
  """None, one id or several ids -> a tuple of stop ids."""
  if eos_id is None:
    return ()
  return (int(eos_id),) if np.ndim(eos_id) == 0 else tuple(int(i) for i in eos_id)


def is_stop(tokens: jax.Array, stop_ids: tuple[int, ...]) -> jax.Array:
  out = jnp.zeros(tokens.shape, bool)
  for i in stop_ids:
    out = out | (tokens == i)
  return out


def _stopper(length: int, first, eos_id, entropy_stop: float, window: int):
  """(tokens, done, end) -> (tokens, done): rows that stop once positions < end are decoded (`eos_id`: one stop id or
  several)."""
  idx = jnp.arange(length, dtype=jnp.int32)[None]
  stop_ids = stop_ids_of(eos_id)

  def stop(tokens, done, end):
    cut = jnp.full(first.shape, length, jnp.int32)
    if stop_ids:
      is_eos = is_stop(tokens, stop_ids) & (idx >= first[:, None]) & (idx < end)
      cut = jnp.minimum(cut, jnp.min(jnp.where(is_eos, idx + 1, length), axis=1))
    if entropy_stop > 0:
      win = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(end - window, 0), window, axis=1)
      low = (end - first >= window) & (unigram_entropy(win) < entropy_stop)
      cut = jnp.where(low, jnp.minimum(cut, end - window), cut)
    newly = (cut < length) & ~done
    tokens = jnp.where(newly[:, None] & (idx >= cut[:, None]), PAD, tokens)
    return tokens, done | newly

  return stop


def _feed(tokens):
  """Model input: PAD (stopped rows' tail) as token 0; those rows' outputs are never used."""
  return jnp.where(tokens == PAD, 0, tokens)


def _blocks(logits_fn, cached_fn, inner, keys, state, first, bs, stop):
  tokens, done = state
  b, length = tokens.shape
  n = length // bs
  t0 = jnp.zeros((b,), jnp.float32)
  nfe = jnp.array(0, jnp.int32)
  cache = None
  if cached_fn is not None:
    _, cache = cached_fn(_feed(tokens), t0, 0, None)  # prefill: the prompt's K/V
    nfe = nfe + 1

  def body(carry):
    k, tokens, cache, done, nfe = carry
    lo = k * bs
    blk = jax.lax.dynamic_slice_in_dim(tokens, lo, bs, axis=1)
    blk_in = jnp.where(done[:, None], 0, blk)  # stopped rows: nothing to decode
    if cached_fn is not None:
      def fn(x, t):
        return cached_fn(x, t, lo, cache)[0]
    else:
      feed = _feed(tokens)

      def fn(x, t):
        full = logits_fn(jax.lax.dynamic_update_slice_in_dim(feed, x, lo, axis=1), t)
        return jax.lax.dynamic_slice_in_dim(full, lo, bs, axis=1)
    new, st = inner(fn, step_keys(keys, k), blk_in)
    new = jnp.where(done[:, None], blk, new)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new, lo, axis=1)
    nfe = nfe + st["nfe"]
    if cached_fn is not None:  # store the finished block's clean K/V for the blocks after it
      cache, nfe = jax.lax.cond(k < n - 1, lambda: (cached_fn(_feed(new), t0, lo, cache)[1], nfe + 1),
                                lambda: (cache, nfe))
    tokens, done = stop(tokens, done, lo + bs)
    return k + 1, tokens, cache, done, nfe

  k0 = jnp.min(first) // bs
  k, tokens, _, done, nfe = jax.lax.while_loop(lambda c: (c[0] < n) & ~jnp.all(c[3]), body,
                                               (k0, tokens, cache, done, nfe))
  return tokens, done, nfe, k - k0


def _autoregressive(logits_fn, cached_fn, keys, state, first, mask_id, temperature, precision, stop, suppress=True):
  tokens, done = state
  b, length = tokens.shape
  t0 = jnp.zeros((b,), jnp.float32)

  def draw(i, logits_i, tokens, done):
    """Samples position i ([B, V] logits) in the rows where it is still masked."""
    k = subkey(step_keys(keys, i), 0)
    logits_i = logits_i.astype(jnp.float32)
    logits_i = suppress_mask(logits_i, mask_id) if suppress else logits_i
    tok = sample_tokens(k, jnp.reshape(length - i, (1,)).astype(jnp.int32), logits_i[:, None], temperature,
                        precision)[:, 0]
    ic = jnp.minimum(i, length - 1)
    cur = jax.lax.dynamic_index_in_dim(tokens, ic, axis=1, keepdims=False)
    write = (cur == mask_id) & ~done & (i < length)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, jnp.where(write, tok, cur), ic, axis=1)
    return stop(tokens, done, i + 1)

  i0 = jnp.min(first)
  if cached_fn is not None:
    logits, cache = cached_fn(_feed(tokens), t0, 0, None)  # prefill: K/V of the prompt, logits of its next token
  else:
    logits, cache = logits_fn(_feed(tokens), t0), None
  tokens, done = draw(i0, jax.lax.dynamic_index_in_dim(logits, jnp.minimum(i0, length - 1), axis=1,
                                                        keepdims=False), tokens, done)

  def body(carry):
    i, tokens, cache, done, nfe = carry
    if cached_fn is not None:
      window = jax.lax.dynamic_slice_in_dim(_feed(tokens), i - 1, 2, axis=1)  # [previous token | position i]
      logits, cache = cached_fn(window, t0, i - 1, cache)
      logits_i = logits[:, 1]
    else:
      logits_i = jax.lax.dynamic_index_in_dim(logits_fn(_feed(tokens), t0), i, axis=1, keepdims=False)
    tokens, done = draw(i, logits_i, tokens, done)
    return i + 1, tokens, cache, done, nfe + 1

  init = (i0 + 1, tokens, cache, done, jnp.array(1, jnp.int32))
  i, tokens, _, done, nfe = jax.lax.while_loop(lambda c: (c[0] < length) & ~jnp.all(c[3]), body, init)
  return tokens, done, nfe, i - i0


# --- the clean-block forwards of samplers with their own block loop (Fast-dLLM v2, SDAR) ------------------------------


def stopper(length: int, first, eos_id, entropy_stop: float, window: int):
  """Block diffusion's variable-length rules as `stop(tokens, done, end) -> (tokens, done)`: a row stops after its
  first stop id (`eos_id`: one id or several) or when the unigram entropy of its last `window` tokens falls below
  `entropy_stop`; what follows the cut becomes PAD."""
  return _stopper(length, first, eos_id, entropy_stop, window)


def feed(tokens: jax.Array) -> jax.Array:
  """Model input of a window: PAD as token 0 (PAD keys are kept out of attention by the cache's row layout)."""
  return _feed(tokens)


def check_block_canvas(logits_fn: Callable, cached_fn: Optional[Callable], canvas, mask_id: int) -> jax.Array:
  """The input checks of a block loop: int32 [B, L] canvas, logits functions of the right shape, prompts that do not
  infill."""
  canvas = check_canvas(canvas, mask_id)
  b = canvas.shape[0]
  check_logits_fn(logits_fn, canvas, mask_id)
  if cached_fn is not None:
    check_logits_fn(cached_fn, canvas, mask_id, (canvas, jnp.zeros((b,), jnp.float32), 0, None))
  _check_prompts(canvas, mask_id)
  return canvas


@dataclasses.dataclass(frozen=True)
class BlockForward:
  """Block-causal forwards for a sampler that runs its own block loop: the logits of a window of the canvas against the
  clean blocks before it.

  With `cached_fn` (`dlm_jax.model.cached_logits_fn(..., block_size=b)`), a window call reads the K/V cache for the
  positions before the window and writes the window's K/V into it: the block against the prefix cache, or a sub-block
  against the prefix and the block's cached K/V (Fast-dLLM v2's DualCache). Until the cache has been written once (no
  prefill: no row has a complete prompt block), a window call is a full forward of the canvas read at the window
  (block-causal attention makes that the same logits), which also gives the cache its row layout. Without a cache
  every call is a full forward of `logits_fn`. The cache state is (cache, written); t is 0 (the block family's network
  takes no time)."""
  logits_fn: Callable
  cached_fn: Optional[Callable]

  def init(self, tokens: jax.Array):
    b = tokens.shape[0]
    if self.cached_fn is None:
      return jnp.zeros((), jnp.int32), jnp.array(False)
    shape = jax.eval_shape(lambda c: self.cached_fn(c, jnp.zeros((b,), jnp.float32), 0, None)[1], tokens)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape), jnp.array(False)

  def full(self, tokens: jax.Array, state):
    """(logits [B, L, V] of a full forward, the new cache state: written)."""
    t0 = jnp.zeros(tokens.shape[:1], jnp.float32)
    if self.cached_fn is None:
      return self.logits_fn(tokens, t0).astype(jnp.float32), state
    logits, cache = self.cached_fn(tokens, t0, 0, None)
    return logits.astype(jnp.float32), (cache, jnp.array(True))

  def window(self, tokens: jax.Array, lo, width: int, state):
    """(logits [B, width, V] of the positions [lo, lo + width), the new cache state)."""
    def whole():
      logits, new = self.full(tokens, state)
      return jax.lax.dynamic_slice_in_dim(logits, lo, width, axis=1), new

    if self.cached_fn is None:
      return whole()
    cache, written = state

    def part():
      win = feed(jax.lax.dynamic_slice_in_dim(tokens, lo, width, axis=1))
      logits, new = self.cached_fn(win, jnp.zeros(tokens.shape[:1], jnp.float32), lo, cache)
      return logits.astype(jnp.float32), (new, jnp.array(True))

    return jax.lax.cond(written, part, whole)


def pad_to_blocks(tokens: jax.Array, block_size: int) -> jax.Array:
  """Right-pads [B, L] with PAD to a multiple of the block size (the last block's window then has the static width)."""
  extra = -tokens.shape[1] % block_size
  return jnp.pad(tokens, ((0, 0), (0, extra)), constant_values=PAD) if extra else tokens


# --- wiring: the masked samplers over a whole canvas or inside blocks ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockOptions(registry.Options):
  """Block diffusion's block-by-block generation, whatever sampler runs inside the blocks (sampler.block.*)."""
  cache: str = "prefix"  # "prefix" = K/V of the clean blocks; "none" = recompute every block from scratch
  stop_at_eos: bool = False  # a row ends after its first generated EOS
  entropy_stop: float = 0.0  # 0 = off; else end a row whose last entropy_window tokens have a lower unigram entropy
  entropy_window: int = 256  # BD3-LM's variable-length rule: 4.0 nats over 256 tokens

  def check(self, key, family, block_size):
    registry.need(self.cache in ("prefix", "none"), f"{key('cache')}={self.cache!r}: block diffusion caches the K/V "
                  "of its clean blocks; use 'prefix' or 'none'")
    registry.need(self.entropy_stop >= 0, f"{key('entropy_stop')} must be >= 0 (0 = off), got {self.entropy_stop}")
    registry.need(self.entropy_window >= 2, f"{key('entropy_window')} must be >= 2, got {self.entropy_window}")
    registry.need(self.entropy_stop > 0 or self.entropy_window == 256,
                  f"{key('entropy_window')} is only read with {key('entropy_stop')} > 0; set both or drop it")


registry.register_family_options("block", BlockOptions)


def block_options_of(name: str, net, family_options) -> BlockOptions:
  """The `sampler.block.*` options of a sampler that only runs block by block (fastdllm_v2, sdar); a model that
  decodes at once is a one-line error naming the sampler."""
  if net.block_size is None or family_options is None:
    raise DLMError(f"sampler.name={name} generates block by block: it needs a block diffusion model "
                   "(diffusion.process=block)")
  return family_options


def discrete(bind: Callable) -> Callable:
  """A `SamplerSpec.run` for a masked sampler, from `bind(net, options, shared, *, length, gen_start, eos_id) ->
  (sampler, wants_cache)`, `sampler(logits_fn, key, canvas) -> (tokens, stats)` decoding a canvas of `length` whose
  generated region starts at gen_start. Top-k / top-p truncation wraps the family's logits functions. For the masked
  family the sampler decodes the whole canvas (over the K/V-cached forward when it asks for it); for block diffusion
  it runs inside each block (`block_diffusion`, the family's options in sampler.block.*)."""

  def run(net, opts, shared, key, canvas, *, gen_start, eos_id, family_options=None):
    trunc = functools.partial(truncated, top_k=opts.top_k, top_p=opts.top_p, temperature=shared.temperature,
                              mask_id=net.mask_id if net.suppress_mask else None)
    if net.block_size is None:
      sampler, cached = bind(net, opts, shared, length=canvas.shape[1], gen_start=gen_start, eos_id=eos_id)
      return sampler(trunc(net.cached_logits_fn if cached else net.logits_fn), key, canvas)
    b, f = net.block_size, family_options
    inner = bind(net, opts, shared, length=b, gen_start=0, eos_id=None)[0] if b > 1 else None
    return block_diffusion(trunc(net.logits_fn), key, canvas, block_size=b, inner=inner,
                           cached_fn=trunc(net.cached_logits_fn) if f.cache == "prefix" else None,
                           eos_id=eos_id if f.stop_at_eos else None, entropy_stop=f.entropy_stop,
                           entropy_window=f.entropy_window, mask_id=net.mask_id, temperature=shared.temperature,
                           precision=opts.precision, suppress_mask=net.suppress_mask)

  return run
