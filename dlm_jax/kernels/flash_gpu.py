"""Block-sparse flash attention for GPU in Pallas-Triton: forward, and a backward pass of two kernels (dq; dk and dv).

The algorithm is FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning", arXiv:2307.08691): each program owns one query tile and streams key / value tiles through an online
softmax kept in float32 (running row maximum m, running denominator l, unnormalised accumulator), normalising once at
the end and saving the row logsumexp for the backward pass. The backward pass recomputes the probabilities from that
logsumexp (no [L, L] matrix is stored) with delta = rowsum(dO * O) (Dao 2023, Algorithm 2), split like the paper's
Section 3.2 into a dq kernel (one program per query tile, looping over its key tiles) and a dk / dv kernel (one program
per key tile, looping over the query tiles that see it), so that neither needs atomics.

Block sparsity: a `MaskSpec` is static, so which (query tile, key tile) pairs hold at least one allowed entry is known
on the host. The forward and dq kernels receive `MaskSpec.tile_table` (key tiles per query tile, as an int32 array
input) and loop `for t in range(counts[qi])` over a dynamic bound; the dk / dv kernel receives the transposed table
built from `MaskSpec.tile_mask`. Inside a visited tile the elementwise mask (the spec's predicate, the segment ids, and
kv_seg >= 0) is applied. A query row with no allowed key returns zeros, and contributes nothing to any gradient.

GQA: the grid runs over query heads and each program reads the key / value head h // (H // K) through the BlockSpec
index map, so K / V are never repeated in memory. The dk / dv kernel runs over key / value heads and accumulates the
contributions of the G = H // K query heads of its group inside the kernel.

Every pallas_call passes `plgpu.CompilerParams` explicitly (JAX otherwise picks Mosaic GPU for GPU Pallas, which cannot
lower on a CPU host); `interpret=True` runs the same kernels on CPU (the tests). Triton needs power-of-two tensor
shapes: tiles are powers of two >= 16, and so is the head dimension D.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from dlm_jax import kernels
from dlm_jax.masks import MaskSpec, tile_rows

DEFAULT_BLOCK = 64
MIN_TILE = 16  # Triton tile shapes: powers of two >= 16; shorter or unaligned lengths are padded to a multiple
_NEG = -1e30  # finite "minus infinity" for masked scores (masked probabilities are zeroed explicitly)


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call: hashable, a custom_vjp non-differentiable argument."""
  spec: MaskSpec | None  # None = full (no elementwise predicate)
  length: int
  block_q: int
  block_kv: int
  num_warps: int
  num_stages: int
  interpret: bool


def _pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def _default_block(length: int) -> int:
  """The largest power of two <= DEFAULT_BLOCK (the default clamped to the length) dividing the length; at least 16."""
  b = DEFAULT_BLOCK
  while b > 16 and (b > length or length % b):
    b //= 2
  return b


def _check_block(name: str, block: int, length: int) -> None:
  if not _pow2(block) or block < 16:
    raise ValueError(f"flash_gpu: {name}={block} must be a power of two >= 16 (Triton tile shapes)")
  if length % block:
    raise ValueError(f"flash_gpu: sequence length {length} is not a multiple of {name}={block}")


@functools.lru_cache(maxsize=256)
def _tables(spec: MaskSpec | None, length: int, bq: int, bk: int):
  """((tiles, counts) per query tile, (tiles, counts) per key tile): the forward / dq table and its transpose."""
  spec = spec or MaskSpec("full")
  tiles, counts = spec.tile_table(length, length, bq, bk)
  tiles_t, counts_t = tile_rows(spec.tile_mask(length, length, bq, bk).T)
  return (tiles, counts), (tiles_t, counts_t)


def _allowed(spec, q_ids, kv_ids, q_seg, kv_seg, length):
  """[bq, bk] bool: the elementwise mask of one tile (segments, padding keys, the spec's predicate)."""
  ok = (q_seg[:, None] == kv_seg[None, :]) & (kv_seg[None, :] >= 0)
  if spec is not None:
    ok = ok & spec.allows(q_ids[:, None], kv_ids[None, :], length)
  return ok


def _zero_visits(visits_ref):
  if visits_ref:  # testing only (`tile_visits`): this program's row of visit counts starts at zero
    visits_ref[0][...] = jnp.zeros(visits_ref[0].shape, jnp.int32)


def _scores(q, k, scale):
  return jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale


# --- forward ----------------------------------------------------------------------------------------------------------


