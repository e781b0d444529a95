"""Cached decode attention: a window of queries against a K/V cache, or a canvas masked over positions (forward only).

The samplers' forwards (`dlm_jax.model.cached_logits_fn`, `logits_fn(block_size=...)`) attend Lq queries (a window of
1..64 tokens, or the whole canvas) to Lk cached keys whose rows are left-padded (negative key segment id) and whose
mask, when there is one, is causal or block-causal over POSITIONS, not indices. Two Pallas kernels, one algorithm:

  "tpu"  Pallas TPU (Mosaic): grid (batch, kv head, query tile, key tile) with scalar prefetch
         (`pltpu.PrefetchScalarGridSpec`) of each row's key-tile range; the key-tile index_map is clamped into that
         range, so the steps past its end ask for the tile already in VMEM (no DMA), and `pl.when` skips their compute.
  "gpu"  Pallas Triton: grid (batch, kv head, query tile); each program loads its row's key-tile range and runs a
         `fori_loop` over exactly those tiles (the inner loop of FlashAttention-2, Dao 2023, with dynamic bounds).

Both use the online softmax of FlashAttention (Dao et al. 2022) in float32 with a finite mask value, so a query row
that sees no key keeps l = 0 and returns zeros. As in Flash-Decoding (Dao et al. 2023, "Flash-Decoding for long-context
inference") the few queries of a decode step are too small a matmul on their own; here the G query heads that share a
key / value head (GQA) are stacked with the window's queries into one [G * block_q, D] operand per kv head, so K / V are
read once per kv head and never repeated in memory. (Flash-Decoding's split of the key axis across programs with a
final log-sum-exp combine is not implemented: the grid parallelises over batch, kv heads and query tiles only.)

Per-row key ranges (computed in the wrapper with jnp, dynamic): for each (row, query tile) the smallest and largest key
index that any query of the tile may attend: keys with a non-negative segment id between the tile's smallest and
largest query segment id and, for causal / block-causal masks, whose order id (position, or position // block size) is
at most the tile's largest query order id. Causal and block-causal masks are monotone in the query position, so this
hull holds every allowed key: left padding is skipped from the front, a window's future blocks from the back, and with
Lq == Lk each query tile visits only the keys up to the end of its last query's block. Inside the visited tiles the
mask is applied elementwise: (q_seg == kv_seg) & (kv_seg >= 0) & (kv_order <= q_order), with the order ids computed in
the wrapper (position // block size; causal is block size 1, full mask all zeros), so no integer division happens
inside a kernel, and the block size is a traced scalar: the jitted wrapper (`_tpu`, `_gpu`: padding, layout, ranges,
pallas_call) compiles once per (platform, shapes, tiles), whatever the mask.

Shapes: q [B, Lq, H, D], k / v [B, Lk, K, D] with H a multiple of K (query head h uses kv head h // (H / K)), ids int32
[B, Lq] / [B, Lk]. Queries are padded to a tile multiple internally. Tiles (0 = default):
  TPU  block_kv 128, clamped to the cache (a single tile may have any length; several tiles need a multiple of 128:
       the key ids' lane dimension); block_q 128 (a multiple of 8), clamped to the queries. The cache is transposed to
       [B, K, Lk, D] (padded to a tile multiple when Lk is not one) so each key tile is a dense [block_kv, D] block.
  GPU  block_kv 64 (a power of two >= 16), clamped; block_q a power of two with (G rounded up to a power of two) *
       block_q >= 16 rows for `tl.dot`, default 64 rows per program. K / V stay in their [B, Lk, K, D] layout (strided
       loads, masked at the end of the cache and past a head size that is not a power of two).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from dlm_jax.masks import MaskSpec

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)  # finite: exp(MASK_VALUE - m) is 0, never NaN
TPU_BLOCK_Q, TPU_BLOCK_KV = 128, 128
GPU_ROWS, GPU_BLOCK_KV = 64, 64
LANES = 128  # TPU vector lanes: several key tiles must each be a multiple of this


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _next_pow2(x: int) -> int:
  return 1 << max(int(x) - 1, 0).bit_length()


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


# --- the shared wrapper logic -----------------------------------------------------------------------------------------


def _check(q, k, v, q_seg, kv_seg, q_pos, kv_pos, mask, platform):
  if platform not in ("tpu", "gpu"):
    raise ValueError(f"decode attention: platform must be 'tpu' or 'gpu', got {platform!r}")
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"decode attention: q must be [B, Lq, H, D] and k, v [B, Lk, K, D] of one shape; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  b, lq, h, d = q.shape
  _, lk, kh, dk = k.shape
  if k.shape[0] != b or dk != d:
    raise ValueError(f"decode attention: q {q.shape} and k / v {k.shape} differ in batch or head size")
  if h % kh:
    raise ValueError(f"decode attention: query heads ({h}) must be a multiple of key/value heads ({kh})")
  if lq == 0 or lk == 0 or d == 0:
    raise ValueError(f"decode attention: empty input (q {q.shape}, k {k.shape})")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"decode attention: q, k, v must share a dtype (got {q.dtype}, {k.dtype}, {v.dtype})")
  for name, x, n, axis in (("q_seg", q_seg, lq, "Lq"), ("kv_seg", kv_seg, lk, "Lk"), ("q_pos", q_pos, lq, "Lq"),
                           ("kv_pos", kv_pos, lk, "Lk")):
    if tuple(x.shape) != (b, n):
      raise ValueError(f"decode attention: {name} must be [B, {axis}] = {(b, n)}, got {tuple(x.shape)}")
  if mask is not None and mask.kind not in ("full", "causal", "block_causal"):
    raise ValueError(f"decode attention: a {mask} mask is over indices, not positions; only full, causal and "
                     "block-causal masks run in the decode kernel")


def order_ids(pos, block):
  """[B, L] int32 ids with key j allowed for query i iff order[j] <= order[i]: the block position // block (causal is
  block 1; the division happens here, never inside a kernel), zeros for block 0 (full mask: always allowed). `block` is
  a traced int32 scalar, so every mask shares one compiled kernel per shape."""
  pos = pos.astype(jnp.int32)
  return jnp.where(block > 0, pos // jnp.maximum(block, 1), 0).astype(jnp.int32)


def tile_ranges(q_seg, kv_seg, q_ord, kv_ord, block_q: int, block_kv: int):
  """[B, nq, 2] int32: per row and query tile, the half-open range [lo, hi) of key tiles that can hold a key some query
  of the tile may attend (empty: lo == hi == 0). q_* are [B, nq * block_q] (padded by repeating the last query), kv_*
  [B, Lk]. The hull of the keys with kv_seg >= 0, kv_seg within the tile's [min, max] query segment and kv_ord <= the
  tile's largest query order id: every allowed key lies in it, since the order predicate is monotone in the query."""
  b, lqp = q_seg.shape
  lk = kv_seg.shape[1]
  nq = lqp // block_q
  qs = q_seg.reshape(b, nq, block_q)
  ks = kv_seg[:, None, :]
  ok = (ks >= 0) & (ks >= qs.min(-1)[..., None]) & (ks <= qs.max(-1)[..., None])  # [B, nq, Lk]
  ok = ok & (kv_ord[:, None, :] <= q_ord.reshape(b, nq, block_q).max(-1)[..., None])
  any_ok = ok.any(-1)
  first = jnp.argmax(ok, axis=-1)
  last = lk - 1 - jnp.argmax(ok[..., ::-1], axis=-1)
  lo = jnp.where(any_ok, first // block_kv, 0)
  hi = jnp.where(any_ok, last // block_kv + 1, 0)
  return jnp.stack([lo, hi], axis=-1).astype(jnp.int32)


def _pad_rows(x, n: int, axis: int = 1):
  """x padded along `axis` to length n by repeating its last entry (padded queries copy the last real one)."""
  extra = n - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, mode="edge")


def _pad_to(x, n: int, axis: int, value=0):
  extra = n - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, mask: MaskSpec | None, *, platform: str, block_q: int = 0,
              block_kv: int = 0, interpret: bool = False):
  """Attention of q [B, Lq, H, D] over the cache k, v [B, Lk, K, D]: out[b, i] attends to the keys j with
  q_seg[b, i] == kv_seg[b, j], kv_seg[b, j] >= 0 and mask.allows(q_pos[b, i], kv_pos[b, j]) (mask None = full),
  softmax scale D ** -0.5; a query with no such key returns zeros. Returns [B, Lq, H, D] in q's dtype.

  platform "tpu" (Pallas TPU / Mosaic) or "gpu" (Pallas Triton); block_q / block_kv 0 = defaults (module docstring);
  interpret: run the kernel in Pallas interpret mode (any host). ValueError for shapes or tiles the kernel cannot take.
  """
  _check(q, k, v, q_seg, kv_seg, q_pos, kv_pos, mask, platform)
  block = 0 if mask is None or mask.kind == "full" else mask.block_size  # a causal spec has block size 1
  fn = _tpu if platform == "tpu" else _gpu
  return fn(q, k, v, q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32), q_pos, kv_pos, jnp.int32(block),
            block_q=block_q, block_kv=block_kv, interpret=interpret)


