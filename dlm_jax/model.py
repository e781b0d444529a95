"""The transformer for diffusion language models (Flax NNX) and its pure `apply` boundary.

A LLaMA-style bidirectional trunk: token embedding, RoPE (rotate-half, computed in float32), RMSNorm, SwiGLU MLP,
grouped-query attention through `dlm_jax.attention.attention`, an untied output head, and optional adaLN time conditioning
(adaLN-Zero as in DiT / MDLM: shift / scale / gate per block from a sinusoidal embedding of the noise level; the
modulation weights start at zero, so every block starts as the identity and the output ignores t until trained).

Every parameter carries `logical_axes` metadata (embed, mlp, heads, kv, vocab, cond) that `dlm_jax.sharding` maps onto the
mesh. Training and sampling never touch the module: they call `apply(graphdef, params, tokens, ...)` with `params` a plain
nested dict of arrays (`init()` returns both).

Options for converted checkpoints (`dlm_jax.convert`), each adding parameters only when on, so the parameter names of
existing checkpoints do not change: q / k / v biases `bq`, `bk`, `bv` (Qwen2: Dream, Fast-dLLM v2), per-head RMSNorm of
q and k before RoPE `q_norm`, `k_norm` (Qwen3: SDAR), a head tied to the input table (no `head`), and the logit shift
(`Network.logit_shift`: the forward's logits at position i predict token i + 1, as the HF causal-LM head of Dream and
Fast-dLLM v2 does; the processes and samplers shift them).

Scale: `scan_layers` keeps the blocks as one stacked module `layers` (every block parameter gets a leading layer axis,
logical name "layers", replicated) run by `jax.lax.scan`, so the compiled step does not grow with depth; the unrolled
layout (`layer_0` .. `layer_{n-1}`, what converted checkpoints use) stays the default and `stack_layers` /
`unstack_layers` convert between the two (the checkpoint adapter does so on restore). The same seed gives the same
parameters in both layouts. `remat` picks what each block's backward pass recomputes (`REMAT_POLICIES`), applied per
layer in both layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dlm_jax import attention as attention_lib
from dlm_jax.attention import attention
from dlm_jax.masks import MaskSpec, block_causal
from dlm_jax.maths import PAD, pad_layout
from dlm_jax.sharding import constrain

ATTENTION_OUT = "attention_out"  # checkpoint_name of a block's attention output (before the output projection)


def _remat_policy(name: str):
  """The `jax.checkpoint` policy of model.remat (None with "full": save nothing, recompute the whole block)."""
  cp = jax.checkpoint_policies
  return {"full": None, "dots_saveable": cp.dots_with_no_batch_dims_saveable,
          "save_attention": cp.save_only_these_names(ATTENTION_OUT),
          "offload": cp.save_and_offload_only_these_names(names_which_can_be_saved=[],
                                                          names_which_can_be_offloaded=[ATTENTION_OUT],
                                                          offload_src="device", offload_dst="pinned_host")}[name]


REMAT_POLICIES = ("none", "full", "dots_saveable", "save_attention", "offload")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_in: int  # input ids (the processes add their own tokens, e.g. the mask id, on top of the tokenizer's)
  vocab_out: int  # output classes
  num_layers: int
  d_model: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_seq_len: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  time_conditioning: bool = False
  init_std: float = 0.02
  dtype: Any = jnp.float32  # compute dtype; parameters stay float32
  attention_impl: str = "xla"  # resolved (`dlm_jax.attention.resolve`): never "auto" here
  attention_block_q: int = 0  # Pallas kernels' tiles (0 = the kernel's default)
  attention_block_kv: int = 0
  attention_interpret: bool = False  # Pallas kernels in interpret mode
  cond_dim: int = 256
  input_bits: int = 0  # > 0: bitstream input adapter (a token's bits -> one trunk token), no token embedding table
  self_conditioning: bool = False  # embedding input: z + W_sc [z || self_cond] (W_sc zero-initialised; LangFlow)
  qkv_bias: bool = False  # biases on the q / k / v projections (Qwen2: Dream, Fast-dLLM v2)
  qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3: SDAR)
  tie_embeddings: bool = False  # the output head is the input table transposed (needs vocab_in == vocab_out)
  logit_shift: bool = False  # the network predicts token i at position i - 1 (Dream, Fast-dLLM v2): `Network.logit_shift`
  scan_layers: bool = False  # blocks as one stacked module `layers` under jax.lax.scan (else layer_0 .. layer_{n-1})
  remat: str = "none"  # per-block rematerialisation: one of REMAT_POLICIES

  def __post_init__(self):
    if self.tie_embeddings and (self.input_bits or self.vocab_in != self.vocab_out):
      raise ValueError(f"tied embeddings need one token table for input and output ids (vocab_in {self.vocab_in}, "
                       f"vocab_out {self.vocab_out}, input_bits {self.input_bits})")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")

  @classmethod
  def from_config(cls, cfg, vocab_in: int, vocab_out: int, platform: str | None = None,
                  **process_options) -> "ModelConfig":
    """`process_options`: what the diffusion family fixes about the network (`Process.model_options`, e.g. the
    continuous families' time conditioning, bit input, self-conditioning). `platform`: where the model runs ("cpu",
    "tpu", "gpu"; default: JAX's default backend), which resolves model.attention="auto" and rejects a kernel the
    platform cannot run (ValueError)."""
    m = cfg.model
    impl = attention_lib.resolve(m.attention, platform or jax.default_backend(), m.attention_interpret)
    attention_lib.check_kernel(impl, m.head_dim or m.d_model // m.num_heads, m.attention_block_q, m.attention_block_kv)
    kw = dict(vocab_in=vocab_in, vocab_out=vocab_out, num_layers=m.num_layers, d_model=m.d_model,
              num_heads=m.num_heads, num_kv_heads=m.num_kv_heads or m.num_heads,
              head_dim=m.head_dim or m.d_model // m.num_heads, mlp_dim=m.mlp_dim, max_seq_len=m.max_seq_len,
              rope_theta=m.rope_theta, norm_eps=m.norm_eps, time_conditioning=m.time_conditioning,
              init_std=m.init_std, dtype=jnp.bfloat16 if cfg.train.compute_dtype == "bfloat16" else jnp.float32,
              attention_impl=impl, attention_block_q=m.attention_block_q,
              attention_block_kv=m.attention_block_kv, attention_interpret=m.attention_interpret, qkv_bias=m.qkv_bias, qk_norm=m.qk_norm, tie_embeddings=m.tie_embeddings,
              logit_shift=m.logit_shift, scan_layers=m.scan_layers, remat=m.remat)
    kw.update(process_options)
    return cls(**kw)


def _param(rngs: nnx.Rngs, shape, axes, std: float | None):
  value = jnp.zeros(shape, jnp.float32) if std is None else std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, logical_axes=axes)


def _ones(shape, axes):
  return nnx.Param(jnp.ones(shape, jnp.float32), logical_axes=axes)


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
  """x [..., *w.shape[:n_in]] @ w, as one 2-D matmul.

  XLA:CPU runs the backward pass of a matmul with two contracting dimensions (batch and length) about 3x slower than
  the same FLOPs as a 2-D matmul, so activations are flattened to [tokens, features] around every weight.
  """
  w_in, w_out = w.shape[:n_in], w.shape[n_in:]
  lead = x.shape[:x.ndim - n_in]
  k = 1
  for s in w_in:
    k *= s
  y = x.reshape(-1, k) @ w.reshape(k, -1)
  return y.reshape(*lead, *w_out)


def rms_norm(x, scale, eps):
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  return (y * scale).astype(x.dtype)


def rope_tables(positions: jax.Array, d: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos / sin [B, L, 1, D/2] (float32) of the rotary angles; computed once per forward and shared by all layers."""
  freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  ang = positions.astype(jnp.float32)[..., None] * freqs  # [B, L, D/2]
  return jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]


