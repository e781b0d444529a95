"""The transformer (dlm_jax.model) and the attention entry point (dlm_jax.attention)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax import masks
from dlm_jax import model as model_lib
from dlm_jax.attention import attention
from dlm_jax.config import apply_overrides, default_config
from dlm_jax.sharding import RULES

VOCAB = 37
L = 16

BASE = model_lib.ModelConfig(vocab_in=VOCAB + 1, vocab_out=VOCAB, num_layers=2, d_model=32, num_heads=4,
                             num_kv_heads=4, head_dim=8, mlp_dim=64, max_seq_len=64, cond_dim=32)


def _config(**changes) -> model_lib.ModelConfig:
  return dataclasses.replace(BASE, **changes)


# Compiling is what costs time on CPU: every test uses batch 2 x length 16 and one jitted apply per config, so that
# calls with the same keyword arguments share one compilation.


@functools.lru_cache(maxsize=None)
def _model(c: model_lib.ModelConfig, seed: int = 0):
  graphdef, params = model_lib.init(c, seed)
  return graphdef, params, _jit_apply(graphdef)


@functools.lru_cache(maxsize=None)
def _apply_for(c: model_lib.ModelConfig):
  """A jitted apply for config `c` without initialising it (to run other parameters through it)."""
  return _jit_apply(model_lib.abstract(c)[0])


def _jit_apply(graphdef):
  return jax.jit(model_lib.make_apply(graphdef), static_argnames=("mask", "output_len"))


def _tokens(seed: int = 0, batch: int = 2, length: int = L) -> jnp.ndarray:
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB + 1, size=(batch, length)), jnp.int32)


def _bump(tokens, rows, cols, by=1):
  """Changes tokens[rows, cols] to different ids."""
  return tokens.at[rows, cols].set((tokens[rows, cols] + by) % (VOCAB + 1))


def _maxdiff(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def _perturb(params, path, scale, seed=0):
  """A copy of params with the leaf at `path` (a tuple of keys) replaced by random values."""
  params = jax.tree.map(lambda x: x, params)
  node = params
  for k in path[:-1]:
    node = node[k]
  leaf = node[path[-1]]
  node[path[-1]] = jnp.asarray(scale * np.random.default_rng(seed).standard_normal(leaf.shape), leaf.dtype)
  return params


# ----------------------------------------------------------------------------------------------------------------------
# Shapes, dtypes and parameter metadata


@pytest.mark.parametrize("changes", [{}, {"time_conditioning": True}, {"num_kv_heads": 2}])
def test_init_apply_shapes_and_dtype(changes):
  c = _config(**changes)
  graphdef, params, apply = _model(c)
  tokens = _tokens()
  logits = apply(params, tokens, t=jnp.full((2,), 0.5)) if c.time_conditioning else apply(params, tokens)
  assert logits.shape == (2, L, VOCAB)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  assert float(jnp.std(logits)) > 1e-3  # not a degenerate constant
  assert _maxdiff(logits[:, 0], logits[:, 1]) > 1e-4  # positions differ
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == jnp.float32


def test_init_is_seeded():
  _, p0, _ = _model(BASE, 0)
  _, p0b = model_lib.init(BASE, 0)
  _, p1, _ = _model(BASE, 1)
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p0b)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(p0["embed"], p1["embed"])
  assert not np.array_equal(p0["layer_0"]["wq"], p1["layer_0"]["wq"])


def test_init_values():
  c = BASE
  _, params, _ = _model(c)
  np.testing.assert_array_equal(params["final_norm"], np.ones(c.d_model))
  np.testing.assert_array_equal(params["layer_0"]["attn_norm"], np.ones(c.d_model))
  assert abs(float(np.std(params["embed"])) - c.init_std) < 0.003
  assert abs(float(np.std(params["layer_0"]["wq"])) - c.init_std) < 0.003
  # The residual output projections are scaled down by sqrt(2 * num_layers).
  assert abs(float(np.std(params["layer_0"]["w_down"])) - c.init_std / 2) < 0.002
  assert params["layer_0"]["wq"].shape == (32, 4, 8)
  assert params["layer_1"]["w_down"].shape == (64, 32)
  assert "layer_2" not in params


@pytest.mark.parametrize("changes", [{}, {"time_conditioning": True}, {"num_kv_heads": 2, "num_heads": 4}])
def test_abstract_params_have_logical_axes(changes):
  c = _config(**changes)
  graphdef, shapes, axes = model_lib.abstract(c)
  _, params, _ = _model(c)
  shape_leaves, shape_tree = jax.tree.flatten(shapes)
  param_leaves, param_tree = jax.tree.flatten(params)
  assert shape_tree == param_tree  # abstract() describes exactly what init() makes
  for s, p in zip(shape_leaves, param_leaves):
    assert isinstance(s, jax.ShapeDtypeStruct)
    assert s.shape == p.shape and s.dtype == p.dtype == jnp.float32
  is_meta = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)
  meta_leaves, meta_tree = jax.tree.flatten(axes, is_leaf=is_meta)
  assert meta_tree == shape_tree
  assert len(meta_leaves) == len(shape_leaves) > 0
  for (shape, logical), s in zip(meta_leaves, shape_leaves):
    assert shape == s.shape
    assert isinstance(logical, tuple) and len(logical) == len(shape)
    for name in logical:
      assert name in RULES, f"logical axis {name!r} has no sharding rule"
  assert axes["embed"] == ((c.vocab_in, c.d_model), ("vocab", "embed"))
  assert axes["head"] == ((c.d_model, c.vocab_out), ("embed", "vocab"))
  assert axes["layer_0"]["wk"] == ((c.d_model, c.num_kv_heads, c.head_dim), ("embed", "heads", "kv"))
  assert axes["layer_0"]["w_gate"][1] == ("embed", "mlp")
  if c.time_conditioning:
    assert axes["layer_1"]["ada"] == ((c.cond_dim, 6 * c.d_model), ("cond", "embed"))
    assert "final_ada" in axes
  else:
    assert "ada" not in axes["layer_0"] and "t_mlp1" not in axes


def test_model_config_from_config():
  cfg = default_config()
  apply_overrides(cfg, [("model.d_model", "48"), ("model.num_heads", "6"), ("model.num_kv_heads", "0"),
                        ("model.head_dim", "0"), ("train.compute_dtype", "bfloat16"),
                        ("model.time_conditioning", "true")])
  mc = model_lib.ModelConfig.from_config(cfg, 258, 257)
  assert (mc.vocab_in, mc.vocab_out, mc.num_kv_heads, mc.head_dim) == (258, 257, 6, 8)
  assert mc.dtype == jnp.bfloat16 and mc.time_conditioning
  apply_overrides(cfg, [("model.num_kv_heads", "2"), ("model.head_dim", "16"), ("train.compute_dtype", "float32")])
  mc = model_lib.ModelConfig.from_config(cfg, 258, 257)
  assert (mc.num_kv_heads, mc.head_dim, mc.dtype) == (2, 16, jnp.float32)


def test_num_params():
  c = BASE
  _, params, _ = _model(c)
  total = sum(x.size for x in jax.tree.leaves(params))
  assert model_lib.num_params(params) == total
  embeddings = c.vocab_in * c.d_model + c.d_model * c.vocab_out
  assert model_lib.num_params(params, exclude_embeddings=True) == total - embeddings


# ----------------------------------------------------------------------------------------------------------------------
# The whole forward pass against an independent float64 numpy implementation


def _reference_forward(c: model_lib.ModelConfig, params, tokens, t=None, segment_ids=None):
  """LLaMA-style bidirectional transformer with optional adaLN, written from the model's description."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  tokens = np.asarray(tokens)
  b, l = tokens.shape
  pos = np.arange(l)
  silu = lambda z: z / (1 + np.exp(-z))
  norm = lambda z, scale: z / np.sqrt((z * z).mean(-1, keepdims=True) + c.norm_eps) * scale

  def rotate(z):  # RoPE as a complex rotation of the pairs (i, i + D/2)
    d = z.shape[-1]
    zc = z[..., :d // 2] + 1j * z[..., d // 2:]
    zc = zc * np.exp(1j * pos[:, None] * c.rope_theta ** (-np.arange(0, d, 2) / d))[None, :, None, :]
    return np.concatenate([zc.real, zc.imag], axis=-1)

  cond = None
  if c.time_conditioning:
    half = c.cond_dim // 2
    args = 1000.0 * np.broadcast_to(np.asarray(t, np.float64), (b,))[:, None] * np.exp(
        -np.log(10000.0) * np.arange(half) / half)
    e = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
    e = silu(e @ p["t_mlp1"] + p["t_mlp1_b"])
    cond = silu(e @ p["t_mlp2"] + p["t_mlp2_b"])
  x = p["embed"][tokens]
  for i in range(c.num_layers):
    w = p[f"layer_{i}"]
    if cond is not None:
      sh1, sc1, g1, sh2, sc2, g2 = np.split((cond @ w["ada"] + w["ada_b"])[:, None, :], 6, axis=-1)
    else:
      sh1 = sh2 = 0.0
      sc1 = sc2 = 0.0
      g1 = g2 = 1.0
    h = norm(x, w["attn_norm"]) * (1 + sc1) + sh1
    q = rotate(np.einsum("bld,dhk->blhk", h, w["wq"]))
    k = rotate(np.einsum("bld,dhk->blhk", h, w["wk"]))
    v = np.einsum("bld,dhk->blhk", h, w["wv"])
    o = _reference_attention(q, k, v, segment_ids, segment_ids)
    x = x + g1 * np.einsum("blhk,hkd->bld", o, w["wo"])
    h = norm(x, w["mlp_norm"]) * (1 + sc2) + sh2
    x = x + g2 * ((silu(h @ w["w_gate"]) * (h @ w["w_up"])) @ w["w_down"])
  x = norm(x, p["final_norm"])
  if cond is not None:
    sh, sc = np.split((cond @ p["final_ada"])[:, None, :], 2, axis=-1)
    x = x * (1 + sc) + sh
  return x @ p["head"]


@pytest.mark.parametrize("changes", [{}, {"num_kv_heads": 2}])
def test_forward_matches_reference(changes):
  c = _config(**changes)
  _, params, apply = _model(c)
  tokens = _tokens(12)
  np.testing.assert_allclose(apply(params, tokens), _reference_forward(c, params, tokens), rtol=1e-4, atol=1e-5)


def test_forward_with_segments_matches_reference():
  _, params, apply = _model(BASE)
  tokens = _tokens(13)
  seg = np.asarray([[0] * 5 + [1] * 8 + [-1] * 3, [0] * 16])
  out = np.asarray(apply(params, tokens, segment_ids=jnp.asarray(seg)))
  ref = _reference_forward(BASE, params, tokens, segment_ids=seg)
  valid = seg >= 0  # padding positions' own logits are unspecified
  np.testing.assert_allclose(out[valid], ref[valid], rtol=1e-4, atol=1e-5)


def test_time_conditioned_forward_matches_reference():
  c = _config(time_conditioning=True)
  _, params, apply = _model(c)
  params = _perturb(params, ("layer_0", "ada"), 1.0, seed=3)
  params = _perturb(params, ("layer_1", "ada"), 1.0, seed=4)
  params = _perturb(params, ("layer_1", "ada_b"), 0.5, seed=5)
  params = _perturb(params, ("final_ada",), 1.0, seed=6)
  tokens = _tokens(14)
  t = np.array([0.15, 0.8], np.float32)
  out = apply(params, tokens, t=jnp.asarray(t))
  np.testing.assert_allclose(out, _reference_forward(c, params, tokens, t=t), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# Masks and bidirectionality


def test_segments_do_not_attend_to_each_other():
  _, params, apply = _model(BASE)
  tokens = _tokens(1)
  seg = jnp.asarray([[0] * 7 + [1] * 9, [0] * 3 + [1] * 13], jnp.int32)
  changed = _bump(tokens, 0, slice(7, None), 5)
  changed = _bump(changed, 1, slice(3, None), 5)
  a = apply(params, tokens, segment_ids=seg)
  b = apply(params, changed, segment_ids=seg)
  np.testing.assert_allclose(a[0, :7], b[0, :7], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(a[1, :3], b[1, :3], rtol=1e-6, atol=1e-6)
  assert _maxdiff(a[0, 7:], b[0, 7:]) > 1e-3 and _maxdiff(a[1, 3:], b[1, 3:]) > 1e-3
  # And the same edit does leak into segment 0 when everything attends to everything.
  full_a, full_b = apply(params, tokens), apply(params, changed)
  assert _maxdiff(full_a[0, :7], full_b[0, :7]) > 1e-4
  assert _maxdiff(full_a[1, :3], full_b[1, :3]) > 1e-4


def test_segment_of_a_document_is_independent_of_its_neighbours():
  _, params, apply = _model(BASE)
  tokens = _tokens(1)
  seg = jnp.asarray([[0] * 5 + [1] * 6 + [2] * 5] * 2, jnp.int32)
  changed = _bump(_bump(tokens, slice(None), slice(0, 5)), slice(None), slice(11, None), 2)
  a = apply(params, tokens, segment_ids=seg)
  b = apply(params, changed, segment_ids=seg)
  np.testing.assert_allclose(a[:, 5:11], b[:, 5:11], rtol=1e-6, atol=1e-6)
  assert _maxdiff(a[:, :5], b[:, :5]) > 1e-4 and _maxdiff(a[:, 11:], b[:, 11:]) > 1e-4


def test_padding_keys_are_ignored():
  _, params, apply = _model(BASE)
  tokens = _tokens(2)
  seg = jnp.asarray([[0] * 12 + [-1] * 4, [0] * 6 + [1] * 6 + [-1] * 4], jnp.int32)
  changed = _bump(tokens, slice(None), slice(12, None), 3)
  a = apply(params, tokens, segment_ids=seg)
  b = apply(params, changed, segment_ids=seg)
  assert np.all(np.isfinite(np.asarray(a))) and np.all(np.isfinite(np.asarray(b)))
  np.testing.assert_allclose(a[:, :12], b[:, :12], rtol=1e-6, atol=1e-6)
  # Padding keys are invisible, so the prefix is computed as if the padding were not there: the same tokens
  # followed by different padding-free context in a segment of its own gives the same logits.
  other = _bump(tokens, slice(None), slice(12, None), 7)
  seg2 = jnp.asarray([[0] * 12 + [5] * 4, [0] * 6 + [1] * 6 + [5] * 4], jnp.int32)
  np.testing.assert_allclose(apply(params, other, segment_ids=seg2)[:, :12], a[:, :12], rtol=1e-6, atol=1e-6)


def test_separate_kv_segment_ids():
  """kv_segment_ids given separately: queries of segment 0 ignore keys outside segment 0."""
  _, params, apply = _model(BASE)
  tokens = _tokens(1)
  kv_seg = jnp.asarray([[0] * 10 + [3] * 6, [0] * 4 + [-1] * 12], jnp.int32)
  q_seg = jnp.zeros_like(kv_seg)
  a = apply(params, tokens, segment_ids=q_seg, kv_segment_ids=kv_seg)
  b = apply(params, _bump(_bump(tokens, 0, slice(10, None)), 1, slice(4, None)), segment_ids=q_seg,
            kv_segment_ids=kv_seg)
  np.testing.assert_allclose(a[0, :10], b[0, :10], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(a[1, :4], b[1, :4], rtol=1e-6, atol=1e-6)
  c = apply(params, tokens, segment_ids=q_seg, kv_segment_ids=jnp.zeros_like(kv_seg))
  assert _maxdiff(a[:, :4], c[:, :4]) > 1e-4  # hiding keys does change the logits


def test_mask_specs_through_the_model():
  """A causal mask makes every position blind to later tokens; block_causal(4) lets a position see the rest of its
  own block of 4, never a later block."""
  _, params, apply = _model(BASE)
  tokens = _tokens(1)
  changed = _bump(tokens, slice(None), 12)
  a = apply(params, tokens, mask=masks.CAUSAL)
  b = apply(params, changed, mask=masks.CAUSAL)
  np.testing.assert_allclose(a[:, :12], b[:, :12], rtol=1e-6, atol=1e-6)
  assert _maxdiff(a[:, 12:], b[:, 12:]) > 1e-4  # its own embedding and later positions change
  changed = _bump(tokens, slice(None), 3)
  assert _maxdiff(apply(params, changed, mask=masks.CAUSAL)[:, 10], a[:, 10]) > 1e-6  # visible keys do matter
  a = apply(params, tokens, mask=masks.block_causal(4))
  b = apply(params, _bump(tokens, slice(None), 13), mask=masks.block_causal(4))  # block 3 = positions 12..15
  np.testing.assert_allclose(a[:, :12], b[:, :12], rtol=1e-6, atol=1e-6)
  assert _maxdiff(a[:, 12], b[:, 12]) > 1e-6  # position 12 sees 13: same block


def test_model_is_bidirectional():
  _, params, apply = _model(BASE)
  tokens = _tokens(3)
  base = apply(params, tokens)
  for pos in (L - 1, 9):
    out = apply(params, _bump(tokens, slice(None), pos))
    diff = np.abs(np.asarray(out - base)).max(axis=-1)
    assert np.all(diff[:, :pos] > 1e-6), f"changing position {pos} did not reach every earlier position"
    assert np.all(diff[:, pos + 1:] > 1e-6), f"changing position {pos} did not reach every later position"


def test_batch_rows_are_independent():
  _, params, apply = _model(BASE)
  tokens = _tokens(4)
  changed = _bump(tokens, 1, slice(None))
  a, b = apply(params, tokens), apply(params, changed)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-6)
  assert _maxdiff(a[1], b[1]) > 1e-3
  swapped = apply(params, tokens[::-1])
  np.testing.assert_allclose(swapped[::-1], a, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# RoPE


_rope = jax.jit(model_lib.rope, static_argnums=2)


def test_rope_preserves_norms_and_identity_at_zero():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 10, 3, 16)), jnp.float32)
  pos = jnp.broadcast_to(jnp.arange(10)[None] * 7, (2, 10))
  y = _rope(x, pos, 10000.0)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6, atol=1e-6)  # position 0 is not rotated
  assert np.abs(np.asarray(y[:, 1:] - x[:, 1:])).max() > 0.1