# --- TPU: Pallas Mosaic -----------------------------------------------------------------------------------------------


def _tpu_tiles(lq: int, lk: int, block_q: int, block_kv: int) -> tuple[int, int]:
  bq = block_q or TPU_BLOCK_Q
  if bq % 8:
    raise ValueError(f"decode attention (TPU): block_q must be a multiple of 8, got {bq}")
  bq = min(bq, _round_up(lq, 8))
  bk = block_kv or TPU_BLOCK_KV
  if bk % 8:
    raise ValueError(f"decode attention (TPU): block_kv must be a multiple of 8, got {bk}")
  if bk >= lk:
    bk = _round_up(lk, 8)  # one tile: the whole cache
  elif bk % LANES:
    raise ValueError(f"decode attention (TPU): block_kv must be a multiple of {LANES} when the cache ({lk} keys) "
                     f"spans several tiles, got {bk}")
  return bq, bk


def _tpu_kernel(ranges_ref, q_ref, qs_ref, qo_ref, ks_ref, ko_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *,
                nq: int, scale: float):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  base = 2 * (b * nq + i)
  lo, hi = ranges_ref[base], ranges_ref[base + 1]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(lo + j < hi)
  def _step():
    s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale  # [R, bk]
    ks = ks_ref[...]  # [1, bk]
    ok = (qs_ref[...] == ks) & (ks >= 0) & (ko_ref[...] <= qo_ref[...])  # [R, bk]
    s = jnp.where(ok, s, MASK_VALUE)
    m_prev = m_sc[...]  # [R, 1]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.where(ok, jnp.exp(s - m_next), 0.0)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_sc[...] = alpha * acc_sc[...] + jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                            preferred_element_type=jnp.float32)
    m_sc[...] = m_next

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_sc[...]
    o_ref[...] = jnp.where(l > 0, acc_sc[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "interpret"))
