"""The cached decode attention kernels (dlm_jax.kernels.decode): TPU (Pallas Mosaic) and GPU (Pallas Triton) variants in
interpret mode against the dense oracle, the per-row key tile ranges, and the model's sampler-facing forwards with
attention_impl "splash" / "pallas_gpu" against attention_impl "xla".

Compiling is what costs time here: `decode.attention` is one jitted program per (platform, shapes, tiles) whatever the
mask (the mask enters as a traced block size), so every mask and padding layout of a shape runs on one compilation.
The oracle of the many cases is `dense`: the definition of `dlm_jax.attention.attention` (segments, padding, the spec's
`allows` over positions, zeros for a row with no allowed key) in float64 numpy, so it compiles nothing; it is checked
against implementation="reference" itself on every mask, and the empty-row and tile-skipping tests use the reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import masks
from dlm_jax import model as model_lib
from dlm_jax.attention import attention as attention_api
from dlm_jax.kernels import decode
from dlm_jax.maths import PAD

MASKS = (None, masks.CAUSAL, masks.block_causal(4), masks.block_causal(16))
LK = 300  # not a tile multiple: the TPU variant pads the cache to 384 (3 tiles of 128), the GPU one masks its loads
PADS = {"none": (0, 0, 0), "left": (0, 37, 170)}  # per-row left padding of the cache
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}


@pytest.fixture(autouse=True, scope="module")
def _quick_compiles():
  """Interpret-mode kernels are large XLA programs: compile them without XLA's costlier optimisations (a third faster
  here; the results do not depend on it beyond rounding)."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def _layout(pads, lk):
  """kv_seg (-1 at left padding) and kv_pos (numbered from each row's first real token), as `maths.pad_layout`."""
  kv_seg = np.zeros((len(pads), lk), np.int32)
  kv_pos = np.zeros((len(pads), lk), np.int32)
  for b, p in enumerate(pads):
    kv_seg[b, :p] = -1
    kv_pos[b, p:] = np.arange(lk - p)
  return kv_seg, kv_pos


def _qkv(seed, b, lq, lk, h, kh, d, dtype):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((b, lq, h, d), (b, lk, kh, d), (b, lk, kh, d)))
  return q, k, v