def test_rope_dot_product_depends_only_on_offset():
  d = 16
  rng = np.random.default_rng(1)
  q, k = rng.standard_normal((2, d)).astype(np.float32)
  starts = np.array([0, 3, 17, 100])
  offsets = np.array([0, 1, 5, -3])
  qpos = np.repeat(starts, len(offsets))  # every (start, offset) pair
  kpos = qpos + np.tile(offsets, len(starts))
  n = len(qpos)
  rq = np.asarray(_rope(jnp.broadcast_to(jnp.asarray(q), (1, n, 1, d)), jnp.asarray(qpos)[None], 500.0))
  rk = np.asarray(_rope(jnp.broadcast_to(jnp.asarray(k), (1, n, 1, d)), jnp.asarray(kpos)[None], 500.0))
  dots = (rq * rk).sum(-1)[0, :, 0].reshape(len(starts), len(offsets))
  for j in range(len(offsets)):
    np.testing.assert_allclose(dots[:, j], dots[0, j], rtol=1e-4, atol=1e-4)  # the same for every start
  np.testing.assert_allclose(dots[:, 0], q @ k, rtol=1e-4, atol=1e-4)  # offset 0: the plain dot product
  assert np.abs(dots[0, 1] - dots[0, 2]) > 1e-3  # ... and it does depend on the offset