def apply_rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotary embedding, rotate-half convention, x: [B, L, H, D]."""
  cos, sin = tables
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding of x [B, L, H, D] at positions [B, L]."""
  return apply_rope(x, rope_tables(positions, x.shape[-1], theta))


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of the noise level t in [0, 1] (scaled by 1000 as in DiT / MDLM)."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Block(nnx.Module):

  def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
    d, h, k, hd, f, s = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.init_std
    self.c = c
    self.attn_norm = _ones((d,), ("embed",))
    self.wq = _param(rngs, (d, h, hd), ("embed", "heads", "kv"), s)
    self.wk = _param(rngs, (d, k, hd), ("embed", "heads", "kv"), s)
    self.wv = _param(rngs, (d, k, hd), ("embed", "heads", "kv"), s)
    self.wo = _param(rngs, (h, hd, d), ("heads", "kv", "embed"), s / (2 * c.num_layers) ** 0.5)
    if c.qkv_bias:
      self.bq = _param(rngs, (h, hd), ("heads", "kv"), None)
      self.bk = _param(rngs, (k, hd), ("heads", "kv"), None)
      self.bv = _param(rngs, (k, hd), ("heads", "kv"), None)
    if c.qk_norm:
      self.q_norm = _ones((hd,), ("kv",))
      self.k_norm = _ones((hd,), ("kv",))
    self.mlp_norm = _ones((d,), ("embed",))
    self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), s)
    self.w_up = _param(rngs, (d, f), ("embed", "mlp"), s)
    self.w_down = _param(rngs, (f, d), ("mlp", "embed"), s / (2 * c.num_layers) ** 0.5)
    if c.time_conditioning:
      self.ada = _param(rngs, (c.cond_dim, 6 * d), ("cond", "embed"), None)  # zero init: starts unconditioned
      self.ada_b = _param(rngs, (6 * d,), ("embed",), None)

  def __call__(self, x, rot, cond, q_seg, kv_seg, mask, cache=None, positions=None, kv_positions=None):
    """rot: RoPE tables of the input positions (`rope_tables`); mask: a `MaskSpec` (causal / block-causal ones over
    positions / kv_positions when given, see `dlm_jax.attention.attention`). cache: None, or (layer cache {'k', 'v'} [B, Lc, K, D]
    with keys before RoPE, start, RoPE tables of the Lc cached positions): this window's keys / values are written at
    [start, start + Lq) and the queries attend to the whole cache, whose keys are rotated at use. Returns x, or
    (x, updated layer cache)."""
    c, dt = self.c, self.c.dtype
    if c.time_conditioning:
      mod = (cond @ self.ada[...] + self.ada_b[...]).astype(dt)[:, None, :]
      sh1, sc1, g1, sh2, sc2, g2 = jnp.split(mod, 6, axis=-1)
    h = rms_norm(x, self.attn_norm[...], c.norm_eps)
    if c.time_conditioning:
      h = h * (1 + sc1) + sh1
    q = dense(h, self.wq[...].astype(dt))
    k = dense(h, self.wk[...].astype(dt))
    v = dense(h, self.wv[...].astype(dt))
    if c.qkv_bias:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    if c.qk_norm:  # per head, before RoPE (and before the K/V cache, which holds keys before RoPE)
      q, k = rms_norm(q, self.q_norm[...], c.norm_eps), rms_norm(k, self.k_norm[...], c.norm_eps)
    q = apply_rope(q, rot)
    q = constrain(q, ("batch", "length", "heads", "kv"))  # queries split along the sequence axis (context parallel)
    new_cache = None
    if cache is not None:
      layer, start, kv_rot = cache
      zero = jnp.zeros((), jnp.int32)
      new_cache = {name: jax.lax.dynamic_update_slice(layer[name], val.astype(layer[name].dtype),
                                                      (zero, start, zero, zero))
                   for name, val in (("k", k), ("v", v))}
      k = apply_rope(new_cache["k"].astype(dt), kv_rot)
      v = new_cache["v"].astype(dt)
    else:
      k = apply_rope(k, rot)
    # keys / values whole along the length (all-gathered over the sequence axis), as MaxText's activation_kv_length
    k, v = constrain(k, ("batch", None, "heads", "kv")), constrain(v, ("batch", None, "heads", "kv"))
    o = attention(q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg, mask=mask, q_positions=positions,
                  kv_positions=kv_positions, implementation=c.attention_impl, block_q=c.attention_block_q,
                  block_kv=c.attention_block_kv, interpret=c.attention_interpret)
    o = constrain(o, ("batch", "length", "heads", "kv"))
    o = checkpoint_name(o, ATTENTION_OUT)  # what remat="save_attention" / "offload" keep
    o = dense(o, self.wo[...].astype(dt), n_in=2)
    x = x + (g1 * o if c.time_conditioning else o)
    x = constrain(x, ("batch", "length", "embed"))
    h = rms_norm(x, self.mlp_norm[...], c.norm_eps)
    if c.time_conditioning:
      h = h * (1 + sc2) + sh2
    g = dense(h, self.w_gate[...].astype(dt))
    u = dense(h, self.w_up[...].astype(dt))
    hidden = constrain(jax.nn.silu(g) * u, ("batch", "length", "mlp"))
    y = dense(hidden, self.w_down[...].astype(dt))
    x = x + (g2 * y if c.time_conditioning else y)
    x = constrain(x, ("batch", "length", "embed"))
    return x if cache is None else (x, new_cache)


