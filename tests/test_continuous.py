"""The continuous families against closed forms: corruption, preconditioning, skip terms, the time-reparameterisation
table, the schedules, the divergence estimators, the ODE bound and the samplers with exact posteriors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from dlm_jax.errors import DLMError
from dlm_jax.processes.bitstream import BINS, Bitstream
from dlm_jax.processes.continuous import exact_divergence, hutchinson_divergence, ode_bound
from dlm_jax.processes.embedding_flow import EmbeddingFlow, c_skip, fit_gumbel, gumbel_curve, gumbel_g
from dlm_jax.processes.flow import OneHotFlow, signal_level, signal_level_table
from dlm_jax.maths import from_bits, to_bits
from dlm_jax.samplers.continuous import ddim, edm, flow_euler

# --- one-hot flow (FLM) ---------------------------------------------------------------------------------------------


class _Table:
  """The model adapter's input table for a bare parameter dict (these tests have no trunk)."""

  def input_table(self, params):
    return params["embed"].astype(jnp.float32)


NET = _Table()


@pytest.mark.parametrize("k", [4, 257, 50257])
def test_signal_level_table_matches_direct_quadrature(k):
  """alpha(g) = K/(K-1) (E_z[Phi(z + g/(1-g))^(K-1)] - 1/K): the 100-node Gauss-Hermite table against adaptive
  quadrature of the same integral, and the interpolated inverse against the table."""
  g_tab, a_tab = signal_level_table(k)
  for g in (0.05, 0.3, 0.5, 0.65, 0.75, 0.85, 0.95):
    a = g / (1 - g)
    q = integrate.quad(lambda z: stats.norm.pdf(z) * np.exp((k - 1) * stats.norm.logcdf(z + a)), -12, 12,
                       limit=400, epsabs=1e-12)[0]
    direct = k / (k - 1) * (q - 1 / k)
    assert abs(float(np.interp(g, g_tab, a_tab)) - direct) < 2e-4, (k, g)
    assert abs(float(signal_level(np.array([g]), k)[0]) - direct) < 3e-5, (k, g)  # 100 Gauss-Hermite nodes
  assert a_tab[0] == 0 and np.all(np.diff(a_tab) > 0) and a_tab[-1] > 1 - 1e-4
  proc = OneHotFlow(vocab_size=k)
  t = jnp.linspace(0.0, 0.999, 50)
  np.testing.assert_allclose(np.asarray(proc.t_of_g(proc.g_of_t(t))), np.asarray(t), atol=2e-4)


def test_signal_level_reference_values():
  """FLM's reported reparameterisation for K = 50257: t 0.01 -> g 0.65, 0.1 -> 0.74, 0.5 -> 0.81, 0.9 -> 0.85,
  0.99 -> 0.87."""
  proc = OneHotFlow(vocab_size=50257)
  got = np.asarray(proc.g_of_t(jnp.array([0.01, 0.1, 0.5, 0.9, 0.99])))
  np.testing.assert_allclose(got, [0.65, 0.74, 0.81, 0.85, 0.87], atol=0.006)


def test_flow_corruption_closed_form():
  v, d = 7, 5
  proc = OneHotFlow(vocab_size=v)
  e = jax.random.normal(jax.random.PRNGKey(0), (v, d))
  params = {"embed": e}
  tokens = jnp.array([[0, 3, 6, 2]])
  g = jnp.array([0.7])
  key = jax.random.PRNGKey(1)
  h = proc.corrupt(key, tokens, g, NET, params)
  eps = jax.random.normal(key, tokens.shape + (v,))
  want = (0.3 * eps + 0.7 * jax.nn.one_hot(tokens, v)) @ e
  np.testing.assert_allclose(np.asarray(h), np.asarray(want), rtol=1e-5, atol=1e-6)
  # the embedding-dimension state: same law, eps E ~ N(0, E^T E) drawn in R^D
  carried = OneHotFlow(vocab_size=v, embed_state=True)
  c = carried.noise_factor(NET, params)
  np.testing.assert_allclose(np.asarray(c @ c.T), np.asarray(e.T @ e), rtol=1e-4, atol=1e-4)
  tok = jnp.zeros((20000, 1), jnp.int32)
  hs = np.asarray(carried.corrupt(jax.random.PRNGKey(2), tok, jnp.full((20000,), 0.4), NET, params))[:, 0]
  np.testing.assert_allclose(hs.mean(0), 0.4 * np.asarray(e[0]), atol=0.06)
  cov = np.cov(hs.T) / 0.36
  np.testing.assert_allclose(cov, np.asarray(e.T @ e), atol=0.08 * float(jnp.max(jnp.abs(e.T @ e))))


