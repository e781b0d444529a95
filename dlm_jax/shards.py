"""The on-disk format of pre-tokenized datasets (what `dlm-tokenize` writes and `data.path` reads).

A dataset is a directory:

  manifest.json        format and version, the tokenizer (name, fingerprint, EOS id, vocabulary size), the token dtype,
                       per-shard document / record / token counts, totals and the source files with their sizes. It is
                       written last: a directory without it is not a dataset.
  index.npy            int64 [2, records + 1]: row 0 = each record's offset in the token stream, row 1 = the number
                       of documents that end before it (and the totals at the end). The stream is "doc0 EOS doc1 EOS
                       ...", the sequence that packing cuts, so packed sequence i (tokens [i L, (i + 1) L)) is found by
                       a binary search in row 0 and read from the few records it overlaps, without loading the dataset
                       (the rows are contiguous, so a memory-mapped index is searched in place, page by page).
  shard-00000-of-0000N.array_record   the records, in stream order across the shards (ArrayRecord, group size 1 for
                       random access): the token ids of one document as little-endian `dtype` bytes, without EOS.
                       A document longer than `record_tokens` is split over consecutive records, so reading one
                       sequence never reads a whole book; a record ends its document when row 1 steps after it.

Record r holds `offsets[r + 1] - offsets[r] - ends[r]` tokens, where ends[r] = docs[r + 1] - docs[r] is 1 when the
loader appends EOS after it. The loader, not the shards, adds EOS, so the run's EOS id is the one packed in.
"""

from __future__ import annotations

import io
import json
import threading
from typing import Iterator

import numpy as np

from dlm_jax import storage
from dlm_jax.errors import DLMError

FORMAT = "dlm_jax.tokenized"
VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.npy"
RECORD_TOKENS = 4096  # longest record: a longer document is split (bounds the bytes read per packed sequence)
WRITER_OPTIONS = "group_size:1,zstd:1"  # one record per chunk (random access); fast zstd
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random access: no read-ahead, no reader threads


def shard_name(shard: int, num_shards: int) -> str:
  return f"shard-{shard:05d}-of-{num_shards:05d}.array_record"


def token_dtype(vocab_size: int) -> str:
  """The smallest unsigned dtype that holds every id of the vocabulary."""
  return "uint16" if vocab_size <= 1 << 16 else "uint32"


def is_dataset(path: str) -> bool:
  """Whether `path` is a pre-tokenized dataset directory (it holds a manifest.json)."""
  return bool(path) and storage.isfile(storage.join(path, MANIFEST))


# ----------------------------------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
  """Writes one shard: documents in, records out, and the per-record (tokens, ends a document) lists the index is
  built from. Local paths only (dlm-tokenize writes into a local temporary directory)."""

  def __init__(self, path: str, dtype: str, record_tokens: int = RECORD_TOKENS):
    from array_record.python.array_record_module import ArrayRecordWriter
    self._writer = ArrayRecordWriter(path, WRITER_OPTIONS)
    if not self._writer.ok():
      raise DLMError(f"cannot create {path}; check that its directory exists and is writable")
    self.path, self.dtype, self.record_tokens = path, np.dtype(dtype).newbyteorder("<"), record_tokens
    self.lengths: list[int] = []  # tokens of each record
    self.ends: list[int] = []  # 1 when the record ends its document
    self.documents = self.tokens = 0

  def add(self, tokens: np.ndarray) -> None:
    """One document's token ids (no EOS). An empty document is one empty record: it still adds an EOS when packed."""
    tokens = np.asarray(tokens).astype(self.dtype, copy=False)
    n = len(tokens)
    starts = range(0, max(n, 1), self.record_tokens)
    for k, a in enumerate(starts):
      piece = tokens[a:a + self.record_tokens]
      self._writer.write(piece.tobytes())
      self.lengths.append(len(piece))
      self.ends.append(int(k == len(starts) - 1))
    self.documents += 1
    self.tokens += n

  def close(self) -> dict:
    self._writer.close()
    return {"lengths": np.asarray(self.lengths, np.int64), "ends": np.asarray(self.ends, np.int64),
            "documents": self.documents, "tokens": self.tokens}


def build_index(lengths: np.ndarray, ends: np.ndarray) -> np.ndarray:
  """int64 [2, R + 1]: (stream offsets, documents before) of the records, from per-record token counts and end flags."""
  index = np.zeros((2, len(lengths) + 1), np.int64)
  np.cumsum(lengths + ends, out=index[0, 1:])
  np.cumsum(ends, out=index[1, 1:])
  return index


def index_bytes(index: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, index, allow_pickle=False)
  return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------------
# Reading