@jax.custom_vjp
def embed_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
  """table[tokens] under FSDP. Forward: the table's embed dimension is gathered (as every weight's is when used), its
  vocabulary stays split over tensor; left to the partitioner, the lookup's output would carry the table's sharding
  into the batch-sharded activations (an involuntary full rematerialisation with fsdp x sequence x tensor). Backward:
  the scatter-add of the batch shards' cotangents lands directly in the table's own sharding, so the partial sums are
  reduce-scattered, not all-reduced into a whole (float32) table on every device."""
  return jnp.take(constrain(table, ("vocab", None)), tokens, axis=0)


def _embed_lookup_fwd(table, tokens):
  return embed_lookup(table, tokens), (tokens, jnp.zeros((0,) + table.shape[1:], table.dtype), table.shape[0])


def _embed_lookup_bwd(res, g):
  tokens, like, vocab = res
  grad = jnp.zeros((vocab,) + like.shape[1:], g.dtype).at[tokens].add(g).astype(like.dtype)
  # summed over the batch shards as a whole row block, then cut to the table's sharding: XLA fuses the pair into a
  # reduce-scatter (scattering the cotangents straight into the embed-sharded layout would reshard them first)
  return constrain(constrain(grad, ("vocab", None)), ("vocab", "embed")), None


