"""Data: tokenizers, document readers, packing, the validation split and the grain training pipeline."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import train_bpe

from dlm_jax import data as data_lib
from dlm_jax.config import apply_overrides, default_config
from dlm_jax.data import (ByteTokenizer, Corpus, eval_batches, load_corpus, make_tokenizer, pack, read_documents,
                          segment_ids, split_indices, train_iterator)
from dlm_jax.errors import DLMError


def _cfg(**overrides):
  cfg = default_config()
  apply_overrides(cfg, [(k.replace("__", "."), v) for k, v in overrides.items()])
  return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Byte tokenizer


@pytest.mark.parametrize("text", ["hello world", "", "naïve café — 日本語 🙂", "tabs\tand\nnewlines\r\n", "\x00\x7f"])
def test_byte_tokenizer_round_trip(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32
  assert ids.ndim == 1 and len(ids) == len(text.encode("utf-8"))
  assert ids.min(initial=0) >= 0 and ids.max(initial=0) < 256
  np.testing.assert_array_equal(ids, np.frombuffer(text.encode("utf-8"), np.uint8))
  assert tok.decode(ids) == text
  assert tok.encode_many([text, "x"])[0].tolist() == ids.tolist()


def test_byte_tokenizer_eos_and_mask_rendering():
  tok = ByteTokenizer()
  assert tok.vocab_size == 257 and tok.eos_id == 256
  ids = np.concatenate([tok.encode("ab"), [tok.eos_id], tok.encode("é"), [tok.eos_id], tok.encode("c")])
  assert tok.decode(ids) == "ab<|eos|>é<|eos|>c"
  assert tok.decode(ids[None, :]) == "ab<|eos|>é<|eos|>c"  # any shape is flattened
  assert tok.decode([104, 257, 105]) == "h<|mask|>i"  # ids past EOS (the mask token) are shown as masks
  # A multi-byte character cut by EOS decodes with a replacement character instead of failing.
  cut = tok.encode("é")[:1].tolist() + [tok.eos_id]
  assert tok.decode(cut) == "\ufffd<|eos|>"


def test_make_tokenizer_bytes():
  assert isinstance(make_tokenizer("bytes"), ByteTokenizer)


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizer

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a diffusion language model denoises masked tokens",
    "the dog sleeps while the fox runs away",
    "tokens and bytes, bytes and tokens: naïve café",
] * 5


def _train_bpe(path, special_tokens=("<|endoftext|>",)) -> str:
  return train_bpe(path, SENTENCES, special_tokens)


def _train_wordlevel(path, special_tokens) -> str:
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers
  tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(SENTENCES, trainer=trainers.WordLevelTrainer(special_tokens=["[UNK]", *special_tokens],
                                                                      show_progress=False))
  tok.save(str(path))
  return str(path)


def test_hf_tokenizer_round_trip_and_eos(tmp_path):
  path = _train_bpe(tmp_path / "tokenizer.json")
  tok = make_tokenizer(path)
  assert isinstance(tok, data_lib.HFTokenizer)
  from tokenizers import Tokenizer
  ref = Tokenizer.from_file(path)
  assert tok.eos_id == ref.token_to_id("<|endoftext|>")
  assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True)
  assert 0 <= tok.eos_id < tok.vocab_size
  for text in ["the quick brown fox", "naïve café sleeps", "unseen words: zebra 123 日本"]:
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1 and len(ids) > 0
    assert ids.max() < tok.vocab_size
    assert tok.eos_id not in ids.tolist()
    assert tok.decode(ids) == text
  many = tok.encode_many(["the dog", "the fox"])
  assert [m.tolist() for m in many] == [tok.encode("the dog").tolist(), tok.encode("the fox").tolist()]
  # Merges were learnt: a frequent word is fewer tokens than bytes.
  assert len(tok.encode("the")) < 3
  # EOS renders as its token; out-of-range ids (e.g. the mask id) are dropped.
  ids = np.concatenate([tok.encode("the dog"), [tok.eos_id, tok.vocab_size], tok.encode("the fox")])
  assert tok.decode(ids) == "the dog<|endoftext|>the fox"


def test_hf_tokenizer_explicit_eos_token(tmp_path):
  path = _train_wordlevel(tmp_path / "tok.json", ["<doc>"])
  tok = make_tokenizer(path, eos_token="<doc>")
  from tokenizers import Tokenizer
  assert tok.eos_id == Tokenizer.from_file(path).token_to_id("<doc>")
  assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"


def test_hf_tokenizer_missing_eos(tmp_path):
  path = _train_wordlevel(tmp_path / "tok.json", ["<doc>"])
  with pytest.raises(DLMError) as e:
    make_tokenizer(path)  # none of the usual names
  assert "data.eos_token" in str(e.value)
  with pytest.raises(DLMError, match="data.eos_token"):
    make_tokenizer(path, eos_token="<|endoftext|>")


def test_hf_tokenizer_bad_paths(tmp_path):
  with pytest.raises(DLMError, match="not a file"):
    make_tokenizer(str(tmp_path / "missing.json"))
  bad = tmp_path / "bad.json"
  bad.write_text("{ this is not a tokenizer")
  with pytest.raises(DLMError, match="not a valid tokenizer.json"):
    make_tokenizer(str(bad))


def test_load_corpus_with_hf_tokenizer(tmp_path):
  tok = make_tokenizer(_train_bpe(tmp_path / "tokenizer.json"))
  text = tmp_path / "docs.jsonl"
  text.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
  corpus = load_corpus(_cfg(data__path=str(text), data__seq_len=8, data__val_fraction=0.2), tok)
  stream = np.concatenate([np.concatenate([tok.encode(s), [tok.eos_id]]) for s in SENTENCES])
  n = len(stream) // 8
  np.testing.assert_array_equal(corpus.sequences, stream[:n * 8].reshape(n, 8))
  assert corpus.eos_id == tok.eos_id
  assert corpus.num_documents == len(SENTENCES)


# ----------------------------------------------------------------------------------------------------------------------
# Packing


def test_pack_puts_eos_after_every_document_and_drops_tail():
  eos = 99
  docs = [np.array([1, 2, 3]), np.array([], np.int32), np.array([4, 5, 6, 7, 8]), np.array([9, 10])]
  out = pack(docs, eos, 4)
  # stream: 1 2 3 E | E | 4 5 6 7 8 E | 9 10 E  -> 14 tokens, 3 rows of 4, tail "10 E" dropped
  expected = np.array([[1, 2, 3, eos], [eos, 4, 5, 6], [7, 8, eos, 9]])
  np.testing.assert_array_equal(out, expected)
  assert out.shape == (3, 4)


def test_pack_reconstructs_documents():
  rng = np.random.default_rng(0)
  eos = 256
  docs = [rng.integers(0, 256, size=rng.integers(0, 40)).astype(np.int32) for _ in range(30)]
  seq_len = 16
  out = pack(docs, eos, seq_len)
  total = sum(len(d) + 1 for d in docs)
  assert out.shape == (total // seq_len, seq_len)
  stream = out.reshape(-1).astype(np.int64)
  pieces = np.split(stream, np.flatnonzero(stream == eos) + 1)
  complete = [p[:-1] for p in pieces if len(p) and p[-1] == eos]
  eos_positions = np.cumsum([len(d) + 1 for d in docs]) - 1
  n_kept = int((eos_positions < len(stream)).sum())  # documents whose EOS survives the dropped tail
  assert n_kept < len(docs)  # the test data does have a tail to drop
  assert len(complete) == n_kept == int((stream == eos).sum())
  for got, want in zip(complete, docs):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(stream, np.concatenate([np.append(d, eos) for d in docs])[:len(stream)])


def test_pack_dtype():
  assert pack([np.array([1, 2, 3])], 256, 2).dtype == np.uint16
  out = pack([np.array([1, 70000, 3])], 70001, 2)
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, [[1, 70000], [3, 70001]])
  assert pack([np.array([1, 2])], 70000, 3).dtype == np.int32  # a large EOS id alone also needs int32


def test_pack_short_stream_gives_no_rows():
  out = pack([np.array([1, 2])], 256, 8)
  assert out.shape == (0, 8)


# ----------------------------------------------------------------------------------------------------------------------
# Split


@pytest.mark.parametrize("n,frac", [(1000, 0.01), (1000, 0.1), (7, 0.01), (50, 0.5), (3, 0.0), (1, 0.3)])
def test_split_indices_disjoint_and_covering(n, frac):
  train, val = split_indices(n, frac, seed=3)
  assert len(np.intersect1d(train, val)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
  assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted
  if frac == 0:
    assert len(val) == 0
  else:
    assert len(val) == max(1, round(frac * n))


def test_split_indices_deterministic_and_seeded():
  a = split_indices(500, 0.1, seed=0)
  b = split_indices(500, 0.1, seed=0)
  c = split_indices(500, 0.1, seed=1)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])
  # The validation set is a spread-out random subset, not the last block.
  assert a[1].min() < 250 < a[1].max()


def test_split_of_single_large_file(tmp_path):
  rng = np.random.default_rng(0)
  words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
  text = " ".join(rng.choice(words, size=40_000))
  path = tmp_path / "big.txt"
  path.write_text(text)
  tok = ByteTokenizer()
  cfg = _cfg(data__path=str(path), data__seq_len=64, data__val_fraction=0.05, data__split_seed=7)
  corpus = load_corpus(cfg, tok)
  n = (len(text.encode()) + 1) // 64
  assert corpus.num_documents == 1
  assert corpus.sequences.shape == (n, 64)
  assert len(corpus.val_index) == round(0.05 * n) > 0
  assert len(np.intersect1d(corpus.train_index, corpus.val_index)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([corpus.train_index, corpus.val_index])), np.arange(n))
  np.testing.assert_array_equal(corpus.val, corpus.sequences[corpus.val_index])
  np.testing.assert_array_equal(corpus.train, corpus.sequences[corpus.train_index])
  assert tok.decode(corpus.sequences[0]) == text[:64]
  again = load_corpus(cfg, tok)
  np.testing.assert_array_equal(again.val_index, corpus.val_index)
  other = load_corpus(_cfg(data__path=str(path), data__seq_len=64, data__val_fraction=0.05, data__split_seed=8), tok)
  assert not np.array_equal(other.val_index, corpus.val_index)


def test_corpus_shorter_than_one_sequence(tmp_path):
  path = tmp_path / "tiny.txt"
  path.write_text("just a few words")
  for frac in (0.0, 0.1):
    with pytest.raises(DLMError) as e:
      load_corpus(_cfg(data__path=str(path), data__seq_len=64, data__val_fraction=frac), ByteTokenizer())
    assert "data.seq_len" in str(e.value)
    assert str(path) in str(e.value)


def test_corpus_with_only_one_sequence_and_validation(tmp_path):
  path = tmp_path / "one.txt"
  path.write_text("x" * 70)  # 71 tokens -> one sequence of 64, which validation would take
  with pytest.raises(DLMError, match="data.val_fraction"):
    load_corpus(_cfg(data__path=str(path), data__seq_len=64, data__val_fraction=0.01), ByteTokenizer())
  corpus = load_corpus(_cfg(data__path=str(path), data__seq_len=64, data__val_fraction=0.0), ByteTokenizer())
  assert corpus.train.shape == (1, 64) and corpus.val.shape == (0, 64)


# ----------------------------------------------------------------------------------------------------------------------
# Documents


def test_read_documents_text_file(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("line one\nline two\n")
  assert read_documents(str(path)) == ["line one\nline two\n"]


def test_read_documents_invalid_utf8_is_replaced(tmp_path):
  path = tmp_path / "a.txt"
  path.write_bytes(b"ok \xff\xfe end")
  assert read_documents(str(path)) == ["ok \ufffd\ufffd end"]


def test_read_documents_jsonl(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"text": "first", "id": 1}) + "\n\n" + json.dumps({"text": "sécond\nline"}) + "\n"
                  + json.dumps({"text": ""}) + "\n")
  assert read_documents(str(path)) == ["first", "sécond\nline"]  # blank lines and empty texts are skipped


def test_read_documents_directory_sorted(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / ".hidden").mkdir()
  (tmp_path / "b.txt").write_text("B")
  (tmp_path / "a.jsonl").write_text(json.dumps({"text": "A1"}) + "\n" + json.dumps({"text": "A2"}) + "\n")
  (tmp_path / "c.md").write_text("C")
  (tmp_path / "sub" / "d.txt").write_text("D")
  (tmp_path / "sub" / "0.jsonl").write_text(json.dumps({"text": "S0"}) + "\n")
  (tmp_path / ".hidden" / "x.txt").write_text("HIDDEN")
  (tmp_path / ".dot.txt").write_text("DOT")
  (tmp_path / "image.png").write_bytes(b"\x89PNG")
  assert read_documents(str(tmp_path)) == ["A1", "A2", "B", "C", "S0", "D"]
  assert read_documents(str(tmp_path), max_documents=3) == ["A1", "A2", "B"]
  assert read_documents(str(tmp_path), max_documents=1) == ["A1"]


def test_read_documents_bad_jsonl_line(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(json.dumps({"text": "ok"}) + "\n\n{not json}\n")
  with pytest.raises(DLMError) as e:
    read_documents(str(path))
  assert f"{path}:3" in str(e.value)
  path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
  with pytest.raises(DLMError, match=f"{path}:2.*'text'"):
    read_documents(str(path))
  path.write_text(json.dumps(["text"]) + "\n")
  with pytest.raises(DLMError, match=f"{path}:1"):
    read_documents(str(path))
  path.write_text(json.dumps({"text": 5}) + "\n")
  with pytest.raises(DLMError, match=f"{path}:1"):
    read_documents(str(path))


def test_read_documents_bad_jsonl_inside_directory(tmp_path):
  (tmp_path / "a.txt").write_text("fine")
  (tmp_path / "z.jsonl").write_text("nope\n")
  with pytest.raises(DLMError, match="z.jsonl:1"):
    read_documents(str(tmp_path))


def test_read_documents_missing_and_empty(tmp_path):
  with pytest.raises(DLMError, match="does not exist"):
    read_documents(str(tmp_path / "missing.txt"))
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(DLMError) as e:
    read_documents(str(empty))
  assert "no text" in str(e.value) and str(empty) in str(e.value)
  empty_jsonl = tmp_path / "empty.jsonl"
  empty_jsonl.write_text("\n\n")
  with pytest.raises(DLMError, match="no text"):
    read_documents(str(empty_jsonl))
  d = tmp_path / "nothing"
  d.mkdir()
  (d / "data.bin").write_bytes(b"123")
  with pytest.raises(DLMError, match="has no"):
    read_documents(str(d))


def test_embedded_corpus():
  files = data_lib.embedded_corpus_files()
  assert len(files) > 100
  assert all(f.endswith(".py") for f in files)
  assert not any("site-packages" in f or "dist-packages" in f for f in files)
  assert any(f.endswith(os.path.join("", "json", "decoder.py")) for f in files)
  docs = read_documents("", max_documents=5)
  assert 1 <= len(docs) <= 5
  nonempty = [data_lib._read_text(f) for f in files[:5]]
  assert docs == [d for d in nonempty if d]
  assert files == data_lib.embedded_corpus_files()  # deterministic


def test_embedded_corpus_load():
  cfg = _cfg(data__path="", data__max_documents=20, data__seq_len=64, data__val_fraction=0.1)
  corpus = load_corpus(cfg, ByteTokenizer())
  assert corpus.num_documents <= 20 and corpus.num_documents >= 1
  assert len(corpus.train_index) > 0 and len(corpus.val_index) > 0
  assert corpus.sequences.shape[1] == 64
  assert (corpus.sequences == 256).sum() >= corpus.num_documents - 1


def test_load_corpus_error_names_embedded_corpus(monkeypatch):
  monkeypatch.setattr(data_lib, "embedded_corpus_files", lambda: [])
  with pytest.raises(DLMError, match="embedded corpus"):
    read_documents("")


# ----------------------------------------------------------------------------------------------------------------------
# Segment ids


def test_segment_ids():
  eos = 9
  tokens = np.array([[1, 2, eos, 3, eos, 4],
                     [eos, eos, 5, 6, 7, eos]])
  np.testing.assert_array_equal(segment_ids(tokens, eos), [[0, 0, 0, 1, 1, 2],
                                                          [0, 1, 2, 2, 2, 2]])
  np.testing.assert_array_equal(segment_ids(np.array([1, 2, 3]), eos), [0, 0, 0])


def test_segment_ids_int32_on_numpy_and_jax():
  import jax.numpy as jnp
  tokens = np.array([[1, 9, 2, 9, 9, 3]], np.int32)
  host = segment_ids(tokens, 9)
  assert host.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(segment_ids(jnp.asarray(tokens), 9)), host)


def test_segment_ids_match_packing():
  docs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9, 10])]
  packed = pack(docs, 0, 13)  # exactly the whole stream in one row
  np.testing.assert_array_equal(segment_ids(packed, 0)[0], [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2])


# ----------------------------------------------------------------------------------------------------------------------
# grain training iterator


def _id_corpus(n_train=10, n_val=2, seq_len=3) -> Corpus:
  """Row i of the sequences starts with token i, so a batch's first column names its rows."""
  seqs = np.zeros((n_train + n_val, seq_len), np.uint16)
  seqs[:, 0] = np.arange(n_train + n_val)
  seqs[:, 1:] = 1000
  idx = np.arange(n_train + n_val)
  return Corpus(seqs, idx[:n_train], idx[n_train:], 256, 1)