def dense(q, k, v, q_seg, kv_seg, q_pos, kv_pos, mask):
  """The oracle in float64: softmax(q k^T / sqrt(D)) v over the allowed keys, zeros for a row with none."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, lq, h, d = q.shape
  lk, kh = k.shape[1], k.shape[2]
  allowed = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] >= 0)
  if mask is not None:
    allowed = allowed & np.asarray(mask.allows(q_pos[:, :, None], kv_pos[:, None, :], lk))
  qg = q.reshape(b, lq, kh, h // kh, d)
  s = np.einsum("bqkgd,bskd->bkgqs", qg, k) * d ** -0.5
  s = np.where(allowed[:, None, None], s, -np.inf)
  m = s.max(-1, keepdims=True)
  p = np.exp(s - np.where(np.isfinite(m), m, 0))
  l = p.sum(-1, keepdims=True)
  o = np.einsum("bkgqs,bskd->bqkgd", p / np.where(l > 0, l, 1), v)
  return o.reshape(b, lq, h, d)


def _reference(q, k, v, q_seg, kv_seg, q_pos, kv_pos, mask):
  """implementation="reference" with the same arguments (positions only for a mask over positions)."""
  q_seg, kv_seg, q_pos, kv_pos = (jnp.asarray(x, jnp.int32) for x in (q_seg, kv_seg, q_pos, kv_pos))
  return attention_api(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, mask=mask,
                       q_positions=None if mask is None else q_pos, kv_positions=None if mask is None else kv_pos,
                       implementation="reference")


def _check(platform, mask, q, k, v, q_seg, kv_seg, q_pos, kv_pos, what, **tiles):
  ids = [jnp.asarray(x, jnp.int32) for x in (q_seg, kv_seg, q_pos, kv_pos)]
  out = decode.attention(q, k, v, *ids, mask, platform=platform, interpret=True, **tiles)
  assert out.shape == q.shape and out.dtype == q.dtype
  out = np.asarray(out, np.float32)
  ref = dense(q, k, v, np.asarray(q_seg), np.asarray(kv_seg), np.asarray(q_pos), np.asarray(kv_pos), mask)
  np.testing.assert_allclose(out, ref, atol=TOL[q.dtype.type], rtol=TOL[q.dtype.type], err_msg=f"{what} {mask}")
  return out


def test_the_oracle_is_the_reference_implementation():
  """`dense` equals implementation="reference" on every mask, a left-padded window and a full canvas, and a row with no
  allowed key."""
  kv_seg, kv_pos = _layout((0, 11, 40), 40)
  for lq, start in ((5, 17), (40, 0)):
    q, k, v = _qkv(2, 3, lq, 40, 4, 2, 8, jnp.float32)
    q_seg, q_pos = np.zeros((3, lq), np.int32), kv_pos[:, start:start + lq]
    for mask in MASKS:
      np.testing.assert_allclose(np.asarray(_reference(q, k, v, q_seg, kv_seg, q_pos, kv_pos, mask)),
                                 dense(q, k, v, q_seg, kv_seg, q_pos, kv_pos, mask), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# The kernels against the dense oracle


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_windows_against_a_cache(platform, heads, dtype):
  """Windows of Lq in {1, 4, 16} queries at start offsets over the whole cache (before, across and after the left
  padding; at the end) with their positions taken from the cache, every mask, with and without left padding."""
  h, kh = heads
  rng = np.random.default_rng(0)
  for pad_name, pads in PADS.items():
    kv_seg, kv_pos = _layout(pads, LK)
    for lq in (1, 4, 16):
      q, k, v = _qkv(lq, len(pads), lq, LK, h, kh, 16, dtype)
      for start in (0, 30, int(rng.integers(40, LK - lq)), 165, LK - lq):
        q_seg = np.zeros((len(pads), lq), np.int32)
        q_pos = kv_pos[:, start:start + lq]
        for mask in MASKS:
          _check(platform, mask, q, k, v, q_seg, kv_seg, q_pos, kv_pos, f"{pad_name} pad, window [{start}, +{lq})")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_full_canvas_over_positions(platform, heads, dtype):
  """Lq == Lk: a whole left-padded canvas (the padding's queries have segment 0 and position 0, as `pad_layout` gives
  them), several query tiles each visiting its own key range."""
  h, kh = heads
  q, k, v = _qkv(1, 3, LK, LK, h, kh, 16, dtype)
  for pad_name, pads in PADS.items():
    kv_seg, kv_pos = _layout(pads, LK)
    q_seg = np.zeros_like(kv_seg)
    for mask in MASKS:
      _check(platform, mask, q, k, v, q_seg, kv_seg, kv_pos, kv_pos, f"{pad_name} pad, full canvas")


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_rows_with_no_allowed_key_are_exactly_zero(platform):
  """A fully padded row, queries of a segment no key has, a causal query before every key; with 3 query heads per kv
  head and a head size of 12 (the GPU variant pads both to powers of two)."""
  lq, lk, h, kh, d = 5, 40, 6, 2, 12
  q, k, v = _qkv(3, 3, lq, lk, h, kh, d, jnp.float32)
  kv_seg, kv_pos = _layout((0, 40, 9), lk)
  kv_pos[0] += 3  # row 0's keys start at position 3
  q_seg = np.zeros((3, lq), np.int32)
  q_seg[2, 1] = 7
  q_pos = np.array([[0, 1, 2, 3, 4], [0, 0, 0, 0, 0], [20, 21, 22, 23, 24]], np.int32)
  for mask in (None, masks.CAUSAL):
    out = _check(platform, mask, q, k, v, q_seg, kv_seg, q_pos, kv_pos, "empty rows")
    np.testing.assert_array_equal(out == 0, np.asarray(_reference(q, k, v, q_seg, kv_seg, q_pos, kv_pos, mask)) == 0)
    assert np.all(out[1] == 0) and np.all(out[2, 1] == 0)  # padding row; a segment no key has
    if mask is not None:
      assert np.all(out[0, :3] == 0) and np.all(out[0, 3:] != 0)  # positions 0..2 precede every key


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_key_tiles_outside_the_row_range_are_not_visited(platform):
  """NaN in K / V in every key tile outside a row's range (before its left padding's end, after its window's block):
  the output stays finite and equal to the oracle on the clean cache."""
  pads, lq, start, bk = (0, 37, 170), 4, 200, {"tpu": 128, "gpu": 64}[platform]
  mask = masks.block_causal(16)
  kv_seg, kv_pos = _layout(pads, LK)
  q, k, v = _qkv(5, len(pads), lq, LK, 4, 2, 16, jnp.float32)
  q_seg, q_pos = np.zeros((len(pads), lq), np.int32), kv_pos[:, start:start + lq]
  ranges = np.asarray(jax.jit(decode.tile_ranges, static_argnums=(4, 5))(
      jnp.asarray(q_seg), jnp.asarray(kv_seg), jnp.asarray(q_pos // 16), jnp.asarray(kv_pos // 16), lq, bk))[:, 0]
  poisoned = np.zeros((len(pads), LK), bool)
  for b, (lo, hi) in enumerate(ranges):
    # the last key any query of the row may see ends its block (positions of row b are index - pad)
    last = (int(q_pos[b].max()) // 16 + 1) * 16 - 1 + pads[b]
    assert lo == pads[b] // bk and hi == min(last, LK - 1) // bk + 1, (b, lo, hi)
    poisoned[b, :lo * bk] = poisoned[b, hi * bk:] = True
  assert poisoned.any(1).all()  # every row has tiles out of range
  bad = jnp.asarray(poisoned)[:, :, None, None]
  out = decode.attention(q, jnp.where(bad, jnp.nan, k), jnp.where(bad, jnp.nan, v), *map(jnp.asarray, (
      q_seg, kv_seg, q_pos, kv_pos)), mask, platform=platform, interpret=True, block_kv=bk)
  assert np.isfinite(np.asarray(out)).all()
  ref = _reference(q, k, v, q_seg, kv_seg, q_pos, kv_pos, mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_tile_ranges_of_a_full_canvas_follow_the_block_causal_mask():
  """Lq == Lk, block-causal(16) over positions, query tiles of 32 and key tiles of 64: each query tile's range ends at
  the tile holding the end of its last query's block and starts at the row's first real key."""
  kv_seg, kv_pos = _layout((0, 100), 256)
  order = jnp.asarray(kv_pos // 16)
  ranges = np.asarray(jax.jit(decode.tile_ranges, static_argnums=(4, 5))(
      jnp.zeros((2, 256), jnp.int32), jnp.asarray(kv_seg), order, order, 32, 64))
  for b, pad in enumerate((0, 100)):
    for i in range(8):
      last_pos = kv_pos[b, 32 * i + 31]
      last_key = min(pad + (last_pos // 16 + 1) * 16 - 1, 255)
      assert tuple(ranges[b, i]) == (pad // 64, last_key // 64 + 1), (b, i, ranges[b, i])


def test_bad_shapes_and_tiles_are_value_errors():
  q, k, v = _qkv(0, 1, 4, 300, 4, 2, 16, jnp.float32)
  q_ids, kv_ids = jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 300), jnp.int32)
  ids = (q_ids, kv_ids, q_ids, kv_ids)  # q_seg, kv_seg, q_pos, kv_pos
  with pytest.raises(ValueError, match="multiple of 128"):
    decode.attention(q, k, v, *ids, None, platform="tpu", block_kv=64, interpret=True)
  with pytest.raises(ValueError, match="multiple of 8"):
    decode.attention(q, k, v, *ids, None, platform="tpu", block_q=12, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    decode.attention(q, k, v, *ids, None, platform="gpu", block_kv=48, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    decode.attention(q, k, v, *ids, None, platform="gpu", block_q=12, interpret=True)
  with pytest.raises(ValueError, match="multiple of key/value heads"):
    decode.attention(q[:, :, :3], k, v, *ids, None, platform="gpu", interpret=True)
  with pytest.raises(ValueError, match="over indices"):
    decode.attention(q, k, v, *ids, masks.bd3(2), platform="tpu", interpret=True)
  with pytest.raises(ValueError, match="share a dtype"):
    decode.attention(q.astype(jnp.bfloat16), k, v, *ids, None, platform="tpu", interpret=True)
  with pytest.raises(ValueError, match="kv_seg must be"):
    decode.attention(q, k, v, ids[0], ids[0], ids[2], ids[3], None, platform="tpu", interpret=True)
  with pytest.raises(ValueError, match="platform"):
    decode.attention(q, k, v, *ids, None, platform="cpu", interpret=True)


def test_tpu_variant_compiles_for_a_tpu_topology():
  """The TPU variant compiles with Mosaic for a v5e slice (needs libtpu: skipped in the project's venv, which has none;
  run it where libtpu is installed, e.g. `python -m pytest tests/test_kernel_decode.py -k topology -o addopts=''`)."""
  pytest.importorskip("libtpu")
  import os
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host discovery without TPUs
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other processes may hold libtpu's lock file
  from jax.experimental import topologies
  device = topologies.get_topology_desc("v5e:2x2", platform="tpu").devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  for (b, lq, lk, h, kh, d), dtype, mask in (((2, 16, 1000, 8, 2, 128), jnp.bfloat16, masks.block_causal(4)),
                                             ((2, 1, 2048, 8, 8, 64), jnp.float32, None),
                                             ((2, 300, 300, 6, 2, 8), jnp.float32, masks.block_causal(3))):
    args = (spec((b, lq, h, d), dtype), spec((b, lk, kh, d), dtype), spec((b, lk, kh, d), dtype),
            spec((b, lq), jnp.int32), spec((b, lk), jnp.int32), spec((b, lq), jnp.int32), spec((b, lk), jnp.int32))
    fn = jax.jit(lambda *a, mask=mask: decode.attention(*a, mask, platform="tpu"))
    fn.trace(*args).lower(lowering_platforms=("tpu",)).compile()


def test_gpu_variant_lowers_to_triton_for_cuda():
  """The GPU variant lowers for CUDA on this CPU host (Triton IR in a custom call; PTX is compiled on a GPU only)."""
  s = jax.ShapeDtypeStruct
  args = (s((2, 16, 8, 128), jnp.bfloat16), s((2, 1000, 2, 128), jnp.bfloat16), s((2, 1000, 2, 128), jnp.bfloat16),
          s((2, 16), jnp.int32), s((2, 1000), jnp.int32), s((2, 16), jnp.int32), s((2, 1000), jnp.int32))
  fn = jax.jit(lambda *a: decode.attention(*a, masks.block_causal(4), platform="gpu"))
  text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "__gpu$xla.gpu.triton" in text and "decode_attention_gpu" in text


# ----------------------------------------------------------------------------------------------------------------------
# The model's sampler-facing forwards through the kernels

VOCAB = 29
BASE = model_lib.ModelConfig(vocab_in=VOCAB + 1, vocab_out=VOCAB, num_layers=2, d_model=32, num_heads=4,
                             num_kv_heads=2, head_dim=8, mlp_dim=64, max_seq_len=64, init_std=0.3)


@functools.lru_cache(maxsize=None)
def _network(impl: str):
  """(apply_fn, params): one random model, its forward with attention_impl `impl` (Pallas kernels in interpret mode)."""
  _, params = _xla_model()
  c = dataclasses.replace(BASE, attention_impl=impl, attention_interpret=impl != "xla")
  return model_lib.make_apply(model_lib.abstract(c)[0]), params


@functools.lru_cache(maxsize=None)
def _xla_model():
  return model_lib.init(BASE, 0)


@functools.lru_cache(maxsize=None)
def _forwards(impl: str):
  """Jitted sampler-facing forwards of `impl`: logits_fn(block_size=4) and cached_logits_fn with block size 4 / None
  (full forwards; windows against a cache)."""
  fn, params = _network(impl)
  logits = jax.jit(model_lib.logits_fn(fn, params, block_size=4))
  cached = {bs: jax.jit(model_lib.cached_logits_fn(fn, params, block_size=bs)) for bs in (4, None)}
  return logits, cached


def _canvas(length=24, pads=(5, 0)):
  rng = np.random.default_rng(7)
  tokens = rng.integers(0, VOCAB + 1, size=(len(pads), length))
  for b, p in enumerate(pads):
    tokens[b, :p] = PAD
  return jnp.asarray(tokens, jnp.int32)


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_model_forwards_match_xla(impl):
  """A left-padded canvas through logits_fn(block_size=4) and the full forward of cached_logits_fn(block_size=4)
  (block-causal over positions: Lq == Lk in the decode kernel), then windows of 4 against a cache (Lq != Lk):
  block-causal against the cache the kernel built, bidirectional (full mask; the cache's left padding skipped) against
  the xla forward's cache. Logits and updated caches equal the xla implementation's."""
  tokens = _canvas()
  t = jnp.zeros((2,), jnp.float32)
  kernel = f"decode_attention_{dict(splash='tpu', pallas_gpu='gpu')[impl]}"
  ref_logits, ref_cached = _forwards("xla")
  logits, cached = _forwards(impl)
  assert kernel in str(logits.trace(tokens, t).jaxpr)
  want = ref_logits(tokens, t)
  _close(logits(tokens, t), want)
  got_full, got_cache = cached[4](tokens, t, 0, None)
  want_full, want_cache = ref_cached[4](tokens, t, 0, None)
  _close(got_full, want)
  _close(want_full, want)
  jax.tree.map(_close, got_cache, want_cache)
  window = jnp.asarray([[3, 1, 4, 1], [5, 9, 2, 6]], jnp.int32)
  for bs, start in ((4, 12), (None, 20), (None, 2)):
    if bs is None:
      _, want_cache = ref_cached[bs](tokens, t, 0, None)
      got_cache = want_cache
    want_w, want_new = ref_cached[bs](window, t, jnp.int32(start), want_cache)
    assert kernel in str(cached[bs].trace(window, t, jnp.int32(start), got_cache).jaxpr)
    got_w, got_new = cached[bs](window, t, jnp.int32(start), got_cache)
    _close(got_w, want_w)
    jax.tree.map(_close, got_new, want_new)
