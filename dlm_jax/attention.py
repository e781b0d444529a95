"""The one attention entry point.

Every attention call in dlm_jax goes through `attention()`. Masks are described, never materialised by callers:
segment ids (packing and padding; a negative key id is padding and is never attended to) and a hashable
`dlm_jax.masks.MaskSpec` (full, causal, block-causal(b), the BD3-LM [x_t | x_0] mask). A query row with no allowed key
(padding) returns zeros. `implementation` selects the kernel:

  "xla"  dense attention written as two einsums around a float32 softmax, with a hand-written backward pass that
         reuses the forward probabilities (fewer passes over the [B, H, Lq, Lk] scores than autodiff of
         `jax.nn.dot_product_attention`), over query blocks sized to stay in cache. Fwd + bwd at B=8, H=8, L=512 on
         this project's 2-core CPU: 273 ms for jax.nn.dot_product_attention, 140 ms here.
  "reference"  `jax.nn.dot_product_attention` differentiated by JAX: the baseline the benchmarks and tests compare to.
  "splash"  TPU: splash attention (`dlm_jax.kernels.splash`): forward and backward, the spec as a computable mask,
         empty tiles skipped, under shard_map on a mesh.
  "pallas_gpu"  GPU: our own Pallas-Triton block-sparse flash attention (`dlm_jax.kernels.flash_gpu`): forward and
         backward, GQA without repeating K/V, visits only the key tiles `MaskSpec.tile_table` lists.
  "auto"  resolved by `resolve()` from the platform: splash on TPU, pallas_gpu on GPU, xla on CPU.
With splash / pallas_gpu, queries against a K/V cache (Lq != Lk) or a mask over positions go to the cached decode
kernel (`dlm_jax.kernels.decode`, TPU and GPU variants; forward only: the samplers' forwards).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dlm_jax import registry
from dlm_jax.masks import MaskSpec

IMPLEMENTATIONS = registry.register_attention(("auto", "xla", "reference", "splash", "pallas_gpu"))
KERNELS = {"splash": "tpu", "pallas_gpu": "gpu"}  # Pallas implementation -> the platform it compiles for


def resolve(implementation: str, platform: str, interpret: bool = False) -> str:
  """The implementation a run uses on `platform` ("cpu", "tpu", "gpu"/"cuda"/"rocm"); ValueError (one line, naming the
  fix) for a kernel the platform cannot run. `interpret`: Pallas kernels run in interpret mode (any platform)."""
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if implementation == "auto":
    return {"tpu": "splash", "gpu": "pallas_gpu"}.get(platform, "xla")
  needs = KERNELS.get(implementation)
  if needs and needs != platform and not interpret:
    raise ValueError(f"model.attention={implementation!r} runs on {needs.upper()} but this run's devices are "
                     f"{platform}; use model.attention='auto' (or 'xla'), or model.attention_interpret=True to run the "
                     "kernel in Pallas interpret mode (slow; for testing)")
  return implementation


def check_kernel(implementation: str, head_dim: int, block_q: int, block_kv: int) -> None:
  """ValueError (one line naming the key to change) for a model shape or tile size the kernel cannot take; raised when
  the model is configured, not when it is traced."""
  if implementation == "pallas_gpu" and (head_dim < 16 or head_dim & (head_dim - 1)):
    raise ValueError(f"model.attention='pallas_gpu' needs a head dimension that is a power of two >= 16 (Triton tiles), "
                     f"got {head_dim}; change model.head_dim or use model.attention='xla'")
  for key, size in (("model.attention_block_q", block_q), ("model.attention_block_kv", block_kv)):
    if implementation == "splash" and size % 128:
      raise ValueError(f"model.attention='splash' takes tiles that are multiples of 128, got {key}={size}; "
                       "use 0 (default 128) or 128, 256, 512, ...")
    if implementation == "pallas_gpu" and size and size < 16:
      raise ValueError(f"model.attention='pallas_gpu' takes tiles >= 16, got {key}={size}; use 0 (default 64) or 16..128")


# Internal layout: q [B, K, G, Lq, D] (K key/value heads, G query heads per key head), k / v [B, K, Lk, D],
# scores [B, K, G, Lq, Lk]. Batched matmuls over (B, K) with (G, Lq) as one free dimension need no transposes.


def _probs(q, k, bias, scale):
  s = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    s = s + bias
  s = s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  e = jnp.exp(s)
  return e / jnp.sum(e, axis=-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dense(q, k, v, bias, scale):
  return _dense_fwd(q, k, v, bias, scale)[0]


def _dense_fwd(q, k, v, bias, scale):
  p = _probs(q, k, bias, scale)
  o = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v)
  return o, (q, k, v, bias, p, o)


def _dense_bwd(scale, res, do):
  q, k, v, bias, p, o = res
  dv = jnp.einsum("bkgqs,bkgqd->bksd", p.astype(v.dtype), do)
  dp = jnp.einsum("bkgqd,bksd->bkgqs", do, v, preferred_element_type=jnp.float32)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  ds = (p * (dp - delta)).astype(q.dtype)
  dq = jnp.einsum("bkgqs,bksd->bkgqd", ds, k) * scale
  dk = jnp.einsum("bkgqs,bkgqd->bksd", ds, q) * scale
  return dq, dk, dv, None if bias is None else jnp.zeros_like(bias)


_dense.defvjp(_dense_fwd, _dense_bwd)

# Query blocks are processed one after another (lax.map) so that each block's scores stay near this size: the
# softmax passes then run from cache instead of memory (1.35x faster fwd + bwd at B=8, H=8, L=512 on CPU).
_BLOCK_BYTES = 16 * 2**20


def _query_chunks(b: int, h: int, lq: int, lk: int) -> int:
  per_row = b * h * lk * 4
  n = 1
  while lq % (2 * n) == 0 and lq // n > 64 and per_row * (lq // n) > _BLOCK_BYTES:
    n *= 2
  return n


def _dense_chunked(q, k, v, bias, scale):
  b, kh, g, lq, d = q.shape
  n = _query_chunks(b, kh * g, lq, k.shape[2])
  if n == 1:
    return _dense(q, k, v, bias, scale)
  qc = jnp.moveaxis(q.reshape(b, kh, g, n, lq // n, d), 3, 0)
  if bias is None:
    oc = jax.lax.map(lambda qq: _dense(qq, k, v, None, scale), qc)
  else:
    bb = bias.shape
    bc = jnp.moveaxis(bias.reshape(*bb[:3], n, lq // n, bb[4]), 3, 0)
    oc = jax.lax.map(lambda a: _dense(a[0], k, v, a[1], scale), (qc, bc))
  return jnp.moveaxis(oc, 0, 3).reshape(b, kh, g, lq, d)


def _allowed(spec, q_segment_ids, kv_segment_ids, q_positions, kv_positions, b, lq, lk):
  """[B or 1, 1, Lq, Lk] bool (or None = everything allowed): the spec and the segments, densely (xla, reference)."""
  allowed = None
  if q_segment_ids is not None or kv_segment_ids is not None:
    if kv_segment_ids is None:
      kv_segment_ids = q_segment_ids
    if q_segment_ids is None:
      q_segment_ids = jnp.zeros((b, lq), kv_segment_ids.dtype)
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    allowed = (same & (kv_segment_ids >= 0)[:, None, :])[:, None, :, :]
  if spec is not None and spec.kind != "full":
    if uses_positions(spec, q_positions):
      m = spec.allows(q_positions[:, :, None], kv_positions[:, None, :], lk)[:, None]
    else:
      m = jnp.asarray(spec.dense(lq, lk))[None, None]
    allowed = m if allowed is None else (allowed & m)
  return allowed


def uses_positions(spec: MaskSpec | None, q_positions) -> bool:
  """Causal and block-causal masks are evaluated over the given positions (sampling canvases: left padding, windows
  against a K/V cache); the BD3 mask is over indices (its [x_t | x_0] input repeats positions)."""
  return spec is not None and spec.kind in ("causal", "block_causal") and q_positions is not None


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None, mask: MaskSpec | None = None,
              q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
              implementation: str = "xla", block_q: int = 0, block_kv: int = 0,
              interpret: bool = False) -> jax.Array:
  """Multi-head attention with grouped-query support.

  Args:
    q: [B, Lq, H, D]; k, v: [B, Lk, K, D] with H a multiple of K.
    q_segment_ids, kv_segment_ids: int [B, Lq] / [B, Lk]; a query attends to keys of its own segment; keys with a
      negative id (padding) are never attended to. Both None = one segment.
    mask: a `MaskSpec` (None = full). Causal / block-causal are evaluated over q_positions / kv_positions ([B, Lq] /
      [B, Lk]) when given (a left-padded canvas, a window against a K/V cache), else over indices.
    implementation: "xla", "reference", "splash", "pallas_gpu" (resolve "auto" first: `resolve`).
    block_q, block_kv: kernel tile sizes (0 = the kernel's default). interpret: run Pallas kernels in interpret mode.
  Returns: [B, Lq, H, D] in q's dtype; zeros for a query row with no allowed key.
  """
  if implementation not in IMPLEMENTATIONS or implementation == "auto":
    raise ValueError(f"attention implementation {implementation!r}: choose one of {IMPLEMENTATIONS[1:]} "
                     "(resolve 'auto' with attention.resolve)")
  b, lq, h, d = q.shape
  lk, kh = k.shape[1], k.shape[2]
  if h % kh:
    raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kh})")
  if mask is not None and mask.kind == "full":
    mask = None
  if mask is not None and not uses_positions(mask, q_positions):
    mask.check(lq, lk)
  if uses_positions(mask, q_positions) and kv_positions is None:
    if lq != lk:
      raise ValueError("a causal / block-causal mask over positions needs kv_positions when Lq != Lk")
    kv_positions = q_positions
  if implementation in KERNELS:
    from dlm_jax import kernels  # the Pallas kernels (imported on use: they pull in jax.experimental.pallas)
    return kernels.attention(q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, mask=mask,
                             q_positions=q_positions if uses_positions(mask, q_positions) else None,
                             kv_positions=kv_positions if uses_positions(mask, q_positions) else None,
                             platform=KERNELS[implementation], block_q=block_q, block_kv=block_kv,
                             interpret=interpret)
  g = h // kh
  allowed = _allowed(mask, q_segment_ids, kv_segment_ids, q_positions, kv_positions, b, lq, lk)
  if implementation == "reference":
    o = jax.nn.dot_product_attention(q, k, v, mask=allowed, implementation="xla")
    return o if allowed is None else jnp.where(jnp.any(allowed, -1)[:, 0, :, None, None], o, 0).astype(o.dtype)
  bias = None
  if allowed is not None:
    if allowed.shape[1] == 1:
      allowed = allowed[:, :, None]  # [B, 1, 1, Lq, Lk]
    bias = jnp.broadcast_to(jnp.where(allowed, 0.0, -1e30).astype(jnp.float32),
                            (allowed.shape[0],) + allowed.shape[1:3] + (lq, lk))
  qt = q.reshape(b, lq, kh, g, d).transpose(0, 2, 3, 1, 4)
  o = _dense_chunked(qt, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), bias, d ** -0.5)
  o = o.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)
  if allowed is not None:  # rows with no allowed key: zeros (their softmax is uniform over the masked keys)
    o = jnp.where(jnp.any(allowed, -1)[:, 0, 0, :, None, None], o, 0).astype(o.dtype)
  return o