def _take(it, k):
  return [next(it)["tokens"] for _ in range(k)]


def test_train_iterator_batches():
  corpus = _id_corpus()
  batch = next(train_iterator(corpus, 5, seed=0))
  assert set(batch) == {"tokens"}
  assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (5, 3)
  assert set(batch["tokens"][:, 0].tolist()) <= set(range(10))  # only training rows
  assert np.all(batch["tokens"][:, 1:] == 1000)


def test_train_iterator_segment_ids_and_batch_fn():
  """segment_attention adds the host-computed segment ids; batch_fn adds fields after them, per host batch; the
  iterator state still resumes exactly."""
  corpus = _id_corpus(n_train=10, seq_len=4)
  corpus.sequences[:, 2] = 256  # EOS in the middle of every row
  it = train_iterator(corpus, 4, seed=0, segment_attention=True,
                      batch_fn=lambda b: dict(b, loss_mask=(b["segment_ids"] == 0).astype(np.float32)))
  batch = next(it)
  assert list(batch) == ["tokens", "segment_ids", "loss_mask"]
  assert batch["segment_ids"].dtype == np.int32
  np.testing.assert_array_equal(batch["segment_ids"], segment_ids(batch["tokens"], 256))
  np.testing.assert_array_equal(batch["segment_ids"][0], [0, 0, 0, 1])
  np.testing.assert_array_equal(batch["loss_mask"][0], [1, 1, 1, 0])
  state = it.get_state()
  nxt = next(it)
  again = train_iterator(corpus, 4, seed=0, segment_attention=True,
                         batch_fn=lambda b: dict(b, loss_mask=(b["segment_ids"] == 0).astype(np.float32)))
  again.set_state(state)
  for k, v in next(again).items():
    np.testing.assert_array_equal(v, nxt[k])
  host1 = next(train_iterator(corpus, 4, seed=0, process_index=1, process_count=2, segment_attention=True))
  np.testing.assert_array_equal(host1["segment_ids"], batch["segment_ids"][2:])


