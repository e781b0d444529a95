"""The Pallas-Triton block-sparse flash attention (`dlm_jax.kernels.flash_gpu`), run on CPU in interpret mode, against
the dense oracle `dlm_jax.attention.attention(..., implementation="reference")`.

Matrix: masks {full, causal, block_causal(4), block_causal(16), bd3(16), bd3(32)} x heads {MHA 4/4, GQA 4/2} x dtypes
{float32, bfloat16}, each case with batch 3 = the segment layouts {none; left padding: kv_seg = -1 on the left of the
row, q_seg 0; packed: three segments then right padding with q_seg = kv_seg = -1}; lengths 128 and 256 with square,
non-square and default tiles; one case at length 512 through the public entry point. Outputs and the gradients dq, dk,
dv (jax.vjp with a random cotangent) are compared per batch row as max |kernel - oracle| / max |oracle|. Inputs and
cotangent hold bf16-representable values in both dtypes, so one float32 oracle serves both.

Tolerances (relative to scale):
  float32   output 1e-5, gradients 1e-4. Both sides compute in float32 (no TF32 on CPU) and differ only in summation
            order (online softmax over tiles, per-tile matmuls, dk / dv summed over the G heads in the kernel):
            measured <= 7e-7 for outputs and gradients, so the bounds leave a wide margin yet catch any masking or
            scaling mistake (those show up at >= 1e-2).
  bfloat16  output 1e-2, gradients 2.5e-2, against the oracle run in float32 on the same bf16-rounded inputs and
            cotangent. The kernel rounds the probabilities to bf16 before P @ V, dS to bf16 before dS @ K and dS^T @ Q
            (as FlashAttention-2 does on GPUs) and its results to bf16 (2^-8 relative each); summed over rows of up to
            a few hundred keys this gives measured errors <= 4e-3 for outputs and <= 5e-3 for gradients.
Exactness: a query row with no allowed key has exactly zero output and dq; a key that no query sees has exactly zero
dk and dv (in every dtype).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import masks
from dlm_jax.attention import attention as entry_attention
from dlm_jax.kernels import flash_gpu

D = 16
TOL = {"float32": (1e-5, 1e-4), "bfloat16": (1e-2, 2.5e-2)}  # (output, gradients), relative to the oracle's scale
LAYOUTS = ("none", "left padding", "packed")

# mask -> (length, block_q, block_kv); 0 = the kernel's default tile
CASES = {
    "full": (masks.FULL, 128, 32, 16),
    "causal": (masks.CAUSAL, 128, 16, 32),
    "block_causal(4)": (masks.block_causal(4), 128, 16, 16),
    "block_causal(16)": (masks.block_causal(16), 256, 32, 32),
    "bd3(16)": (masks.bd3(16), 128, 16, 16),
    "bd3(32)": (masks.bd3(32), 256, 0, 0),
}
HEADS = {"mha": (4, 4), "gqa": (4, 2)}


def _segments(length: int) -> tuple[np.ndarray, np.ndarray]:
  """q_seg, kv_seg [3, length]: the three layouts, one per batch row."""
  qs = np.zeros((3, length), np.int32)
  ks = np.zeros((3, length), np.int32)
  ks[1, :length * 3 // 10] = -1  # left padding: padding keys are never seen; early causal queries see nothing
  sizes = [length // 4, length // 3, length // 4]
  sizes.append(length - sum(sizes))
  qs[2] = ks[2] = np.repeat([0, 1, 2, -1], sizes)  # packed, then right padding (those queries see nothing)
  return qs, ks


def _allowed(spec, qs, ks) -> np.ndarray:
  """[B, L, L] bool: the dense mask, for the exact-zero checks."""
  length = qs.shape[1]
  return spec.dense(length, length)[None] & (qs[:, :, None] == ks[:, None, :]) & (ks[:, None, :] >= 0)


def _inputs(b, length, h, kh, seed):
  """q, k, v and the output cotangent as float32 arrays holding bf16-rounded values (so that the bf16 kernel and the
  float32 oracle see the same numbers)."""
  rng = np.random.default_rng(seed)
  shapes = ((b, length, h, D), (b, length, kh, D), (b, length, kh, D), (b, length, h, D))
  return [jnp.asarray(rng.normal(size=s), jnp.float32).astype(jnp.bfloat16).astype(jnp.float32) for s in shapes]


def _value_and_vjp(fn, q, k, v, ct):
  o, vjp = jax.vjp(fn, q, k, v)
  return (o,) + vjp(ct.astype(o.dtype))


@functools.lru_cache(maxsize=None)
def _oracle(spec, length, h, kh, seed):
  """The reference's (o, dq, dk, dv) in float32: shared by the float32 and bfloat16 cases of one mask and head count."""
  q, k, v, ct = _inputs(3, length, h, kh, seed)
  qs, ks = (jnp.asarray(a) for a in _segments(length))
  fn = lambda q, k, v: entry_attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks, mask=spec,
                                       implementation="reference")
  return tuple(np.asarray(x) for x in jax.jit(functools.partial(_value_and_vjp, fn))(q, k, v, ct))