def _tpu(q, k, v, q_seg, kv_seg, q_pos, kv_pos, block, *, block_q, block_kv, interpret):
  b, lq, h, d = q.shape
  lk, kh = k.shape[1], k.shape[2]
  g = h // kh
  bq, bk = _tpu_tiles(lq, lk, block_q, block_kv)
  lqp, lkp = _round_up(lq, bq), _round_up(lk, bk)
  nq, rows = lqp // bq, g * bq
  q_ord, kv_ord = order_ids(q_pos, block), order_ids(kv_pos, block)
  q_seg, q_ord = _pad_rows(q_seg, lqp), _pad_rows(q_ord, lqp)
  ranges = tile_ranges(q_seg, kv_seg, q_ord, kv_ord, bq, bk)
  # queries: [B, K, nq, G * bq, D], row r = g * bq + (query within the tile)
  qt = _pad_to(q, lqp, 1).reshape(b, nq, bq, kh, g, d).transpose(0, 3, 1, 4, 2, 5).reshape(b, kh, nq, rows, d)
  kt = _pad_to(k.transpose(0, 2, 1, 3), lkp, 2)
  vt = _pad_to(v.transpose(0, 2, 1, 3), lkp, 2)

  def q_ids(x):  # [B, Lqp] -> [B, nq, G * bq, 1]
    return jnp.broadcast_to(x.reshape(b, nq, 1, bq), (b, nq, g, bq)).reshape(b, nq, rows, 1)

  def kv_ids(x, fill):  # [B, Lk] -> [B, 1, Lkp]
    return _pad_to(x, lkp, 1, fill)[:, None, :]

  out = _tpu_call(ranges.reshape(-1), qt, q_ids(q_seg), q_ids(q_ord), kv_ids(kv_seg, -1), kv_ids(kv_ord, 0), kt, vt,
                  nq=nq, bk=bk, interpret=interpret)
  out = out.reshape(b, kh, nq, g, bq, d).transpose(0, 2, 4, 1, 3, 5).reshape(b, lqp, h, d)
  return out[:, :lq]


