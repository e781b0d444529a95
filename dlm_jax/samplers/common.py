"""What every sampler shares: the padding convention, per-row randomness, input checks, Gumbel draws, logit shift.

Conventions (all samplers)
  * Canvas [B, L] int32. `mask_id` marks positions to generate; every other position is kept as is. Prompts of
    different lengths are LEFT-padded with `PAD` (-1): every row is right-aligned, so its generated region ends at L.
    Samplers never write PAD positions, and the logits functions dlm_jax builds for its models (`dlm_jax.model.
    logits_fn` / `cached_logits_fn`) keep PAD out of attention and number positions from each row's first real token,
    so a padded row decodes exactly as the same row alone. A hand-written logits_fn that sees PAD must do the same.
  * Randomness is per row and per position: `key` is one PRNG key (row r uses fold_in(key, r)) or B keys. A row's
    draws at its n-th step for the position p (counted from the right end, p = L - index) use
    fold_in(fold_in(row_key, n), p). Draws therefore do not depend on batch size, padding or on which window of the
    canvas a step looks at (cached and uncached decoding see the same noise).
  * `logits_fn(tokens [B, L], t [B]) -> [B, L, V]` with V the number of token classes; if V > mask_id the mask logit
    is suppressed (`suppress_mask=True`, the default; checkpoints whose reference code keeps the mask class in the
    softmax, LLaDA / Dream / Fast-dLLM v2 / SDAR, are sampled with it off for parity: `SamplingNet.suppress_mask`).
    It is checked once with `jax.eval_shape` before anything runs.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.maths import PAD
from dlm_jax.registry import PRECISIONS


def suppress_mask(logits: jax.Array, mask_id: int) -> jax.Array:
  if logits.shape[-1] > mask_id:
    logits = logits.at[..., mask_id].set(-jnp.inf)
  return logits


def shift_logits(logits: jax.Array) -> jax.Array:
  """Logit shift for models trained to predict token i at position i - 1 (Dream): position i takes the logits of
  position i - 1; position 0 keeps its own."""
  return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0) -> jax.Array:
  """Top-k and nucleus (top-p, Holtzman et al. 2020) truncation: logits outside the kept set become -inf.

  The nucleus is the smallest set of most likely tokens whose probability under softmax(logits / temperature) reaches
  top_p (the order of Hugging Face's generate: temperature, then top-k, then top-p); ties at the boundary are kept.
  top_k = 0 and top_p = 1 leave the logits unchanged.
  """
  if top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"top_k must be >= 0 and top_p in (0, 1], got top_k={top_k}, top_p={top_p}")
  logits = logits.astype(jnp.float32)
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    scaled = logits / temperature if temperature > 0 else logits
    desc = jnp.sort(scaled, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
    keep = before < top_p  # the first token always, then until the mass reaches top_p
    cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(scaled < cutoff, -jnp.inf, logits)
  return logits


def truncated(logits_fn: Callable, *, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
              mask_id: Optional[int] = None) -> Callable:
  """`logits_fn` with `filter_logits` applied to its logits (after removing the mask class); a cached function's
  (logits, cache) output keeps its cache. The identity when top_k = 0 and top_p = 1."""
  if not top_k and top_p >= 1.0:
    return logits_fn

  def fn(*args):
    out = logits_fn(*args)
    logits, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
    logits = logits.astype(jnp.float32)
    if mask_id is not None:
      logits = suppress_mask(logits, mask_id)
    logits = filter_logits(logits, top_k, top_p, temperature)
    return logits if rest is None else (logits, *rest)

  return fn


def row_keys(key: jax.Array, b: int) -> jax.Array:
  """One key per row: a batch of B keys is used as is, a single key gives fold_in(key, r) to row r."""
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  single_ndim = 0 if typed else 1
  if key.ndim == single_ndim:
    return jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(b, dtype=jnp.int32))
  if key.ndim == single_ndim + 1 and key.shape[0] == b:
    return key
  raise ValueError(f"key must be one PRNG key or a batch of {b} keys, got shape {key.shape}")


def step_keys(keys: jax.Array, step: jax.Array) -> jax.Array:
  """[B] keys for each row's `step` ([B] or scalar)."""
  step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), keys.shape[:1])
  return jax.vmap(jax.random.fold_in)(keys, step)