def _check(name, got, want, allowed, dtype):
  """Per batch row (segment layout): relative error within tolerance; exact zeros where nothing is allowed."""
  out_tol, grad_tol = TOL[dtype]
  got = [np.asarray(x.astype(jnp.float32)) for x in got]
  for n, g, w in zip(("o", "dq", "dk", "dv"), got, want):
    assert g.shape == w.shape, (n, g.shape, w.shape)
    for row, layout in enumerate(LAYOUTS):
      err = np.max(np.abs(g[row] - w[row])) / np.max(np.abs(w[row]))
      assert err <= (out_tol if n == "o" else grad_tol), f"{name} {layout}: {n} relative error {err:.2e}"
  empty_q = ~allowed.any(axis=2)  # [B, L]: queries that see no key
  unseen_k = ~allowed.any(axis=1)  # [B, L]: keys no query sees
  assert np.all(got[0][empty_q] == 0) and np.all(got[1][empty_q] == 0), f"{name}: a fully masked query is not zero"
  assert np.all(got[2][unseen_k] == 0) and np.all(got[3][unseen_k] == 0), f"{name}: an unseen key has a gradient"
  return empty_q.any(), unseen_k.any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("mask", list(CASES))
def test_parity_with_dense_oracle(mask, heads, dtype):
  spec, length, bq, bk = CASES[mask]
  h, kh = HEADS[heads]
  seed = 10 * list(CASES).index(mask) + list(HEADS).index(heads)
  want = _oracle(spec, length, h, kh, seed)
  q, k, v, ct = (x.astype(dtype) for x in _inputs(3, length, h, kh, seed))
  qs, ks = _segments(length)
  fn = lambda q, k, v: flash_gpu.attention(q, k, v, jnp.asarray(qs), jnp.asarray(ks), spec, block_q=bq, block_kv=bk,
                                           interpret=True)
  got = jax.jit(functools.partial(_value_and_vjp, fn))(q, k, v, ct)
  assert got[0].dtype == q.dtype and got[1].dtype == q.dtype and got[2].dtype == k.dtype
  empty_q, unseen_k = _check(f"{mask} {heads} {dtype}", got, want, _allowed(spec, qs, ks), dtype)
  assert empty_q and unseen_k  # the layouts do exercise both exact-zero rules


def test_length_512_through_the_entry_point():
  """L = 512, default tiles (64), GQA, the BD3 mask, via `dlm_jax.attention.attention(implementation="pallas_gpu")`."""
  spec, length, h, kh = masks.bd3(32), 512, 4, 2
  q, k, v, ct = _inputs(3, length, h, kh, 7)
  qs, ks = (jnp.asarray(a) for a in _segments(length))
  run = lambda impl: jax.jit(functools.partial(_value_and_vjp, lambda q, k, v: entry_attention(
      q, k, v, q_segment_ids=qs, kv_segment_ids=ks, mask=spec, implementation=impl, interpret=True)))(q, k, v, ct)
  want = [np.asarray(x) for x in run("reference")]
  _check("bd3(32) L=512", run("pallas_gpu"), want, _allowed(spec, np.asarray(qs), np.asarray(ks)), "float32")


@pytest.mark.parametrize("spec,bq,bk", [(masks.bd3(16), 32, 16), (masks.CAUSAL, 16, 32),
                                        (masks.block_causal(48), 32, 32), (masks.FULL, 16, 16)])
