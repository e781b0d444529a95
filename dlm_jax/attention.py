"""The one attention entry point.

Every attention call in dlm_jax goes through `attention()`. Masks are described, not materialised by callers:
segment ids (packing and padding; a negative id is padding and is never attended to) and an optional boolean mask for
structured patterns (later: block-diffusion masks). `implementation` selects the kernel; today "xla"
(`jax.nn.dot_product_attention`), later Pallas kernels (splash on TPU, a block-sparse kernel on GPU) behind the same call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


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
  Returns: [B, Lq, H, D] in q's dtype.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
  full = None
  if q_segment_ids is not None or kv_segment_ids is not None:
    if kv_segment_ids is None:
      kv_segment_ids = q_segment_ids
    if q_segment_ids is None:
      q_segment_ids = jnp.zeros(q.shape[:2], kv_segment_ids.dtype)
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    full = (same & (kv_segment_ids >= 0)[:, None, :])[:, None, :, :]
  if mask is not None:
    full = mask if full is None else (full & mask)
  return jax.nn.dot_product_attention(q, k, v, mask=full, implementation="xla")