def test_rope_matches_rotate_half_formula():
  d, theta = 8, 10000.0
  x = np.random.default_rng(3).standard_normal((1, 4, 2, d)).astype(np.float32)
  pos = np.array([[0, 1, 2, 9]])
  y = np.asarray(_rope(jnp.asarray(x), jnp.asarray(pos), theta))
  freqs = theta ** (-np.arange(0, d, 2) / d)
  ang = pos[..., None] * freqs  # [1, 4, d/2]
  cos, sin = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  ref = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_rope_keeps_bfloat16():
  x = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
  assert _rope(x, jnp.arange(4)[None], 10000.0).dtype == jnp.bfloat16


def test_model_is_invariant_to_shifted_positions():
  """Positions enter only through RoPE, so shifting them all by a constant leaves the logits unchanged."""
  _, params, apply = _model(BASE)
  tokens = _tokens(5, batch=2)
  base = apply(params, tokens)
  shifted = apply(params, tokens, positions=jnp.broadcast_to(jnp.arange(L)[None] + 11, (2, L)))
  np.testing.assert_allclose(base, shifted, rtol=1e-4, atol=1e-4)
  permuted = apply(params, tokens, positions=jnp.broadcast_to(jnp.arange(L)[::-1][None], (2, L)))
  assert np.abs(np.asarray(permuted - base)).max() > 1e-4  # but positions do matter


