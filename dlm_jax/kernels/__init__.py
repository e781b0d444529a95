"""Pallas attention kernels behind `dlm_jax.attention.attention` (implementations "splash" and "pallas_gpu").

  splash.py     TPU: splash attention (jax.experimental.pallas.ops.tpu.splash_attention) over a `MaskSpec`'s
                computable mask, segment ids, GQA; forward + backward; kernels cached per static signature
  flash_gpu.py  GPU: our Pallas-Triton flash attention, block-sparse over `MaskSpec.tile_table`, GQA without repeating
                K/V, segment ids; forward + dq and dk/dv backward passes
  decode.py     TPU and GPU: a block of queries against a K/V cache (or a canvas masked over positions), per-row
                valid key ranges, forward only (the samplers' forwards)

`attention()` here picks the kernel and, inside a mesh, runs it under `shard_map` (batch over data / fsdp, heads over
tensor, as the logical axis rules of `dlm_jax.sharding` say): a Pallas call is opaque to the SPMD partitioner. The
length is never split inside a kernel: with mesh.sequence > 1 the queries, keys and values are all-gathered over the
sequence axis on the way in, each device of a sequence group runs the kernel over the whole sequence of its batch /
head shard (the attention FLOPs are repeated across that axis; the projections, MLP and head stay split) and the model
takes its length shard of the output. Splitting the queries inside the kernel would need a mask per query shard
(MaxText shards splash's mask info over the context axis); that is not done here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dlm_jax.masks import MaskSpec
from dlm_jax.sharding import spec_for


def padded_length(spec: MaskSpec | None, length: int, multiple: int) -> int:
  """The length a kernel whose tiles need `multiple` runs at: `length` when it is a multiple, else the next one. For
  bd3 each half ([x_t | x_0]) is padded at its end to a multiple of both multiple / 2 and the block size, so block
  numbers and the clean / noisy halves of the real positions stay what they were."""
  if length % multiple == 0:
    return length
  if spec is not None and spec.kind == "bd3":
    unit = math.lcm(multiple // 2, spec.block_size)
    return 2 * (-(-(length // 2) // unit) * unit)
  return -(-length // multiple) * multiple


def pad(x: jax.Array, spec: MaskSpec | None, length: int, padded: int, value=0) -> jax.Array:
  """x [B, length, ...] -> [B, padded, ...]: new positions at the end (bd3: at the end of each half). Kernels pad
  queries with a segment id no key has and keys with -1, so padding changes nothing and its rows are dropped."""
  def grow(y, n):
    return jnp.pad(y, [(0, 0), (0, n)] + [(0, 0)] * (y.ndim - 2), constant_values=value)
  if spec is not None and spec.kind == "bd3":
    half, padded_half = length // 2, padded // 2
    return jnp.concatenate([grow(x[:, :half], padded_half - half), grow(x[:, half:], padded_half - half)], axis=1)
  return grow(x, padded - length)


def unpad(x: jax.Array, spec: MaskSpec | None, length: int, padded: int) -> jax.Array:
  """The inverse of `pad` on [B, padded, ...] outputs."""
  if spec is not None and spec.kind == "bd3":
    half, padded_half = length // 2, padded // 2
    return jnp.concatenate([x[:, :half], x[:, padded_half:padded_half + half]], axis=1)
  return x[:, :length]


def _specs(mesh, q, k):
  """PartitionSpecs for q / k,v ([B, L, H, D]) and the per-token arrays ([B, L]): batch over data x fsdp, heads over
  tensor when it divides both the query and the key/value heads, the length whole (gathered over mesh.sequence)."""
  qs = spec_for(("batch", "length", "heads", "kv"), q.shape, mesh)
  ks = spec_for(("batch", "length", "heads", "kv"), k.shape, mesh)
  batch, heads = qs[0], (qs[2] if qs[2] == ks[2] else None)
  return P(batch, None, heads, None), P(batch, None, heads, None), P(batch, None)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids, kv_segment_ids, mask: MaskSpec | None,
              q_positions, kv_positions, platform: str, block_q: int = 0, block_kv: int = 0,
              interpret: bool = False) -> jax.Array:
  """See `dlm_jax.attention.attention` (mask None = full; positions given only for a mask over positions)."""
  b, lq = q.shape[:2]
  lk = k.shape[1]
  if kv_segment_ids is None:
    kv_segment_ids = q_segment_ids if q_segment_ids is not None and lq == lk else jnp.zeros((b, lk), jnp.int32)
  if q_segment_ids is None:
    q_segment_ids = jnp.zeros((b, lq), jnp.int32)
  q_segment_ids, kv_segment_ids = q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32)
  decode = q_positions is not None or lq != lk
  if decode:
    from dlm_jax.kernels import decode as impl
    if q_positions is None:  # a full mask needs no positions; the kernel still takes them
      q_positions = jnp.zeros((b, lq), jnp.int32)
      kv_positions = jnp.zeros((b, lk), jnp.int32)

    def run(q, k, v, qs, ks, qp, kp):
      return impl.attention(q, k, v, qs, ks, qp.astype(jnp.int32), kp.astype(jnp.int32), mask, platform=platform,
                            block_q=block_q, block_kv=block_kv, interpret=interpret)

    args = (q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions)
  else:
    if platform == "tpu":
      from dlm_jax.kernels import splash as impl
    else:
      from dlm_jax.kernels import flash_gpu as impl

    def run(q, k, v, qs, ks):
      return impl.attention(q, k, v, qs, ks, mask, block_q=block_q, block_kv=block_kv, interpret=interpret)

    args = (q, k, v, q_segment_ids, kv_segment_ids)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return run(*args)
  qs, ks, ts = _specs(mesh, q, k)
  in_specs = (qs, ks, ks) + (ts,) * (len(args) - 3)
  return jax.shard_map(run, mesh=mesh, in_specs=in_specs, out_specs=qs, check_vma=False)(*args)