def subkey(keys: jax.Array, j: int) -> jax.Array:
  """fold_in(key, j) for every row key [B]: the j-th independent stream of a step."""
  return jax.vmap(lambda k: jax.random.fold_in(k, j))(keys)


def _per_position(keys: jax.Array, from_end: jax.Array, draw: Callable) -> jax.Array:
  """draw(key) for every row key [B] and position [W] (counted from the right end) -> [B, W, ...]."""
  return jax.vmap(lambda k: jax.vmap(lambda p: draw(jax.random.fold_in(k, p)))(from_end))(keys)


def gumbel_noise(keys: jax.Array, from_end: jax.Array, v: int, precision: str = "float32") -> jax.Array:
  dtype = jnp.float64 if precision == "float64" else jnp.float32
  return _per_position(keys, from_end, lambda k: jax.random.gumbel(k, (v,), dtype))


def uniform_noise(keys: jax.Array, from_end: jax.Array) -> jax.Array:
  return _per_position(keys, from_end, lambda k: jax.random.uniform(k, (), jnp.float32))


def sample_tokens(keys: jax.Array, from_end: jax.Array, logits: jax.Array, temperature: float,
                  precision: str = "float32") -> jax.Array:
  """x0 [B, W]: argmax(logits / temperature + Gumbel) (a draw from softmax(logits / temperature)); greedy at 0.

  With precision="float64" the division and the Gumbel noise are computed in float64 (LLaDA samples in float64;
  low-precision Gumbel sampling is known to shift generative perplexity). Needs jax_enable_x64.
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  dtype = jnp.float64 if precision == "float64" else jnp.float32
  g = gumbel_noise(keys, from_end, logits.shape[-1], precision)
  return jnp.argmax(logits.astype(dtype) / temperature + g, axis=-1).astype(jnp.int32)


def check_precision(precision: str) -> None:
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
  if precision == "float64" and not jax.config.jax_enable_x64:
    raise ValueError("precision='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 (dlm-sample does this for "
                     "a sampler whose precision option is float64)")


def check_canvas(canvas, mask_id: int) -> jax.Array:
  canvas = jnp.asarray(canvas)
  if canvas.ndim != 2:
    raise ValueError(f"canvas must be [B, L] token ids, got shape {canvas.shape}")
  if not jnp.issubdtype(canvas.dtype, jnp.integer):
    raise ValueError(f"canvas must hold integer token ids, got dtype {canvas.dtype}")
  return canvas.astype(jnp.int32)


def check_logits_fn(logits_fn: Callable, canvas: jax.Array, mask_id: int, extra_args=None) -> int:
  """Traces `logits_fn` once (no compilation) and returns V; a wrong output shape is one clear ValueError.
  Concrete canvases are also checked for ids outside [0, V) other than mask_id and PAD."""
  b, length = canvas.shape
  args = (canvas, jnp.zeros((b,), jnp.float32)) if extra_args is None else extra_args
  out = jax.eval_shape(logits_fn, *args)
  out = out[0] if isinstance(out, tuple) else out
  if len(out.shape) != 3 or tuple(out.shape[:2]) != (b, length):
    raise ValueError(f"the logits function must return [B, L, V] = [{b}, {length}, V] logits for a [{b}, {length}] "
                     f"canvas, got shape {tuple(out.shape)}")
  v = int(out.shape[-1])
  check_ids(canvas, mask_id, v)
  return v


def prepare_checks(logits_fn: Callable, canvas, mask_id: int, precision: str) -> jax.Array:
  """The input checks of a sampler that decodes the whole canvas with one logits function (greedy allowed): returns
  the canvas as int32 [B, L]."""
  check_precision(precision)
  canvas = check_canvas(canvas, mask_id)
  check_logits_fn(logits_fn, canvas, mask_id)
  return canvas


def prepare(logits_fn: Callable, key: jax.Array, canvas, mask_id: int, temperature: float, precision: str):
  """The checks and per-row randomness of a sampler that decodes the whole canvas (ancestral, first-hitting, ReMDM):
  returns (canvas int32 [B, L], row keys [B], positions from the right end [L])."""
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  check_precision(precision)
  canvas = check_canvas(canvas, mask_id)
  b, length = canvas.shape
  check_logits_fn(logits_fn, canvas, mask_id)
  return canvas, row_keys(key, b), positions_from_end(length, 0, length)


def model_logits(logits_fn: Callable, tokens: jax.Array, t: jax.Array, mask_id: int, logit_shift: bool,
                 suppress: bool = True) -> jax.Array:
  """float32 logits of `tokens`, shifted for models that predict position i at i - 1, with the mask class removed
  (`suppress`; False keeps it in the softmax, as the reference code of LLaDA / Dream checkpoints does)."""
  logits = logits_fn(tokens, t).astype(jnp.float32)
  logits = shift_logits(logits) if logit_shift else logits
  return suppress_mask(logits, mask_id) if suppress else logits


def check_ids(canvas, mask_id: int, v: int) -> None:
  if isinstance(canvas, jax.core.Tracer):
    return
  c = np.asarray(canvas)
  bad = (c != mask_id) & (c != PAD) & ((c < 0) | (c >= v))
  if bad.any():
    r, i = map(int, np.argwhere(bad)[0])
    raise ValueError(f"canvas[{r}, {i}] = {int(c[r, i])} is not a token id: ids must be in [0, {v}) (the logits "
                     f"function's classes), mask_id={mask_id} or PAD={PAD}")


def left_pad(prompts, length: int, mask_id: int, pad_id: int = PAD, width: int = 0) -> tuple[np.ndarray, int]:
  """Canvas for prompts of different lengths: each row is [PAD ... | prompt | mask_id * gen_length], right-aligned,
  with gen_length = length - max(longest prompt, `width`). Returns (canvas [B, length] int32, gen_start)."""
  prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
  longest = max([len(p) for p in prompts] + [width])
  if longest >= length:
    raise ValueError(f"the longest prompt has {longest} tokens but the canvas holds {length}; nothing is left to "
                     "generate (raise the length or shorten the prompt)")
  canvas = np.full((len(prompts), length), mask_id, np.int32)
  for r, p in enumerate(prompts):
    canvas[r, :longest - len(p)] = pad_id
    canvas[r, longest - len(p):longest] = p
  return canvas, longest


def positions_from_end(length: int, lo, width: int) -> jax.Array:
  """Distance from the right end (L - index) of the positions lo .. lo + width - 1 (the per-position noise index)."""
  return (length - (lo + jnp.arange(width, dtype=jnp.int32))).astype(jnp.int32)


def eos_fill(tokens: jax.Array, eos_id: Optional[int], mask_id: int, lo: int = 0, hi: Optional[int] = None
             ) -> jax.Array:
  """Finished sequences: in rows where EOS has been committed at a position p in [lo, hi) and every decoded token
  after p (up to hi) is EOS, the masks after p can only be EOS, so they are set to EOS (the row then needs no further
  network calls)."""
  if eos_id is None:
    return tokens
  length = tokens.shape[1]
  hi = length if hi is None else hi
  idx = jnp.arange(length, dtype=jnp.int32)
  region = (idx >= lo) & (idx < hi)
  is_eos = (tokens == eos_id) & region[None]
  first = jnp.min(jnp.where(is_eos, idx[None], length), axis=1)  # [B]; L = no EOS
  after = (idx[None] > first[:, None]) & region[None]
  clean = ~jnp.any(after & (tokens != eos_id) & (tokens != mask_id), axis=1)  # nothing but EOS / masks after it
  return jnp.where(after & clean[:, None] & (tokens == mask_id), eos_id, tokens)