# ----------------------------------------------------------------------------------------------------------------------
# Time conditioning


def test_timestep_embedding():
  e = model_lib.timestep_embedding(jnp.asarray([0.0, 0.5, 1.0]), 32)
  assert e.shape == (3, 32)
  np.testing.assert_allclose(e[0, :16], 1.0)
  np.testing.assert_allclose(e[0, 16:], 0.0)
  assert np.abs(np.asarray(e[1] - e[2])).max() > 0.1


def test_time_conditioning_starts_as_zero_and_then_matters():
  c = _config(time_conditioning=True)
  _, params, apply = _model(c)
  tokens = _tokens(6, batch=2)
  a = apply(params, tokens, t=jnp.asarray([0.1, 0.1]))
  b = apply(params, tokens, t=jnp.asarray([0.9, 0.9]))
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # zero-initialised adaLN: t has no effect yet
  np.testing.assert_allclose(a, apply(params, tokens), rtol=0, atol=1e-6)  # t=None means t=0
  for path in [("layer_0", "ada"), ("layer_1", "ada"), ("final_ada",)]:
    p = _perturb(params, path, 3.0)
    pa = apply(p, tokens, t=jnp.asarray([0.1, 0.1]))
    pb = apply(p, tokens, t=jnp.asarray([0.9, 0.9]))
    assert np.abs(np.asarray(pa - pb)).max() > 1e-4, f"t has no effect after perturbing {path}"
    assert np.all(np.isfinite(np.asarray(pa)))
  # A modulation bias alone changes the network, but the same way for every t.
  p = _perturb(params, ("layer_1", "ada_b"), 1.0)
  pa = apply(p, tokens, t=jnp.asarray([0.1, 0.1]))
  pb = apply(p, tokens, t=jnp.asarray([0.9, 0.9]))
  assert np.abs(np.asarray(pa - a)).max() > 1e-4
  np.testing.assert_allclose(pa, pb, rtol=0, atol=1e-6)


