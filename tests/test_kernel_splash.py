"""TPU splash attention (`dlm_jax.kernels.splash`; splash attention = FlashAttention, Dao et al. 2022, with block-sparse
masks) against the dense oracle `dlm_jax.attention.attention(..., implementation="reference")`, run on CPU in Pallas
interpret mode.

Matrix: masks {full, causal, block_causal(4), block_causal(16), bd3(16), bd3(32)} x {MHA 4/4, GQA 4/2} x {float32,
bfloat16} at lengths 128 and 256 (128 = one tile; 256 = 2 x 2 tiles, so empty tiles are skipped and partial tiles
masked), plus bd3(32) at 512 with 256 x 128 tiles and head dim 128, and two lengths the kernel runs padded (200 -> 256,
bd3 at 64 -> 128). Every case holds the three segment layouts in its batch (one compile per case): row 0 no segments
(all ids 0, what the dispatcher passes for None), rows 1-2 left padding (row 1: key ids -1 on the left, query ids 0, so
causal rows over the padding have no key while their query id is valid; row 2: query and key ids -1 on the left, a
padded canvas), row 3 packed (segments 5, 0, 5, 2 - one id in two places - and trailing padding -1). Outputs AND
gradients (jax.vjp with a random cotangent) are compared, and rows with no allowed key must be exactly 0 in the output
and in dq.

Tolerances (elementwise |got - want| <= atol + rtol |want|, inputs and cotangent standard normal, head dim 64;
outputs are O(1), gradients up to ~7):
  float32   outputs atol = rtol = 1e-5, gradients atol = rtol = 1e-4. Both sides compute in float32 with float32
            accumulation; they differ only in summation order (online softmax over 128-key tiles vs one softmax, dk / dv
            summed tile by tile) and in pre-scaling q by D**-0.5. Measured: outputs <= 3e-6, gradients <= 6e-6.
  bfloat16  the oracle runs in float32 on the same bf16-rounded inputs. The kernel rounds q * D**-0.5 to bf16, takes
            q.k in bf16 with float32 accumulation, rounds its output and gradients to bf16 (relative step 2**-8 =
            3.9e-3), and its backward matmuls take bf16 probabilities / score gradients. Bounds: outputs atol = rtol =
            2e-2 (a few bf16 steps of an O(1) value); gradients atol = 5e-2 x max|want|, rtol 5e-2 (dk / dv sum up to
            512 rounded products). Measured: outputs <= 1e-2, gradients <= 2.4e-2 (<= 6e-3 x max|want|).
The sharded test runs in a subprocess with 4 host devices: under a (data=2, fsdp=1, tensor=2) mesh the dispatcher's
shard_map gives each device its batch rows and heads; outputs and gradients equal the one-device run to 1e-6 (they are
bitwise equal on CPU).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import attention as attn_lib
from dlm_jax import masks
from dlm_jax.kernels import splash

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [(masks.FULL, 128), (masks.CAUSAL, 256), (masks.block_causal(4), 256), (masks.block_causal(16), 128),
         (masks.bd3(16), 256), (masks.bd3(32), 256)]
HEADS = [(4, 4), (4, 2)]
# dtype -> (output atol, output rtol, gradient atol, gradient rtol); a bf16 gradient atol is a fraction of max|want|
TOL = {"float32": (1e-5, 1e-5, 1e-4, 1e-4), "bfloat16": (2e-2, 2e-2, 5e-2, 5e-2)}


def segments(length: int) -> tuple[np.ndarray, np.ndarray]:
  """[4, L] query and key segment ids: none, two left paddings, packed (see the module docstring)."""
  qs = np.zeros((4, length), np.int32)
  ks = np.zeros((4, length), np.int32)
  ks[1, :length // 4 + 5] = -1
  qs[2, :length // 3] = ks[2, :length // 3] = -1
  cuts = np.array([0.3, 0.55, 0.8, 0.92]) * length
  packed = np.repeat([5, 0, 5, 2, -1], np.diff(np.concatenate([[0], cuts.astype(int), [length]])))
  qs[3] = ks[3] = packed
  return qs, ks


def inputs(length, h, kh, dtype, d=64, seed=0):
  rng = np.random.default_rng(seed)
  b = 4
  arrays = [rng.standard_normal(s, np.float32) for s in ((b, length, h, d), (b, length, kh, d), (b, length, kh, d),
                                                         (b, length, h, d))]
  q, k, v, ct = (jnp.asarray(a, dtype) for a in arrays)
  qs, ks = segments(length)
  return q, k, v, ct, jnp.asarray(qs), jnp.asarray(ks)


@functools.lru_cache(maxsize=None)
def fwd_bwd(implementation: str, spec: masks.MaskSpec, block_q: int = 0, block_kv: int = 0):
  """jit (q, k, v, q_seg, kv_seg, cotangent) -> (output, (dq, dk, dv)); one function per (implementation, spec), so
  the float32 oracle compiles once for both dtypes of a case."""

  def run(q, k, v, qs, ks, ct):
    def f(q, k, v):
      return attn_lib.attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks, mask=spec, implementation=implementation,
                                block_q=block_q, block_kv=block_kv, interpret=True)
    o, vjp = jax.vjp(f, q, k, v)
    return o, vjp(ct)

  return jax.jit(run)


def empty_rows(spec, qs, ks) -> np.ndarray:
  """[B, L] bool: query rows with no allowed key."""
  length = qs.shape[1]
  allowed = spec.dense(length, length)[None] & (qs[:, :, None] == ks[:, None, :]) & (ks >= 0)[:, None, :]
  return ~allowed.any(-1)


def check(spec, length, h, kh, dtype, block_q=0, block_kv=0, d=64):
  q, k, v, ct, qs, ks = inputs(length, h, kh, dtype, d=d)
  o, grads = fwd_bwd("splash", spec, block_q, block_kv)(q, k, v, qs, ks, ct)
  f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
  want_o, want_grads = fwd_bwd("reference", spec)(*f32[:3], qs, ks, f32[3])
  assert o.shape == q.shape and o.dtype == q.dtype
  assert all(g.dtype == x.dtype for g, x in zip(grads, (q, k, v)))
  o_atol, o_rtol, g_atol, g_rtol = TOL[jnp.dtype(dtype).name]
  np.testing.assert_allclose(np.asarray(o, np.float32), want_o, atol=o_atol, rtol=o_rtol, err_msg=f"{spec} output")
  for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
    w = np.asarray(w)
    atol = g_atol * (float(np.abs(w).max()) if dtype == jnp.bfloat16 else 1.0)
    np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=atol, rtol=g_rtol, err_msg=f"{spec} {name}")
  empty = empty_rows(spec, np.asarray(qs), np.asarray(ks))
  assert empty[2].any() and not empty[0].any()  # the padded canvas has empty rows, the unsegmented row none
  assert np.all(np.asarray(o)[empty] == 0), "rows with no allowed key must be exactly 0"
  assert np.all(np.asarray(grads[0])[empty] == 0), "rows with no allowed key get no query gradient"
  return empty


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("h,kh", HEADS, ids=["mha", "gqa"])
@pytest.mark.parametrize("spec,length", CASES, ids=[str(s) for s, _ in CASES])
def test_matches_reference(spec, length, h, kh, dtype):
  empty = check(spec, length, h, kh, jnp.dtype(dtype))
  if spec.kind in ("causal", "block_causal"):  # key padding empties rows whose query id is valid
    assert empty[1].any()


def test_length_512_rectangular_tiles():
  empty = check(masks.bd3(32), 512, 4, 2, jnp.float32, block_q=256, block_kv=128, d=128)
  assert empty[1, :32].all()  # noisy rows of the first block see only their x_t block, all key padding in row 1


@pytest.mark.parametrize("spec,length", [(masks.block_causal(16), 200), (masks.bd3(8), 64)], ids=str)
def test_padded_lengths(spec, length):
  """Lengths splash cannot tile run padded to 256 (at the end) and 128 (bd3: each half 32 -> 64)."""
  check(spec, length, 4, 2, jnp.float32)


def test_block_sizes():
  assert [splash.padded_length(s, n) for s, n in ((masks.FULL, 64), (masks.CAUSAL, 256), (masks.CAUSAL, 200),
                                                  (masks.bd3(8), 64), (masks.bd3(16), 256), (masks.bd3(48), 96),
                                                  (masks.bd3(4), 200))] == [128, 256, 256, 128, 256, 384, 256]
  assert splash.block_sizes(256) == (128, 128)
  assert splash.block_sizes(256, 512, 256) == (256, 256)  # clamped to the length
  assert splash.block_sizes(1024, 512, 256) == (512, 256)
  assert splash.block_sizes(384, 0, 256) == (128, 128)  # a tile that does not divide the length: the largest that does
  assert splash.block_sizes(1536, 1024, 1024) == (768, 768)
  for length, bq, bkv, what in ((192, 0, 0, "multiple of 128"), (64, 0, 0, "multiple of 128"),
                                (256, 96, 0, "block_q=96"), (256, -1, 0, ">= 0")):
    with pytest.raises(ValueError, match=what):
      splash.block_sizes(length, bq, bkv)
  q = jnp.zeros((1, 200, 2, 64))
  seg = jnp.zeros((1, 200), jnp.int32)
  with pytest.raises(ValueError, match="block_q=192 must be a multiple of 128"):  # checked on the padded length 256
    splash.attention(q, q, q, seg, seg, masks.CAUSAL, block_q=192, interpret=True)
  with pytest.raises(ValueError, match="multiple of key/value heads"):
    splash.attention(jnp.zeros((1, 128, 3, 64)), jnp.zeros((1, 128, 2, 64)), jnp.zeros((1, 128, 2, 64)), seg[:, :128],
                     seg[:, :128], None, interpret=True)


def test_kernels_cached_per_signature():
  kernel = splash._kernel  # pylint: disable=protected-access
  a = kernel(masks.bd3(16), 256, 4, 128, 128, True)
  assert kernel(masks.bd3(16), 256, 4, 128, 128, True) is a
  assert kernel(masks.bd3(32), 256, 4, 128, 128, True) is not a

  @jax.jit
  def first_made_in_a_trace(x):  # the cached kernel must hold no tracer of the trace that made it
    kern = kernel(masks.bd3(16), 256, 3, 128, 128, True)
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(kern))
    return x

  first_made_in_a_trace(jnp.zeros(()))


SHARDED = textwrap.dedent("""
  import json, types
  import jax, jax.numpy as jnp, numpy as np
  from dlm_jax import attention as attn_lib, masks, sharding
  from test_kernel_splash import segments

  assert jax.device_count() == 4
  mesh = sharding.make_mesh(types.SimpleNamespace(data=2, fsdp=1, tensor=2))
  out = {}
  # bd3 with GQA: batch over data, query and key/value heads over tensor; causal with one key/value head and 3 rows:
  # heads and batch do not divide, the dispatcher replicates them (gradients summed back correctly)
  for spec, b, h, kh in ((masks.bd3(16), 4, 4, 2), (masks.CAUSAL, 3, 4, 1)):
    rng = np.random.default_rng(1)
    q, ct = (jnp.asarray(rng.standard_normal((b, 256, h, 64)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, 256, kh, 64)), jnp.float32) for _ in range(2))
    qs, ks = (jnp.asarray(s[:b]) for s in segments(256))

    @jax.jit
    def run(q, k, v, qs, ks, ct):
      f = lambda q, k, v: attn_lib.attention(q, k, v, q_segment_ids=qs, kv_segment_ids=ks, mask=spec,
                                             implementation="splash", interpret=True)
      o, vjp = jax.vjp(f, q, k, v)
      return (o,) + vjp(ct)

    one = run(q, k, v, qs, ks, ct)
    with jax.set_mesh(mesh):
      assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v, qs, ks, ct))
      many = run(q, k, v, qs, ks, ct)
    out[str(spec)] = [float(jnp.abs(a - b).max()) for a, b in zip(one, many)] + [float(jnp.abs(one[1]).max())]
  print(json.dumps(out))
""")


def test_sharded_matches_one_device():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
  env["PYTHONPATH"] = os.pathsep.join([os.path.join(REPO, "tests"), REPO, env.get("PYTHONPATH", "")])
  r = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  diffs = json.loads(r.stdout.strip().splitlines()[-1])
  assert set(diffs) == {"bd3(16)", "causal"}
  for spec, (do, dq, dk, dv, scale) in diffs.items():
    assert scale > 0.1, spec  # the gradients are not trivially zero
    assert max(do, dq, dk, dv) <= 1e-6, (spec, diffs[spec])
