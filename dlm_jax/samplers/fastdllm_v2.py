"""Fast-dLLM v2's block generation (Wu et al. 2025, "Fast-dLLM v2: Efficient Block-Diffusion LLM"; the `generate` of
the Fast_dLLM_v2 Hugging Face model, NVlabs/Fast-dLLM `v2/`) for block diffusion checkpoints.

Rows are left-aligned and cut into blocks of the checkpoint's block size B from position 0 (`dlm_jax.samplers.block`).
A prefill forward stores the K/V of the complete prompt blocks; when a row's prompt ends on a block boundary, the argmax
of the prefill's last logit becomes the first token of its first generated block. Inside a block, sub-blocks of
`small_block_size` are decoded left to right; each step runs the whole block against the cached clean blocks (the
cache is not updated), shifts the logits when the model predicts token i at position i - 1 (position 0 of the block
keeps its own, as the reference's shift inside the block window does), draws x0 at the sub-block's positions
(argmax at temperature 0; else from softmax(logits / T) truncated to top-k and top-p) and commits every masked position
of the sub-block whose drawn token has probability > `threshold`, plus the single most confident one (threshold 1 =
one token per step, the reference's default). When the block has no mask left, one more forward of the clean block
appends its K/V to the cache, and the argmax of its last logit becomes the first token of the next block (always
greedy). With `use_block_cache` (the reference's DualCache), the first step of a block, and every step at which the
first position of the current sub-block is still masked, is a full-block forward whose K/V of the block are kept; the
other steps feed only the sub-block, which attends to the prefix and to the block's cached K/V (its own K/V replaced).

Stop ids (`stop_ids`: EOS / end of turn): a row stops as soon as its generated tokens hold a stop id with no mask
before the first one; what follows that stop id is PAD (the reference truncates there). NFE counts every network
call: prefill (when a row has a complete prompt block), steps, and the block-finishing forwards (a block's finishing
forward runs when the canvas has a position after it: give the canvas one position more than the blocks to get the
reference's final appended token).

`procedure="batch_sample"` follows instead the batch procedure of NVlabs/Fast-dLLM `v2/generation_functions.py`
`batch_sample` (read at upstream commit 8292f3c; the same steps, draws and DualCache inside a block). Rows are prompts
right-padded with the mask id (a left-padded canvas is left-aligned into that layout); decoding starts at the block of
the shortest prompt, and the prefill covers its complete blocks (its next token goes to the rows of that length only,
when it ends on a block boundary). Position p of every row belongs to block p // B, so the block of a longer prompt
holds its prompt tokens, which are not decoded. A row finishes when it commits a stop id, whatever is still masked
before it; it still decodes the rest of that block, is then cut after its first generated stop id (PAD; the reference
writes the tokenizer's pad id) and stays as it is. The argmax of a finished block's last logit goes to the next
position of the rows that generated in the block, and of every row when the input was exactly one token longer than
the block's end: the reference then takes the block's tokens as its whole input, which overwrites the last prompt
token of the longest rows (reproduced). The stop test does not look at these carried tokens (a stop id there is cut at
the next stop). The block-finishing forward runs while a row is unfinished; NFE counts the batch's calls.

Deliberate differences from the reference: a prompt of exactly one block is prefilled (the reference's `>` skips its
prefill and then never sees the prompt); rows are independent (the reference's stop test and its top-p sampling look at
batch row 0 only); draws use JAX's per-row keys (only temperature 0 matches the reference token for token); `top_p` /
`top_k` also truncate the distribution whose probabilities meet the threshold at temperature 0 (the reference ignores
top_p there: leave them at their defaults for parity); ties between equally confident positions go to the lower
position; a sub-block takes at most `small_block_size` steps (the reference loops forever if the model keeps predicting
the mask token itself, possible when its class is kept in the softmax).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from dlm_jax import registry
from dlm_jax.errors import DLMError
from dlm_jax.samplers.block import (BlockForward, block_options_of, check_block_canvas, is_stop, left_align,
                                    pad_to_blocks, stop_ids_of, stopper)
from dlm_jax.samplers.common import (PAD, check_precision, filter_logits, positions_from_end, row_keys, sample_tokens,
                                     shift_logits, step_keys, subkey, suppress_mask as remove_mask_class)


PROCEDURES = ("generate", "batch_sample")


def draw(keys: jax.Array, from_end: jax.Array, logits: jax.Array, temperature: float, top_k: int, top_p: float,
         precision: str) -> tuple[jax.Array, jax.Array]:
  """(x0, p(x0)): argmax of softmax(truncated logits) at T = 0, else a draw from softmax(truncated logits / T)."""
  scaled = filter_logits(logits / temperature if temperature > 0 else logits, top_k, top_p)
  if temperature == 0:
    x0 = jnp.argmax(scaled, axis=-1).astype(jnp.int32)
  else:
    x0 = sample_tokens(keys, from_end, scaled, 1.0, precision)
  return x0, jnp.take_along_axis(jax.nn.softmax(scaled, axis=-1), x0[..., None], axis=-1)[..., 0]


def unmask(conf: jax.Array, masked: jax.Array, threshold: float) -> jax.Array:
  """Fast-dLLM v2's rule over a sub-block: masked positions with confidence > threshold, plus the most confident masked
  one (the first on ties); rows without a masked position commit nothing."""
  conf = jnp.where(masked, conf, -jnp.inf)
  best = jax.nn.one_hot(jnp.argmax(conf, axis=1), conf.shape[1], dtype=bool)
  return masked & ((conf > threshold) | best)


def stop_reached(tokens: jax.Array, first: jax.Array, mask_id: int, stop_ids: tuple) -> tuple[jax.Array, jax.Array]:
  """([B] rows whose generated tokens (from `first`) hold a stop id with no mask before the first one, [B] where)."""
  length = tokens.shape[1]
  idx = jnp.arange(length, dtype=jnp.int32)[None]
  gen = idx >= first[:, None]
  where = jnp.min(jnp.where(is_stop(tokens, stop_ids) & gen, idx, length), axis=1)
  masked_before = jnp.any((tokens == mask_id) & gen & (idx < where[:, None]), axis=1)
  return (where < length) & ~masked_before, where


def fastdllm_v2(logits_fn: Callable, key: jax.Array, canvas: jax.Array, *, mask_id: int, block_size: int,
                small_block_size: int, threshold: float = 1.0, cached_fn: Optional[Callable] = None,
                use_block_cache: bool = False, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                precision: str = "float32", stop_ids: Sequence[int] = (), entropy_stop: float = 0.0,
                entropy_window: int = 256, logit_shift: bool = True, suppress_mask: bool = True,
                procedure: str = "generate") -> tuple[jax.Array, dict]:
  """Generates the masks of `canvas` [B, L] block by block with Fast-dLLM v2's procedure (module docstring).

  logits_fn: the uncached block-causal forward; cached_fn: its cache-aware form (None = a full forward per call;
  use_block_cache needs it). stop_ids: EOS / end-of-turn ids; entropy_stop / entropy_window: block diffusion's entropy
  stop after each block. procedure: "generate" (the model's generate) or "batch_sample" (v2/generation_functions.py's
  batch_sample, module docstring). Returns (tokens [B, L] left-aligned, PAD after a stop; stats {'nfe', 'steps',
  'lengths'}).
  """
  if procedure not in PROCEDURES:
    raise ValueError(f"procedure must be one of {PROCEDURES}, got {procedure!r}")
  batch = procedure == "batch_sample"
  bs, sb = block_size, small_block_size
  if bs < 1 or sb < 1 or bs % sb:
    raise ValueError(f"small_block_size ({sb}) must divide block_size ({bs})")
  if not 0 <= threshold <= 1 or temperature < 0:
    raise ValueError(f"threshold must be in [0, 1] and temperature >= 0, got {threshold}, {temperature}")
  if use_block_cache and cached_fn is None:
    raise ValueError("use_block_cache (DualCache) needs the cache-aware forward cached_fn")
  check_precision(precision)
  canvas = check_block_canvas(logits_fn, cached_fn, canvas, mask_id)
  b, length = canvas.shape
  keys = row_keys(key, b)
  stop_ids = stop_ids_of(stop_ids)
  tokens = pad_to_blocks(left_align(canvas, mask_id), bs)
  lp = tokens.shape[1]
  n_blocks = lp // bs
  idx = jnp.arange(lp, dtype=jnp.int32)[None]
  has_mask = jnp.any(tokens == mask_id, axis=1)
  first = jnp.where(has_mask, jnp.argmax(tokens == mask_id, axis=1), length).astype(jnp.int32)
  min_first = jnp.min(first)
  longest = jnp.max(jnp.where(has_mask, first, 0))  # batch_sample: the width of its right-padded input
  entropy = stopper(lp, first, None, entropy_stop, entropy_window)
  net = BlockForward(logits_fn, cached_fn)

  def greedy(logits):
    logits = remove_mask_class(logits, mask_id) if suppress_mask else logits
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def finish(tokens, done):
    """Stop ids: rows that stop now, cut after their first stop id."""
    if not stop_ids:
      return tokens, done
    now, where = stop_reached(tokens, first, mask_id, stop_ids)
    newly = now & ~done
    return jnp.where(newly[:, None] & (idx > where[:, None]), PAD, tokens), done | newly

  def carry_token(tokens, logits_last, pos, rows):
    """Writes argmax(logits_last [B, V]) at position pos in `rows` where it is masked."""
    posc = jnp.minimum(pos, lp - 1)
    cur = jax.lax.dynamic_index_in_dim(tokens, posc, axis=1, keepdims=False)
    write = rows & (cur == mask_id) & (pos < length)
    return jax.lax.dynamic_update_index_in_dim(tokens, jnp.where(write, greedy(logits_last), cur), posc, axis=1)

  # prefill: the K/V of the complete prompt blocks; a prompt ending on a block boundary gets its next token
  state = net.init(tokens)
  if batch:  # one prefill of the blocks the shortest prompt completes; its next token only for the shortest rows
    complete = jnp.broadcast_to(min_first >= bs, (b,))
    on_boundary = complete & (first == min_first) & (min_first % bs == 0)
  else:
    complete = first >= bs
    on_boundary = complete & (first % bs == 0)
  prefill = jnp.any(complete) if cached_fn is not None else jnp.any(on_boundary)

  def do_prefill():
    logits, new = net.full(tokens, state)
    last = jnp.take_along_axis(logits, jnp.maximum(first - 1, 0)[:, None, None], axis=1)[:, 0]  # [B, V]
    posc = jnp.minimum(first, lp - 1)
    cur = jnp.take_along_axis(tokens, posc[:, None], axis=1)[:, 0]
    write = on_boundary & (cur == mask_id) & (first < length)
    new_tokens = jnp.where((idx == posc[:, None]) & write[:, None], greedy(last)[:, None], tokens)
    return new_tokens, new

  tokens, state = jax.lax.cond(prefill, do_prefill, lambda: (tokens, state))
  nfe = prefill.astype(jnp.int32)
  done = ~has_mask
  if not batch:
    tokens, done = finish(tokens, done)

  def block(carry):
    k, tokens, state, done, nfe, n_steps = carry
    lo = k * bs

    def sub_block(j, c):
      tokens, state, done, hit, nfe, n_steps, block_step = c
      slo = lo + j * sb
      from_end = positions_from_end(lp, slo, sb)

      def masks(tokens, done):
        return (jax.lax.dynamic_slice_in_dim(tokens, slo, sb, axis=1) == mask_id) & ~done[:, None]

      def step(c):
        i, tokens, state, done, hit, nfe, block_step = c
        masked = masks(tokens, done)

        def whole_block():
          logits, new = net.window(tokens, lo, bs, state)
          logits = shift_logits(logits) if logit_shift else logits
          return jax.lax.dynamic_slice_in_dim(logits, j * sb, sb, axis=1), new

        if use_block_cache:
          head = jax.lax.dynamic_index_in_dim(tokens, slo, axis=1, keepdims=False)
          full = (block_step == 0) | jnp.any((head == mask_id) & ~done)

          def sub_only():
            logits, new = net.window(tokens, slo, sb, state)
            return (shift_logits(logits) if logit_shift else logits), new

          logits, new_state = jax.lax.cond(full, whole_block, sub_only)
        else:
          logits, _ = whole_block()  # the block against the prefix cache; the cache is not updated
          new_state = state
        logits = remove_mask_class(logits, mask_id) if suppress_mask else logits
        x0, p = draw(subkey(step_keys(step_keys(keys, k), block_step), 0), from_end, logits, temperature, top_k,
                     top_p, precision)
        take = unmask(p, masked, threshold)
        win = jax.lax.dynamic_slice_in_dim(tokens, slo, sb, axis=1)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, jnp.where(take, x0, win), slo, axis=1)
        if batch:  # a row finishes when it commits a stop id, whatever is masked before it (it decodes its block on)
          hit = hit | jnp.any(take & is_stop(x0, stop_ids), axis=1) if stop_ids else hit
        else:
          tokens, done = finish(tokens, done)
        return i + 1, tokens, new_state, done, hit, nfe + 1, block_step + 1

      def more(c):
        return (c[0] < sb) & jnp.any(masks(c[1], c[3]))

      i, tokens, state, done, hit, nfe, block_step = jax.lax.while_loop(
          more, step, (jnp.array(0, jnp.int32), tokens, state, done, hit, nfe, block_step))
      return tokens, state, done, hit, nfe, n_steps + i, block_step

    active = ~done  # rows still generating when the block starts
    tokens, state, done, hit, nfe, n_steps, _ = jax.lax.fori_loop(
        0, bs // sb, sub_block, (tokens, state, done, jnp.zeros((b,), bool), nfe, n_steps, jnp.array(0, jnp.int32)))
    if batch:  # rows that finished in this block: cut after their first stop id, kept as they are from now on
      _, where = stop_reached(tokens, first, mask_id, stop_ids) if stop_ids else (None, jnp.full((b,), lp))
      tokens = jnp.where(hit[:, None] & (idx > where[:, None]), PAD, tokens)
      rows = active & ~hit
      run = jnp.any(rows) & (lo + bs < length)
      # the next block's first token: rows generating in this block, and every row when the input was one token
      # longer than this block (the reference then replaces its input by the block's: see the module docstring)
      write = rows & ((first < lo + bs) | (longest <= lo + bs + 1))

      def close_batch():
        logits, new = net.window(tokens, lo, bs, state)
        pos = jnp.minimum(lo + bs, lp - 1)
        cur = jax.lax.dynamic_index_in_dim(tokens, pos, axis=1, keepdims=False)
        new_tokens = jax.lax.dynamic_update_index_in_dim(tokens, jnp.where(write, greedy(logits[:, -1]), cur), pos,
                                                         axis=1)
        return new_tokens, new

      tokens, state = jax.lax.cond(run, close_batch, lambda: (tokens, state))
      nfe = nfe + run.astype(jnp.int32)
      tokens, done = entropy(tokens, done | hit, lo + bs)
      return k + 1, tokens, state, done, nfe, n_steps
    # the finished block: its clean K/V, and the argmax of its last logit as the next block's first token
    rows = ~done & active
    run = jnp.any(rows) & (lo + bs < length)

    def close():
      logits, new = net.window(tokens, lo, bs, state)
      return carry_token(tokens, logits[:, -1], lo + bs, rows), new

    tokens, state = jax.lax.cond(run, close, lambda: (tokens, state))
    nfe = nfe + run.astype(jnp.int32)
    tokens, done = finish(tokens, done)
    tokens, done = entropy(tokens, done, lo + bs)
    return k + 1, tokens, state, done, nfe, n_steps

  k0 = jnp.min(first) // bs
  init = (k0, tokens, state, done, nfe, jnp.array(0, jnp.int32))
  _, tokens, _, _, nfe, n_steps = jax.lax.while_loop(lambda c: (c[0] < n_blocks) & ~jnp.all(c[3]), block, init)
  tokens = tokens[:, :length]
  return tokens, {"nfe": nfe, "steps": n_steps, "lengths": jnp.sum(tokens != PAD, axis=1)}


@dataclasses.dataclass(frozen=True)
class FastDllmV2Options(registry.Draw):
  """sampler.fastdllm_v2.*: Fast-dLLM v2's sub-blocks, confidence threshold and DualCache (module docstring)."""
  small_block_size: int = 8  # sub-block width; must divide the checkpoint's block size
  threshold: float = 1.0  # commit every masked sub-block position with p > threshold, plus the most confident one
  use_block_cache: bool = False  # DualCache: sub-block-only forwards over the block's cached K/V
  procedure: str = "generate"  # "generate" (the HF model's generate) or "batch_sample" (generation_functions.py's)

  def check(self, key, family, block_size):
    super().check(key, family, block_size)
    need = registry.need
    need(self.small_block_size >= 1, f"{key('small_block_size')} must be >= 1, got {self.small_block_size}")
    need(block_size is None or block_size % self.small_block_size == 0,
         f"{key('small_block_size')}={self.small_block_size} must divide the block size ({block_size})")
    need(0 <= self.threshold <= 1, f"{key('threshold')} must be in [0, 1] (1 = one token per step), got "
         f"{self.threshold}")
    need(self.procedure in PROCEDURES, f"{key('procedure')} must be one of {', '.join(PROCEDURES)}, got "
         f"{self.procedure!r}")


