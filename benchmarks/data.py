"""Data pipeline throughput: the training iterator over pre-tokenized shards, and the tokenizing step (dlm-tokenize).

  python benchmarks/data.py [--mb 32] [--seq_len 1024] [--batch 64] [--seconds 5] [--keep DIR]

Generates a corpus of .jsonl files in a temporary directory (--mb MB of text: Zipf-distributed words, log-normal
document lengths, a few KB on average), then measures

  1. the tokenizing step, `dlm-tokenize` as the CLI runs it (`pretokenize.tokenize`), with 1 worker and with 2, for
     the byte tokenizer and for a byte-level BPE tokenizer (8192 ids, trained on a sample of the corpus): input
     tokens/s and the CPU seconds of all processes;
  2. the training iterator `dlm-train` builds (`data.train_iterator` over `load_corpus`) at --seq_len with --batch rows
     per host, over the byte-tokenized shards: tokens/s after the first batch (and the first batch's latency) for the
     default pipeline (data.read_threads=2, data.prefetch=4, no worker processes), for data.workers=1 and 2 (grain
     mp_prefetch), and for the same text packed in memory (data.path = the .jsonl directory) for comparison.

Prints a table and one JSON line with every figure, including the load average and how many cores two processes
actually got (a pure-Python loop in one process vs two at once, before and after): on a shared machine the 1 vs 2 worker
comparison of the tokenizer depends on how many cores other jobs leave free.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np


def generate(directory: str, mb: float, files: int = 8, seed: int = 0) -> int:
  """Writes `files` .jsonl files of about mb / files MB of text each; returns the number of documents."""
  rng = np.random.default_rng(seed)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  words = np.array(["".join(rng.choice(letters, rng.integers(1, 10))) for _ in range(20_000)])
  p = 1.0 / np.arange(1, len(words) + 1)
  p /= p.sum()
  docs = 0
  for k in range(files):
    with open(os.path.join(directory, f"part-{k:03d}.jsonl"), "w") as f:
      size = 0
      while size < mb * 1e6 / files:
        n = int(min(rng.lognormal(7.0, 1.0), 50_000)) // 6 + 1  # words; about 1 KB median, 3 KB mean
        text = " ".join(words[rng.choice(len(words), n, p=p)])
        f.write(json.dumps({"text": text}) + "\n")
        size += len(text)
        docs += 1
  return docs


def train_bpe(path: str, corpus_dir: str, vocab: int = 8192) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  sample = []
  with open(os.path.join(corpus_dir, sorted(os.listdir(corpus_dir))[0])) as f:
    for line, _ in zip(f, range(2000)):
      sample.append(json.loads(line)["text"])
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(sample, trainer=trainers.BpeTrainer(
      vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  tok.save(path)
  return path


def _spin(n: int) -> float:
  t = time.perf_counter()
  x = 0
  for i in range(n):
    x += i
  return time.perf_counter() - t


def parallel_capacity(n: int = 10_000_000) -> float:
  """How many cores two processes get right now: 2 x (one process's time for a pure-Python loop) / (the wall time of two
  processes running it at once). 2.0 on an idle 2-core machine; less when other jobs hold the cores."""
  import multiprocessing
  with multiprocessing.get_context("spawn").Pool(2) as pool:
    pool.map(_spin, [1, 1])  # started
    one = min(_spin(n) for _ in range(2))
    t = time.perf_counter()
    pool.map(_spin, [n, n])
    return round(2 * one / (time.perf_counter() - t), 2)


def cpu_seconds() -> float:
  """User + system CPU seconds of this process and its finished children (the tokenizer's worker processes)."""
  me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def tokenize_rate(corpus_dir: str, tokenizer: str, out: str, workers: int) -> dict:
  from dlm_jax import pretokenize
  shutil.rmtree(out, ignore_errors=True)
  cpu = cpu_seconds()
  res = pretokenize.tokenize([corpus_dir], tokenizer, out, num_shards=2, workers=workers)
  return {"tokens": res["tokens"], "seconds": res["seconds"], "tokens_per_s": res["tokens_per_second"],
          "cpu_seconds": round(cpu_seconds() - cpu, 2)}


def iterator_rate(path: str, seq_len: int, batch: int, seconds: float, workers: int = 0) -> dict:
  from dlm_jax.config import apply_overrides, default_config
  from dlm_jax.data import ByteTokenizer, load_corpus, train_iterator
  cfg = default_config()
  apply_overrides(cfg, [("data.path", path), ("data.seq_len", seq_len), ("model.max_seq_len", seq_len)])
  t = time.perf_counter()
  corpus = load_corpus(cfg, ByteTokenizer())
  load = time.perf_counter() - t
  d = cfg.data
  it = train_iterator(corpus, batch, 0, read_threads=d.read_threads, prefetch=d.prefetch, workers=workers)
  t0 = time.perf_counter()
  next(it)
  t1 = time.perf_counter()
  tokens = 0
  while time.perf_counter() - t1 < seconds:
    tokens += next(it)["tokens"].size
  rate = tokens / (time.perf_counter() - t1)
  it.close()
  return {"load_s": round(load, 3), "first_batch_s": round(t1 - t0, 3), "tokens_per_s": round(rate)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--mb", type=float, default=32, help="MB of generated text")
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--batch", type=int, default=64, help="rows per host batch")
  p.add_argument("--seconds", type=float, default=5, help="measuring time per iterator variant")
  p.add_argument("--keep", default=None, help="generate into this directory and keep it")
  a = p.parse_args()
  root = a.keep or tempfile.mkdtemp(prefix="dlm-bench-data-")
  os.makedirs(root, exist_ok=True)
  text_dir = os.path.join(root, "text")
  try:
    if not os.path.isdir(text_dir):
      os.makedirs(text_dir)
      generate(text_dir, a.mb)
    bpe = train_bpe(os.path.join(root, "bpe.json"), text_dir)
    rows, figures = [], {"mb": a.mb, "seq_len": a.seq_len, "batch": a.batch, "cpus": os.cpu_count(),
                         "parallel_capacity_before": parallel_capacity()}
    for name, tok in (("bytes", "bytes"), ("bpe8k", bpe)):
      for workers in (1, 2):
        r = tokenize_rate(text_dir, tok, os.path.join(root, f"tok-{name}-{workers}"), workers)
        figures[f"tokenize_{name}_workers{workers}"] = r
        rows.append((f"dlm-tokenize {name}, {workers} worker{'s' if workers > 1 else ''}", r["tokens_per_s"],
                     f"{r['tokens']:,} tokens in {r['seconds']:.2f} s, {r['cpu_seconds']:.1f} CPU s"))
    shards_dir = os.path.join(root, "tok-bytes-1")
    for label, path, workers in (("iterator, shards (default: 2 threads)", shards_dir, 0),
                                 ("iterator, shards, data.workers=1", shards_dir, 1),
                                 ("iterator, shards, data.workers=2", shards_dir, 2),
                                 ("iterator, text packed in memory", text_dir, 0)):
      r = iterator_rate(path, a.seq_len, a.batch, a.seconds, workers)
      key = "iterator_" + ("memory" if path == text_dir else f"shards_workers{workers}")
      figures[key] = r
      rows.append((label, r["tokens_per_s"],
                   f"first batch {r['first_batch_s']:.2f} s, corpus load {r['load_s']:.2f} s"))
    figures["load_average"] = os.getloadavg()[0]
    figures["parallel_capacity_after"] = parallel_capacity()
    print(f"{'':44s} {'tokens/s':>12s}")
    for label, rate, note in rows:
      print(f"{label:44s} {rate:12,d}   {note}")
    print(f"(seq_len {a.seq_len}, {a.batch} rows per batch, {a.mb:g} MB of text; {os.cpu_count()} CPUs, load average "
          f"{figures['load_average']:.1f}, two processes got {figures['parallel_capacity_before']:.2f} / "
          f"{figures['parallel_capacity_after']:.2f} cores before / after)")
    print(json.dumps(figures), flush=True)
  finally:
    if not a.keep:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # (grain's worker processes re-import this module: nothing may run on import)
  sys.exit(main())