embed_lookup.defvjp(_embed_lookup_fwd, _embed_lookup_bwd)


BIT_FEATURES = 64  # per-bit features of the bitstream input adapter (value and self-conditioning each)
BIT_FOURIER = 16  # Fourier features of a bit's position within its token


def bit_position_features(bits: int) -> jax.Array:
  """[bits, BIT_FOURIER] fixed sin / cos features of the bit index (most significant first)."""
  pos = jnp.arange(bits, dtype=jnp.float32)[:, None] / max(bits, 1)
  freqs = jnp.pi * 2.0 ** jnp.arange(BIT_FOURIER // 2, dtype=jnp.float32)
  return jnp.concatenate([jnp.sin(pos * freqs), jnp.cos(pos * freqs)], axis=-1)


class Transformer(nnx.Module):
  """Bidirectional transformer over token ids; returns float32 logits [B, L, vocab_out].

  Inputs, by diffusion family: token ids (masked, block), vectors in the model dimension (`embeddings=`: one-hot flow's
  x E, embedding flow's noisy embeddings, optionally with a self-conditioning vector), or per-token bit strings (`bits=`,
  bitstream diffusion, `input_bits` > 0): each bit -> Linear(1 -> 64), its self-conditioning estimate -> Linear(1 -> 64)
  and Fourier features of its index, and the token's bits patched into one trunk token by one linear map (CoBit).
  """

  def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
    self.c = c
    if c.input_bits:
      f, nb = BIT_FEATURES, c.input_bits
      self.bit_in = _param(rngs, (2, f), (None, None), 1.0)
      self.bit_in_b = _param(rngs, (2, f), (None, None), None)
      self.bit_patch = _param(rngs, (nb, 2 * f + BIT_FOURIER, c.d_model), (None, None, "embed"),
                              (nb * (2 * f + BIT_FOURIER)) ** -0.5)
    else:
      self.embed = _param(rngs, (c.vocab_in, c.d_model), ("vocab", "embed"), c.init_std)
    if c.self_conditioning:
      self.self_cond = _param(rngs, (2 * c.d_model, c.d_model), (None, "embed"), None)
    blocks = [Block(c, rngs) for _ in range(c.num_layers)]  # the same random draws in both layouts
    if c.scan_layers:
      self.layers = _stack_blocks(blocks)
    else:
      for i, block in enumerate(blocks):
        setattr(self, f"layer_{i}", block)
    self.final_norm = _ones((c.d_model,), ("embed",))
    if not c.tie_embeddings:
      self.head = _param(rngs, (c.d_model, c.vocab_out), ("embed", "vocab"), c.init_std)
    if c.time_conditioning:
      self.t_mlp1 = _param(rngs, (c.cond_dim, c.cond_dim), ("cond", "cond"), c.init_std)
      self.t_mlp1_b = _param(rngs, (c.cond_dim,), ("cond",), None)
      self.t_mlp2 = _param(rngs, (c.cond_dim, c.cond_dim), ("cond", "cond"), c.init_std)
      self.t_mlp2_b = _param(rngs, (c.cond_dim,), ("cond",), None)
      self.final_ada = _param(rngs, (c.cond_dim, 2 * c.d_model), ("cond", "embed"), None)

  def __call__(self, tokens, *, t=None, positions=None, segment_ids=None, kv_segment_ids=None, mask=None,
               embeddings=None, bits=None, self_cond=None, cache=None, cache_start=None, kv_positions=None,
               output_len=None):
    """tokens [B, L] int; or `embeddings` [B, L, d_model] given instead of the token lookup (continuous families
    feed noisy vectors; pass tokens=None then); or `bits` [B, L, input_bits] (bitstream). `self_cond`: the
    self-conditioning input ([B, L, d_model] with embeddings, [B, L, input_bits] with bits; None = zeros).

    K/V cache (samplers): `cache` = {'layer_i': {'k', 'v'}} with [B, Lc, K, D] arrays (`empty_cache`); the L input
    tokens are the window [cache_start, cache_start + L) of an Lc-long sequence. Their keys (before RoPE) and values
    are written into the cache, and the queries attend to all Lc cached positions (`kv_segment_ids` [B, Lc]: a
    negative id is never attended; `kv_positions` [B, Lc] rotate the cached keys). Returns (logits, cache) then.

    `mask`: a `dlm_jax.masks.MaskSpec` (None = bidirectional); causal / block-causal ones are evaluated over
    `positions` / `kv_positions` when those are given, the BD3 mask over indices.

    `output_len` (static): logits only for the first output_len positions (block diffusion reads its x_t half of the
    [x_t | x_0] input; the head is not applied to the rest)."""
    c = self.c
    if bits is not None:
      b, l = bits.shape[:2]
      sc = jnp.zeros_like(bits) if self_cond is None else self_cond
      w, wb = self.bit_in[...], self.bit_in_b[...]
      feats = jnp.concatenate([bits[..., None] * w[0] + wb[0], sc[..., None] * w[1] + wb[1],
                               jnp.broadcast_to(bit_position_features(c.input_bits), (b, l, c.input_bits, BIT_FOURIER))],
                              axis=-1)
      x = dense(feats.astype(c.dtype), self.bit_patch[...].astype(c.dtype), n_in=2)
    elif embeddings is not None:
      b, l = embeddings.shape[:2]
      x = embeddings.astype(c.dtype)
      if c.self_conditioning:
        sc = jnp.zeros_like(x) if self_cond is None else self_cond.astype(c.dtype)
        x = x + dense(jnp.concatenate([x, sc], axis=-1), self.self_cond[...].astype(c.dtype))
    else:
      b, l = tokens.shape
      x = embed_lookup(self.embed[...], tokens).astype(c.dtype)
    positions_given = positions
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32)[None], (b, l))
    x = constrain(x, ("batch", "length", "embed"))
    cond = None
    if c.time_conditioning:
      if t is None:
        t = jnp.zeros((b,), jnp.float32)
      e = timestep_embedding(jnp.broadcast_to(t, (b,)), c.cond_dim)
      e = jax.nn.silu(e @ self.t_mlp1[...] + self.t_mlp1_b[...])
      cond = jax.nn.silu(e @ self.t_mlp2[...] + self.t_mlp2_b[...])
    new_cache = {} if cache is not None else None
    # causal / block-causal masks are over positions when the caller gave them (left-padded canvases, cache windows)
    mask_pos = positions if attention_lib.uses_positions(mask, positions_given) else None
    rot = rope_tables(positions, c.head_dim, c.rope_theta)
    kv_rot = None if cache is None else rope_tables(kv_positions, c.head_dim, c.rope_theta)
    kv_pos = kv_positions if mask_pos is not None else None

    def run_block(graphdef, x, layer_params, layer_cache):
      """One block as a function of its parameters (and its cache), rematerialised per model.remat."""
      def f(x, layer_params, layer_cache):
        block = nnx.merge(graphdef, layer_params)
        if layer_cache is None:
          return block(x, rot, cond, segment_ids, kv_segment_ids, mask, positions=mask_pos), None
        return block(x, rot, cond, segment_ids, kv_segment_ids, mask, cache=(layer_cache, cache_start, kv_rot),
                     positions=mask_pos, kv_positions=kv_pos)
      if c.remat != "none":
        f = jax.checkpoint(f, policy=_remat_policy(c.remat), prevent_cse=not c.scan_layers)
      return f(x, layer_params, layer_cache)

    if c.scan_layers:
      graphdef, stacked = nnx.split(self.layers)

      def body(x, xs):
        layer_params, layer_cache = xs
        return run_block(graphdef, x, layer_params, layer_cache)

      x, scanned = jax.lax.scan(body, x, (stacked, None if cache is None else cache["layers"]))
      if cache is not None:
        new_cache["layers"] = scanned
    else:
      for i in range(c.num_layers):
        graphdef, layer_params = nnx.split(getattr(self, f"layer_{i}"))
        x, layer_cache = run_block(graphdef, x, layer_params, None if cache is None else cache[f"layer_{i}"])
        if cache is not None:
          new_cache[f"layer_{i}"] = layer_cache
    if output_len is not None:
      x = x[:, :output_len]
    x = rms_norm(x, self.final_norm[...], c.norm_eps)
    if c.time_conditioning:
      sh, sc = jnp.split((cond @ self.final_ada[...]).astype(c.dtype)[:, None, :], 2, axis=-1)
      x = x * (1 + sc) + sh
    head = self.embed[...].T if c.tie_embeddings else self.head[...]
    logits = dense(x, head.astype(c.dtype)).astype(jnp.float32)
    logits = constrain(logits, ("batch", "length", "vocab"))
    return logits if cache is None else (logits, new_cache)