def _run(net, opts, shared, key, canvas, *, gen_start, eos_id, family_options=None):
  del gen_start
  f = block_options_of('fastdllm_v2', net, family_options)
  if opts.use_block_cache and f.cache != "prefix":
    raise DLMError("sampler.fastdllm_v2.use_block_cache caches the block's K/V on top of the clean blocks' cache: "
                   "set sampler.block.cache=prefix or drop it")
  return fastdllm_v2(net.logits_fn, key, canvas, mask_id=net.mask_id, block_size=net.block_size,
                     small_block_size=opts.small_block_size, threshold=opts.threshold,
                     cached_fn=net.cached_logits_fn if f.cache == "prefix" else None,
                     use_block_cache=opts.use_block_cache, temperature=shared.temperature, top_k=opts.top_k,
                     top_p=opts.top_p, precision=opts.precision, stop_ids=stop_ids_of(eos_id) if f.stop_at_eos else (),
                     entropy_stop=f.entropy_stop, entropy_window=f.entropy_window, logit_shift=net.logit_shift,
                     suppress_mask=net.suppress_mask, procedure=opts.procedure)


registry.register_sampler(registry.SamplerSpec(
    "fastdllm_v2", ("block",), FastDllmV2Options, _run,
    "Fast-dLLM v2's block decoding: sub-blocks, confidence threshold, next block's first token from the clean block, "
    "DualCache; the HF generate or generation_functions.py's batch_sample", uses_steps=lambda opts: False,
    steps_note="threshold decoding runs until each sub-block is decoded",
    greedy=True))