def _fwd_kernel(tiles_ref, counts_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *visits_ref, cfg,
                scale):
  bq, bk = cfg.block_q, cfg.block_kv
  qi = pl.program_id(0)
  q = q_ref[...]
  q_seg = qseg_ref[...]
  q_ids = qi * bq + jnp.arange(bq, dtype=jnp.int32)
  d = q.shape[-1]

  def body(t, carry):
    acc, m, l = carry
    kt = tiles_ref[qi, t]
    start = pl.multiple_of(kt * bk, bk)
    if visits_ref:
      visits_ref[0][kt] += 1
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    ok = _allowed(cfg.spec, q_ids, start + jnp.arange(bk, dtype=jnp.int32), q_seg, kseg_ref[pl.ds(start, bk)],
                  cfg.length)
    s = jnp.where(ok, _scores(q, k, scale), _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l

  _zero_visits(visits_ref)
  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), _NEG, jnp.float32), jnp.zeros((bq,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, counts_ref[qi], body, init)
  l_safe = jnp.where(l == 0.0, 1.0, l)  # a row with no allowed key: acc is 0, so the output is exactly 0
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l_safe)


def _query_tile_specs(groups, length, d, bq, tiles, counts):
  """in_specs of the per-query-tile kernels (forward, dq) on the grid (query tile i, batch j, query head n): the tile
  table and counts whole, the query tile, the key / value head n // G whole, the query tile's segment ids and all key
  segment ids."""
  return [
      pl.BlockSpec(tiles.shape, lambda i, j, n: (0, 0)),
      pl.BlockSpec(counts.shape, lambda i, j, n: (0,)),
      pl.BlockSpec((None, bq, None, d), lambda i, j, n: (j, i, n, 0)),
      pl.BlockSpec((None, length, None, d), lambda i, j, n: (j, 0, n // groups, 0)),
      pl.BlockSpec((None, length, None, d), lambda i, j, n: (j, 0, n // groups, 0)),
      pl.BlockSpec((None, bq), lambda i, j, n: (j, i)),
      pl.BlockSpec((None, length), lambda i, j, n: (j, 0)),
  ]


def _forward(q, k, v, q_seg, kv_seg, cfg: _Config, visits: bool = False):
  b, length, h, d = q.shape
  groups = h // k.shape[2]
  bq = cfg.block_q
  nq = length // bq
  (tiles, counts), _ = _tables(cfg.spec, length, bq, cfg.block_kv)
  in_specs = _query_tile_specs(groups, length, d, bq, tiles, counts)
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, length), jnp.float32)]
  out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, j, k: (j, i, k, 0)),
               pl.BlockSpec((None, None, bq), lambda i, j, k: (j, k, i))]
  if visits:  # testing: how often each program visited each key tile
    nk = length // cfg.block_kv
    out_shape.append(jax.ShapeDtypeStruct((b, h, nq, nk), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, None, nk), lambda i, j, k: (j, k, i, 0)))
  out = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, scale=d ** -0.5),
      grid=(nq, b, h),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret,
      name="flash_gpu_fwd",
  )(jnp.asarray(tiles), jnp.asarray(counts), q, k, v, q_seg, kv_seg)
  return out


# --- backward: dq -----------------------------------------------------------------------------------------------------


def _dq_kernel(tiles_ref, counts_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dq_ref,
               *visits_ref, cfg, scale):
  bq, bk = cfg.block_q, cfg.block_kv
  qi = pl.program_id(0)
  q = q_ref[...]
  do = do_ref[...]
  q_seg = qseg_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  q_ids = qi * bq + jnp.arange(bq, dtype=jnp.int32)

  def body(t, dq):
    kt = tiles_ref[qi, t]
    start = pl.multiple_of(kt * bk, bk)
    if visits_ref:
      visits_ref[0][kt] += 1
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    ok = _allowed(cfg.spec, q_ids, start + jnp.arange(bk, dtype=jnp.int32), q_seg, kseg_ref[pl.ds(start, bk)],
                  cfg.length)
    p = jnp.where(ok, jnp.exp(_scores(q, k, scale) - lse[:, None]), 0.0)
    dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  _zero_visits(visits_ref)
  dq = jax.lax.fori_loop(0, counts_ref[qi], body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dq(q, k, v, q_seg, kv_seg, do, lse, delta, cfg: _Config, visits: bool = False):
  b, length, h, d = q.shape
  groups = h // k.shape[2]
  bq = cfg.block_q
  nq = length // bq
  (tiles, counts), _ = _tables(cfg.spec, length, bq, cfg.block_kv)
  in_specs = _query_tile_specs(groups, length, d, bq, tiles, counts)
  in_specs += [pl.BlockSpec((None, bq, None, d), lambda i, j, k: (j, i, k, 0)),
               pl.BlockSpec((None, None, bq), lambda i, j, k: (j, k, i)),
               pl.BlockSpec((None, None, bq), lambda i, j, k: (j, k, i))]
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [pl.BlockSpec((None, bq, None, d), lambda i, j, k: (j, i, k, 0))]
  if visits:
    nk = length // cfg.block_kv
    out_shape.append(jax.ShapeDtypeStruct((b, h, nq, nk), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, None, nk), lambda i, j, k: (j, k, i, 0)))
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, scale=d ** -0.5),
      grid=(nq, b, h),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret,
      name="flash_gpu_dq",
  )(jnp.asarray(tiles), jnp.asarray(counts), q, k, v, q_seg, kv_seg, do, lse, delta)


