"""A first-order Markov chain over a few symbols: a source of known law for statistical tests."""

from __future__ import annotations

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
  """Max over current symbols of the total variation between empirical and true next-symbol distributions."""
  k = len(SYMBOLS)
  counts = np.zeros((k, k))
  idx = {c: i for i, c in enumerate(SYMBOLS)}
  for t in texts:
    ids = [idx.get(c, -1) for c in t]
    for a, b in zip(ids[:-1], ids[1:]):
      if a >= 0 and b >= 0:
        counts[a, b] += 1
  emp = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  tv = 0.5 * np.abs(emp - p).sum(1)
  return float(tv.max()), counts


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
