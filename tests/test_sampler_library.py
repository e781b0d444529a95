"""The sampler library beyond single-prompt decoding: padded batches, K/V caches, Prophet, EOS stopping, ReMDM,
infilling, logit shift, sampling precision and bad input. Models are a tiny random dlm_jax transformer (through its
sampler-facing forwards) and plain JAX functions written here."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, exact_cache, random_transformer
from dlm_jax import model as model_lib
from dlm_jax.samplers import PAD, ancestral, first_hitting, left_pad, llada, maskgit, remdm

V, MASK = 12, 12


@pytest.fixture(scope="module")
def tiny_model():
  apply_fn, params = random_transformer(V)
  return (model_lib.logits_fn(apply_fn, params), model_lib.cached_logits_fn(apply_fn, params))


def _jit(sampler, fn, **kw):
  return jax.jit(functools.partial(sampler, fn, mask_id=MASK, **kw))


def _prompts():
  return [np.array([1, 2, 3, 4, 5, 6, 7], np.int32), np.array([3], np.int32), np.array([9, 8, 7, 6], np.int32)]


# --- the model's sampler-facing forwards -----------------------------------------------------------------------------


def test_cached_window_forward_equals_the_full_forward(tiny_model):
  plain, cached = tiny_model
  canvas, _ = left_pad(_prompts(), 24, MASK)
  tokens = jnp.asarray(np.where(canvas == MASK, 5, canvas))
  full = plain(tokens, None)
  logits, cache = cached(tokens, None, 0, None)
  np.testing.assert_allclose(logits, full, atol=1e-5)
  for start, width in ((8, 8), (16, 8), (7, 17)):
    win, _ = cached(tokens[:, start:start + width], None, start, cache)
    np.testing.assert_allclose(win, full[:, start:start + width], atol=1e-5)
  # A window whose tokens changed writes its new keys: it equals the full forward of the changed sequence at the
  # window (bidirectional context outside the window is stale, exactly as in Fast-dLLM's dual cache, so only layer 0 of
  # positions outside sees the change; with a one-layer view we check the window's own rows against a full pass).
  changed = tokens.at[:, 16:24].set(2)
  win, new_cache = cached(changed[:, 16:24], None, 16, cache)
  _, fresh = cached(changed, None, 0, None)
  np.testing.assert_allclose(new_cache["kv"]["layer_0"]["k"], fresh["kv"]["layer_0"]["k"], atol=1e-5)


def test_padded_rows_give_the_logits_they_give_alone(tiny_model):
  plain, _ = tiny_model
  prompts = _prompts()
  canvas, gen_start = left_pad(prompts, 20, MASK)
  assert gen_start == 7 and (canvas[1, :6] == PAD).all() and canvas[1, 6] == 3
  batch = plain(jnp.asarray(canvas), None)
  for r, p in enumerate(prompts):
    alone = plain(jnp.asarray(canvas[r:r + 1, 7 - len(p):]), None)
    np.testing.assert_allclose(batch[r, 7 - len(p):], alone[0], atol=1e-5)


# --- padded batches decode like rows alone ----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler,kw", [
    (llada, dict(block_length=4, steps=8, temperature=1.0)),
    (llada, dict(block_length=4, threshold=0.5, temperature=0.8, confidence="margin")),
    (llada, dict(block_length=8, steps=8, remasking="random", temperature=1.0, cfg_scale=1.0)),
    (ancestral, dict(steps=6)),
    (first_hitting, dict()),
    (remdm, dict(steps=10, eta=0.2)),
    (maskgit, dict(steps=5)),
])
def test_a_padded_batch_equals_its_rows_alone(tiny_model, sampler, kw):
  plain, _ = tiny_model
  prompts, gen_length = _prompts(), 8
  canvas, gen_start = left_pad(prompts, 7 + gen_length, MASK)
  keys = jax.random.split(jax.random.PRNGKey(4), len(prompts))
  extra = dict(gen_start=gen_start) if sampler is llada else {}
  batch, _ = _jit(sampler, plain, **kw, **extra)(keys, jnp.asarray(canvas))
  batch = np.asarray(batch)
  assert (batch[canvas != MASK] == canvas[canvas != MASK]).all() and (batch[canvas == MASK] < V).all()
  for r, p in enumerate(prompts):
    row = canvas[r:r + 1, 7 - len(p):]  # the same prompt, unpadded
    extra = dict(gen_start=len(p)) if sampler is llada else {}
    alone, _ = _jit(sampler, plain, **kw, **extra)(keys[r:r + 1], jnp.asarray(row))
    np.testing.assert_array_equal(batch[r, 7 - len(p):], np.asarray(alone)[0])
  # and the batch size does not matter: the first two rows as their own batch
  two, _ = _jit(sampler, plain, **kw, **(dict(gen_start=gen_start) if sampler is llada else {}))(
      keys[:2], jnp.asarray(canvas[:2]))
  np.testing.assert_array_equal(np.asarray(two), batch[:2])


# --- K/V caches ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(steps=16, temperature=1.0), dict(threshold=0.3, temperature=0.0),
                                dict(factor=2.0, temperature=0.5), dict(steps=8, prophet=True),
                                dict(steps=16, temperature=1.0, cfg_scale=1.5), dict(steps=8, logit_shift=True),
                                dict(threshold=0.3, cfg_scale=0.5, logit_shift=True)])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_caches_refreshed_every_step_equal_the_uncached_sampler(tiny_model, cache, kw):
  plain, cached = tiny_model
  canvas, gen_start = left_pad(_prompts(), 7 + 16, MASK)
  key = jax.random.PRNGKey(1)
  base = dict(gen_start=gen_start, block_length=4, **kw)
  ref, ref_stats = _jit(llada, plain, **base)(key, jnp.asarray(canvas))
  got, stats = _jit(llada, cached, cache=cache, cache_refresh=1, **base)(key, jnp.asarray(canvas))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  assert int(stats["nfe"]) == int(ref_stats["nfe"]) == int(stats["nfe_full"])
  # With the exact toy cache, refreshing only at block starts must also reproduce the uncached tokens.
  counted_calls = []

  def counted(tokens, t):
    jax.debug.callback(lambda: counted_calls.append(1))
    return plain(tokens, t)

  exact, ex_stats = _jit(llada, exact_cache(counted), cache=cache, **base)(key, jnp.asarray(canvas))
  np.testing.assert_array_equal(np.asarray(exact), np.asarray(ref))
  assert int(ex_stats["nfe"]) == len(counted_calls) == int(ref_stats["nfe"])
  calls = 2 if kw.get("cfg_scale") else 1
  assert int(ex_stats["nfe_full"]) <= 4 * calls  # one full pass per block, the rest are window calls


def test_stale_dual_cache_still_decodes_and_is_cheaper_per_call(tiny_model):
  plain, cached = tiny_model
  canvas, gen_start = left_pad(_prompts(), 7 + 16, MASK)
  tokens, stats = _jit(llada, cached, gen_start=gen_start, block_length=4, steps=16, cache="dual")(
      jax.random.PRNGKey(0), jnp.asarray(canvas))
  tokens = np.asarray(tokens)
  assert (tokens[:, gen_start:] < V).all() and int(stats["nfe"]) == 16 and int(stats["nfe_full"]) == 4
  with pytest.raises(ValueError, match="logit_shift with a K/V cache needs"):
    llada(cached, jax.random.PRNGKey(0), canvas, mask_id=MASK, gen_start=0, steps=4, cache="dual",
          logit_shift=True)


# --- Prophet, EOS ----------------------------------------------------------------------------------------------------


def peaked(gap):
  """Position-wise logits: class (i % V) at position i, top-1 minus top-2 logit = gap."""

  def fn(tokens, t):
    del t
    target = jax.nn.one_hot(jnp.arange(tokens.shape[1]) % V, V)
    return jnp.broadcast_to(gap * target, tokens.shape + (V,))

  return fn


def test_prophet_commits_everything_once_the_gap_is_large():
  canvas = np.full((2, 16), MASK, np.int32)
  canvas[:, :2] = [1, 2]
  kw = dict(mask_id=MASK, gen_start=2, block_length=7, steps=14)
  tokens, stats = jax.jit(functools.partial(llada, peaked(8.0), prophet=True, **kw))(jax.random.PRNGKey(0), canvas)
  np.testing.assert_array_equal(np.asarray(tokens)[:, 2:], np.tile(np.arange(2, 16) % V, (2, 1)))
  assert int(stats["nfe"]) == 1 and (np.asarray(stats["prophet_step"]) == 0).all()
  # a gap of 3 is below the early threshold (7.5) ...
  _, stats = jax.jit(functools.partial(llada, peaked(3.0), prophet=True, **kw))(jax.random.PRNGKey(0), canvas)
  assert int(stats["nfe"]) > 1
  # ... and a small gap never fires: identical to the plain schedule
  a, sa = jax.jit(functools.partial(llada, peaked(1.0), prophet=True, **kw))(jax.random.PRNGKey(0), canvas)
  b, sb = jax.jit(functools.partial(llada, peaked(1.0), **kw))(jax.random.PRNGKey(0), canvas)
  np.testing.assert_array_equal(a, b)
  assert int(sa["nfe"]) == int(sb["nfe"]) == 14 and (np.asarray(sa["prophet_step"]) == -1).all()
  np.testing.assert_allclose(jax.jit(lambda p: __import__("dlm_jax.samplers.llada", fromlist=["x"]).prophet_threshold(
      p, (7.5, 5.0, 2.5)))(jnp.array([0.0, 0.4, 0.9])), [7.5, 5.0, 2.5])


def test_eos_stops_a_finished_row():
  eos = 3

  def eos_at(k):
    def fn(tokens, t):  # position >= k strongly predicts EOS, earlier positions predict 5
      del t
      pos = jnp.arange(tokens.shape[1])
      return jnp.broadcast_to(jnp.where((pos >= k)[:, None], 9.0 * jax.nn.one_hot(eos, V),
                                        9.0 * jax.nn.one_hot(5, V)), tokens.shape + (V,))
    return fn

  canvas = np.full((1, 32), MASK, np.int32)
  kw = dict(mask_id=MASK, gen_start=0, block_length=8, threshold=0.9)
  plain_tokens, plain_stats = jax.jit(functools.partial(llada, eos_at(5), **kw))(jax.random.PRNGKey(0), canvas)
  tokens, stats = jax.jit(functools.partial(llada, eos_at(5), eos_id=eos, **kw))(jax.random.PRNGKey(0), canvas)
  np.testing.assert_array_equal(tokens, plain_tokens)  # the same text ...
  assert int(stats["nfe"]) < int(plain_stats["nfe"])  # ... without decoding the EOS tail block by block
  assert int(stats["nfe"]) == 1  # block 0 commits everything (all confident), EOS at 5 fills blocks 1-3
  # An EOS followed by a decoded non-EOS token does not end the row.
  canvas2 = canvas.copy()
  canvas2[0, 20] = 7
  tokens2, _ = jax.jit(functools.partial(llada, eos_at(5), eos_id=eos, **kw))(jax.random.PRNGKey(0), canvas2)
  assert np.asarray(tokens2)[0, 20] == 7 and (np.asarray(tokens2)[0, 5:20] == eos).all()


# --- ReMDM -----------------------------------------------------------------------------------------------------------


def test_remdm_without_remasking_is_the_ancestral_sampler(tiny_model):
  plain, _ = tiny_model
  canvas, _ = left_pad(_prompts(), 20, MASK)
  key = jax.random.PRNGKey(2)
  a, _ = _jit(ancestral, plain, steps=9, time_conditioned=True)(key, jnp.asarray(canvas))
  r, st = _jit(remdm, plain, steps=9, eta=0.0)(key, jnp.asarray(canvas))
  np.testing.assert_array_equal(np.asarray(r), np.asarray(a))
  assert int(st["remasked"].sum()) == 0
  for strategy in ("cap", "rescale", "conf"):
    r, st = _jit(remdm, plain, steps=30, eta=0.5, strategy=strategy)(key, jnp.asarray(canvas))
    r = np.asarray(r)
    assert (r[canvas == MASK] < V).all() and (r[canvas != MASK] == canvas[canvas != MASK]).all()
    assert int(st["remasked"].sum()) > 0, strategy  # committed tokens were revised


# --- infilling, logit shift, precision -----------------------------------------------------------------------------


def test_infilling_fills_only_the_masked_spans(tiny_model):
  plain, _ = tiny_model
  template = np.array([[1, 2, MASK, MASK, MASK, 6, 7, MASK, MASK, 10]], np.int32)
  for sampler, kw in ((ancestral, dict(steps=5)), (first_hitting, {}), (remdm, dict(steps=5, eta=0.1)),
                      (llada, dict(gen_start=2, steps=5, temperature=1.0))):
    out = np.asarray(_jit(sampler, plain, **kw)(jax.random.PRNGKey(0), jnp.asarray(template))[0])
    fixed = template != MASK
    assert (out[fixed] == template[fixed]).all() and (out[~fixed] < V).all(), sampler


def test_logit_shift_reads_the_previous_position():
  def next_token(tokens, t):  # position i predicts token (i + 1) % V: the AR-style convention Dream is trained with
    del t
    return jnp.broadcast_to(9.0 * jax.nn.one_hot((jnp.arange(tokens.shape[1]) + 1) % V, V), tokens.shape + (V,))

  canvas = np.full((1, 10), MASK, np.int32)
  for sampler, kw in ((llada, dict(gen_start=0, steps=10)), (ancestral, dict(steps=4, temperature=0.01)),
                      (first_hitting, dict(temperature=0.01))):
    out = np.asarray(_jit(sampler, next_token, logit_shift=True, **kw)(jax.random.PRNGKey(0), canvas)[0])
    np.testing.assert_array_equal(out[0, 1:], np.arange(1, 10) % V)


def test_float64_sampling_needs_and_uses_64_bit_mode():
  with pytest.raises(ValueError, match="JAX_ENABLE_X64"):
    llada(peaked(1.0), jax.random.PRNGKey(0), np.full((1, 8), MASK, np.int32), mask_id=MASK, gen_start=0, steps=8,
          temperature=1.0, precision="float64")
  code = (
      "import jax, jax.numpy as jnp, numpy as np\n"
      "from dlm_jax.samplers import llada, ancestral, first_hitting, remdm\n"
      f"V, MASK = {V}, {MASK}\n"
      "fn = lambda tokens, t: jnp.broadcast_to(jnp.linspace(0, 2, V), tokens.shape + (V,))\n"
      "canvas = np.full((2, 8), MASK, np.int32)\n"
      "k = jax.random.PRNGKey(0)\n"
      "for s, kw in ((llada, dict(gen_start=0, steps=8, temperature=1.0, cache=None)), (ancestral, dict(steps=4)),\n"
      "              (first_hitting, {}), (remdm, dict(steps=4, eta=0.1))):\n"
      "  out, st = jax.jit(lambda k, c: s(fn, k, c, mask_id=MASK, precision='float64', **kw))(k, canvas)\n"
      "  assert (np.asarray(out) < V).all() and out.dtype == jnp.int32, s\n"
      "print('ok')\n")
  env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


# --- bad input: one ValueError each, before anything is compiled ----------------------------------------------------


def test_bad_input_is_rejected_before_compiling(tiny_model):
  plain, _ = tiny_model
  canvas = np.full((2, 16), MASK, np.int32)
  k = jax.random.PRNGKey(0)
  cases = [
      (dict(gen_start=20, steps=4), "does not fit"),  # prompt longer than the canvas
      (dict(gen_start=4, block_length=5, steps=4), "multiple of block_length"),
      (dict(gen_start=0, block_length=4, steps=6), "multiple of the number of blocks"),
      (dict(gen_start=0, threshold=1.5), r"threshold must be in \(0, 1\]"),
      (dict(gen_start=0, threshold=0.0), r"threshold must be in \(0, 1\]"),
      (dict(gen_start=0, steps=4, remasking="sometimes"), "remasking must be one of"),
      (dict(gen_start=0, steps=4, cache="triple"), "cache must be one of"),
      (dict(gen_start=0, steps=4, precision="float16"), "precision must be one of"),
  ]
  for kw, msg in cases:
    with pytest.raises(ValueError, match=msg):
      llada(plain, k, canvas, mask_id=MASK, **kw)
  with pytest.raises(TypeError):
    llada(plain, k, canvas, mask_id=MASK, gen_start=0, steps=4, no_such_option=1)  # unknown option
  bad = canvas.copy()
  bad[0, 3] = V + 5
  for sampler, kw in ((llada, dict(gen_start=0, steps=4)), (ancestral, dict(steps=4)), (first_hitting, {}),
                      (remdm, dict(steps=4))):
    with pytest.raises(ValueError, match=r"canvas\[0, 3\] = 17 is not a token id"):
      sampler(plain, k, bad, mask_id=MASK, **kw)
    with pytest.raises(ValueError, match=r"must return \[B, L, V\]"):
      sampler(lambda tokens, t: jnp.zeros((tokens.shape[0], V)), k, canvas, mask_id=MASK, **kw)
  with pytest.raises(ValueError, match="longest prompt has 9 tokens"):
    left_pad([np.arange(9)], 9, MASK)


def test_position_noise_makes_draws_independent_of_the_schedule():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(16, V)), jnp.float32)
  fn = lambda tokens, t: jnp.broadcast_to(logits, tokens.shape + (V,))  # noqa: E731  context-free, not peaked
  canvas = np.full((2, 16), MASK, np.int32)
  kw = dict(mask_id=MASK, gen_start=0, block_length=8, temperature=1.0)
  runs = {}
  for noise in ("step", "position"):
    a, _ = jax.jit(functools.partial(llada, fn, steps=16, noise=noise, **kw))(jax.random.PRNGKey(0), canvas)
    b, _ = jax.jit(functools.partial(llada, fn, steps=4, noise=noise, **kw))(jax.random.PRNGKey(0), canvas)
    runs[noise] = (np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(*runs["position"])  # the same draw at every position, whatever the schedule
  assert (runs["step"][0] != runs["step"][1]).any()
  with pytest.raises(ValueError, match="noise must be one of"):
    llada(fn, jax.random.PRNGKey(0), canvas, steps=4, noise="frozen", **kw)
