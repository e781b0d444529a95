"""MaskGIT confidence decoding (dlm_jax/samplers/maskgit.py), the one-file sampler example: its commit schedule and
confidence order on hand-made logits, and its statistics on a Markov chain with the exact conditionals."""

import jax
import jax.numpy as jnp
import numpy as np

import markov
from dlm_jax.samplers import maskgit

K = len(markov.SYMBOLS)
MASK = K


def exact_chain_logits(length: int):
  """log p(x_i | the unmasked tokens) of the stationary Markov chain for every position: with the nearest unmasked
  neighbours l (a steps left) and r (b steps right), p(x_i = s) ~ P^a[l, s] P^b[s, r] (pi[s] without a left one)."""
  p = np.asarray(markov.TRANSITIONS)
  powers = np.stack([np.linalg.matrix_power(p, n) for n in range(length + 1)])  # [L + 1, K, K]
  pi = np.asarray(markov.stationary())
  powers, pi = jnp.asarray(powers, jnp.float32), jnp.asarray(pi, jnp.float32)
  idx = jnp.arange(length)

  def fn(tokens, t):
    del t
    known = tokens != MASK

    def row(tok, kn):
      left = jax.lax.cummax(jnp.where(kn, idx, -1))  # nearest known index at or before i
      right = jax.lax.cummin(jnp.where(kn, idx, length), reverse=True)
      left_prev = jnp.concatenate([jnp.array([-1]), left[:-1]])  # strictly before i
      right_next = jnp.concatenate([right[1:], jnp.array([length])])  # strictly after i
      lt = jnp.clip(tok[jnp.clip(left_prev, 0)], 0, K - 1)
      rt = jnp.clip(tok[jnp.clip(right_next, 0, length - 1)], 0, K - 1)
      from_left = jnp.where((left_prev >= 0)[:, None], powers[idx - left_prev, lt], pi[None])  # [L, K]
      to_right = jnp.where((right_next < length)[:, None], powers[right_next - idx, :, rt], 1.0)  # [L, K]
      return jnp.log(from_left * to_right + 1e-30)

    return jax.vmap(row)(tokens, known)

  return fn


def test_every_mask_is_decoded_in_steps_calls():
  fn = exact_chain_logits(10)
  canvas = jnp.full((3, 10), MASK, jnp.int32).at[:, 0].set(1)
  out, stats = jax.jit(lambda k, c: maskgit(fn, k, c, mask_id=MASK, steps=4))(jax.random.PRNGKey(0), canvas)
  out = np.asarray(out)
  assert int(stats["nfe"]) == 4 and np.all(out < K) and np.all(out[:, 0] == 1)


def test_first_step_commits_the_most_confident_positions():
  """choice_temperature 0: the first of 3 steps keeps the floor(N gamma(1/3)) least confident positions masked and
  commits the rest (gamma = cos(pi/2 r) or 1 - r)."""
  length = 8
  conf = jnp.arange(1, length + 1, dtype=jnp.float32)

  def fn(tokens, t):  # token 1 everywhere with confidence rising to the right; once anything is committed, token 3
    del t
    committed = jnp.any(tokens != MASK, axis=1, keepdims=True)
    tok = jnp.where(committed, 3, 1)
    return jax.nn.one_hot(tok, K + 1) * conf[None, :, None] * 5.0

  canvas = jnp.full((1, length), MASK, jnp.int32)
  for schedule, first in (("cosine", 8 - int(np.floor(8 * np.cos(np.pi / 6)))), ("linear", 8 - int(8 * 2 / 3))):
    out, _ = maskgit(fn, jax.random.PRNGKey(0), canvas, mask_id=MASK, steps=3, schedule=schedule,
                     choice_temperature=0.0, temperature=1e-3)
    out = np.asarray(out[0])
    # the first step's tokens (1) sit at the `first` most confident positions, the right end
    np.testing.assert_array_equal(out == 1, np.arange(length) >= length - first)


def test_random_order_maskgit_samples_the_chain():
  """With a linear schedule of L steps (one commit per step) and a large choice temperature the order is uniformly
  random and independent of the draws, so with exact conditionals MaskGIT samples the chain exactly: bigram total
  variation within the bar of the chain's own sampling noise (99th percentile of 200 samples of the same size drawn
  from the chain, times 1.5)."""
  length, n = 16, 512
  fn = exact_chain_logits(length)
  canvas = jnp.full((n, length), MASK, jnp.int32)
  out, _ = jax.jit(lambda k, c: maskgit(fn, k, c, mask_id=MASK, steps=length, schedule="linear",
                                        choice_temperature=1e4))(jax.random.PRNGKey(0), canvas)
  texts = ["".join(markov.SYMBOLS[i] for i in row) for row in np.asarray(out)]
  tv, _ = markov.bigram_tv(texts)
  rng = np.random.default_rng(0)
  ref = []
  for _ in range(200):
    rows = [markov.generate(length, seed=int(rng.integers(1 << 30))) for _ in range(n)]
    ref.append(markov.bigram_tv(rows)[0])
  bar = 1.5 * float(np.percentile(ref, 99))
  print(f"MaskGIT (random order, exact conditionals): bigram TV {tv:.4f}, bar {bar:.4f} (margin "
        f"{100 * (1 - tv / bar):.0f}%)")
  assert tv <= bar