def _stack_blocks(blocks: list[Block]) -> Block:
  """One Block whose parameters are the blocks' stacked on a leading "layers" axis."""
  out = blocks[0]
  for name, var in list(vars(out).items()):
    if isinstance(var, nnx.Param):
      value = jnp.stack([getattr(b, name)[...] for b in blocks])
      setattr(out, name, nnx.Param(value, logical_axes=("layers", *var.get_metadata()["logical_axes"])))
  return out


def _is_layer_dict(x) -> bool:
  return isinstance(x, dict) and ("layers" in x or "layer_0" in x)


def stack_layers(params: Any, stack=None) -> Any:
  """The unrolled layout (`layer_0` .. `layer_{n-1}`) -> the scanned one (`layers`, leading layer axis), in every
  params-shaped dict of a tree (parameters, EMA, optimizer moments); other entries unchanged. Pure; `stack` (a list of
  leaves -> one leaf, default jnp.stack) lets the checkpoint adapter convert abstract trees."""
  stack = stack or (lambda xs: jnp.stack(xs))

  def one(d):
    if not (isinstance(d, dict) and "layer_0" in d):
      return d
    n = sum(1 for k in d if k.startswith("layer_"))
    out = {k: v for k, v in d.items() if not k.startswith("layer_")}
    out["layers"] = jax.tree.map(lambda *xs: stack(list(xs)), *[d[f"layer_{i}"] for i in range(n)])
    return out

  return jax.tree.map(one, params, is_leaf=_is_layer_dict)