def test_visits_exactly_the_tile_table(spec, bq, bk):
  """Each kernel visits exactly the tiles `MaskSpec.tile_table` lists, once each: forward and dq the key tiles of each
  query tile, dk / dv the query tiles of each key tile (the transpose)."""
  b, length, h, kh = 1, 256, 2, 1
  q, k = jnp.zeros((b, length, h, D)), jnp.zeros((b, length, kh, D))
  seg = jnp.zeros((b, length), jnp.int32)
  fwd, dq, dkv = flash_gpu.tile_visits(q, k, k, seg, seg, spec, block_q=bq, block_kv=bk)
  tiles, counts = spec.tile_table(length, length, bq, bk)
  table = np.zeros((length // bq, length // bk), np.int32)
  for i, c in enumerate(counts):
    table[i, tiles[i, :c]] += 1
  np.testing.assert_array_equal(fwd, np.broadcast_to(table, (b, h) + table.shape))
  np.testing.assert_array_equal(dq, np.broadcast_to(table, (b, h) + table.shape))
  np.testing.assert_array_equal(dkv, np.broadcast_to(table.T, (b, kh) + table.T.shape))
  assert table.sum() == spec.tiles_visited(length, length, bq, bk)[0]
  if spec.kind != "full":
    assert table.sum() < table.size  # sparsity is exploited


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cuda_lowering_forward_and_backward(dtype):
  """Lowered for CUDA on this CPU host, the loss and its gradient hold three Triton custom calls: forward, dq, dk / dv
  (PTX compilation happens on a GPU and is not checked here)."""
  b, length, h, kh, d = 2, 256, 4, 2, 32
  q = jax.ShapeDtypeStruct((b, length, h, d), dtype)
  kv = jax.ShapeDtypeStruct((b, length, kh, d), dtype)
  seg = jax.ShapeDtypeStruct((b, length), jnp.int32)
  for spec in (masks.bd3(16), masks.block_causal(12), None):
    def loss(q, k, v, qs, ks, spec=spec):
      return jnp.sum(flash_gpu.attention(q, k, v, qs, ks, spec).astype(jnp.float32) ** 2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(q, kv, kv, seg, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3, spec
    for name in ("flash_gpu_fwd", "flash_gpu_dq", "flash_gpu_dkv"):
      assert name in text, (spec, name)
    fwd = jax.jit(loss).trace(q, kv, kv, seg, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert fwd.count("__gpu$xla.gpu.triton") == 1 and "flash_gpu_fwd" in fwd


@pytest.mark.parametrize("shapes,kwargs,match", [
    (((1, 64, 2, 24), (1, 64, 2, 24)), {}, "power of two"),
    (((1, 64, 2, 8), (1, 64, 2, 8)), {}, "power of two"),
    (((1, 64, 2, 16), (1, 32, 2, 16)), {}, "Lq == Lk"),
    (((1, 64, 3, 16), (1, 64, 2, 16)), {}, "multiple of key/value heads"),
    (((1, 96, 2, 16), (1, 96, 2, 16)), {"block_q": 64}, "not a multiple"),
    (((1, 64, 2, 16), (1, 64, 2, 16)), {"block_kv": 24}, "power of two >= 16"),
    (((1, 64, 2, 16), (1, 64, 2, 16)), {"block_q": 8}, "power of two >= 16"),
])
def test_rejects_unsupported_shapes(shapes, kwargs, match):
  q, k = jnp.zeros(shapes[0]), jnp.zeros(shapes[1])
  qs, ks = jnp.zeros(shapes[0][:2], jnp.int32), jnp.zeros(shapes[1][:2], jnp.int32)
  with pytest.raises(ValueError, match=match):
    flash_gpu.attention(q, k, k, qs, ks, None, interpret=True, **kwargs)


@pytest.mark.parametrize("length,spec", [(8, None), (23, masks.CAUSAL), (20, masks.bd3(5))])
def test_unaligned_lengths_are_padded(length, spec):
  """Lengths that are not a multiple of 16 run padded (bd3: each half) and equal the dense oracle."""
  rng = np.random.default_rng(length)
  q, k, v = (jnp.asarray(rng.standard_normal((2, length, 2, 16)), jnp.float32) for _ in range(3))
  seg = jnp.asarray(np.where(np.arange(length)[None] < np.array([[0], [3]]), -1, 0), jnp.int32)
  got = flash_gpu.attention(q, k, v, seg, seg, spec, interpret=True)
  want = entry_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, mask=spec, implementation="reference")
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_default_tiles():
  # pylint: disable-next=protected-access
  assert [flash_gpu._default_block(n) for n in (16, 32, 96, 128, 192, 4096)] == [16, 32, 32, 64, 64, 64]
