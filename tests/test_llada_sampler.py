"""The LLaDA / Fast-dLLM sampler driven by plain JAX logits functions (no dlm_jax model)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import counting, exact_cache
from dlm_jax.samplers import PAD, factor_count, llada
from dlm_jax.samplers.llada import commit_counts

V, MASK = 8, 8


def neighbour_logits(tokens, t):
  """Deterministic, row-wise toy model: favours (left neighbour + 1) mod V where the left neighbour is known."""
  del t
  left = jnp.concatenate([jnp.full((tokens.shape[0], 1), MASK), tokens[:, :-1]], axis=1)
  known = left != MASK
  pref = jnp.where(known, (left + 1) % V, 0)
  return jnp.where(known[..., None], 3.0 * jax.nn.one_hot(pref, V), 0.0)


def fixed_conf_logits(conf):
  """Position-wise, context-free logits whose max prob at position i is conf[i], with argmax i % V."""
  conf = jnp.asarray(conf, jnp.float32)
  length = conf.shape[0]
  target = jax.nn.one_hot(jnp.arange(length) % V, V)
  p = target * conf[:, None] + (1 - target) * ((1 - conf[:, None]) / (V - 1))
  logits = jnp.log(p)

  def fn(tokens, t):
    del t
    return jnp.broadcast_to(logits, tokens.shape + (V,))

  return fn


def recording(fn, log):
  """Wraps fn so every real call appends the tokens it saw to `log`."""

  def wrapped(tokens, t):
    jax.debug.callback(lambda x: log.append(np.asarray(x)), tokens, ordered=True)
    return fn(tokens, t)

  return wrapped


def _run(logits_fn, key, canvas, **kw):
  fn = jax.jit(functools.partial(llada, logits_fn, mask_id=MASK, **kw))
  tokens, stats = fn(key, jnp.asarray(canvas, jnp.int32))
  return np.asarray(tokens), jax.tree_util.tree_map(np.asarray, stats)


def _canvas(b, prompt_len, gen_length, suffix=0):
  canvas = np.full((b, prompt_len + gen_length + suffix), MASK, np.int32)
  canvas[:, :prompt_len] = np.arange(prompt_len) % V
  if suffix:
    canvas[:, prompt_len + gen_length:] = 7  # e.g. padding after the generated region
  return canvas


def _commit_step(log, final, lo, hi):
  """Step at which each position in [lo, hi) was committed, from the tokens seen by successive calls."""
  seen = np.stack(log)[:, 0, lo:hi]  # [calls, positions] of row 0
  steps = (seen == MASK).sum(axis=0)  # a position masked at k calls was committed after the k-th call
  assert (final[0, lo:hi] != MASK).all()
  return steps


@pytest.mark.parametrize("kw", [
    dict(steps=8, temperature=1.0),
    dict(steps=16, remasking="random", temperature=0.7, confidence="margin"),
    dict(steps=4, cfg_scale=1.5, confidence="neg_entropy"),
    dict(threshold=0.7, temperature=1.0),
    dict(factor=1.0),
])
def test_decodes_everything_and_keeps_prompt_and_suffix(kw):
  canvas = _canvas(3, 5, 16, suffix=3)
  tokens, stats = _run(neighbour_logits, jax.random.PRNGKey(0), canvas, gen_start=5, gen_length=16, block_length=4,
                       **kw)
  assert (tokens[:, 5:21] != MASK).all() and tokens.max() < V
  np.testing.assert_array_equal(tokens[:, :5], canvas[:, :5])
  np.testing.assert_array_equal(tokens[:, 21:], canvas[:, 21:])
  assert (stats["committed"].sum(axis=1) == 16).all()


def test_mask_logit_is_never_sampled_and_masks_outside_region_are_kept():
  def loves_mask(tokens, t):
    return jnp.zeros(tokens.shape + (V + 1,)).at[..., MASK].set(100.0)

  canvas = np.full((2, 12), MASK, np.int32)  # prompt positions hold masks too: they are not generated
  tokens, _ = _run(loves_mask, jax.random.PRNGKey(0), canvas, gen_start=4, gen_length=8, block_length=4, steps=4,
                   temperature=1.0)
  assert (tokens[:, 4:] < V).all()
  assert (tokens[:, :4] == MASK).all()


def test_commit_schedule_matches_llada_rule():
  gen_start, gen_length, block = 2, 16, 8
  canvas = _canvas(2, gen_start, gen_length)
  canvas[1, gen_start + 1:gen_start + 4] = 3  # row 1: 5 masked positions in block 0, 8 in block 1
  log = []
  for steps in (6, 20):  # 3 steps per block, and 10 (more steps than masked positions)
    log.clear()
    tokens, stats = _run(recording(neighbour_logits, log), jax.random.PRNGKey(0), canvas, gen_start=gen_start,
                         gen_length=gen_length, block_length=block, steps=steps)
    spb = steps // 2
    want = [commit_counts(8, spb) + commit_counts(8, spb), commit_counts(5, spb) + commit_counts(8, spb)]
    np.testing.assert_array_equal(stats["committed"], want)
    np.testing.assert_array_equal(tokens[1, gen_start + 1:gen_start + 4], 3)  # pre-filled tokens are kept
    # Independent check from what the network saw: masks removed between consecutive calls (row 0).
    masks = [(x[0] == MASK).sum() for x in log] + [0]
    active_steps = [c for c in np.maximum(want[0], want[1]) if c > 0]
    assert len(log) == len(active_steps) == int(stats["nfe"])  # steps that commit nothing make no call
    np.testing.assert_array_equal(-np.diff(masks), [c for c in want[0] if c > 0])
  assert commit_counts(8, 3) == [3, 3, 2] and commit_counts(5, 10) == [1] * 5 + [0] * 5


def test_low_confidence_order_and_block_order():
  gen_length, block = 12, 4
  conf = np.concatenate([np.full(2, 0.5), np.linspace(0.2, 0.8, gen_length)])  # increases with position
  log = []
  tokens, stats = _run(recording(fixed_conf_logits(conf), log), jax.random.PRNGKey(0), _canvas(1, 2, gen_length),
                       gen_start=2, gen_length=gen_length, block_length=block, steps=gen_length)
  np.testing.assert_array_equal(tokens[0, 2:], np.arange(2, 2 + gen_length) % V)  # greedy = argmax
  order = _commit_step(log, tokens, 2, 2 + gen_length)
  # One token per step; within a block the most confident (rightmost) first; blocks left to right.
  want = np.concatenate([blk * block + np.arange(block, 0, -1) for blk in range(3)])
  np.testing.assert_array_equal(order, want)
  assert (stats["committed"] == 1).all()

  # Random remasking: any order within a block, but a later block never starts before the earlier one is done.
  log.clear()
  tokens, _ = _run(recording(fixed_conf_logits(conf), log), jax.random.PRNGKey(1), _canvas(1, 2, gen_length),
                   gen_start=2, gen_length=gen_length, block_length=block, steps=6, remasking="random")
  order = _commit_step(log, tokens, 2, 2 + gen_length).reshape(3, block)
  assert (order[:-1].max(axis=1) < order[1:].min(axis=1)).all()


def test_threshold_equals_one_token_per_step_when_nothing_is_confident():
  gen_length, block = 12, 4
  rng = np.random.default_rng(0)
  conf = np.concatenate([np.full(2, 0.5), rng.uniform(0.2, 0.8, gen_length)])
  canvas = _canvas(1, 2, gen_length)
  runs = []
  for kw in (dict(steps=gen_length), dict(threshold=0.9), dict(threshold=1.0)):
    log = []
    tokens, stats = _run(recording(fixed_conf_logits(conf), log), jax.random.PRNGKey(0), canvas, gen_start=2,
                         gen_length=gen_length, block_length=block, **kw)
    runs.append((tokens, np.stack(log), int(stats["nfe"])))
    assert int(stats["nfe"]) == gen_length == int(stats["steps"])
  for tokens, seen, nfe in runs[1:]:
    np.testing.assert_array_equal(tokens, runs[0][0])
    np.testing.assert_array_equal(seen, runs[0][1])  # identical trajectories


def test_threshold_never_stalls_on_a_flat_model():
  flat = lambda tokens, t: jnp.zeros(tokens.shape + (V,))  # noqa: E731
  tokens, stats = _run(flat, jax.random.PRNGKey(0), _canvas(2, 3, 8), gen_start=3, gen_length=8, block_length=4,
                       threshold=1.0)
  assert (tokens[:, 3:] != MASK).all()
  assert int(stats["nfe"]) == 8 and (stats["committed"] == 1).all() and (stats["row_steps"] == 8).all()


def test_threshold_commits_many_tokens_when_confident():
  gen_length, block = 16, 8
  conf = np.full(2 + gen_length, 0.99)
  tokens, stats = _run(fixed_conf_logits(conf), jax.random.PRNGKey(0), _canvas(2, 2, gen_length), gen_start=2,
                       gen_length=gen_length, block_length=block, threshold=0.9)
  np.testing.assert_array_equal(tokens[:, 2:], np.broadcast_to(np.arange(2, 2 + gen_length) % V, (2, gen_length)))
  assert int(stats["nfe"]) == 2  # one step per block
  np.testing.assert_array_equal(stats["committed"][:, :2], 8)

  # Mixed: block confidences [0.95, 0.5, 0.97, 0.6] -> step 1 commits {0, 2}, then 3 (top-1), then 1.
  conf = np.array([0.5, 0.5, 0.95, 0.5, 0.97, 0.6])
  log = []
  tokens, stats = _run(recording(fixed_conf_logits(conf), log), jax.random.PRNGKey(0), _canvas(1, 2, 4), gen_start=2,
                       gen_length=4, block_length=4, threshold=0.9)
  np.testing.assert_array_equal(stats["committed"][0, :3], [2, 1, 1])
  np.testing.assert_array_equal(_commit_step(log, tokens, 2, 6), [1, 3, 1, 2])


def test_factor_rule():
  """Fast-dLLM's get_transfer_index_dynamic: leading confidences up to the first c(n) < 1 - f / (n + 1) (n >= 2); all
  of them when that first failure is the last candidate (its `top_i == len - 1` rule) or nothing fails."""
  c = jnp.array([[0.99, 0.95, 0.9, 0.6], [-jnp.inf] * 4, [0.5, 0.4, -jnp.inf, -jnp.inf]])
  np.testing.assert_array_equal(factor_count(c, 1.0), [4, 0, 2])  # 0.6 < 0.8 fails last: all (the reference's rule)
  np.testing.assert_array_equal(factor_count(c, 0.3), [2, 0, 2])  # 0.9 < 0.925 fails at n = 3
  np.testing.assert_array_equal(factor_count(c, 0.01), [1, 0, 2])  # always at least one
  np.testing.assert_array_equal(factor_count(c, 10.0), [4, 0, 2])
  c = jnp.array([[0.95, 0.9, 0.5, 0.1]])  # thresholds 1 - f/3, 1 - f/4, 1 - f/5
  np.testing.assert_array_equal(factor_count(c, 0.25), [1])  # 0.9 < 0.917
  np.testing.assert_array_equal(factor_count(c, 0.35), [2])  # 0.9 >= 0.883, 0.5 < 0.9125

  # End to end, factor 0.3: block confidences [0.9, 0.99, 0.6, 0.95] -> step 1 commits 0.99, 0.95 (0.9 < 0.925), step
  # 2 the other two (0.6 < 0.9 fails on the last candidate: all).
  conf = np.array([0.5, 0.9, 0.99, 0.6, 0.95])
  log = []
  tokens, stats = _run(recording(fixed_conf_logits(conf), log), jax.random.PRNGKey(0), _canvas(1, 1, 4), gen_start=1,
                       gen_length=4, block_length=4, factor=0.3)
  np.testing.assert_array_equal(stats["committed"][0, :2], [2, 2])
  np.testing.assert_array_equal(_commit_step(log, tokens, 1, 5), [2, 1, 2, 1])
  assert int(stats["nfe"]) == 2


@pytest.mark.parametrize("kw", [
    dict(steps=8, temperature=1.0),
    dict(steps=8, remasking="random", temperature=1.0),
    dict(threshold=0.7, temperature=1.0),
    dict(factor=2.0, temperature=1.0, cfg_scale=0.5),
])
def test_batch_rows_are_independent(kw):
  b, gen_start, gen_length = 5, 3, 16
  canvas = _canvas(b, gen_start, gen_length)
  canvas[:, 0] = [0, 1, 2, 2, 2]
  canvas[1, 5:8] = [4, 5, 6]
  canvas[2, 12] = 1
  fn = jax.jit(functools.partial(llada, neighbour_logits, mask_id=MASK, gen_start=gen_start, gen_length=gen_length,
                                 block_length=8, **kw))

  def run(key, x):
    tokens, stats = fn(key, jnp.asarray(x))
    return np.asarray(tokens), jax.tree_util.tree_map(np.asarray, stats)

  keys = jax.random.split(jax.random.PRNGKey(5), b)
  tokens, stats = run(keys, canvas)
  for r in range(b):
    alone, st = run(keys[r:r + 1], canvas[r:r + 1])
    np.testing.assert_array_equal(tokens[r], alone[0])
    np.testing.assert_array_equal(stats["committed"][r], st["committed"][0])
    assert stats["row_steps"][r] == st["row_steps"][0]
  assert not (tokens[3] == tokens[4]).all()  # same prompt, different row keys -> different samples
  # A single key: row r uses fold_in(key, r), so row 0 of a batch equals the row alone.
  key = jax.random.PRNGKey(7)
  tokens, _ = run(key, canvas)
  alone, _ = run(key, canvas[:1])
  np.testing.assert_array_equal(tokens[0], alone[0])
  assert not (tokens[3] == tokens[4]).all()  # and rows do not share a key


def test_nfe_is_exact_including_cfg():
  counted, calls = counting(neighbour_logits)

  canvas = _canvas(2, 3, 16)
  for kw, want in ((dict(steps=8), 8), (dict(steps=8, cfg_scale=1.0), 16), (dict(threshold=0.7), None),
                   (dict(factor=1.0, cfg_scale=2.0), None)):
    calls.clear()
    _, stats = _run(counted, jax.random.PRNGKey(0), canvas, gen_start=3, gen_length=16, block_length=8, **kw)
    assert int(stats["nfe"]) == len(calls)
    if want is not None:
      assert len(calls) == want
    if "cfg_scale" in kw:
      assert len(calls) == 2 * int(stats["steps"])


def test_cfg_masks_the_prompt_and_applies_the_guidance_formula():
  log = []

  def prompt_aware(tokens, t):
    """cond (prompt visible) prefers token 1 slightly; unconditional (prompt masked) prefers 1 strongly."""
    jax.debug.callback(lambda x: log.append(np.asarray(x)), tokens, ordered=True)
    has_prompt = (tokens[:, :1] != MASK)[..., None]
    cond = jnp.zeros(tokens.shape + (V,)).at[..., 0].set(1.0).at[..., 1].set(1.2)
    un = jnp.zeros(tokens.shape + (V,)).at[..., 1].set(2.0)
    return jnp.where(has_prompt, cond, un)

  canvas = _canvas(1, 2, 4)
  plain, _ = _run(prompt_aware, jax.random.PRNGKey(0), canvas, gen_start=2, gen_length=4, block_length=4, steps=2)
  assert (plain[0, 2:] == 1).all()
  log.clear()
  guided, stats = _run(prompt_aware, jax.random.PRNGKey(0), canvas, gen_start=2, gen_length=4, block_length=4,
                       steps=2, cfg_scale=1.0)
  assert (guided[0, 2:] == 0).all()  # un + 2 (cond - un) = [2.0, 0.4, 0, ...]
  assert len(log) == 4 == int(stats["nfe"])
  assert (log[0][0, :2] == canvas[0, :2]).all() and (log[1][0, :2] == MASK).all()
  np.testing.assert_array_equal(log[0][0, 2:], log[1][0, 2:])  # the generated region is the same in both calls


def _boom(tokens, t):
  raise AssertionError("logits_fn must not be traced for bad input")


@pytest.mark.parametrize("kw", [
    dict(gen_length=10, block_length=4, steps=5),  # gen_length % block_length
    dict(gen_length=8, block_length=4, steps=3),  # steps % num_blocks
    dict(gen_length=8, block_length=4, steps=None),  # fixed schedule needs steps
    dict(gen_length=8, block_length=4, threshold=0.0),
    dict(gen_length=8, block_length=4, threshold=1.5),
    dict(gen_length=8, block_length=4, threshold=-0.2),
    dict(gen_length=8, block_length=4, factor=0.0),
    dict(gen_length=8, block_length=4, threshold=0.9, factor=1.0),
    dict(gen_length=8, block_length=4, threshold=0.9, remasking="random"),
    dict(gen_length=8, block_length=4, threshold=0.9, confidence="neg_entropy"),
    dict(gen_length=8, block_length=4, steps=4, remasking="lowest"),
    dict(gen_length=8, block_length=4, steps=4, confidence="logit"),
    dict(gen_length=8, block_length=4, steps=4, temperature=-1.0),
    dict(gen_length=32, block_length=4, steps=8),  # region does not fit the canvas
])
def test_bad_input_raises_before_tracing(kw):
  with pytest.raises(ValueError):
    llada(_boom, jax.random.PRNGKey(0), jnp.full((1, 32), MASK, jnp.int32), mask_id=MASK, gen_start=4, **kw)


# --- K/V cache windows and program size ---------------------------------------------------------------------------


def test_prefix_cache_pads_the_canvas_on_the_right_and_decodes_like_the_uncached_sampler():
  gen_start, gen_length = 3, 16
  canvas = _canvas(2, gen_start, gen_length, suffix=2)
  length = canvas.shape[1]
  for block, kw in ((16, dict(steps=8)), (8, dict(steps=8, cfg_scale=1.0)), (4, dict(threshold=0.9)),
                    (2, dict(steps=16, temperature=1.0, logit_shift=True))):
    full_passes, windows = [], set()

    def fn(window, t, start, cache):
      if cache is None or window.shape[1] == cache.shape[1]:
        jax.debug.callback(lambda x: full_passes.append(np.asarray(x)), window, ordered=True)
      else:
        windows.add(window.shape[1])  # at trace time
      return exact_cache(neighbour_logits)(window, t, start, cache)

    base = dict(gen_start=gen_start, gen_length=gen_length, block_length=block, **kw)
    ref, ref_stats = _run(neighbour_logits, jax.random.PRNGKey(2), canvas, **base)
    got, stats = _run(fn, jax.random.PRNGKey(2), canvas, cache="prefix", **base)
    np.testing.assert_array_equal(got, ref)
    assert int(stats["nfe"]) == int(ref_stats["nfe"]) and int(stats["nfe_full"]) < int(stats["nfe"])
    # Full passes see the canvas with gen_length - block_length PAD positions appended; every window has one width:
    # from the block start to the end of the caller's canvas (one more position to the left with the logit shift).
    pad = gen_length - block
    assert full_passes and all(x.shape == (2, length + pad) and (x[:, length:] == PAD).all() for x in full_passes)
    assert windows == {length - gen_start + kw.get("logit_shift", 0)}


@pytest.mark.parametrize("kw", [dict(steps=16), dict(threshold=0.9, cfg_scale=1.0, logit_shift=True)])
@pytest.mark.parametrize("cache", [None, "prefix", "dual"])
def test_program_size_does_not_grow_with_the_number_of_blocks(cache, kw):
  canvas = jnp.asarray(_canvas(2, 3, 16))
  fn = neighbour_logits if cache is None else exact_cache(neighbour_logits)

  def program_size(block_length):
    f = jax.jit(functools.partial(llada, fn, mask_id=MASK, gen_start=3, block_length=block_length, cache=cache, **kw))
    return len(f.lower(jax.random.PRNGKey(0), canvas).as_text())

  two, eight = program_size(8), program_size(2)
  assert abs(eight - two) <= 0.1 * two, (two, eight)