def unstack_layers(params: Any, take=None) -> Any:
  """The scanned layout (`layers`) -> the unrolled one (`layer_0` .. `layer_{n-1}`); the inverse of `stack_layers`.
  `take` (leaf, i -> the i-th layer's leaf, default x[i]) for abstract trees."""
  take = take or (lambda x, i: x[i])

  def one(d):
    if not (isinstance(d, dict) and "layers" in d):
      return d
    n = jax.tree.leaves(d["layers"])[0].shape[0]
    out = {k: v for k, v in d.items() if k != "layers"}
    for i in range(n):
      out[f"layer_{i}"] = jax.tree.map(lambda x: take(x, i), d["layers"])
    return out

  return jax.tree.map(one, params, is_leaf=_is_layer_dict)


def layer_layout(params: Any) -> str | None:
  """"scanned", "unrolled" or None (no transformer parameters) of a tree holding parameters."""
  found = [d for d in jax.tree.leaves(params, is_leaf=_is_layer_dict) if _is_layer_dict(d)]
  if not found:
    return None
  return "scanned" if "layers" in found[0] else "unrolled"


def init(c: ModelConfig, seed: int) -> tuple[nnx.GraphDef, dict]:
  """Builds the model; returns (graphdef, params) with params a plain nested dict of float32 arrays."""
  model = Transformer(c, nnx.Rngs(params=seed))
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def abstract(c: ModelConfig) -> tuple[nnx.GraphDef, dict, dict]:
  """(graphdef, params as ShapeDtypeStructs, params' (shape, logical_axes)) without allocating anything."""
  model = nnx.eval_shape(lambda: Transformer(c, nnx.Rngs(params=0)))
  graphdef, state = nnx.split(model, nnx.Param)
  shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))
  axes = jax.tree.map(lambda v: (tuple(v.shape), v.get_metadata()["logical_axes"]), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  axes = nnx.to_pure_dict(axes) if not isinstance(axes, dict) else axes
  return graphdef, shapes, axes


def apply(graphdef: nnx.GraphDef, params: dict, tokens: jax.Array, **kwargs) -> jax.Array:
  """Pure forward: logits = f(params, tokens; t, positions, segment_ids, kv_segment_ids, mask (a MaskSpec))."""
  return nnx.merge(graphdef, params)(tokens, **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
  """The model as the processes and samplers see it (`dlm_jax.processes.base.Network`): the pure forward, the input
  table, and the sampler-facing forwards (`logits_fn`, `cached_logits_fn`). Processes never read parameter names.
  `logit_shift`: the forward's logits at position i - 1 are the prediction of token i (Dream, Fast-dLLM v2); the
  forwards return them unshifted and the processes / samplers shift them (`dlm_jax.maths.shift_logits`)."""
  graphdef: Any
  logit_shift: bool = False

  def __call__(self, params: dict, tokens, **kwargs):
    return apply(self.graphdef, params, tokens, **kwargs)

  def input_table(self, params: dict) -> jax.Array:
    """[vocab_in, d_model] float32: the token embedding table."""
    return params["embed"].astype(jnp.float32)

  def logits_fn(self, params: dict, *, time_conditioned: bool = False, block_size: int | None = None):
    return logits_fn(self, params, time_conditioned=time_conditioned, block_size=block_size)

  def cached_logits_fn(self, params: dict, *, time_conditioned: bool = False, block_size: int | None = None):
    return cached_logits_fn(self, params, time_conditioned=time_conditioned, block_size=block_size)


def make_apply(graphdef: nnx.GraphDef, logit_shift: bool = False) -> Network:
  return Network(graphdef, logit_shift)


def num_params(params: dict, exclude_embeddings: bool = False) -> int:
  """Parameter count; `exclude_embeddings` leaves out the input table and the output head (the usual convention)."""
  skip = ("embed", "head", "bit_in", "bit_in_b", "bit_patch", "self_cond") if exclude_embeddings else ()
  return sum(x.size for key, sub in params.items() if key not in skip for x in jax.tree.leaves(sub))


# --- the model seen by samplers -------------------------------------------------------------------------------------


def block_mask(block_size: int | None) -> MaskSpec | None:
  """Block diffusion's inference-time attention (Arriola et al. 2025, BD3-LM): a query sees the keys whose block
  (position // block_size) is not after its own: clean earlier blocks plus its own block; block_size 1 is causal;
  None = bidirectional."""
  return None if block_size is None else block_causal(block_size)


def logits_fn(apply_fn, params, *, time_conditioned: bool = False, pad_id: int = PAD, block_size: int | None = None):
  """(tokens [B, L], t [B]) -> logits: the sampler-facing forward. PAD positions are never attended to and positions
  are numbered from each row's first real token, so a left-padded row gives the logits it gives alone. With
  `block_size` (block diffusion) attention is block-causal over those positions (`block_mask`)."""

  def fn(tokens, t):
    row = pad_layout(tokens, pad_id)
    kw = {"t": t} if time_conditioned else {}
    return apply_fn(params, row["ids"], positions=row["positions"], segment_ids=row["segment_ids"],
                    kv_segment_ids=row["kv_segment_ids"],
                    mask=block_mask(block_size), **kw)

  return fn


def empty_cache(params: dict, batch: int, length: int, dtype=jnp.float32) -> dict:
  """Zero K/V cache {'layer_i': {'k', 'v'}: [B, L, K, D]} for the model whose parameters are `params` (scanned
  layout: {'layers': {'k', 'v'}: [num_layers, B, L, K, D]})."""
  cache = {}
  if "layers" in params:
    n, _, kh, hd = params["layers"]["wk"].shape
    return {"layers": {"k": jnp.zeros((n, batch, length, kh, hd), dtype), "v": jnp.zeros((n, batch, length, kh, hd), dtype)}}
  for name, layer in params.items():
    if name.startswith("layer_"):
      _, kh, hd = layer["wk"].shape
      cache[name] = {"k": jnp.zeros((batch, length, kh, hd), dtype), "v": jnp.zeros((batch, length, kh, hd), dtype)}
  return cache


def cached_logits_fn(apply_fn, params, *, time_conditioned: bool = False, pad_id: int = PAD, dtype=jnp.float32,
                     block_size: int | None = None):
  """The cache-aware forward for the Fast-dLLM prefix / dual caches (`dlm_jax.samplers.llada`, cache="prefix"/"dual").

  fn(window [B, W], t [B], start, cache) -> (logits [B, W, V], cache). With W = L, start = 0 (a full forward;
  `cache` may be None) it computes every position and returns a fresh cache: per-layer keys (before RoPE) and values
  plus the row layout (PAD positions, RoPE positions). Otherwise the window's keys and values replace the cached ones at
  [start, start + W) and its queries attend to all L positions, the rest coming from the cache as it was last written
  (Fast-dLLM's dual cache; with the window reaching the end of the sequence, the prefix cache). Cached keys are
  rotated at use with their absolute positions.

  With `block_size` (block diffusion's K/V cache of clean blocks, `dlm_jax.samplers.block`) attention is
  block-causal (`block_mask`): a window sees the cache up to the end of its own block, never later entries.
  """

  def fn(window, t, start, cache):
    b, w = window.shape
    kw = {"t": t} if time_conditioned else {}
    if cache is None or w == cache["positions"].shape[1]:
      row = pad_layout(window, pad_id)
      positions, seg = row["positions"], row["kv_segment_ids"]
      kv = empty_cache(params, b, w, dtype)
      logits, kv = apply_fn(params, row["ids"], positions=positions, segment_ids=row["segment_ids"],
                            kv_segment_ids=seg, mask=block_mask(block_size), cache=kv,
                            cache_start=jnp.zeros((), jnp.int32), kv_positions=positions, **kw)
      return logits, {"kv": kv, "segments": seg, "positions": positions}
    start = jnp.asarray(start, jnp.int32)
    positions = jax.lax.dynamic_slice_in_dim(cache["positions"], start, w, axis=1)
    logits, kv = apply_fn(params, window, positions=positions, segment_ids=jnp.zeros((b, w), jnp.int32),
                          kv_segment_ids=cache["segments"], mask=block_mask(block_size),
                          cache=cache["kv"], cache_start=start, kv_positions=cache["positions"], **kw)
    return logits, {**cache, "kv": kv}

  return fn
