"""The MDLM ancestral sampler driven by plain JAX logits functions (no dlm_jax model)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from conftest import counting
from dlm_jax.samplers import ancestral

V, MASK = 6, 6


def neighbour_logits(tokens, t):
  """A deterministic toy 'model': favours (left neighbour + 1) mod V where the left neighbour is known."""
  del t
  left = jnp.concatenate([jnp.full((tokens.shape[0], 1), MASK), tokens[:, :-1]], axis=1)
  pref = jnp.where(left == MASK, 0, (left + 1) % V)
  return 3.0 * jax.nn.one_hot(pref, V)


def _run(logits_fn, key, canvas, **kw):
  fn = jax.jit(functools.partial(ancestral, logits_fn, mask_id=MASK, **kw))
  return fn(key, canvas)


def test_decodes_everything_and_keeps_the_prompt():
  canvas = np.full((4, 20), MASK, np.int32)
  canvas[:, :3] = [1, 2, 3]
  tokens, stats = _run(neighbour_logits, jax.random.PRNGKey(0), jnp.asarray(canvas), steps=10)
  tokens = np.asarray(tokens)
  assert (tokens != MASK).all() and tokens.max() < V
  assert (tokens[:, :3] == [1, 2, 3]).all()
  assert 1 <= int(stats["nfe"]) <= 10 and int(stats["steps"]) == 10


def test_nfe_is_exact_and_cache_does_not_change_results():
  counted, calls = counting(neighbour_logits)

  canvas = jnp.full((3, 16), MASK, jnp.int32)
  key = jax.random.PRNGKey(3)
  cached, st_c = _run(counted, key, canvas, steps=64)
  n_cached = len(calls)
  calls.clear()
  uncached, st_u = _run(counted, key, canvas, steps=64, time_conditioned=True)
  assert int(st_c["nfe"]) == n_cached
  assert int(st_u["nfe"]) == len(calls) == 64
  assert n_cached < 64  # with 64 steps for 16 positions many steps change nothing
  np.testing.assert_array_equal(cached, uncached)


def test_mask_logit_is_never_sampled():
  def loves_mask(tokens, t):
    return jnp.zeros(tokens.shape + (V + 1,)).at[..., MASK].set(100.0)

  tokens, _ = _run(loves_mask, jax.random.PRNGKey(0), jnp.full((2, 8), MASK, jnp.int32), steps=4)
  assert (np.asarray(tokens) < V).all()


def test_samples_follow_the_model_distribution():
  """With a position-independent model p(x) = softmax(l / T), sample frequencies match at every temperature."""
  logits = jnp.array([2.0, 1.0, 0.0, -1.0, 0.5, 1.5])

  def fn(tokens, t):
    return jnp.broadcast_to(logits, tokens.shape + (V,))

  for temp in (1.0, 0.5):
    tokens, _ = _run(fn, jax.random.PRNGKey(1), jnp.full((1000, 32), MASK, jnp.int32), steps=8, temperature=temp)
    freq = np.bincount(np.asarray(tokens).ravel(), minlength=V) / tokens.size
    want = np.asarray(jax.nn.softmax(logits / temp))
    assert 0.5 * np.abs(freq - want).sum() < 0.015  # sampling noise is about 0.004


def test_reveal_schedule_one_step_decodes_all_and_respects_steps():
  canvas = jnp.full((2, 12), MASK, jnp.int32)
  tokens, stats = _run(neighbour_logits, jax.random.PRNGKey(0), canvas, steps=1)
  assert (np.asarray(tokens) != MASK).all() and int(stats["nfe"]) == 1


def test_first_hitting_reveals_one_position_per_call():
  from dlm_jax.samplers import first_hitting
  counted, calls = counting(neighbour_logits)

  canvas = np.full((3, 12), MASK, np.int32)
  canvas[0, :5] = [1, 2, 3, 4, 5]  # row 0 has 7 masks, rows 1-2 have 12
  canvas[1, 6] = 2
  fn = jax.jit(functools.partial(first_hitting, counted, mask_id=MASK))
  tokens, stats = fn(jax.random.PRNGKey(0), jnp.asarray(canvas))
  tokens = np.asarray(tokens)
  assert (tokens != MASK).all() and (tokens[0, :5] == [1, 2, 3, 4, 5]).all() and tokens[1, 6] == 2
  assert int(stats["nfe"]) == len(calls) == 12  # the longest row needs one call per masked position


def test_first_hitting_follows_the_model_distribution():
  from dlm_jax.samplers import first_hitting
  logits = jnp.array([2.0, 1.0, 0.0, -1.0, 0.5, 1.5])
  fn = lambda tokens, t: jnp.broadcast_to(logits, tokens.shape + (V,))
  tokens, _ = jax.jit(functools.partial(first_hitting, fn, mask_id=MASK))(jax.random.PRNGKey(2),
                                                                           jnp.full((1000, 16), MASK, jnp.int32))
  freq = np.bincount(np.asarray(tokens).ravel(), minlength=V) / tokens.size
  assert 0.5 * np.abs(freq - np.asarray(jax.nn.softmax(logits))).sum() < 0.015
