"""Attention masks as hashable specs: what every attention implementation needs to know about a mask, computed once.

A `MaskSpec` names a structured pattern over query / key indices; it never holds an array, so it is a static argument
of jit and a key for caching compiled kernels. Segment ids are not part of the spec: `dlm_jax.attention.attention`
takes them as arrays (packing and padding; a negative key id is never attended) and combines them with the spec.

  full               every query sees every key (bidirectional diffusion models)
  causal             key index <= query index (autoregressive)
  block_causal(b)    key block <= query block, block = index // b (block diffusion at sampling time, Arriola et al.
                     2025, BD3-LM; block_causal(1) is causal)
  bd3(b)             the BD3-LM training mask over the [x_t | x_0] input of length 2L (Arriola et al. 2025, eq. 7):
                     with blk = (index mod L) // b and x0 = index >= L,
                       M_BD  = (blk_q == blk_kv) & (x0_q == x0_kv)   a noisy block sees itself, a clean block itself
                       M_OBC = (blk_q >  blk_kv) & x0_kv & ~x0_q     a noisy block sees the clean blocks before it
                       M_BC  = (blk_q >= blk_kv) & x0_kv & x0_q      the clean half is block-causal

Each spec gives
  `allows(q_ids, kv_ids, lk)`   the elementwise predicate, written with operators that work on numpy arrays (host) and
                                inside Pallas kernels (TPU and GPU): block numbers use a shift when b is a power of two
                                (integer division inside a computable mask does not lower for TPU from a CPU host)
  `dense(lq, lk)`               the [lq, lk] boolean form: the oracle every kernel is tested against
  `row_intervals(lq, lk)`       per query row, the allowed keys as at most two index intervals (O(L), no L x L array)
  `tile_table(lq, lk, bq, bk)`  per query tile, the key tiles that hold at least one allowed entry: what a block-sparse
                                kernel visits (the GPU kernel iterates exactly these; `tiles_visited` counts them)
  `splash_mask(lq, lk)`         the splash-attention mask object (a computable mask: no L x L host array)
Queries are at key indices 0..lq-1 (self-attention); `full` also allows lq != lk (cross / cached attention).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

KINDS = ("full", "causal", "block_causal", "bd3")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  kind: str = "full"
  block_size: int = 1

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown mask kind {self.kind!r}; choose one of {KINDS}")
    if self.block_size < 1:
      raise ValueError(f"mask block size must be >= 1, got {self.block_size}")
    if self.kind in ("full", "causal") and self.block_size != 1:
      raise ValueError(f"a {self.kind} mask has no block size (got {self.block_size})")

  def __str__(self):
    return self.kind if self.kind in ("full", "causal") else f"{self.kind}({self.block_size})"

  # --- checks ---------------------------------------------------------------------------------------------------------

  def check(self, lq: int, lk: int) -> None:
    """ValueError unless the spec is defined for these lengths."""
    if self.kind != "full" and lq != lk:
      raise ValueError(f"a {self} mask needs as many queries as keys (got {lq} and {lk})")
    if self.kind == "bd3" and (lk % 2 or (lk // 2) % self.block_size):
      raise ValueError(f"a {self} mask needs an [x_t | x_0] input of 2L keys with L a multiple of {self.block_size} "
                       f"(got {lk})")

  # --- the predicate --------------------------------------------------------------------------------------------------

  def _block(self, ids):
    b = self.block_size
    if b & (b - 1) == 0:
      return ids >> (b.bit_length() - 1)
    return ids // b

  def allows(self, q_ids, kv_ids, lk: int):
    """Elementwise: may query index q_ids attend to key index kv_ids (broadcasting; numpy or jax int32 arrays)."""
    if self.kind == "full":
      return (q_ids >= 0) | (kv_ids >= 0)  # all True, shaped like the broadcast of both
    if self.kind == "causal":
      return kv_ids <= q_ids
    if self.kind == "block_causal":
      return self._block(kv_ids) <= self._block(q_ids)
    half = lk // 2
    xq, xk = q_ids >= half, kv_ids >= half
    bq = self._block(q_ids - half * xq.astype(q_ids.dtype))
    bk = self._block(kv_ids - half * xk.astype(kv_ids.dtype))
    return (((bq == bk) & (xq == xk)) | ((bq > bk) & xk & ~xq)) | ((bq >= bk) & xk & xq)

  def dense(self, lq: int, lk: int) -> np.ndarray:
    """[lq, lk] bool, True = may attend: the oracle."""
    self.check(lq, lk)
    return np.asarray(self.allows(np.arange(lq, dtype=np.int32)[:, None], np.arange(lk, dtype=np.int32)[None, :], lk))

  # --- sparsity -------------------------------------------------------------------------------------------------------

  def row_intervals(self, lq: int, lk: int) -> np.ndarray:
    """[lq, 2, 2] int: per query row, two half-open key intervals [lo, hi) whose union is the allowed set (an unused
    interval is empty, lo == hi)."""
    self.check(lq, lk)
    i = np.arange(lq, dtype=np.int64)
    out = np.zeros((lq, 2, 2), np.int64)
    b = self.block_size
    if self.kind == "full":
      out[:, 0, 1] = lk
    elif self.kind == "causal":
      out[:, 0, 1] = i + 1
    elif self.kind == "block_causal":
      out[:, 0, 1] = np.minimum((i // b + 1) * b, lk)
    else:
      half = lk // 2
      noisy = i < half
      blk = np.where(noisy, i, i - half) // b
      # noisy rows: own block in x_t, clean blocks before it in x_0; clean rows: x_0 up to the end of their block
      out[:, 0, 0] = np.where(noisy, blk * b, half)
      out[:, 0, 1] = np.where(noisy, blk * b + b, half + (blk + 1) * b)
      out[:, 1, 0] = np.where(noisy, half, 0)
      out[:, 1, 1] = np.where(noisy, half + blk * b, 0)
    return out

  def tile_mask(self, lq: int, lk: int, bq: int, bk: int) -> np.ndarray:
    """[ceil(lq / bq), ceil(lk / bk)] bool: which (query tile, key tile) pairs hold at least one allowed entry."""
    nq, nk = -(-lq // bq), -(-lk // bk)
    iv = self.row_intervals(lq, lk)
    rows = np.repeat(np.arange(lq) // bq, 2)
    lo, hi = iv[:, :, 0].reshape(-1), iv[:, :, 1].reshape(-1)
    used = hi > lo
    diff = np.zeros((nq, nk + 1), np.int64)
    np.add.at(diff, (rows[used], lo[used] // bk), 1)
    np.add.at(diff, (rows[used], -(-hi[used] // bk)), -1)
    return np.cumsum(diff, axis=1)[:, :nk] > 0

  def tile_table(self, lq: int, lk: int, bq: int, bk: int) -> tuple[np.ndarray, np.ndarray]:
    """(tiles [nq, m] int32, counts [nq] int32): for query tile i, the key tiles tiles[i, :counts[i]] in increasing
    order are the non-empty ones; the rest of the row repeats the last of them (a kernel that fetches it again does no
    extra memory traffic). m = the largest count."""
    return tile_rows(self.tile_mask(lq, lk, bq, bk))

  def tiles_visited(self, lq: int, lk: int, bq: int, bk: int) -> tuple[int, int]:
    """(key tiles a block-sparse kernel visits, tiles of the dense [lq, lk] score matrix)."""
    tm = self.tile_mask(lq, lk, bq, bk)
    return int(tm.sum()), int(tm.size)

  # --- kernels' forms -------------------------------------------------------------------------------------------------

  def splash_mask(self, lq: int, lk: int, shard_count: int = 1):
    """The splash-attention mask (`jax.experimental.pallas.ops.tpu.splash_attention`): a computable mask evaluated
    inside the kernel from this spec's predicate, hashable by (spec, shape) so kernels are cached per signature."""
    self.check(lq, lk)
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    if self.kind == "full":
      return sm.FullMask((lq, lk))
    if self.kind == "causal":
      return sm.CausalMask((lq, lk), shard_count=shard_count)
    return _splash_mask_class()(self, (lq, lk), shard_count)