def _categorical_tv(tokens, pi):
  freq = np.bincount(np.asarray(tokens).ravel(), minlength=len(pi)) / np.asarray(tokens).size
  return 0.5 * np.abs(freq - pi).sum()


PI = np.array([0.4, 0.3, 0.15, 0.1, 0.05, 0.0])


def test_flow_euler_samples_a_known_law_with_the_exact_posterior():
  """Exact posterior of i.i.d. tokens x ~ pi under x_g = (1 - g) eps + g e_x: logits log pi + g x_g / (1 - g)^2.
  The Euler sampler on FLM's grid reproduces pi, in the one-hot state and carried in R^D."""
  v = len(PI)
  proc = OneHotFlow(vocab_size=v)
  steps = 32
  t = jnp.arange(steps + 1) / steps
  g = proc.g_of_t(t)
  log_pi = jnp.log(jnp.asarray(PI) + 1e-12)

  def exact(z, tt):
    gg = proc.g_of_t(tt)[:, None, None]
    return log_pi + gg * z / (1 - gg) ** 2

  canvas = jnp.full((4000, 4), v, jnp.int32)
  toks, stats_ = flow_euler(exact, jax.random.PRNGKey(0), canvas, mask_id=v, vocab_size=v, g_grid=g, t_grid=t)
  assert int(stats_["nfe"]) == steps
  assert _categorical_tv(toks, PI) < 0.02
  # carried state: an orthonormal basis E (V = D) lets the exact posterior be read from h = z E
  basis = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(3), (v, v)))[0]
  carried = lambda h, tt: exact(h @ basis.T, tt)
  toks2, _ = flow_euler(carried, jax.random.PRNGKey(1), canvas, mask_id=v, vocab_size=v, g_grid=g, t_grid=t,
                        basis=basis, noise_factor=jnp.linalg.cholesky(basis.T @ basis))
  assert _categorical_tv(toks2, PI) < 0.02
  # fixed (prompt) positions are kept
  canvas = canvas.at[:, 1].set(2)
  toks3, _ = flow_euler(exact, jax.random.PRNGKey(0), canvas, mask_id=v, vocab_size=v, g_grid=g, t_grid=t)
  assert np.all(np.asarray(toks3[:, 1]) == 2)


# --- embedding flow (LangFlow) -----------------------------------------------------------------------------------------


def test_embedding_flow_skip_term_is_the_gaussian_posterior():
  """c_skip(g) z E^T = alpha / sigma^2 z . e_v: with equal-norm rows it equals log N(z; alpha e_v, sigma^2 I) up to a
  constant per position, i.e. the exact token posterior under a uniform prior."""
  proc = EmbeddingFlow(vocab_size=9)
  params = {"embed": jax.random.normal(jax.random.PRNGKey(0), (9, 16))}
  e = proc.embeddings(NET, params)
  np.testing.assert_allclose(np.asarray(jnp.linalg.norm(e, axis=-1)), 4.0, rtol=1e-5)
  for g in (-2.0, 0.5, 4.0):
    alpha, sigma = math.sqrt(1 / (1 + math.exp(g))), math.sqrt(1 / (1 + math.exp(-g)))
    assert abs(alpha ** 2 + sigma ** 2 - 1) < 1e-12
    assert abs(float(c_skip(jnp.float32(g))) - alpha / sigma ** 2) < 1e-4 * alpha / sigma ** 2
    z = alpha * e[3] + sigma * jax.random.normal(jax.random.PRNGKey(1), (16,))
    skip = float(c_skip(jnp.float32(g))) * (z @ e.T)
    log_lik = -jnp.sum((z[None] - alpha * e) ** 2, -1) / (2 * sigma ** 2)
    np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(skip)), np.asarray(jax.nn.log_softmax(log_lik)),
                               atol=2e-4)