class Dataset:
  """A pre-tokenized dataset opened for random access: the manifest, the index (memory-mapped when local) and one
  ArrayRecord reader per shard, opened on first use (thread-safe; dropped when pickled, so a dataset can go to grain's
  worker processes)."""

  def __init__(self, path: str):
    self.path = storage.resolve(path)
    where = f"the tokenized dataset {self.path}"
    try:
      m = json.loads(storage.read_text(storage.join(self.path, MANIFEST)))
    except (ValueError, UnicodeDecodeError):
      raise DLMError(f"{where}: manifest.json is not valid JSON; the dataset is damaged, re-run dlm-tokenize") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
      raise DLMError(f"{where}: manifest.json is not a dlm-tokenize manifest (format {m.get('format')!r}); "
                     "point data.path at a directory dlm-tokenize wrote")
    if m.get("version") != VERSION:
      raise DLMError(f"{where} has format version {m.get('version')}, this dlm_jax reads version {VERSION}; "
                     "re-run dlm-tokenize with this version")
    self.manifest = m
    self.dtype = np.dtype(m["dtype"]).newbyteorder("<")
    index_path = storage.join(self.path, INDEX)
    try:
      if storage.is_remote(index_path):
        self.index = np.load(io.BytesIO(storage.read_bytes(index_path)), allow_pickle=False)
      else:
        self.index = np.load(index_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
      raise DLMError(f"{where}: cannot read {INDEX} ({e}); the dataset is damaged, re-run dlm-tokenize") from None
    records = sum(s["records"] for s in m["shards"])
    want, totals = (2, records + 1), (m["stream_tokens"], m["documents"])
    if self.index.shape != want:
      raise DLMError(f"{where}: {INDEX} has shape {self.index.shape}, the manifest says {want}; the dataset is "
                     "damaged, re-run dlm-tokenize")
    if tuple(int(x) for x in self.index[:, -1]) != totals:
      raise DLMError(f"{where}: {INDEX} ends at {tuple(int(x) for x in self.index[:, -1])} (stream tokens, documents), "
                     f"the manifest says {totals}; the dataset is damaged, re-run dlm-tokenize")
    self.files = [storage.join(self.path, s["file"]) for s in m["shards"]]
    missing = [f for f in self.files if not storage.exists(f)]
    if missing:
      raise DLMError(f"{where}: shard {missing[0]} is missing ({len(missing)} of {len(self.files)} shards); the "
                     "dataset is incomplete, copy it again or re-run dlm-tokenize")
    self.shard_starts = np.concatenate([[0], np.cumsum([s["records"] for s in m["shards"]])]).astype(np.int64)
    self._readers: list = [None] * len(self.files)
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_readers"] = [None] * len(self.files)
    del state["_lock"]
    if isinstance(state["index"], np.memmap):  # a worker maps the file again rather than receiving a copy
      state["index"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
    if self.index is None:
      self.index = np.load(storage.join(self.path, INDEX), mmap_mode="r", allow_pickle=False)

  # --- what the manifest says

  @property
  def documents(self) -> int:
    return int(self.manifest["documents"])

  @property
  def records(self) -> int:
    return self.index.shape[1] - 1

  @property
  def offsets(self) -> np.ndarray:
    """int64 [R + 1]: each record's offset in the stream "doc0 EOS doc1 EOS ..." (then the stream's length)."""
    return self.index[0]

  @property
  def doc_counts(self) -> np.ndarray:
    """int64 [R + 1]: the documents that end before each record (then the document count)."""
    return self.index[1]

  def ends(self, ids: np.ndarray) -> np.ndarray:
    """1 where record `ids` ends its document (the loader appends EOS), else 0."""
    return self.index[1, ids + 1] - self.index[1, ids]

  def check_tokenizer(self, tokenizer, key: str = "data.path") -> None:
    """A DLMError naming both tokenizers unless `tokenizer` is the one the dataset was written with."""
    t = self.manifest["tokenizer"]
    if t["fingerprint"] != getattr(tokenizer, "fingerprint", None):
      raise DLMError(f"{key} '{self.path}' was tokenized with {t['name']} ({t['fingerprint']}), but this run's "
                     f"data.tokenizer is {getattr(tokenizer, 'name', '?')} ({getattr(tokenizer, 'fingerprint', '?')});"
                     f" set data.tokenizer={t['name']} or re-run dlm-tokenize with this run's tokenizer")

  # --- records

  def _reader(self, shard: int):
    reader = self._readers[shard]
    if reader is None:
      with self._lock:
        reader = self._readers[shard]
        if reader is None:
          from array_record.python.array_record_module import ArrayRecordReader
          reader = ArrayRecordReader(self.files[shard], READER_OPTIONS)
          want = int(self.shard_starts[shard + 1] - self.shard_starts[shard])
          if not reader.ok() or reader.num_records() != want:
            raise DLMError(f"the tokenized dataset {self.path}: shard {self.files[shard]} holds "
                           f"{reader.num_records() if reader.ok() else 'no readable'} records, the manifest says "
                           f"{want}; the dataset is damaged, re-run dlm-tokenize")
          self._readers[shard] = reader
    return reader

  def read_records(self, ids: np.ndarray) -> list[np.ndarray]:
    """The token arrays of records `ids` (global record numbers), one ArrayRecord batch read per shard."""
    ids = np.asarray(ids, np.int64)
    out: list = [None] * len(ids)
    shard_of = np.searchsorted(self.shard_starts, ids, side="right") - 1
    for shard in np.unique(shard_of):
      where = np.flatnonzero(shard_of == shard)
      positions = (ids[where] - self.shard_starts[shard]).tolist()
      for k, raw in zip(where, self._reader(int(shard)).read(positions)):
        out[k] = np.frombuffer(raw, self.dtype)
    want = self.index[0, ids + 1] - self.index[0, ids] - self.ends(ids)
    got = np.fromiter((len(t) for t in out), np.int64, len(out))
    if (got != want).any():
      k = int(np.flatnonzero(got != want)[0])
      raise DLMError(f"the tokenized dataset {self.path}: record {ids[k]} holds {got[k]} tokens, the index says "
                     f"{want[k]}; the dataset is damaged, re-run dlm-tokenize")
    return out

  def documents_iter(self, block: int = 1024) -> Iterator[np.ndarray]:
    """Every document's token ids (no EOS), in order: records read sequentially and joined at document ends."""
    parts: list[np.ndarray] = []
    for a in range(0, self.records, block):
      ids = np.arange(a, min(a + block, self.records))
      for tokens, end in zip(self.read_records(ids), self.ends(ids)):
        parts.append(tokens)
        if end:
          yield np.concatenate(parts) if len(parts) > 1 else parts[0]
          parts = []

  def close(self) -> None:
    for reader in self._readers:
      if reader is not None:
        reader.close()
    self._readers = [None] * len(self.files)
