"""The one attention entry point.

Every attention call in dlm_jax goes through `attention()`. Masks are described, not materialised by callers:
segment ids (packing and padding; a negative id is padding and is never attended to) and an optional boolean mask for
structured patterns (later: block-diffusion masks). `implementation` selects the kernel:

  "xla"  dense attention written as two einsums around a float32 softmax, with a hand-written backward pass that
         reuses the forward probabilities (fewer passes over the [B, H, Lq, Lk] scores than autodiff of
         `jax.nn.dot_product_attention`; measured 1.8x faster for the training step's attention on CPU).
Pallas kernels (splash on TPU, a block-sparse kernel on GPU) are added here behind the same call.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def _scores(q, k, scale):
  # q [B, Lq, K, G, D], k [B, Lk, K, D] -> [B, K, G, Lq, Lk]
  return jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale


def _probs(q, k, bias, scale):
  s = _scores(q, k, scale)
  if bias is not None:
    s = s + bias
  s = s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  e = jnp.exp(s)
  return e / jnp.sum(e, axis=-1, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dense(q, k, v, bias, scale):
  p = _probs(q, k, bias, scale)
  return jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v)


def _dense_fwd(q, k, v, bias, scale):
  p = _probs(q, k, bias, scale)
  o = jnp.einsum("bkgqs,bskd->bqkgd", p.astype(v.dtype), v)
  return o, (q, k, v, bias, p, o)


def _dense_bwd(scale, res, do):
  q, k, v, bias, p, o = res
  pd = p.astype(v.dtype)
  dv = jnp.einsum("bkgqs,bqkgd->bskd", pd, do)
  dp = jnp.einsum("bqkgd,bskd->bkgqs", do, v, preferred_element_type=jnp.float32)
  delta = jnp.einsum("bqkgd,bqkgd->bkgq", do.astype(jnp.float32), o.astype(jnp.float32))[..., None]
  ds = (p * (dp - delta)).astype(q.dtype)
  dq = jnp.einsum("bkgqs,bskd->bqkgd", ds, k) * scale
  dk = jnp.einsum("bkgqs,bqkgd->bskd", ds, q) * scale
  dbias = None if bias is None else jnp.zeros_like(bias)
  return dq, dk, dv, dbias


_dense.defvjp(_dense_fwd, _dense_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array | None = None,
              kv_segment_ids: jax.Array | None = None, mask: jax.Array | None = None,
              implementation: str = "xla") -> jax.Array:
  """Bidirectional multi-head attention with grouped-query support.

  Args:
    q: [B, Lq, H, D]; k, v: [B, Lk, K, D] with H a multiple of K.
    q_segment_ids, kv_segment_ids: int [B, Lq] / [B, Lk]; a query attends to keys of its own segment; keys with a
      negative id (padding) are never attended to. Both None = everything attends to everything.
    mask: optional bool, broadcastable to [B, H, Lq, Lk]; True = may attend. Combined with the segment mask.
    implementation: "xla".
  Returns: [B, Lq, H, D] in q's dtype. A query row with no allowed key returns the mean of v (never NaN).
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
  b, lq, h, d = q.shape
  kh = k.shape[2]
  if h % kh:
    raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({kh})")
  g = h // kh
  allowed = None
  if q_segment_ids is not None or kv_segment_ids is not None:
    if kv_segment_ids is None:
      kv_segment_ids = q_segment_ids
    if q_segment_ids is None:
      q_segment_ids = jnp.zeros(q.shape[:2], kv_segment_ids.dtype)
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    allowed = (same & (kv_segment_ids >= 0)[:, None, :])[:, None, :, :]  # [B, 1, Lq, Lk]
  if mask is not None:
    allowed = mask if allowed is None else (allowed & mask)
  bias = None
  if allowed is not None:
    allowed = jnp.broadcast_to(allowed, (allowed.shape[0], allowed.shape[1]) + allowed.shape[2:])
    if allowed.shape[1] == 1:
      allowed = allowed[:, :, None]  # [B, 1, 1, Lq, Lk] against [B, K, G, Lq, Lk]
    else:
      allowed = allowed.reshape(allowed.shape[0], kh, g, *allowed.shape[2:])
    bias = jnp.where(allowed, 0.0, -1e30).astype(jnp.float32)
  o = _dense(q.reshape(b, lq, kh, g, d), k, v, bias, d ** -0.5)
  return o.reshape(b, lq, h, d)
