"""Masked diffusion: schedules, weights, antithetic times and the loss / bound against closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.maths import Schedule, sample_times, token_nll
from dlm_jax.processes.masked import MaskedDiffusion

SCHEDULES = [Schedule("linear"), Schedule("cosine"), Schedule("polynomial", power=3.0), Schedule("loglinear", eps=1e-3)]


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: s.name)
def test_schedule_endpoints_derivative_and_weight(s):
  ts = jnp.linspace(0.01, 0.99, 41)
  np.testing.assert_allclose(s.alpha(0.0), 1.0, atol=1e-7)
  np.testing.assert_allclose(s.alpha(1.0), s.alpha_one, atol=1e-7)
  assert np.all(np.diff(np.asarray(s.alpha(ts))) < 0), "alpha must decrease"
  autodiff = jax.vmap(jax.grad(lambda t: s.alpha(t)))(ts)
  np.testing.assert_allclose(s.dalpha(ts), autodiff, rtol=1e-5, atol=1e-6)
  t64 = np.asarray(ts, np.float64)
  one_minus_alpha = {"linear": t64, "cosine": np.cos(np.pi / 2 * (1 - t64)), "polynomial": t64 ** s.power,
                     "loglinear": (1 - s.eps) * t64}[s.name]
  np.testing.assert_allclose(s.weight(ts), -np.asarray(autodiff, np.float64) / one_minus_alpha, rtol=1e-4)


def test_weight_closed_forms():
  t = jnp.array([0.1, 0.5, 0.9])
  np.testing.assert_allclose(Schedule("linear").weight(t), 1 / t, rtol=1e-6)
  np.testing.assert_allclose(Schedule("polynomial", power=2.0).weight(t), 2 / t, rtol=1e-6)
  np.testing.assert_allclose(Schedule("cosine").weight(t), (math.pi / 2) * np.tan(math.pi / 2 * (1 - t)), rtol=1e-5)
  np.testing.assert_allclose(Schedule("loglinear", eps=1e-3).weight(t), 1 / t, rtol=1e-6)


def test_antithetic_times_are_stratified():
  n, t_min = 64, 1e-3
  for seed in range(5):
    t = np.asarray(sample_times(jax.random.PRNGKey(seed), n, t_min, True))
    assert t.min() >= t_min and t.max() <= 1.0
    e = np.sort((t - t_min) / (1 - t_min))
    # exactly one point per stratum [i/n, (i+1)/n) after a common shift: the gaps are all 1/n
    gaps = np.diff(e)
    np.testing.assert_allclose(gaps, 1.0 / n, atol=1e-5)
  iid = np.asarray(sample_times(jax.random.PRNGKey(0), n, t_min, False))
  assert np.std(np.diff(np.sort(iid))) > 1e-3  # i.i.d. draws are not evenly spaced


def _fixed_logits(vocab, seed=0):
  table = jax.random.normal(jax.random.PRNGKey(seed), (vocab,))

  def apply_fn(params, z, **kw):
    del params, kw
    return jnp.broadcast_to(table, z.shape + (vocab,))
  return apply_fn, table


def test_loss_matches_manual_computation():
  """Loss = sum_b w(t_b) sum_{masked} CE / (B L) with the same draws - not normalised by the masked count."""
  v, b, l = 7, 16, 12
  apply_fn, table = _fixed_logits(v)
  x = jax.random.randint(jax.random.PRNGKey(1), (b, l), 0, v)
  key = jax.random.PRNGKey(2)
  for s in SCHEDULES:
    proc = MaskedDiffusion(vocab_size=v, schedule=s, t_min=1e-3)
    loss, metrics, _ = proc.loss(apply_fn, None, {"tokens": x}, key, {})
    k_t, k_m = jax.random.split(key)
    t = sample_times(k_t, b, 1e-3, True)
    masked = jax.random.uniform(k_m, (b, l)) < (1 - s.alpha(t))[:, None]
    ce = -jax.nn.log_softmax(table)[x]
    manual = jnp.sum(s.weight(t)[:, None] * masked * ce) / (b * l)
    np.testing.assert_allclose(loss, manual, rtol=1e-5)
    np.testing.assert_allclose(metrics["masked_fraction"], masked.mean(), rtol=1e-6)


def test_llada_form_is_linear_schedule_with_inverse_p_mask():
  v, b, l = 5, 8, 10
  apply_fn, table = _fixed_logits(v, 3)
  x = jax.random.randint(jax.random.PRNGKey(4), (b, l), 0, v)
  key = jax.random.PRNGKey(5)
  llada = MaskedDiffusion(vocab_size=v, objective="llada", t_min=1e-3)
  loss, _, _ = llada.loss(apply_fn, None, {"tokens": x}, key, {})
  k_t, k_m = jax.random.split(key)
  u = (sample_times(k_t, b, 1e-3, True) - 1e-3) / (1 - 1e-3)
  p_mask = (1 - 1e-3) * u + 1e-3
  masked = jax.random.uniform(k_m, (b, l)) < p_mask[:, None]
  ce = -jax.nn.log_softmax(table)[x]
  np.testing.assert_allclose(loss, jnp.sum(masked * ce / p_mask[:, None]) / (b * l), rtol=1e-5)
  mdlm = MaskedDiffusion(vocab_size=v, schedule=Schedule("linear"), t_min=1e-3)
  np.testing.assert_allclose(mdlm.loss(apply_fn, None, {"tokens": x}, key, {})[0], loss, rtol=1e-5)


def test_subs_clean_positions_cost_nothing_and_mask_is_not_an_output():
  v = 6
  proc = MaskedDiffusion(vocab_size=v)
  assert proc.vocab_in == v + 1 and proc.vocab_out == v and proc.mask_id == v
  x = jnp.arange(12).reshape(2, 6) % v
  z, masked = proc.corrupt(jax.random.PRNGKey(0), x, jnp.array([0.0, 1.0]))
  assert not masked[0].any() and masked[1].all()
  assert (z[0] == x[0]).all() and (z[1] == v).all()


@pytest.mark.parametrize("s", SCHEDULES, ids=lambda s: s.name)
def test_bound_equals_entropy_for_oracle_on_iid_source(s):
  """For an i.i.d. source and the true conditionals (the marginal), the expected NELBO is exactly L * H
  (plus the documented prior term when alpha_1 > 0), and the training loss estimates the same integral."""
  v, l, b = 5, 16, 512
  probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
  entropy = -(probs * np.log(probs)).sum()
  logp = jnp.log(jnp.asarray(probs, jnp.float32))

  def apply_fn(params, z, **kw):
    return jnp.broadcast_to(logp, z.shape + (v,))

  proc = MaskedDiffusion(vocab_size=v, schedule=s, t_min=1e-3)
  rng = np.random.default_rng(0)
  tot, ntok = 0.0, 0.0
  bound = jax.jit(lambda x, k: proc.bound(apply_fn, None, {"tokens": x}, k, {}))
  for i in range(40):
    x = jnp.asarray(rng.choice(v, size=(b, l), p=probs), jnp.int32)
    nats, n = bound(x, jax.random.PRNGKey(i))
    tot += float(nats.sum())
    ntok += float(n.sum())
  expected = entropy + s.alpha_one * math.log(v)
  assert abs(tot / ntok - expected) / expected < 0.01, (tot / ntok, expected)


def test_token_nll():
  logits = jnp.array([[[1.0, 2.0, 3.0]]])
  np.testing.assert_allclose(token_nll(logits, jnp.array([[2]])), -jax.nn.log_softmax(logits)[0, 0, 2], rtol=1e-6)


def test_both_bound_estimators_match_exact_enumeration():
  """For a fixed context-dependent model and L = 6, the NELBO is computable exactly by enumerating mask sets:
  sum_m (1/m) mean_{|S|=m} sum_{i in S} CE_i. The masked-count estimator (time-independent network) and the
  t-integral estimator (used for time-conditioned networks; here the network ignores t) both converge to it."""
  import itertools
  v, l = 4, 6
  mask_id = v
  w = jax.random.normal(jax.random.PRNGKey(0), (v + 1, l, v))

  def apply_fn(params, z, **kw):  # logits at each position depend on every token of z
    onehot = jax.nn.one_hot(z, v + 1)  # [B, L, V+1]
    return jnp.einsum("bjc,cjv->bv", onehot, w)[:, None, :] + jnp.arange(l)[None, :, None] * 0.1

  x = jnp.array([[0, 1, 3, 2, 2, 1]], jnp.int32)
  exact = 0.0
  for m in range(1, l + 1):
    sets = list(itertools.combinations(range(l), m))
    tot = 0.0
    for s in sets:
      z = x.at[0, list(s)].set(mask_id)
      nll = token_nll(apply_fn(None, z), x)[0]
      tot += float(sum(nll[i] for i in s))
    exact += tot / len(sets) / m

  xb = jnp.repeat(x, 4096, axis=0)
  for proc in (MaskedDiffusion(vocab_size=v), MaskedDiffusion(vocab_size=v, time_conditioning=True, t_min=1e-4)):
    f = jax.jit(lambda k: proc.bound(apply_fn, None, {"tokens": xb}, k, {})[0].mean())
    est = np.mean([float(f(jax.random.PRNGKey(i))) for i in range(8)])
    assert abs(est - exact) / exact < 0.01, (proc.time_conditioning, est, exact)
