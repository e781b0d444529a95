"""SDAR's block generation (Cheng et al. 2025, "SDAR: A Synergistic Diffusion-AutoRegression Paradigm for Scalable
Sequence Generation"; `block_diffusion_generate` of JetAstra/SDAR `generate.py`) for block diffusion checkpoints.

Rows are left-aligned and cut into blocks of the checkpoint's block size B from position 0 (`dlm_jax.samplers.block`).
One prefill forward stores the K/V of the complete prompt blocks (none when no row has one). Each block is then
decoded with up to steps + 1 forwards of the block against the cached clean blocks: step j draws x0 at every position
from the model's distribution (temperature T, then top-k, then top-p), the confidence of a position is the probability
of its draw under that truncated distribution, and the step commits, among the block's masked positions:

  sequential              the first k_j masked positions (left to right);
  low_confidence_static   the k_j most confident;
  low_confidence_dynamic  every one with confidence > threshold when there are at least k_j of them, else the k_j most
                          confident;

with the quota k_j = B // steps + (1 if j < B % steps else 0) (the remainder to the early steps). When the block has no
mask left, one more forward of the clean block stores its K/V (also after the last block, as the reference does: NFE =
prefill + per block (denoising steps + 1)). After a block, a row that holds a stop id in its generated tokens stops.

Deliberate differences from the reference (documented, tested where they matter):
  * temperature 0 is greedy: x0 = argmax and confidence 1, the T -> 0 limit (the reference divides by zero; its
    "greedy" setting top_k=1 gives the same tokens, every confidence being 1 there too);
  * the quota is capped at the masks left in the block (the reference's top-k then also picks non-mask positions and
    overwrites prompt tokens of a prompt-tail block when steps < B); `sequential` commits masked positions only;
  * a stopped row is cut after its first stop id (PAD follows; the reference returns the whole canvas, including the
    rest of the block and the masks of blocks never decoded); stops are checked row by row (the reference has batch 1);
  * confidence ties go to the lower position (torch.topk leaves the order unspecified); draws use JAX's per-row keys,
    so only greedy settings (temperature 0, or top_k = 1) match the reference token for token;
  * a denoising step whose draws include the mask id itself (the mask class is in the softmax with
    `suppress_mask=False`, as in the reference) leaves that position masked; after the `steps`-th step the quota is
    every mask left (the reference would index past its quota table).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from dlm_jax import registry
from dlm_jax.samplers.block import (BlockForward, block_options_of, check_block_canvas, is_stop, left_align,
                                    pad_to_blocks, stop_ids_of, stopper)
from dlm_jax.samplers.common import (PAD, check_precision, filter_logits, positions_from_end, row_keys, sample_tokens,
                                     shift_logits, step_keys, subkey, suppress_mask as remove_mask_class)

STRATEGIES = ("low_confidence_dynamic", "low_confidence_static", "sequential")


def quota(block_size: int, steps: int) -> list[int]:
  """SDAR's per-step commit quota (`get_num_transfer_tokens`): B // steps each, the remainder to the early steps."""
  base, rem = divmod(block_size, steps)
  return [base + (1 if j < rem else 0) for j in range(steps)]


def draw(keys: jax.Array, from_end: jax.Array, logits: jax.Array, temperature: float, top_k: int, top_p: float,
         precision: str) -> tuple[jax.Array, jax.Array]:
  """(x0, confidence): a draw from softmax(truncated logits / T) and its probability there; greedy (argmax,
  confidence 1) at T = 0."""
  if temperature == 0:
    logits = filter_logits(logits, top_k, top_p)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.ones(logits.shape[:-1], jnp.float32)
  logits = filter_logits(logits / temperature, top_k, top_p)
  x0 = sample_tokens(keys, from_end, logits, 1.0, precision)
  p = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), x0[..., None], axis=-1)[..., 0]
  return x0, p


def commit(strategy: str, masked: jax.Array, conf: jax.Array, k: jax.Array, threshold: float) -> jax.Array:
  """[B, W] positions to commit: masked [B, W], confidences [B, W], quota k [B] (already capped at the masks)."""
  w = masked.shape[1]
  if strategy == "sequential":
    score = jnp.where(masked, -jnp.arange(w, dtype=jnp.float32)[None], -jnp.inf)
  else:
    score = jnp.where(masked, conf, -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-score, axis=1, stable=True), axis=1, stable=True)  # 0 = first to commit
  top = masked & (rank < k[:, None])
  if strategy != "low_confidence_dynamic":
    return top
  high = masked & (conf > threshold)
  return jnp.where((jnp.sum(high, axis=1) >= k)[:, None], high, top)


