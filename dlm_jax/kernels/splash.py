"""TPU splash attention behind `dlm_jax.attention.attention(..., implementation="splash")`.

Splash attention ("Sparse Flash Attention", `jax.experimental.pallas.ops.tpu.splash_attention`, the JAX team's Pallas
TPU kernel) is FlashAttention (Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness"; Dao 2023, FlashAttention-2) for TPU with block-sparse masks: the scores are computed tile by tile with an
online softmax, tiles that a mask leaves empty are skipped, partial tiles evaluate the mask inside the kernel. Here the
mask is a `MaskSpec`'s computable mask (`MaskSpec.splash_mask`: no L x L host array), segment ids do packing and
padding, grouped-query attention is the kernel's own (H query heads over K key/value heads), and the backward pass is
splash's custom VJP with the fused dq / dk / dv kernel (`BlockSizes(use_fused_bwd_kernel=True)`, as MaxText uses).

Semantics equal `dlm_jax.attention.attention(..., implementation="reference")`:
  allowed[q, k] = spec(q, k) & (q_seg[q] == kv_seg[k]) & (kv_seg[k] >= 0); a query row with no allowed key returns 0.
Splash masks only with `spec & (q_seg == kv_seg)`, and a row whose every key is masked returns finite garbage (a
uniform average over the tiles it visited). Two things make the kernel exact here:
  - segment ids are remapped so that padding can never match: keys with a negative id get -1, queries with a negative
    id get -2 (non-negative ids are unchanged), so a padding key is masked for every query and a padding query sees
    nothing;
  - every query head gets an attention sink (the kernel's `sinks` argument: a virtual key with logit `_SINK` and value
    0, which starts the online softmax at max = _SINK, sum = 1). _SINK = -1e30 is far below any real logit, so for a
    row with at least one allowed key exp(_SINK - max) underflows to exactly 0 and the result is unchanged; a masked
    logit is splash's mask value (-0.7 * float32 max) < _SINK, so a row with no allowed key keeps max = _SINK, sum = 1,
    accumulates exp(mask - _SINK) = 0 times each value, and returns exactly 0. Its log-sum-exp residual is _SINK, so in
    the backward pass every probability exp(mask - lse) of that row is 0 too: its dq is 0 and it adds nothing to dk /
    dv, exactly as the dense oracle (whose zeroed row passes no cotangent back). No extra pass, no L x L array.
The kernel works on one example ([H, L, D]); batches are vmapped, q is pre-scaled by D**-0.5 (splash has no scale).
Kernels are built with head_shards = q_seq_shards = 1: inside a mesh the dispatcher (`dlm_jax.kernels.attention`)
runs this under shard_map, so each device sees its own batch rows and heads.

Tiling: splash's key/value tiles are at least 128 wide (the TPU lane width) and every tile divides the length, so a
length that is not a multiple of 128 is padded (`padded_length`: at the end; for bd3 at the end of each half, so the
mask of the real positions is unchanged) with query id -2 / key id -1, and the padded rows are dropped from the output;
a multiple of 128 runs as is. block_q / block_kv (0 = 128) are clamped to the (padded) length and must be multiples of
128 dividing it (ValueError otherwise); the backward kernel uses the same tiles.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax import kernels
from dlm_jax.masks import FULL, MaskSpec

LANES = 128  # TPU lane width: splash's kv tiles (and so L) are multiples of it
DEFAULT_BLOCK = 128
_SINK = -1e30  # the sink logit: above splash's mask value (-2.4e38), below any real logit


def padded_length(spec: MaskSpec, length: int) -> int:
  """The length the kernel runs at: the next multiple of 128 (`dlm_jax.kernels.padded_length`)."""
  return kernels.padded_length(spec, length, LANES)


def block_sizes(length: int, block_q: int = 0, block_kv: int = 0) -> tuple[int, int]:
  """(block_q, block_kv) for the kernel's (padded) `length`: 0 = the default 128; a setting is clamped to the length and
  lowered to the largest multiple of 128 that divides it (a 512 tile runs a 640-token canvas in 128 tiles); ValueError
  for a tile the kernel cannot use."""
  if length % LANES:
    raise ValueError(f"splash attention runs at a length that is a multiple of {LANES} (the TPU lane width: key/value "
                     f"tiles are at least {LANES} wide), got {length}")
  out = []
  for name, b in (("block_q", block_q), ("block_kv", block_kv)):
    if b < 0:
      raise ValueError(f"splash attention {name} must be >= 0 (0 = default), got {b}")
    b = min(b or DEFAULT_BLOCK, length)
    if b % LANES:
      raise ValueError(f"splash attention {name}={b} must be a multiple of {LANES}; set model.attention_block_q / "
                       "model.attention_block_kv accordingly, or to 0")
    while length % b:  # the setting is an upper bound: the largest multiple of 128 below it that divides the length
      b -= LANES
    out.append(b)
  return out[0], out[1]


@functools.lru_cache(maxsize=64)
def _kernel(spec: MaskSpec, length: int, heads: int, block_q: int, block_kv: int, interpret: bool):
  """The splash kernel for one static signature (the mask object is built and processed once per signature).

  The kernel holds its mask tables as jnp arrays. Made inside a trace (the first call usually comes from inside jit /
  shard_map) they would be that trace's tracers, leaked into the cache; made under a mesh context of compile-only TPU
  devices (AOT compilation on a CPU host) they cannot be computed at all. JAX's trace and mesh contexts are
  thread-local, so the kernel is built in a fresh thread, and its tables are kept as host numpy arrays: constants of
  every trace that uses the cached kernel."""
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(_build_kernel, spec, length, heads, block_q, block_kv, interpret).result()


def _build_kernel(spec, length, heads, block_q, block_kv, interpret):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = sm.MultiHeadMask(tuple(spec.splash_mask(length, length) for _ in range(heads)))
  sizes = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
                        block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, use_fused_bwd_kernel=True)
  kern = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
  return jax.tree.map(np.asarray, kern)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, mask: MaskSpec | None,
              *, block_q: int = 0, block_kv: int = 0, interpret: bool = False) -> jax.Array:
  """Splash attention. q [B, L, H, D], k / v [B, L, K, D] (H a multiple of K), q_seg / kv_seg int [B, L] (a negative
  key id is padding), mask a `MaskSpec` (None = full). Returns [B, L, H, D] in q's dtype, zeros for a query row with no
  allowed key. Differentiable (splash's fused backward kernel)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  lq, h, d = q.shape[1:]
  lk, kh = k.shape[1], k.shape[2]
  if lq != lk:
    raise ValueError(f"splash attention needs as many queries as keys (got {lq} and {lk}); queries against a cache go "
                     "to dlm_jax.kernels.decode")
  if h % kh:
    raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kh})")
  spec = FULL if mask is None else mask
  spec.check(lq, lk)
  q_seg = jnp.where(q_seg < 0, -2, q_seg).astype(jnp.int32)
  kv_seg = jnp.where(kv_seg < 0, -1, kv_seg).astype(jnp.int32)
  length = padded_length(spec, lq)
  if length != lq:  # padded queries (id -2) and keys (id -1) match nothing; their outputs are dropped
    q, k, v = (kernels.pad(x, spec, lq, length) for x in (q, k, v))
    q_seg, kv_seg = kernels.pad(q_seg, spec, lq, length, -2), kernels.pad(kv_seg, spec, lq, length, -1)
  bq, bkv = block_sizes(length, block_q, block_kv)
  kern = _kernel(spec, length, h, bq, bkv, bool(interpret))
  sinks = jnp.full((h,), _SINK, jnp.float32)
  qt = (q.astype(jnp.float32) * d ** -0.5).astype(q.dtype).transpose(0, 2, 1, 3)  # [B, H, L, D], one rounding
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  o = jax.vmap(lambda q1, k1, v1, s1: kern(q1, k1, v1, s1, sinks))(qt, kt, vt, sk.SegmentIds(q_seg, kv_seg))
  o = o.transpose(0, 2, 1, 3)
  return o if length == lq else kernels.unpad(o, spec, lq, length)