def test_time_conditioning_per_example_and_scalar_t():
  c = _config(time_conditioning=True)
  _, params, apply = _model(c)
  params = _perturb(_perturb(params, ("layer_0", "ada"), 3.0), ("final_ada",), 3.0, seed=2)
  tokens = _tokens(7)
  mixed = apply(params, tokens, t=jnp.asarray([0.2, 0.7]))
  low = apply(params, tokens, t=jnp.asarray([0.2, 0.2]))
  high = apply(params, tokens, t=jnp.asarray([0.7, 0.7]))
  assert _maxdiff(low, high) > 1e-4
  np.testing.assert_allclose(mixed[0], low[0], rtol=1e-5, atol=1e-5)  # each row uses its own t
  np.testing.assert_allclose(mixed[1], high[1], rtol=1e-5, atol=1e-5)
  scalar = apply(params, tokens, t=jnp.asarray(0.7))  # a scalar t is broadcast over the batch
  np.testing.assert_allclose(scalar, high, rtol=1e-5, atol=1e-5)


def test_unconditioned_model_ignores_t():
  _, params, apply = _model(BASE)
  tokens = _tokens(8)
  np.testing.assert_allclose(apply(params, tokens, t=jnp.asarray([0.1, 0.1])),
                             apply(params, tokens, t=jnp.asarray([0.9, 0.9])), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------------
# Compute dtype and grouped-query attention


def test_bfloat16_compute_close_to_float32():
  c16 = dataclasses.replace(BASE, dtype=jnp.bfloat16)
  _, params, apply32 = _model(BASE)
  apply16 = _apply_for(c16)
  _, shapes16, _ = model_lib.abstract(c16)
  for s in jax.tree.leaves(shapes16):  # parameters stay float32
    assert s.dtype == jnp.float32
  tokens = _tokens(9)
  l32 = np.asarray(apply32(params, tokens))
  l16 = apply16(params, tokens)
  assert l16.dtype == jnp.float32
  l16 = np.asarray(l16)
  assert np.all(np.isfinite(l16))
  scale = l32.std()
  assert scale > 0.02
  assert np.abs(l16 - l32).max() < 0.1 * scale + 0.02
  assert np.corrcoef(l16.ravel(), l32.ravel())[0, 1] > 0.99
  assert not np.array_equal(l16, l32)  # it really computed in bfloat16
  seg = jnp.asarray([[0] * 8 + [1] * 8] * 2, jnp.int32)
  s16 = np.asarray(apply16(params, tokens, segment_ids=seg))
  s32 = np.asarray(apply32(params, tokens, segment_ids=seg))
  assert np.abs(s16 - s32).max() < 0.1 * scale + 0.02
  assert _maxdiff(s32, l32) > 1e-3


def test_grouped_query_attention_model():
  c = _config(num_heads=4, num_kv_heads=2)
  _, params, apply = _model(c)
  assert params["layer_0"]["wq"].shape == (32, 4, 8)
  assert params["layer_0"]["wk"].shape == (32, 2, 8)
  assert params["layer_0"]["wv"].shape == (32, 2, 8)
  tokens = _tokens(10)
  seg = jnp.asarray([[0] * 8 + [1] * 8, [0] * 12 + [-1] * 4], jnp.int32)
  out = apply(params, tokens, segment_ids=seg)
  assert out.shape == (2, L, VOCAB) and np.all(np.isfinite(np.asarray(out)))
  changed = _bump(tokens, 0, slice(8, None))
  np.testing.assert_allclose(apply(params, changed, segment_ids=seg)[0, :8], out[0, :8], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(apply(params, changed, segment_ids=seg)[1], out[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kv", [2, 1])
def test_grouped_query_equals_repeated_kv_heads(kv):
  """A GQA / MQA model equals a full multi-head model whose kv weights repeat each kv head for its query group."""
  cg = _config(num_heads=4, num_kv_heads=kv)
  _, pg, apply_g = _model(cg)
  _, pm, apply_m = _model(BASE)
  pm = jax.tree.map(lambda x: x, pm)
  for name in pg:
    if not name.startswith("layer_"):
      pm[name] = pg[name]
      continue
    for k, v in pg[name].items():
      pm[name][k] = jnp.repeat(v, 4 // kv, axis=1) if k in ("wk", "wv") else v
  tokens = _tokens(11)
  g = apply_g(pg, tokens)
  assert g.shape == (2, L, VOCAB)
  np.testing.assert_allclose(g, apply_m(pm, tokens), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# attention() against a dense reference


def _reference_attention(q, k, v, q_seg=None, kv_seg=None, mask=None):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, lq, h, d = q.shape
  kh = k.shape[2]
  k = np.repeat(k, h // kh, axis=2)  # query head i uses kv head i // (h // kh)
  v = np.repeat(v, h // kh, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  allowed = np.ones(logits.shape, bool)
  if q_seg is not None:
    q_seg, kv_seg = np.asarray(q_seg), np.asarray(kv_seg)
    allowed &= ((q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] >= 0))[:, None]
  if mask is not None:
    allowed &= np.asarray(mask)
  logits = np.where(allowed, logits, -np.inf)
  top = logits.max(axis=-1, keepdims=True)
  w = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
  w = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-300)  # rows with no allowed key come out as 0
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def _qkv(seed, b=2, lq=12, lk=12, h=4, kh=4, d=8, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
               for shape in ((b, lq, h, d), (b, lk, kh, d), (b, lk, kh, d)))


_attention = jax.jit(attention, static_argnames=("implementation", "mask"))


@pytest.mark.parametrize("kh", [4, 2, 1])
def test_attention_matches_dense_reference(kh):
  q, k, v = _qkv(0, kh=kh)
  out = _attention(q, k, v)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, _reference_attention(q, k, v), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kh", [4, 2])
def test_attention_with_segments_matches_reference(kh):
  q, k, v = _qkv(1, kh=kh)
  seg = jnp.asarray([[0] * 5 + [1] * 4 + [2] * 3, [0] * 9 + [-1] * 3], jnp.int32)
  out = _attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
  ref = _reference_attention(q, k, v, seg, seg)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(out)[1, 9:] == 0)  # padding queries have no key to attend to: zeros
  # q_segment_ids alone means kv_segment_ids = q_segment_ids.
  np.testing.assert_allclose(_attention(q, k, v, q_segment_ids=seg), out, rtol=0, atol=0)
  # The segment mask really changes the result.
  assert _maxdiff(out, _attention(q, k, v)) > 1e-2


def test_attention_cross_lengths_and_kv_segments_only():
  q, k, v = _qkv(2, lq=5, lk=9, kh=2)
  kv_seg = jnp.asarray([[0, 0, 1, 0, 1, 0, -1, 0, 1], [1, 1, 1, 1, 0, 0, 0, 0, 0]], jnp.int32)
  out = _attention(q, k, v, kv_segment_ids=kv_seg)  # queries default to segment 0
  ref = _reference_attention(q, k, v, np.zeros((2, 5), np.int32), kv_seg)
  assert out.shape == (2, 5, 4, 8)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  q_seg = jnp.asarray([[1, 0, 1, 1, 0], [0, 1, 0, 1, 1]], jnp.int32)
  out = _attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
  np.testing.assert_allclose(out, _reference_attention(q, k, v, q_seg, kv_seg), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", [masks.CAUSAL, masks.block_causal(4), masks.block_causal(3), masks.bd3(3),
                                  masks.bd3(2)])
@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_attention_with_mask_specs_and_segments(spec, implementation):
  """Each spec equals its dense boolean form, alone and combined with segments; rows without keys are zeros."""
  q, k, v = _qkv(3, kh=2)
  dense = spec.dense(12, 12)[None, None]
  out = _attention(q, k, v, mask=spec, implementation=implementation)
  np.testing.assert_allclose(out, _reference_attention(q, k, v, mask=dense), rtol=1e-4, atol=1e-5)
  seg = jnp.asarray([[0] * 6 + [1] * 6, [-1] * 3 + [0] * 9], jnp.int32)
  out = _attention(q, k, v, q_segment_ids=seg, mask=spec, implementation=implementation)
  ref = _reference_attention(q, k, v, seg, seg, dense)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(out)[1, :3] == 0)  # padding queries: no key of their segment -> exactly zero


def test_attention_mask_over_positions():
  """Causal / block-causal masks are evaluated over positions when given (a left-padded canvas; a window of queries
  against a longer K/V cache), the BD3 mask over indices."""
  q, k, v = _qkv(6, lq=4, lk=12, kh=2)
  kv_pos = jnp.asarray([np.arange(12), np.maximum(np.arange(12) - 3, 0)], jnp.int32)
  kv_seg = jnp.asarray([[0] * 12, [-1] * 3 + [0] * 9], jnp.int32)
  q_pos = kv_pos[:, 5:9]
  for spec in (masks.CAUSAL, masks.block_causal(4)):
    out = _attention(q, k, v, kv_segment_ids=kv_seg, mask=spec, q_positions=q_pos, kv_positions=kv_pos)
    dense = np.asarray(spec.allows(np.asarray(q_pos)[:, :, None], np.asarray(kv_pos)[:, None, :], 12))[:, None]
    ref = _reference_attention(q, k, v, np.zeros((2, 4), np.int32), kv_seg, dense)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="kv_positions"):
    attention(q, k, v, mask=masks.CAUSAL, q_positions=q_pos)


def test_attention_bfloat16():
  q, k, v = _qkv(4, kh=2, dtype=jnp.bfloat16)
  out = _attention(q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), _reference_attention(q, k, v), atol=5e-2, rtol=5e-2)


def test_attention_unknown_implementation():
  q, k, v = _qkv(5)
  with pytest.raises(ValueError, match="implementation"):
    attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="resolve"):
    attention(q, k, v, implementation="auto")