def _tpu_call(ranges, qt, qs, qo, ks, ko, kt, vt, *, nq: int, bk: int, interpret: bool):
  """The pallas_call on prepared operands: ranges [B * nq * 2], qt [B, K, nq, G * bq, D], query ids [B, nq, G * bq, 1],
  key ids [B, 1, Lkp], kt / vt [B, K, Lkp, D]."""
  b, kh, _, rows, d = qt.shape
  nk = kt.shape[2] // bk

  def tile(bi, i, j, r):  # the key tile of step j: clamped into [lo, hi) so steps past the range refetch nothing
    lo, hi = r[2 * (bi * nq + i)], r[2 * (bi * nq + i) + 1]
    return jnp.minimum(lo + j, jnp.maximum(hi - 1, lo))

  q_spec = pl.BlockSpec((None, None, None, rows, d), lambda bi, hd, i, j, r: (bi, hd, i, 0, 0))
  qid_spec = pl.BlockSpec((None, None, rows, 1), lambda bi, hd, i, j, r: (bi, i, 0, 0))
  kid_spec = pl.BlockSpec((None, 1, bk), lambda bi, hd, i, j, r: (bi, 0, tile(bi, i, j, r)))
  kv_spec = pl.BlockSpec((None, None, bk, d), lambda bi, hd, i, j, r: (bi, hd, tile(bi, i, j, r), 0))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b, kh, nq, nk),
      in_specs=[q_spec, qid_spec, qid_spec, kid_spec, kid_spec, kv_spec, kv_spec], out_specs=q_spec,
      scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                      pltpu.VMEM((rows, d), jnp.float32)])
  kernel = functools.partial(_tpu_kernel, nq=nq, scale=d ** -0.5)
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(qt.shape, qt.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret, name="decode_attention_tpu",
  )(ranges, qt, qs, qo, ks, ko, kt, vt)


# --- GPU: Pallas Triton -----------------------------------------------------------------------------------------------