# --- backward: dk, dv -------------------------------------------------------------------------------------------------


def _dkv_kernel(tiles_ref, counts_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *visits_ref, cfg, scale, groups):
  bq, bk = cfg.block_q, cfg.block_kv
  ki = pl.program_id(0)
  k = k_ref[...]
  v = v_ref[...]
  kv_seg = kseg_ref[...]
  kv_ids = ki * bk + jnp.arange(bk, dtype=jnp.int32)

  def tile(t, carry):
    qt = tiles_ref[ki, t]
    start = pl.multiple_of(qt * bq, bq)
    if visits_ref:
      visits_ref[0][qt] += 1
    ok = _allowed(cfg.spec, start + jnp.arange(bq, dtype=jnp.int32), kv_ids, qseg_ref[pl.ds(start, bq)], kv_seg,
                  cfg.length)

    def head(g, carry):  # the G query heads that share this key / value head
      dk, dv = carry
      q = q_ref[pl.ds(start, bq), g, :]
      do = do_ref[pl.ds(start, bq), g, :]
      lse = lse_ref[g, pl.ds(start, bq)]
      delta = delta_ref[g, pl.ds(start, bq)]
      p = jnp.where(ok, jnp.exp(_scores(q, k, scale) - lse[:, None]), 0.0)
      dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
      dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
      ds = p * (dp - delta[:, None])
      dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
      return dk, dv

    return head(0, carry) if groups == 1 else jax.lax.fori_loop(0, groups, head, carry)

  _zero_visits(visits_ref)
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, counts_ref[ki], tile, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv(q, k, v, q_seg, kv_seg, do, lse, delta, cfg: _Config, visits: bool = False):
  b, length, h, d = q.shape
  kh = k.shape[2]
  groups = h // kh
  bq, bk = cfg.block_q, cfg.block_kv
  nk = length // bk
  _, (tiles, counts) = _tables(cfg.spec, length, bq, bk)
  full = lambda shape: pl.BlockSpec(shape, lambda i, j, n: (0,) * len(shape))
  per_group = pl.BlockSpec((None, length, groups, d), lambda i, j, n: (j, 0, n, 0))  # query heads n*G .. n*G+G-1
  key_tile = pl.BlockSpec((None, bk, None, d), lambda i, j, n: (j, i, n, 0))
  rows = pl.BlockSpec((None, groups, length), lambda i, j, n: (j, n, 0))
  in_specs = [full(tiles.shape), full(counts.shape), per_group, key_tile, key_tile,
              pl.BlockSpec((None, length), lambda i, j, n: (j, 0)), pl.BlockSpec((None, bk), lambda i, j, n: (j, i)),
              per_group, rows, rows]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  out_specs = [key_tile, key_tile]
  if visits:
    nq = length // bq
    out_shape.append(jax.ShapeDtypeStruct((b, kh, nk, nq), jnp.int32))
    out_specs.append(pl.BlockSpec((None, None, None, nq), lambda i, j, n: (j, n, i, 0)))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, scale=d ** -0.5, groups=groups),
      grid=(nk, b, kh),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=cfg.interpret,
      name="flash_gpu_dkv",
  )(jnp.asarray(tiles), jnp.asarray(counts), q, k, v, q_seg, kv_seg, do, lse, delta)