def test_train_iterator_deterministic_per_seed():
  corpus = _id_corpus()
  a = _take(train_iterator(corpus, 4, seed=1), 6)
  b = _take(train_iterator(corpus, 4, seed=1), 6)
  c = _take(train_iterator(corpus, 4, seed=2), 6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_train_iterator_epochs_reshuffled():
  corpus = _id_corpus(n_train=10)
  rows = np.concatenate([b[:, 0] for b in _take(train_iterator(corpus, 5, seed=0), 8)])
  epochs = rows.reshape(4, 10)
  for e in epochs:
    assert sorted(e.tolist()) == list(range(10))  # every epoch visits every training row once
  orders = {tuple(e.tolist()) for e in epochs}
  assert len(orders) == 4, "epochs are not reshuffled"
  assert tuple(range(10)) not in orders  # and they are shuffled at all


def test_train_iterator_batches_cross_epoch_boundary():
  corpus = _id_corpus(n_train=10)
  rows = np.concatenate([b[:, 0] for b in _take(train_iterator(corpus, 4, seed=0), 5)])  # 20 rows = 2 epochs
  assert sorted(rows[:10].tolist()) == list(range(10))
  assert sorted(rows[10:].tolist()) == list(range(10))


def test_train_iterator_resume_from_state():
  corpus = _id_corpus(n_train=10)
  it = train_iterator(corpus, 3, seed=5)
  _take(it, 4)
  state = it.get_state()
  state = json.loads(json.dumps(state))  # checkpoints store it as JSON
  expected = _take(it, 6)
  resumed = train_iterator(corpus, 3, seed=5)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 6)):
    np.testing.assert_array_equal(x, y)
  fresh = _take(train_iterator(corpus, 3, seed=5), 10)[4:]  # same as continuing without interruption
  for x, y in zip(expected, fresh):
    np.testing.assert_array_equal(x, y)


