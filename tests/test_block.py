"""Block diffusion (BD3-LM) and the autoregressive baseline: the training mask, the objective's special cases (block
size 1 = exact causal NLL, block size L = masked diffusion), the bound, and block sampling (KV cache = uncached,
padding, variable length, nucleus truncation, bad input). Models are a tiny random dlm_jax transformer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_transformer
from dlm_jax import model as model_lib
from dlm_jax.processes import BlockDiffusion, MaskedDiffusion
from dlm_jax.processes.block import bd3_mask
from dlm_jax.samplers import PAD, ancestral, block_diffusion, filter_logits, first_hitting, left_pad, llada, remdm
from dlm_jax.samplers.block import left_align, unigram_entropy
from dlm_jax.samplers.common import truncated

V, MASK = 12, 12


@pytest.fixture(scope="module")
def net():
  return random_transformer(V)


def _batch(b=4, l=16, seed=0):
  return {"tokens": jax.random.randint(jax.random.PRNGKey(seed), (b, l), 0, V)}


# --- the training mask -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length,bs", [(8, 1), (8, 2), (12, 4), (8, 8)])
def test_bd3_mask_matches_its_definition_position_by_position(length, bs):
  m = bd3_mask(length, bs)
  assert m.shape == (2 * length, 2 * length) and m.dtype == bool
  for q in range(2 * length):
    for k in range(2 * length):
      q_clean, k_clean = q >= length, k >= length
      q_blk, k_blk = (q % length) // bs, (k % length) // bs
      if not q_clean:  # a noisy token: its own noisy block, and clean blocks strictly before it
        want = (not k_clean and k_blk == q_blk) or (k_clean and k_blk < q_blk)
      else:  # a clean token: clean tokens in its block and in earlier blocks, never the noisy half
        want = k_clean and k_blk <= q_blk
      assert m[q, k] == want, (q, k)


# --- the objective's special cases -------------------------------------------------------------------------------


def _chain_rule_nll(apply_fn, params, tokens):
  """-log p(x) by the chain rule, one forward per position: x_<i clean, x_i masked, causal attention (the sampler-
  facing forward at block size 1)."""
  fn = model_lib.logits_fn(apply_fn, params, block_size=1)
  b, l = tokens.shape
  total = np.zeros(b)
  for i in range(l):
    z = tokens.at[:, i].set(MASK)
    logp = jax.nn.log_softmax(fn(z, None)[:, i], axis=-1)
    total -= np.asarray(jnp.take_along_axis(logp, tokens[:, i:i + 1], axis=1)[:, 0])
  return total


def test_block_size_one_is_the_exact_causal_nll(net):
  apply_fn, params = net
  batch = _batch()
  proc = BlockDiffusion(vocab_size=V, block_size=1)
  truth = _chain_rule_nll(apply_fn, params, batch["tokens"])
  for seed in range(3):  # no randomness left at block size 1
    nats, ntok = proc.bound(apply_fn, params, batch, jax.random.PRNGKey(seed), {})
    np.testing.assert_allclose(nats, truth, rtol=1e-5)
  loss, metrics, _ = proc.loss(apply_fn, params, batch, jax.random.PRNGKey(7), {})
  np.testing.assert_allclose(float(loss), truth.sum() / batch["tokens"].size, rtol=1e-5)
  assert float(metrics["masked_fraction"]) == 1.0


def test_block_size_L_is_masked_diffusion_for_the_same_noise(net):
  apply_fn, params = net
  batch = _batch(b=8, l=16)
  block = BlockDiffusion(vocab_size=V, block_size=16)
  masked = MaskedDiffusion(vocab_size=V)
  for seed in range(3):
    key = jax.random.PRNGKey(seed)
    lb, mb, _ = block.loss(apply_fn, params, batch, key, {})
    lm, mm, _ = masked.loss(apply_fn, params, batch, key, {})
    np.testing.assert_allclose(float(lb), float(lm), rtol=1e-5)
    assert float(mb["masked_fraction"]) == float(mm["masked_fraction"])


def test_block_times_are_antithetic_and_uniform_per_block():
  proc = BlockDiffusion(vocab_size=V, block_size=4, t_min=0.2, t_max=0.7)
  t = np.asarray(proc.block_times(jax.random.PRNGKey(0), 8, 4))
  assert t.shape == (8, 4) and t.min() >= 0.2 and t.max() <= 0.7
  strata = np.sort(((t - 0.2) / 0.5 * 32).astype(int).ravel())
  np.testing.assert_array_equal(strata, np.arange(32))  # one draw per stratum over batch x blocks
  rows = np.floor((t - 0.2) / 0.5 * 8).astype(int)
  np.testing.assert_array_equal(rows, np.repeat(np.arange(8)[:, None], 4, axis=1))  # row i: its own strata
  # each block position averages to the interval's mean over many batches (no position bias)
  ts = np.stack([np.asarray(proc.block_times(jax.random.PRNGKey(s), 8, 4)) for s in range(300)])
  np.testing.assert_allclose(ts.mean(axis=(0, 1)), 0.45, atol=0.01)


def test_the_bound_is_the_exact_per_block_nelbo_in_expectation(net):
  """The masked-count bound (exact integral over t) and the 1/t-weighted training estimator on [~0, 1] estimate the
  same per-block NELBO: their averages over many draws agree."""
  apply_fn, params = net
  batch = _batch(b=16, l=8)
  proc = BlockDiffusion(vocab_size=V, block_size=4, t_min=1e-4)
  bound = np.mean([np.asarray(proc.bound(apply_fn, params, batch, jax.random.PRNGKey(s), {})[0]).sum()
                   for s in range(150)])
  train = np.mean([float(proc.loss(apply_fn, params, batch, jax.random.PRNGKey(s), {})[0]) * batch["tokens"].size
                   for s in range(400)])
  assert abs(bound - train) / bound < 0.03, (bound, train)


# --- sampling ------------------------------------------------------------------------------------------------------


def _fns(net, bs, top_p=1.0):
  apply_fn, params = net
  trunc = dict(top_k=0, top_p=top_p, temperature=1.0, mask_id=MASK)
  return (truncated(model_lib.logits_fn(apply_fn, params, block_size=bs), **trunc),
          truncated(model_lib.cached_logits_fn(apply_fn, params, block_size=bs), **trunc))


INNER = {
    "first_hitting": functools.partial(first_hitting, mask_id=MASK),
    "ancestral": functools.partial(ancestral, mask_id=MASK, steps=6),
    "llada": functools.partial(llada, mask_id=MASK, gen_start=0, gen_length=4, block_length=2, steps=4,
                               temperature=0.7, remasking="random"),
    "remdm": functools.partial(remdm, mask_id=MASK, steps=6, eta=0.1),
}


def _prompts():
  return [np.array([1, 2, 3, 4, 5], np.int32), np.array([3], np.int32), np.array([9, 8, 7, 6, 5, 4, 3, 2], np.int32)]


@pytest.mark.parametrize("inner", sorted(INNER))
def test_kv_cached_block_sampling_equals_uncached(net, inner):
  plain, cached = _fns(net, 4)
  canvas, _ = left_pad(_prompts(), 24, MASK)
  key = jax.random.PRNGKey(3)
  a, sa = jax.jit(functools.partial(block_diffusion, plain, block_size=4, mask_id=MASK, inner=INNER[inner]))(
      key, canvas)
  b, sb = jax.jit(functools.partial(block_diffusion, plain, block_size=4, mask_id=MASK, inner=INNER[inner],
                                    cached_fn=cached))(key, canvas)
  np.testing.assert_array_equal(a, b)
  assert not (np.asarray(a) == MASK).any()
  # rows come back left-aligned with their prompt first
  for row, p in zip(np.asarray(a), _prompts()):
    np.testing.assert_array_equal(row[:len(p)], p)
  assert int(sb["nfe"]) > 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_ar_kv_cache_sampling_equals_uncached_and_each_row_alone(net, temperature):
  plain, cached = _fns(net, 1)
  canvas, _ = left_pad(_prompts(), 20, MASK)
  kw = dict(block_size=1, mask_id=MASK, temperature=temperature)
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(5), r))(jnp.arange(3))
  a, sa = jax.jit(functools.partial(block_diffusion, plain, **kw))(keys, canvas)
  b, sb = jax.jit(functools.partial(block_diffusion, plain, cached_fn=cached, **kw))(keys, canvas)
  np.testing.assert_array_equal(a, b)
  # one forward per generated token after the prefill (from the shortest prompt on)
  assert int(sb["nfe"]) == 20 - 1
  for r, p in enumerate(_prompts()):
    alone, _ = left_pad([p], 20, MASK)
    row, _ = jax.jit(functools.partial(block_diffusion, plain, cached_fn=cached, **kw))(keys[r:r + 1], alone)
    np.testing.assert_array_equal(row[0], b[r])


def test_block_sampling_rows_do_not_depend_on_the_batch(net):
  plain, cached = _fns(net, 4)
  canvas, _ = left_pad(_prompts(), 24, MASK)
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.PRNGKey(9), r))(jnp.arange(3))
  run = jax.jit(functools.partial(block_diffusion, plain, block_size=4, mask_id=MASK, inner=INNER["first_hitting"],
                                  cached_fn=cached))
  full, _ = run(keys, canvas)
  for r, p in enumerate(_prompts()):
    alone, _ = left_pad([p], 24, MASK)
    np.testing.assert_array_equal(run(keys[r:r + 1], alone)[0][0], full[r])


def test_the_model_forward_at_block_size_one_is_causal(net):
  plain, _ = _fns(net, 1)
  x = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, V)
  y = x.at[:, 7:].set(3)
  np.testing.assert_allclose(plain(x, None)[:, :7], plain(y, None)[:, :7], atol=1e-6)
  assert not np.allclose(plain(x, None)[:, 7:], plain(y, None)[:, 7:])


def test_eos_stop_ends_rows_and_stops_the_loop(net):
  apply_fn, params = net
  eos = 4

  def always_eos(tokens, t):  # a model that puts all mass on EOS after position 6
    logits = model_lib.logits_fn(apply_fn, params, block_size=4)(tokens, t)
    late = jnp.arange(tokens.shape[1]) >= 6
    return jnp.where(late[None, :, None], jnp.where(jnp.arange(V) == eos, 50.0, -50.0), logits)

  canvas, _ = left_pad([np.array([1, 2], np.int32)] * 2, 32, MASK)
  out, st = jax.jit(functools.partial(block_diffusion, always_eos, block_size=4, mask_id=MASK,
                                      inner=INNER["first_hitting"], eos_id=eos))(jax.random.PRNGKey(0), canvas)
  out = np.asarray(out)
  for row in out:
    e = int(np.argmax(row == eos))
    assert e <= 6 and (row[e + 1:] == PAD).all() and (row[:e + 1] != PAD).all()
  assert int(st["steps"]) == 2  # blocks 0 and 1 only, then every row has stopped
  np.testing.assert_array_equal(st["lengths"], [int(np.argmax(r == eos)) + 1 for r in out])


def test_entropy_stop_drops_the_collapsed_window(net):
  def repeat(tokens, t):  # always the same token: entropy 0
    return jnp.broadcast_to(jnp.where(jnp.arange(V) == 7, 50.0, -50.0), tokens.shape + (V,))

  canvas, _ = left_pad([np.array([1], np.int32)], 32, MASK)
  out, st = block_diffusion(repeat, jax.random.PRNGKey(0), canvas, block_size=4, mask_id=MASK,
                            inner=INNER["first_hitting"], entropy_stop=1.0, entropy_window=8)
  out = np.asarray(out)[0]
  # after block 1 (positions < 8) only 7 tokens are generated; after block 2 the last 8 tokens (4..11) collapse
  assert int(st["steps"]) == 3 and (out[4:] == PAD).all() and (out[1:4] == 7).all()
  np.testing.assert_allclose(unigram_entropy(jnp.array([[1, 1, 2, 2]])), [np.log(2)], rtol=1e-6)


def test_left_align_and_filter_logits():
  canvas = jnp.array([[PAD, PAD, 1, 2, MASK], [3, 4, 5, 6, MASK]])
  np.testing.assert_array_equal(left_align(canvas, MASK), [[1, 2, MASK, MASK, MASK], [3, 4, 5, 6, MASK]])
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda **kw: np.isfinite(np.asarray(filter_logits(logits, **kw)))[0].tolist()
  assert kept(top_p=0.5) == [True, False, False, False]
  assert kept(top_p=0.8) == [True, True, False, False]
  assert kept(top_p=0.81) == [True, True, True, False]
  assert kept(top_k=3) == [True, True, True, False]
  assert kept(top_k=2, top_p=0.99) == [True, True, False, False]
  # at temperature 2 the distribution flattens, so the nucleus grows
  assert kept(top_p=0.8, temperature=2.0) == [True, True, True, False]


@pytest.mark.parametrize("bs", [1, 4])
def test_nucleus_sampling_draws_from_the_renormalised_nucleus(bs):
  probs = jnp.array([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
  fixed = lambda tokens, t: jnp.broadcast_to(jnp.log(probs + 1e-30), tokens.shape + (V,))
  canvas, _ = left_pad([np.array([1], np.int32)] * 64, 32, MASK)
  inner = INNER["first_hitting"] if bs > 1 else None
  counts = {}
  for top_p in (1.0, 0.7):
    fn = truncated(fixed, top_p=top_p, mask_id=MASK)
    out, _ = jax.jit(functools.partial(block_diffusion, fn, block_size=bs, mask_id=MASK, inner=inner))(
        jax.random.PRNGKey(0), canvas)
    counts[top_p] = np.bincount(np.asarray(out)[:, 1:].ravel(), minlength=V)
  assert counts[1.0][2] > 0 and counts[1.0][3] > 0
  assert counts[0.7][2:].sum() == 0  # {0, 1} holds 0.8 >= 0.7
  frac = counts[0.7][0] / counts[0.7].sum()
  assert abs(frac - 0.5 / 0.8) < 0.03, frac


def test_bad_input(net):
  plain, _ = _fns(net, 4)
  canvas, _ = left_pad([np.array([1, 2], np.int32)], 18, MASK)
  with pytest.raises(ValueError, match="must divide the canvas length"):
    block_diffusion(plain, jax.random.PRNGKey(0), canvas, block_size=4, mask_id=MASK, inner=INNER["first_hitting"])
  infill = jnp.array([[1, MASK, 2, MASK]])
  with pytest.raises(ValueError, match="cannot infill"):
    block_diffusion(plain, jax.random.PRNGKey(0), infill, block_size=2, mask_id=MASK, inner=INNER["first_hitting"])
  with pytest.raises(ValueError, match="does not divide"):
    BlockDiffusion(vocab_size=V, block_size=5).loss(*net, _batch(l=16), jax.random.PRNGKey(0), {})


def test_block_benchmark_runs(tiny_config):
  """benchmarks/block.py end to end at a tiny size (figures are not checked: this only keeps it runnable)."""
  import json
  import os
  import subprocess
  import sys
  from conftest import REPO
  cfg = tiny_config()
  r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "block.py"), "--config", cfg, "--sample_config",
                      cfg, "--block_size", "4", "--length", "16", "--batch_size", "2", "--repeats", "1",
                      "--train_steps", "1", "--tile", "8"], capture_output=True, text=True, timeout=900,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  rows = {row["bench"]: row for row in (json.loads(l) for l in r.stdout.splitlines() if l.startswith("{"))}
  assert set(rows) == {"mask_tiles", "train_step", "block_sampling", "ar_sampling"}
  assert rows["mask_tiles"]["nonzero_entries"] == rows["mask_tiles"]["analytic_entries"]
  assert rows["block_sampling"]["token_agreement"] == 1.0 and rows["ar_sampling"]["token_agreement"] == 1.0