def test_query_chunked_attention_matches_unchunked(monkeypatch):
  """The cache-sized query blocks (lax.map) give the same outputs and gradients as one dense block."""
  import dlm_jax.attention as att
  kq = jax.random.split(jax.random.PRNGKey(7), 4)
  b, l, h, kh, d = 2, 256, 4, 2, 16
  q = jax.random.normal(kq[0], (b, l, h, d))
  k = jax.random.normal(kq[1], (b, l, kh, d))
  v = jax.random.normal(kq[2], (b, l, kh, d))
  seg = (jnp.arange(l)[None, :] >= jnp.array([[100], [180]])).astype(jnp.int32)
  seg = seg.at[1, -7:].set(-1)

  def loss(q, k, v):
    o = att.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg)
    return jnp.sum(o * jnp.cos(o)), o

  (_, ref_o), ref_g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  assert att._query_chunks(b, h, l, l) == 1
  monkeypatch.setattr(att, "_BLOCK_BYTES", 4096)
  assert att._query_chunks(b, h, l, l) == 4  # blocks stop at 64 query rows
  (_, got_o), got_g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(got_o, ref_o, rtol=1e-5, atol=1e-5)
  for a, r in zip(got_g, ref_g):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)
  # and both agree with autodiff through jax.nn.dot_product_attention
  mask = ((seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, None, :])[:, None]
  dpa = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=mask) *
                                jnp.cos(jax.nn.dot_product_attention(q, k, v, mask=mask)))
  want = jax.grad(dpa, argnums=(0, 1, 2))(q, k, v)
  rows = np.asarray(seg >= 0)  # padding query rows are unspecified
  for a, r in zip(got_g[:1], want[:1]):
    np.testing.assert_allclose(np.asarray(a)[rows], np.asarray(r)[rows], rtol=1e-4, atol=1e-4)


def test_embeddings_input_seam_equals_token_lookup():
  """Continuous families feed vectors instead of ids: apply(embeddings=E[tokens]) == apply(tokens)."""
  from dlm_jax import model as model_lib
  c = model_lib.ModelConfig(vocab_in=11, vocab_out=10, num_layers=1, d_model=16, num_heads=2, num_kv_heads=2,
                            head_dim=8, mlp_dim=32, max_seq_len=16)
  graphdef, params = model_lib.init(c, 0)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, 11)
  by_ids = model_lib.apply(graphdef, params, tokens)
  by_vectors = model_lib.apply(graphdef, params, None, embeddings=params["embed"][tokens])
  np.testing.assert_allclose(by_vectors, by_ids, rtol=1e-6, atol=1e-6)
  moved = model_lib.apply(graphdef, params, None, embeddings=params["embed"][tokens] + 0.1)
  assert not np.allclose(moved, by_ids, atol=1e-3)