def test_train_iterator_host_slices_concatenate_to_global_batch():
  corpus = _id_corpus(n_train=11)
  single = _take(train_iterator(corpus, 6, seed=3), 5)
  host0 = _take(train_iterator(corpus, 6, seed=3, process_index=0, process_count=2), 5)
  host1 = _take(train_iterator(corpus, 6, seed=3, process_index=1, process_count=2), 5)
  for g, a, b in zip(single, host0, host1):
    assert a.shape == (3, 3) and b.shape == (3, 3)
    np.testing.assert_array_equal(np.concatenate([a, b]), g)
    assert not np.array_equal(a, b)


def test_train_iterator_indivisible_hosts():
  with pytest.raises(DLMError, match="train.batch_size"):
    train_iterator(_id_corpus(), 5, seed=0, process_index=0, process_count=2)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation batches


def test_eval_batches_pads_final_batch():
  val = np.arange(5 * 4).reshape(5, 4).astype(np.uint16)
  batches = list(eval_batches(val, 2))
  assert len(batches) == 3
  for tokens, valid in batches:
    assert tokens.shape == (2, 4) and tokens.dtype == np.int32
    assert valid.shape == (2,) and valid.dtype == bool
  np.testing.assert_array_equal(batches[0][0], val[0:2])
  np.testing.assert_array_equal(batches[1][0], val[2:4])
  assert batches[0][1].all() and batches[1][1].all()
  last_tokens, last_valid = batches[2]
  np.testing.assert_array_equal(last_valid, [True, False])
  np.testing.assert_array_equal(last_tokens[0], val[4])
  # The valid rows of all batches are exactly the validation set, in order.
  kept = np.concatenate([t[v] for t, v in batches])
  np.testing.assert_array_equal(kept, val)


def test_eval_batches_exact_and_capped():
  val = np.arange(6 * 3).reshape(6, 3)
  batches = list(eval_batches(val, 3))
  assert len(batches) == 2 and all(v.all() for _, v in batches)
  capped = list(eval_batches(val, 2, max_batches=2))
  assert len(capped) == 2
  np.testing.assert_array_equal(np.concatenate([t for t, _ in capped]), val[:4])
  big = list(eval_batches(val, 8))
  assert len(big) == 1
  assert big[0][1].sum() == 6 and not big[0][1][6:].any()
  assert list(eval_batches(val[:0], 4)) == []