def sdar(logits_fn: Callable, key: jax.Array, canvas: jax.Array, *, mask_id: int, block_size: int, steps: int,
         cached_fn: Optional[Callable] = None, strategy: str = "low_confidence_dynamic", threshold: float = 0.85,
         temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, precision: str = "float32",
         stop_ids: Sequence[int] = (), entropy_stop: float = 0.0, entropy_window: int = 256,
         logit_shift: bool = False, suppress_mask: bool = True) -> tuple[jax.Array, dict]:
  """Generates the masks of `canvas` [B, L] block by block with SDAR's procedure (module docstring).

  logits_fn: the uncached block-causal forward; cached_fn: its cache-aware form (None = recompute every call, and no
  prefill / store forwards). stop_ids: ids that end a row after a block; entropy_stop / entropy_window: block
  diffusion's entropy stop. Returns (tokens [B, L] left-aligned, PAD after a stop; stats {'nfe', 'steps', 'lengths'}).
  """
  if block_size < 1 or steps < 1:
    raise ValueError(f"block_size and steps must be >= 1, got {block_size}, {steps}")
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if not 0 <= threshold <= 1 or temperature < 0:
    raise ValueError(f"threshold must be in [0, 1] and temperature >= 0, got {threshold}, {temperature}")
  check_precision(precision)
  canvas = check_block_canvas(logits_fn, cached_fn, canvas, mask_id)
  b, length = canvas.shape
  bs = block_size
  keys = row_keys(key, b)
  stop_ids = stop_ids_of(stop_ids)
  tokens = pad_to_blocks(left_align(canvas, mask_id), bs)
  lp = tokens.shape[1]
  n_blocks = lp // bs
  has_mask = jnp.any(tokens == mask_id, axis=1)
  first = jnp.where(has_mask, jnp.argmax(tokens == mask_id, axis=1), length).astype(jnp.int32)
  stop = stopper(lp, first, stop_ids or None, entropy_stop, entropy_window)
  quotas = jnp.asarray(quota(bs, steps) + [bs], jnp.int32)  # [steps + 1]: after the last step, every mask left
  net = BlockForward(logits_fn, cached_fn)
  state = net.init(tokens)
  nfe = jnp.array(0, jnp.int32)
  if cached_fn is not None:  # prefill: the K/V of the complete prompt blocks
    prefill = jnp.any(first >= bs)
    state = jax.lax.cond(prefill, lambda: net.full(tokens, state)[1], lambda: state)
    nfe = nfe + prefill.astype(jnp.int32)

  def block(carry):
    k, tokens, state, done, nfe, n_steps = carry
    lo = k * bs
    from_end = positions_from_end(lp, lo, bs)

    def block_masks(tokens):
      return (jax.lax.dynamic_slice_in_dim(tokens, lo, bs, axis=1) == mask_id) & ~done[:, None]

    def step(c):
      j, tokens, state, nfe = c
      win = jax.lax.dynamic_slice_in_dim(tokens, lo, bs, axis=1)
      masked = block_masks(tokens)
      logits, _ = net.window(tokens, lo, bs, state)  # denoising: the cache is not updated
      logits = shift_logits(logits) if logit_shift else logits
      logits = remove_mask_class(logits, mask_id) if suppress_mask else logits
      x0, conf = draw(subkey(step_keys(step_keys(keys, k), j), 0), from_end, logits, temperature, top_k, top_p,
                      precision)
      want = jnp.minimum(quotas[jnp.minimum(j, steps)], jnp.sum(masked, axis=1))
      take = commit(strategy, masked, conf, want, threshold)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, jnp.where(take, x0, win), lo, axis=1)
      return j + 1, tokens, state, nfe + 1

    def more(c):
      j, tokens = c[0], c[1]
      return (j <= steps) & jnp.any(block_masks(tokens))

    j, tokens, state, nfe = jax.lax.while_loop(more, step, (jnp.array(0, jnp.int32), tokens, state, nfe))
    if cached_fn is not None:  # the clean block's K/V for the blocks after it
      decoded = j > 0
      state = jax.lax.cond(decoded, lambda: net.window(tokens, lo, bs, state)[1], lambda: state)
      nfe = nfe + decoded.astype(jnp.int32)
    tokens, done = stop(tokens, done, lo + bs)
    return k + 1, tokens, state, done, nfe, n_steps + j

  k0 = jnp.min(first) // bs
  init = (k0, tokens, state, ~has_mask, nfe, jnp.array(0, jnp.int32))
  _, tokens, _, _, nfe, n_steps = jax.lax.while_loop(lambda c: (c[0] < n_blocks) & ~jnp.all(c[3]), block, init)
  tokens = tokens[:, :length]
  return tokens, {"nfe": nfe, "steps": n_steps, "lengths": jnp.sum(tokens != PAD, axis=1)}


@dataclasses.dataclass(frozen=True)
class SdarOptions(registry.Draw):
  """sampler.sdar.*: SDAR's remasking strategy and its dynamic threshold (module docstring)."""
  strategy: str = "low_confidence_dynamic"  # or "low_confidence_static", "sequential"
  threshold: float = 0.85  # low_confidence_dynamic: commit every mask more confident than this (at least the quota)

  def check(self, key, family, block_size):
    super().check(key, family, block_size)
    registry.need(self.strategy in STRATEGIES, f"{key('strategy')} must be one of {STRATEGIES}, got {self.strategy!r}")
    registry.need(0 <= self.threshold <= 1, f"{key('threshold')} must be in [0, 1], got {self.threshold}")
    registry.need(self.strategy == "low_confidence_dynamic" or self.threshold == 0.85,
                  f"{key('threshold')} is read by {key('strategy')}='low_confidence_dynamic' only; drop it")


def _run(net, opts, shared, key, canvas, *, gen_start, eos_id, family_options=None):
  del gen_start
  f = block_options_of('sdar', net, family_options)
  return sdar(net.logits_fn, key, canvas, mask_id=net.mask_id, block_size=net.block_size,
              steps=min(shared.steps, net.block_size), cached_fn=net.cached_logits_fn if f.cache == "prefix" else None,
              strategy=opts.strategy, threshold=opts.threshold, temperature=shared.temperature, top_k=opts.top_k,
              top_p=opts.top_p, precision=opts.precision, stop_ids=stop_ids_of(eos_id) if f.stop_at_eos else (),
              entropy_stop=f.entropy_stop, entropy_window=f.entropy_window, logit_shift=net.logit_shift,
              suppress_mask=net.suppress_mask)


registry.register_sampler(registry.SamplerSpec(
    "sdar", ("block",), SdarOptions, _run,
    "SDAR's block decoding: per-block step quota, sequential / static / dynamic-threshold remasking", greedy=True))