def _gpu_tiles(lq: int, lk: int, g: int, block_q: int, block_kv: int) -> tuple[int, int, int]:
  gp = _next_pow2(g)
  if block_q and not _is_pow2(block_q):
    raise ValueError(f"decode attention (GPU): block_q must be a power of two, got {block_q}")
  bq = min(block_q or max(1, GPU_ROWS // gp), _next_pow2(lq))
  bq = max(bq, -(-16 // gp))  # tl.dot needs >= 16 rows
  bk = block_kv or GPU_BLOCK_KV
  if not _is_pow2(bk) or bk < 16:
    raise ValueError(f"decode attention (GPU): block_kv must be a power of two >= 16, got {bk}")
  bk = min(bk, max(16, _next_pow2(lk)))
  return gp, bq, bk


def _gpu_kernel(ranges_ref, qs_ref, qo_ref, ks_ref, ko_ref, q_ref, k_ref, v_ref, o_ref, *, lk: int, d: int, bk: int,
                scale: float):
  rows, dp = q_ref.shape
  lo, hi = ranges_ref[0], ranges_ref[1]
  q = q_ref[...]
  qs = qs_ref[...]
  qo = qo_ref[...]
  dmask = (jnp.arange(dp) < d)[None, :]

  def body(t, carry):
    acc, m, l = carry
    start = t * bk
    inb = start + jnp.arange(bk) < lk
    span = pl.ds(start, bk)
    ks = plgpu.load(ks_ref.at[span], mask=inb, other=-1)
    kk = plgpu.load(k_ref.at[span, :], mask=inb[:, None] & dmask, other=0.0)
    s = jax.lax.dot_general(q, kk, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    ko = plgpu.load(ko_ref.at[span], mask=inb, other=0)
    ok = (qs[:, None] == ks[None, :]) & (ks >= 0)[None, :] & (ko[None, :] <= qo[:, None])
    s = jnp.where(ok, s, MASK_VALUE)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_next)
    p = jnp.where(ok, jnp.exp(s - m_next[:, None]), 0.0)
    l = alpha * l + jnp.sum(p, axis=1)
    vv = plgpu.load(v_ref.at[span, :], mask=inb[:, None] & dmask, other=0.0)
    acc = alpha[:, None] * acc + jax.lax.dot_general(p.astype(vv.dtype), vv, (((1,), (0,)), ((), ())),
                                                     preferred_element_type=jnp.float32)
    return acc, m_next, l

  init = (jnp.zeros((rows, dp), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, _, l = jax.lax.fori_loop(lo, hi, body, init)
  out = jnp.where(l[:, None] > 0, acc / jnp.where(l > 0, l, 1.0)[:, None], 0.0)
  o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_q", "block_kv", "interpret"))
def _gpu(q, k, v, q_seg, kv_seg, q_pos, kv_pos, block, *, block_q, block_kv, interpret):
  b, lq, h, d = q.shape
  lk, kh = k.shape[1], k.shape[2]
  g = h // kh
  gp, bq, bk = _gpu_tiles(lq, lk, g, block_q, block_kv)
  dp = max(16, _next_pow2(d))
  lqp = _round_up(lq, bq)
  nq, rows = lqp // bq, gp * bq
  q_ord, kv_ord = order_ids(q_pos, block), order_ids(kv_pos, block)
  q_seg, q_ord = _pad_rows(q_seg, lqp), _pad_rows(q_ord, lqp)
  ranges = tile_ranges(q_seg, kv_seg, q_ord, kv_ord, bq, bk)
  # queries: [B, K, nq, Gp * bq, Dp] (query heads padded to a power of two per kv head, the head size to Dp)
  qt = _pad_to(_pad_to(q, lqp, 1).reshape(b, lqp, kh, g, d), gp, 3)
  qt = _pad_to(qt, dp, 4).reshape(b, nq, bq, kh, gp, dp).transpose(0, 3, 1, 4, 2, 5).reshape(b, kh, nq, rows, dp)

  def q_ids(x):  # [B, Lqp] -> [B, nq, Gp * bq]
    return jnp.broadcast_to(x.reshape(b, nq, 1, bq), (b, nq, gp, bq)).reshape(b, nq, rows)

  out = _gpu_call(ranges, q_ids(q_seg), q_ids(q_ord), kv_seg, kv_ord, qt, k, v, bk=bk, interpret=interpret)
  out = out.reshape(b, kh, nq, gp, bq, dp)[:, :, :, :g, :, :d].transpose(0, 2, 4, 1, 3, 5).reshape(b, lqp, h, d)
  return out[:, :lq]


def _gpu_call(ranges, qs, qo, ks, ko, qt, k, v, *, bk: int, interpret: bool):
  """The pallas_call on prepared operands: ranges [B, nq, 2], query ids [B, nq, Gp * bq], key ids [B, Lk],
  qt [B, K, nq, Gp * bq, Dp], k / v [B, Lk, K, D]."""
  b, kh, nq, rows, dp = qt.shape
  lk, d = k.shape[1], k.shape[3]
  q_spec = pl.BlockSpec((None, None, None, rows, dp), lambda bi, hd, i: (bi, hd, i, 0, 0))
  qid_spec = pl.BlockSpec((None, None, rows), lambda bi, hd, i: (bi, i, 0))
  kid_spec = pl.BlockSpec((None, lk), lambda bi, hd, i: (bi, 0))
  kv_spec = pl.BlockSpec((None, lk, None, dp), lambda bi, hd, i: (bi, 0, hd, 0))
  range_spec = pl.BlockSpec((None, None, 2), lambda bi, hd, i: (bi, i, 0))
  kernel = functools.partial(_gpu_kernel, lk=lk, d=d, bk=bk, scale=d ** -0.5)
  return pl.pallas_call(
      kernel, grid=(b, kh, nq), in_specs=[range_spec, qid_spec, qid_spec, kid_spec, kid_spec, q_spec, kv_spec, kv_spec],
      out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(qt.shape, qt.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=4 if dp <= 64 else 8, num_stages=2),
      interpret=interpret, name="decode_attention_gpu",
  )(ranges, qs, qo, ks, ko, qt, k, v)