def test_embedding_flow_and_bitstream_corruption_closed_form():
  """LangFlow: z = sqrt(sigmoid(-g)) e_x + sqrt(sigmoid(g)) eps with normalised rows; CoBit: x = b + sigma eps."""
  proc = EmbeddingFlow(vocab_size=9)
  params = {"embed": jax.random.normal(jax.random.PRNGKey(0), (9, 16))}
  tokens, g, key = jnp.array([[1, 4, 8]]), jnp.array([1.3]), jax.random.PRNGKey(1)
  e = params["embed"] / jnp.linalg.norm(params["embed"], axis=-1, keepdims=True) * 4.0
  want = math.sqrt(1 / (1 + math.exp(1.3))) * e[tokens] + math.sqrt(1 / (1 + math.exp(-1.3))) * jax.random.normal(
      key, (1, 3, 16))
  np.testing.assert_allclose(np.asarray(proc.corrupt(key, tokens, g, NET, params)), np.asarray(want), rtol=1e-5, atol=1e-5)
  bits = Bitstream(vocab_size=9)
  x = bits.corrupt(key, tokens, jnp.array([0.7]))
  want = np.asarray(to_bits(tokens, 4)) + 0.7 * np.asarray(jax.random.normal(key, (1, 3, 4)))
  np.testing.assert_allclose(np.asarray(x), want, rtol=1e-5, atol=1e-6)


def test_gumbel_schedule_range_and_fit():
  """g = F^-1(u) of Gumbel(mu, beta) clamped at u in [1e-5, 1 - 1e-5]: LangFlow's released mu = 4.723, beta = 0.852
  give g in [2.64, 14.53]; draws follow the Gumbel law; the least-squares fit recovers a known curve."""
  lo, hi = gumbel_g(jnp.array([0.0, 1.0]), 4.723, 0.852)
  np.testing.assert_allclose([float(lo), float(hi)], [2.64, 14.53], atol=0.01)
  u = jax.random.uniform(jax.random.PRNGKey(0), (20000,))
  g = np.asarray(gumbel_g(u, 1.5, 2.0))
  assert stats.kstest(g, stats.gumbel_r(loc=1.5, scale=2.0).cdf).pvalue > 1e-3
  gs = jnp.linspace(-4, 14, 512)
  ce = gumbel_curve(gs, 3.2, 4.0, 1.3) + 0.02 * jax.random.normal(jax.random.PRNGKey(1), gs.shape)
  mu, beta, ok = fit_gumbel(gs, ce, jnp.ones(gs.shape, bool), 2.0, 0.5)
  assert bool(ok)
  np.testing.assert_allclose([float(mu), float(beta)], [4.0, 1.3], rtol=0.03)


def test_ddim_samples_a_known_law_with_the_exact_posterior():
  """Exact posterior of i.i.d. tokens under z = alpha e_x + sigma eps (equal-norm embeddings): log pi + c_skip z E^T.
  The DDIM sampler on a Gumbel grid reproduces pi (float32 and float64 state)."""
  v, d = len(PI), 8
  proc = EmbeddingFlow(vocab_size=v)
  e = proc.embeddings(NET, {"embed": jax.random.normal(jax.random.PRNGKey(0), (v, d))})
  log_pi = jnp.log(jnp.asarray(PI) + 1e-12)
  exact = lambda z, g, sc: log_pi + c_skip(g)[:, None, None] * (z @ e.T)
  grid = gumbel_g(jnp.linspace(1 - 1e-5, 1e-5, 65), 1.0, 1.5)
  canvas = jnp.full((4000, 4), v, jnp.int32)
  toks, st = ddim(exact, jax.random.PRNGKey(0), canvas, mask_id=v, g_grid=grid, embed=e, precision="float32")
  assert int(st["nfe"]) == 65
  assert _categorical_tv(toks, PI) < 0.02
  with jax.enable_x64(True):
    toks64, _ = ddim(exact, jax.random.PRNGKey(0), canvas, mask_id=v, g_grid=grid, embed=e, precision="float64")
  assert _categorical_tv(toks64, PI) < 0.02