def tile_rows(tm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(tiles [n, m] int32, counts [n] int32) from a boolean tile mask [n, n']: row r lists its True columns in increasing
  order, padded with the last of them (`MaskSpec.tile_table`; the transposed mask gives the query tiles per key tile)."""
  counts = tm.sum(axis=1).astype(np.int32)
  tiles = np.zeros((tm.shape[0], max(int(counts.max(initial=0)), 1)), np.int32)
  for r in range(tm.shape[0]):
    idx = np.flatnonzero(tm[r])
    if idx.size:
      tiles[r, :idx.size] = idx
      tiles[r, idx.size:] = idx[-1]
  return tiles, counts


FULL = MaskSpec("full")
CAUSAL = MaskSpec("causal")


def block_causal(block_size: int) -> MaskSpec:
  return MaskSpec("block_causal", block_size)


def bd3(block_size: int) -> MaskSpec:
  return MaskSpec("bd3", block_size)


@functools.cache
def _splash_mask_class():
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  class SpecMask(sm._ComputableMask):  # pylint: disable=protected-access
    """A splash computable mask whose predicate is a MaskSpec's."""

    def __init__(self, spec: MaskSpec, shape: tuple[int, int], shard_count: int = 1):
      self.spec = spec
      lk = shape[1]
      super().__init__(shape=shape, mask_function=lambda q, k: spec.allows(q, k, lk), shard_count=shard_count)

    def __eq__(self, other):
      return isinstance(other, SpecMask) and (self.spec, self.shape) == (other.spec, other.shape)

    def __hash__(self):
      return hash((type(self), self.spec, self.shape))

  return SpecMask
