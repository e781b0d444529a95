"""A first-order Markov chain over a few symbols: a source of known law for statistical tests."""

from __future__ import annotations

import functools
import math

import numpy as np

SYMBOLS = "abcd"
# Rows: current symbol, columns: next symbol.
TRANSITIONS = np.array([
    [0.10, 0.60, 0.20, 0.10],
    [0.30, 0.05, 0.50, 0.15],
    [0.15, 0.25, 0.10, 0.50],
    [0.60, 0.10, 0.20, 0.10],
])


def stationary(p: np.ndarray = TRANSITIONS) -> np.ndarray:
  w, v = np.linalg.eig(p.T)
  pi = np.real(v[:, np.argmin(np.abs(w - 1))])
  return pi / pi.sum()


def entropy_rate_bits(p: np.ndarray = TRANSITIONS) -> float:
  pi = stationary(p)
  return float(-(pi[:, None] * p * np.log2(p)).sum())


def sequence_entropy_bits_per_token(length: int, p: np.ndarray = TRANSITIONS) -> float:
  """Entropy per token of a length-`length` window of the stationary chain: (H(pi) + (L - 1) h) / L."""
  pi = stationary(p)
  h0 = float(-(pi * np.log2(pi)).sum())
  return (h0 + (length - 1) * entropy_rate_bits(p)) / length


def generate(n: int, seed: int, p: np.ndarray = TRANSITIONS) -> str:
  rng = np.random.default_rng(seed)
  cum = np.cumsum(p, axis=1)
  s = rng.choice(len(p), p=stationary(p))
  u = rng.random(n)
  out = np.empty(n, dtype=np.int64)
  for i in range(n):
    out[i] = s
    s = int(np.searchsorted(cum[s], u[i] * cum[s, -1]))
  return "".join(SYMBOLS[i] for i in out)


def bigram_tv(texts: list[str], p: np.ndarray = TRANSITIONS) -> tuple[float, np.ndarray]:
  """Max over current symbols of the total variation between empirical and true next-symbol distributions (of
  decoded texts; characters other than the chain's symbols count as in `bigram_tv_of_ids`)."""
  idx = {c: i for i, c in enumerate(SYMBOLS)}
  return bigram_tv_of_ids([np.array([idx.get(c, -1) for c in t], np.int64) for t in texts], p)


def bigram_tv_of_ids(ids, p: np.ndarray = TRANSITIONS) -> tuple[float, np.ndarray]:
  """`bigram_tv` of sequences of symbol indices (an [N, n] array or a list of 1-d arrays; -1 = not a chain symbol).
  A symbol followed by a non-chain token counts in that symbol's row in an extra column (true probability 0), so
  mass a model puts outside the chain adds to its total variation; bigrams starting at a non-chain token are not
  counted. Returns (max TV, bigram counts [k, k + 1], the last column the non-chain successors)."""
  k = len(p)
  counts = np.zeros((k, k + 1))
  for row in ([ids] if isinstance(ids, np.ndarray) and ids.ndim == 2 else ids):
    row = np.asarray(row)
    a, b = row[..., :-1].ravel(), row[..., 1:].ravel()
    ok = a >= 0
    counts += np.bincount(a[ok] * (k + 1) + np.where(b[ok] >= 0, b[ok], k), minlength=k * (k + 1)).reshape(k, k + 1)
  return _tv_of_counts(counts, np.pad(p, ((0, 0), (0, 1)))), counts


def _tv_of_counts(counts: np.ndarray, p: np.ndarray) -> float:
  emp = counts / np.maximum(counts.sum(-1, keepdims=True), 1)
  return float((0.5 * np.abs(emp - p).sum(-1)).max())


def sample_sequences(num: int, length: int, rng: np.random.Generator, p: np.ndarray = TRANSITIONS) -> np.ndarray:
  """`num` independent length-`length` windows of the chain, each started from the stationary law: ids [num, length]."""
  cum = np.cumsum(p, axis=1)
  cum[:, -1] = 1.0
  out = np.empty((num, length), np.int64)
  out[:, 0] = rng.choice(len(p), size=num, p=stationary(p))
  u = rng.random((num, length - 1))
  for i in range(1, length):
    out[:, i] = (u[:, i - 1, None] >= cum[out[:, i - 1]]).sum(-1)
  return out


# The factor on the sampling-noise quantile in `tv_bar`. The empirical bigram table of a model's samples differs from
# the truth by its own sampling noise plus the model's error: in every row, TV(empirical, truth) <= TV(empirical,
# model) + TV(model, truth). For a model close to the chain the first term has (nearly) the chain's own noise
# distribution, so its max over rows stays below the noise quantile q99 with probability 0.99. A factor of 2 lets the
# second term, the model's own next-symbol error, be as large as q99: a model whose rows are all within q99 of the
# truth fails at most 1% of the time, and a bar much below 2 q99 would fail good models by noise. The bar scales with
# the sample count as the noise does (1 / sqrt(bigrams per row)), so it stays a statement about the samples drawn.
TV_FACTOR = 2.0


@functools.lru_cache(maxsize=None)
def tv_noise_quantile(num: int, length: int, q: float = 0.99, replicates: int = 400, seed: int = 0,
                      ) -> tuple[float, float]:
  """Sampling noise of `bigram_tv`: (q-quantile, median) of its value over `replicates` sets of `num` sequences of
  `length` (stationary start) drawn from the chain itself, with a fixed seed."""
  rng = np.random.default_rng(seed)
  tvs = []
  for _ in range(replicates):
    tvs.append(bigram_tv_of_ids(sample_sequences(num, length, rng))[0])
  return float(np.quantile(tvs, q)), float(np.median(tvs))


def tv_bar(num: int, length: int, factor: float = TV_FACTOR) -> float:
  """The bar for `bigram_tv` of `num` sampled sequences of `length`: `factor` (TV_FACTOR) times the 99th percentile of
  its sampling noise (`tv_noise_quantile`)."""
  return factor * tv_noise_quantile(num, length)[0]


def write_char_tokenizer(path) -> str:
  """A tokenizer.json with one token per chain symbol plus <|endoftext|> (a 5-token vocabulary), for the families whose
  state grows with the vocabulary (one-hot flow) or whose noise schedule assumes the vocabulary is used."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
  vocab = {c: i for i, c in enumerate(SYMBOLS)}
  vocab["<|endoftext|>"] = len(SYMBOLS)
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
  tok.decoder = decoders.Fuse()
  tok.save(str(path))
  return str(path)