# --- custom_vjp -------------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, cfg):
  return _forward(q, k, v, q_seg, kv_seg, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg):
  o, lse = _forward(q, k, v, q_seg, kv_seg, cfg)
  return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg, res, do):
  q, k, v, q_seg, kv_seg, o, lse = res
  do = do.astype(q.dtype)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).transpose(0, 2, 1)  # [B, H, L]
  (dq,) = _dq(q, k, v, q_seg, kv_seg, do, lse, delta, cfg)
  dk, dv = _dkv(q, k, v, q_seg, kv_seg, do, lse, delta, cfg)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _config(q, k, v, q_seg, kv_seg, mask, block_q, block_kv, interpret) -> _Config:
  """Validates the call and returns its static configuration."""
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise ValueError(f"flash_gpu: q must be [B, L, H, D] and k, v [B, L, K, D] alike; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  b, lq, h, d = q.shape
  lk, kh = k.shape[1], k.shape[2]
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"flash_gpu: k / v {k.shape} do not match q {q.shape} in batch or head dimension")
  if lq != lk:
    raise ValueError(f"flash_gpu: self-attention only (Lq == Lk); got {lq} and {lk} (the decode kernel takes the rest)")
  if h % kh:
    raise ValueError(f"flash_gpu: query heads ({h}) must be a multiple of key/value heads ({kh})")
  if not _pow2(d) or d < 16:
    raise ValueError(f"flash_gpu: head dimension {d} must be a power of two >= 16 (Triton tile shapes)")
  if q_seg.shape != (b, lq) or kv_seg.shape != (b, lk):
    raise ValueError(f"flash_gpu: segment ids must be [B, L] = {(b, lq)}; got {q_seg.shape} and {kv_seg.shape}")
  if mask is not None:
    mask.check(lq, lk)
    if mask.kind == "full":
      mask = None
  bq = block_q or _default_block(lq)
  bk = block_kv or _default_block(lk)
  _check_block("block_q", bq, lq)
  _check_block("block_kv", bk, lk)
  warps = 4 if bq * bk <= 64 * 64 else 8
  return _Config(mask, lq, bq, bk, warps, 2, bool(interpret))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, mask: MaskSpec | None, *,
              block_q: int = 0, block_kv: int = 0, interpret: bool = False) -> jax.Array:
  """Block-sparse flash attention (Pallas-Triton), differentiable in q, k, v.

  Args:
    q: [B, L, H, D]; k, v: [B, L, K, D] with H a multiple of K; D a power of two >= 16. float32 or bfloat16. A length
      that is not a multiple of 16 is padded (`dlm_jax.kernels.padded_length`) and the padding dropped again.
    q_seg, kv_seg: int32 [B, L]: query i sees key j iff their ids are equal and kv_seg[j] >= 0.
    mask: a `MaskSpec` (None = full) over indices.
    block_q, block_kv: tile sizes, powers of two >= 16 dividing L; 0 = 64, or the largest power of two below it that
      divides L.
    interpret: Pallas interpret mode (runs on CPU).
  Returns: [B, L, H, D] in q's dtype, softmax scale D ** -0.5; zeros for a query with no allowed key.
  """
  lq = q.shape[1]
  length = kernels.padded_length(mask, lq, MIN_TILE) if lq == k.shape[1] else lq
  q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
  if length != lq:  # padded keys (-1) are never attended, padded queries (-1) see nothing; their rows are dropped
    q, k, v = (kernels.pad(x, mask, lq, length) for x in (q, k, v))
    q_seg, kv_seg = kernels.pad(q_seg, mask, lq, length, -1), kernels.pad(kv_seg, mask, lq, length, -1)
  cfg = _config(q, k, v, q_seg, kv_seg, mask, block_q, block_kv, interpret)
  o = _flash(q, k.astype(q.dtype), v.astype(q.dtype), q_seg, kv_seg, cfg)
  return o if length == lq else kernels.unpad(o, mask, lq, length)


def tile_visits(q, k, v, q_seg, kv_seg, mask: MaskSpec | None, *, block_q: int = 0, block_kv: int = 0,
                interpret: bool = True):
  """Testing aid: how many times each kernel visited each tile, as int32 arrays (forward [B, H, nq, nk], dq
  [B, H, nq, nk], dk / dv [B, K, nk, nq]; the dk / dv count is per query tile, over all G query heads at once). A
  kernel that visits exactly `mask.tile_table`'s tiles gives `mask.tile_mask(...)` (and its transpose) in each."""
  cfg = _config(q, k, v, q_seg, kv_seg, mask, block_q, block_kv, interpret)
  q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
  o, lse, fwd = _forward(q, k, v, q_seg, kv_seg, cfg, visits=True)
  do = jnp.ones_like(o)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
  _, dq = _dq(q, k, v, q_seg, kv_seg, do, lse, delta, cfg, visits=True)
  _, _, dkv = _dkv(q, k, v, q_seg, kv_seg, do, lse, delta, cfg, visits=True)
  return fwd, dq, dkv