# --- bitstream (CoBit) ---------------------------------------------------------------------------------------------------


def test_bits_round_trip_and_wrap():
  ids = jnp.arange(300)
  assert np.array_equal(np.asarray(from_bits(to_bits(ids, 9), 300)), np.arange(300))
  assert np.asarray(to_bits(jnp.array([5]), 4)).tolist() == [[0, 1, 0, 1]]  # most significant first
  assert int(from_bits(to_bits(jnp.array([511]), 9), 300)[0]) == 511 % 300  # invalid codes wrap modulo V
  with pytest.raises(DLMError, match="diffusion.bits=8 cannot hold a vocabulary of 257"):
    Bitstream(vocab_size=257, bits=8)


class _Recorder:
  """A stand-in network: records what the process feeds it and returns zeros (so logits = the matched filter)."""

  def __init__(self):
    self.seen = {}

  def __call__(self, params, tokens, **kw):
    self.seen = kw
    return jnp.zeros(kw["bits"].shape, jnp.float32)


def test_bitstream_preconditioning_matched_filter_and_loss_weight():
  proc = Bitstream(vocab_size=257, sigma_data=0.5)
  rec = _Recorder()
  bits = jax.random.bernoulli(jax.random.PRNGKey(0), 0.5, (4, 2000, 9)).astype(jnp.float32)
  for sigma in (0.05, 0.5, 3.0, 40.0):
    s = jnp.full((4,), sigma)
    x = bits + sigma * jax.random.normal(jax.random.PRNGKey(1), bits.shape)
    logits = proc.logits(rec, {}, x, s, None, {})
    inp = np.asarray(rec.seen["bits"])
    assert abs(inp.var() - 1.0) < 0.03, (sigma, inp.var())  # c_in = 1 / sqrt(sigma^2 + s_d^2): unit variance
    np.testing.assert_allclose(np.asarray(rec.seen["t"]), math.log(sigma) / 4, rtol=1e-6)
    # matched filter = exact log-odds of an independent bit: log N(x; 1, s^2) - log N(x; 0, s^2), clipped at 30
    log_odds = (stats.norm.logpdf(np.asarray(x), 1, sigma) - stats.norm.logpdf(np.asarray(x), 0, sigma))
    np.testing.assert_allclose(np.asarray(logits), np.clip(log_odds, -30, 30), rtol=1e-3, atol=1e-3)
  # EDM weight, and the loss of a zero network at one fixed sigma (a one-bin table of zero width is not possible, so
  # compare against the same draws: the loss equals E[lambda(sigma) sum_bits (sigmoid(matched filter) - b)^2])
  for sigma in (0.01, 0.5, 10.0):
    assert abs(float(proc.loss_weight(jnp.float32(sigma))) - (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2) < 1e-3 * (
        (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (8, 16), 0, 257)
  zero_net = lambda params, inputs, **kw: jnp.zeros(kw["bits"].shape, jnp.float32)
  loss, metrics, new_state = proc.loss(zero_net, {}, {"tokens": tokens}, jax.random.PRNGKey(3), proc.init_state(None))
  sig = jnp.exp(new_state["log_sigma"][:8])
  mse = new_state["mse"][:8]  # per-example mean over tokens and bits
  np.testing.assert_allclose(float(loss), float(jnp.mean(proc.loss_weight(sig) * mse * 9)), rtol=1e-4)


def test_entropy_rate_table():
  """The rebuilt table from a synthetic (sigma, MSE) buffer: r = MSE / sigma^2 per bin, training density q ~
  g(sigma) sqrt(r), empty bins filled from neighbours, non-finite entries dropped; draws follow q; the sampling grid
  splits the integral of r into equal parts."""
  proc = Bitstream(vocab_size=257, buffer_size=8192, update_every=1)
  state = proc.init_state(None)
  log_sigma = jax.random.uniform(jax.random.PRNGKey(0), (8192,), minval=math.log(0.002), maxval=math.log(80))
  mse = 0.25 * jax.nn.sigmoid(2.0 * (log_sigma + 1.0))  # a smooth MMSE curve
  mse = mse.at[:10].set(jnp.nan)
  state = proc.update_schedule(state, log_sigma, mse)
  assert int(state["built"]) == 1
  edges = np.linspace(math.log(0.002), math.log(80), BINS + 1)
  c = 0.5 * (edges[1:] + edges[:-1])
  sig = np.exp(c)
  r = 0.25 / (1 + np.exp(-2.0 * (c + 1.0))) / sig ** 2
  q = sig ** 3 / (sig ** 3 + 1e-3) * np.sqrt(r)
  np.testing.assert_allclose(np.asarray(state["rate"]), r / r.sum(), rtol=0.05)
  np.testing.assert_allclose(np.asarray(state["train_probs"]), q / q.sum(), rtol=0.05, atol=1e-6)
  draws = np.log(np.asarray(proc.sample_sigma(state, jax.random.uniform(jax.random.PRNGKey(1), (50000,)))))
  hist = np.histogram(draws, bins=edges)[0] / 50000
  assert 0.5 * np.abs(hist - q / q.sum()).sum() < 0.02
  grid = np.log(np.asarray(proc.sigma_grid(state, 16)))
  assert abs(grid[0] - math.log(80)) < 1e-4 and abs(grid[-1] - math.log(0.002)) < 1e-4 and np.all(np.diff(grid) < 0)
  cdf = np.concatenate([[0], np.cumsum(r / r.sum())])
  mass = np.diff(np.interp(grid[::-1], edges, cdf))
  np.testing.assert_allclose(mass, 1 / 16, atol=2e-3)
  # before any rebuild sigma is log-normal(-1.2, 1.2)
  first = np.log(np.asarray(proc.sample_sigma(proc.init_state(None), jax.random.uniform(jax.random.PRNGKey(2),
                                                                                         (20000,)))))
  assert abs(first.mean() + 1.2) < 0.05 and abs(first.std() - 1.2) < 0.05


def test_edm_sampler_with_the_exact_denoiser():
  """Independent bits with P(b_j = 1) = p_j: the exact log-odds are logit(p_j) + (x - 1/2) / sigma^2. Both the
  deterministic and the churned sampler reproduce the token law."""
  bits, v = 3, 8
  p = jnp.array([0.8, 0.3, 0.5])
  pi = np.array([np.prod([(p[j] if (k >> (bits - 1 - j)) & 1 else 1 - p[j]) for j in range(bits)]) for k in range(v)])
  exact = lambda x, s, sc: jnp.log(p / (1 - p)) + (x - 0.5) / s[:, None, None] ** 2
  proc = Bitstream(vocab_size=v)
  grid = proc.sigma_grid(proc.init_state(None), 64)
  canvas = jnp.full((3000, 4), v, jnp.int32)
  for gate, churn in ((None, 0.0), (jnp.ones((64,), bool), 0.2)):
    toks, st = edm(exact, jax.random.PRNGKey(0), canvas, mask_id=v, vocab_size=v, bits=bits, sigma_grid=grid,
                   churn_gate=gate, churn=churn)
    assert int(st["nfe"]) == 65
    assert _categorical_tv(toks, pi) < 0.02, (churn, _categorical_tv(toks, pi))


# --- divergence and the ODE bound ---------------------------------------------------------------------------------------


def test_hutchinson_matches_the_exact_divergence():
  w = jax.random.normal(jax.random.PRNGKey(0), (6, 6))
  f = lambda y: jnp.tanh(y @ w) * 0.7 + y ** 2 * 0.1
  y = jax.random.normal(jax.random.PRNGKey(1), (3, 2, 3))  # rows of [2, 3] states
  fr = lambda y: f(y.reshape(y.shape[0], 6)).reshape(y.shape)
  _, exact = exact_divergence(fr, y)
  brute = [np.trace(np.asarray(jax.jacfwd(lambda r: fr(r[None])[0].reshape(-1))(y[i].reshape(-1).reshape(2, 3)))
                    .reshape(6, 6)) for i in range(3)]
  np.testing.assert_allclose(np.asarray(exact), brute, rtol=1e-5)
  est = jax.vmap(lambda k: hutchinson_divergence(fr, y, k)[1])(jax.random.split(jax.random.PRNGKey(2), 20000))
  mean, se = np.asarray(est.mean(0)), np.asarray(est.std(0)) / math.sqrt(20000)
  assert np.all(np.abs(mean - np.asarray(exact)) < 4 * se + 1e-6), (mean, exact, se)


def test_ode_bound_with_the_exact_velocity_approaches_the_entropy():
  """i.i.d. bits b ~ Bernoulli(p) in y = u (b - 1/2) + eps: the posterior mean is sigmoid(logit p + u y) - 1/2 and
  the decoder at u_hi is Bernoulli(sigmoid(logit p + u_hi y)). With Heun steps the ODE bound lies above the entropy
  and approaches it as the grid is refined (Euler's first-order error would put it below); Hutchinson and the exact
  divergence agree on average."""
  p = 0.2
  h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
  b = jax.random.bernoulli(jax.random.PRNGKey(0), p, (20000, 1, 2)).astype(jnp.float32)
  lo = math.log(p / (1 - p))
  velocity = lambda y, u: jax.nn.sigmoid(lo + u[:, None, None] * y) - 0.5
  decoder = lambda y, u: jnp.sum(jax.nn.softplus(lo + u[:, None, None] * y) - b * (lo + u[:, None, None] * y),
                                 axis=(1, 2))
  means = []
  for n in (33, 129):
    u_grid = 1.0 / jnp.exp(jnp.linspace(math.log(0.002), math.log(80.0), n))
    exact, _ = jax.jit(lambda k: ode_bound(velocity, decoder, b - 0.5, u_grid, k, divergence="exact"))(
        jax.random.PRNGKey(1))
    means.append(float(exact.mean()) / 2)
    se = float(exact.std()) / 2 / math.sqrt(b.shape[0])
  assert h - 2 * se <= means[1] < means[0] <= 1.04 * h, (means, h, se)
  assert means[1] <= 1.01 * h
  u_grid = 1.0 / jnp.exp(jnp.linspace(math.log(0.002), math.log(80.0), 33))
  hutch, _ = jax.jit(lambda k: ode_bound(velocity, decoder, b - 0.5, u_grid, k))(jax.random.PRNGKey(1))
  assert abs(float(hutch.mean()) / 2 - means[0]) < 4 * float(hutch.std()) / 2 / math.sqrt(b.shape[0])


@pytest.mark.slow
def test_families_benchmark_runs(tiny_config):
  """benchmarks/families.py end to end at a tiny size; the head-memory figure is checked (bitstream's per-bit head
  and loss take far less than one V-way logits array), speeds only have to be positive."""
  import json
  import os
  import subprocess
  import sys
  from conftest import REPO
  cfg = tiny_config(sampler__steps=4)
  r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "families.py"), "--config", cfg,
                      "--batch_size", "2", "--seq_len", "16", "--train_steps", "1", "--sample_batch", "2",
                      "--repeats", "1", "--head_vocab", "8192", "--head_seq_len", "256"],
                     capture_output=True, text=True, timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  rows = {row["kind"]: row for row in (json.loads(l) for l in r.stdout.splitlines() if l.startswith("{"))}
  assert set(rows) == {"head_memory", "train", "sampling"}
  assert rows["head_memory"]["bits"] == 13 and rows["head_memory"]["bitstream_fraction_of_logits"] <= 0.1
  for kind in ("train", "sampling"):
    assert set(rows[kind]["tokens_per_second"]) == {"masked", "flow", "embedding_flow", "bitstream"}
    assert all(v > 0 for v in rows[kind]["tokens_per_second"].values())
