"""Data: corpus sources, tokenizers, packing, the validation split, mixtures and the grain training pipeline.

Documents come from the embedded default corpus (this interpreter's standard-library `.py` files), a text file, a
`.jsonl` file with a `text` field, a `.parquet` file with a `text` column, or a directory of such files. Each document is
tokenized and followed by EOS; the token stream is cut into fixed-length sequences (packing). A pre-tokenized dataset
(`dlm-tokenize`, `dlm_jax/shards.py`) gives the same sequences without tokenizing or loading anything: `PackedShards`
reads each one from the records it overlaps. A fixed pseudo-random subset of the sequences is the validation split, so
the split is deterministic and works for a single large file. Training batches come from a grain `MapDataset` of row
indices (shuffled per epoch, deterministically; a `data.mixture` follows `mixture_schedule`) whose host slice is read
by a grain map; the iterator's position is saved in checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import sysconfig
from typing import Callable, Iterator, Protocol

import numpy as np

from dlm_jax import config as config_lib
from dlm_jax import shards, storage
from dlm_jax.errors import DLMError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl", ".parquet")


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
  vocab_size: int  # number of real tokens; the mask token of the masked process is appended after these
  eos_id: int
  eot_id: int | None  # end of turn (chat models), set by make_tokenizer
  pad_id: int | None  # the padding id of the checkpoint (EOS unless data.pad_id says otherwise)

  def encode(self, text: str) -> np.ndarray: ...

  def encode_many(self, texts: list[str]) -> list[np.ndarray]: ...

  def decode(self, ids) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes 0..255 plus EOS = 256."""

  vocab_size = 257
  eos_id = 256
  name = "bytes"
  fingerprint = "bytes"  # what samples record, so a scorer can check it uses the same tokenizer

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

  def encode_many(self, texts):
    return [self.encode(t) for t in texts]

  has_chat_template = True

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The byte tokenizer's plain chat format (it has no special tokens): one 'role: content' line per message, and
    'assistant: ' as the generation prompt; a reply ends with EOS."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")

  def decode(self, ids) -> str:
    out, buf = [], bytearray()
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        out.append(buf.decode("utf-8", errors="replace") + "<|eos|>")
        buf = bytearray()
      elif 0 <= i < 256:
        buf.append(i)
      else:
        out.append(buf.decode("utf-8", errors="replace") + "<|mask|>")
        buf = bytearray()
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]", "<|end_of_text|>")


class HFTokenizer:
  """A Hugging Face `tokenizer.json` through the `tokenizers` library."""

  def __init__(self, path: str, eos_token: str = ""):
    try:
      from tokenizers import Tokenizer as _T
    except ImportError:
      raise DLMError("data.tokenizer names a tokenizer.json but the 'tokenizers' package is missing; pip install tokenizers") from None
    if not storage.isfile(path):
      raise DLMError(f"data.tokenizer '{path}' is not a file; use 'bytes' or the path of a tokenizer.json")
    try:
      self._tok = _T.from_file(path) if not storage.is_remote(path) else _T.from_str(storage.read_text(path))
    except Exception as e:  # the library raises a bare Exception for malformed files
      raise DLMError(f"data.tokenizer '{path}' is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    self.name = storage.resolve(path)
    import hashlib
    self.fingerprint = "tokenizer.json sha256:" + hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    names = (eos_token,) if eos_token else _EOS_NAMES
    eos = None
    for n in names:
      eos = self._tok.token_to_id(n)
      if eos is not None:
        break
    if eos is None:
      raise DLMError(f"tokenizer '{path}' has no end-of-document token among {names}; set data.eos_token to one of its tokens")
    self.eos_id = int(eos)
    self._chat = _read_tokenizer_config(storage.join(storage.parent(self.name), "tokenizer_config.json"))

  @property
  def has_chat_template(self) -> bool:
    return bool(self._chat.get("chat_template"))

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text of a conversation, rendered with the checkpoint's Jinja chat template (`chat_template` of the
    `tokenizer_config.json` beside tokenizer.json) the way transformers' `apply_chat_template` renders it: a sandboxed
    environment with trim_blocks / lstrip_blocks, the special tokens' strings as variables (bos_token, eos_token,
    ...), `raise_exception`, and `add_generation_prompt`."""
    template = self._chat.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
      template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
      raise DLMError(f"the tokenizer {self.name} has no chat template (no chat_template in its tokenizer_config.json); "
                     "drop --chat and give the prompt text itself")
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
      raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    specials = {k: _token_text(v) for k, v in self._chat.items() if k.endswith("_token")}
    try:
      return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                              **specials)
    except TemplateError as e:
      raise DLMError(f"the chat template of {self.name} rejected the conversation: {e}") from None

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_many(self, texts):
    return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < self.vocab_size]
    return self._tok.decode(ids, skip_special_tokens=False)


def _read_tokenizer_config(path: str) -> dict:
  """A Hugging Face tokenizer_config.json ({} when absent)."""
  if not storage.isfile(path):
    return {}
  try:
    return json.loads(storage.read_text(path))
  except ValueError:
    raise DLMError(f"{path} is not valid JSON; repair or delete it") from None


def _token_text(value):
  """A special token of tokenizer_config.json: a string, or an AddedToken-style {"content": ...} object."""
  return value.get("content", "") if isinstance(value, dict) else value


class NoTokenizer:
  """`data.tokenizer='none'`: a model that works on token ids only (a checkpoint converted without tokenizer files).
  Logits functions and samplers work from Python; anything that needs text raises the one-line error below."""

  name = "none"
  fingerprint = "none"

  def __init__(self, vocab_size: int):
    self.vocab_size = int(vocab_size)
    self.eos_id = None

  def _fail(self, *args):
    raise DLMError("this workdir has no tokenizer (data.tokenizer='none': converted without tokenizer files), so "
                   "text cannot be encoded or decoded; convert a directory that holds tokenizer.json, or use the model "
                   "at the token-id level from Python (load_for_inference, model.logits_fn, the samplers)")

  encode = encode_many = decode = _fail


def make_tokenizer(name: str, eos_token: str = "", *, eos_id: int = -1, eot_id: int = -1, pad_id: int = -1,
                   vocab_size: int = 0) -> Tokenizer:
  """The tokenizer of `data.tokenizer` with the special ids a checkpoint fixes (`data.eos_id` / `eot_id` / `pad_id`;
  -1 = the tokenizer's EOS, no end-of-turn, padding = EOS). `vocab_size` is the id count of a tokenizer-less model."""
  if name == "bytes":
    tok = ByteTokenizer()
  elif name == "none":
    tok = NoTokenizer(vocab_size)
  else:
    tok = HFTokenizer(name, eos_token)
  if eos_id >= 0:
    tok.eos_id = eos_id
  tok.eot_id = eot_id if eot_id >= 0 else None
  tok.pad_id = pad_id if pad_id >= 0 else tok.eos_id
  return tok


# ----------------------------------------------------------------------------------------------------------------------
# Documents


def embedded_corpus_files() -> list[str]:
  """The default corpus: every `.py` file of this interpreter's standard library (not site-packages), sorted."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
    files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
  return files


def _read_text(path: str) -> str:
  with storage.open_file(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def _jsonl_line_number(path: str, offset: int) -> int:
  """The line number of byte `offset` (errors inside a byte range of a large .jsonl file name the line)."""
  with storage.open_file(path, "rb") as f:
    return f.read(offset).count(b"\n") + 1


def read_jsonl(path: str, field: str = "text", start: int = 0, end: int | None = None) -> list[str]:
  """The `field` strings of the lines of a .jsonl file that start in bytes [start, end) (the whole file by default),
  so a large file can be split at byte offsets and each part read on its own."""
  docs = []
  with storage.open_file(path, "rb") as f:
    if start > 0:  # a line that starts before `start` belongs to the previous part
      f.seek(start - 1)
      f.readline()
    n = None if start > 0 else 0  # line number, counted only from the file's start
    while True:
      pos = f.tell()
      if end is not None and pos >= end:
        break
      line = f.readline()
      if not line:
        break
      n = None if n is None else n + 1
      line = line.strip()
      if not line:
        continue
      where = lambda: f"{path}:{n if n is not None else _jsonl_line_number(path, pos)}"  # noqa: E731
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DLMError(f"{where()}: not valid JSON ({e.msg}); each line of a .jsonl file must be one JSON "
                       "object") from None
      if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
        raise DLMError(f"{where()}: no string field '{field}'; each line must look like {{\"{field}\": \"...\"}}"
                       + ("" if field != "text" or not isinstance(obj, dict) or not obj else
                          f" (its fields: {', '.join(list(obj)[:8])}; dlm-tokenize --field NAME reads another)"))
      docs.append(obj[field])
  return docs


def _pyarrow_parquet():
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise DLMError("reading .parquet files needs the 'pyarrow' package; pip install 'dlm_jax[data]' (or pip install "
                   "pyarrow)") from None
  return pq


@contextlib.contextmanager
def parquet_file(path: str, field: str = "text"):
  """The open pyarrow ParquetFile of `path` (closed on exit), checked to have a string column `field`."""
  pq = _pyarrow_parquet()
  import pyarrow as pa
  with storage.open_file(path, "rb") as f:
    try:
      pf = pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as e:
      raise DLMError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]}); check or remove it") from None
    names = pf.schema_arrow.names
    if field not in names:
      raise DLMError(f"{path} has no column '{field}' (its columns: {', '.join(names[:12])}); name the text column "
                     f"with --field")
    kind = pf.schema_arrow.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
      raise DLMError(f"column '{field}' of {path} holds {kind}, not strings; name the text column with --field")
    yield pf


def read_parquet(path: str, field: str = "text", row_groups: list[int] | None = None) -> list[str]:
  """The strings of column `field` (nulls skipped), of the given row groups or the whole file."""
  docs = []
  with parquet_file(path, field) as pf:
    for g in range(pf.num_row_groups) if row_groups is None else row_groups:
      docs.extend(t for t in pf.read_row_group(g, columns=[field]).column(0).to_pylist() if t is not None)
  return docs


def read_file(path: str, field: str = "text") -> list[str]:
  """The documents of one file: a .jsonl file's `field` strings, a .parquet file's `field` column, or the whole text
  of any other file (one document)."""
  if path.endswith(".jsonl"):
    return read_jsonl(path, field)
  if path.endswith(".parquet"):
    return read_parquet(path, field)
  return [_read_text(path)]


def corpus_files(path: str) -> list[str]:
  """The files a directory contributes, in corpus order: its own files (those with a suffix of TEXT_SUFFIXES, not
  starting with a dot) sorted by name, then each subdirectory's in turn (os.walk's top-down order)."""
  names = storage.listdir(path)
  files, dirs = [], []
  for name in names:
    if name.startswith("."):
      continue
    full = storage.join(path, name)
    if storage.isdir(full):
      dirs.append(full)
    elif name.endswith(TEXT_SUFFIXES):
      files.append(full)
  for d in dirs:
    files.extend(corpus_files(d))
  return files


def read_documents(path: str, max_documents: int = 0) -> list[str]:
  """Documents from `path` ("" = embedded corpus): a text file, a .jsonl or .parquet file, or a directory of them.
  Empty documents are skipped."""
  if path == "":
    files = embedded_corpus_files()
    if not files:
      raise DLMError("the embedded corpus is empty (no standard-library .py files found); set data.path to your text")
  elif storage.isdir(path):
    files = corpus_files(path)
    if not files:
      raise DLMError(f"data.path '{path}' has no {', '.join(TEXT_SUFFIXES)} files; point it at text, .jsonl, or a folder of them")
  elif storage.isfile(path):
    files = [path]
  else:
    raise DLMError(f"data.path '{path}' does not exist; set data.path to a text file, a .jsonl file or a directory ('' = embedded corpus)")
  docs: list[str] = []
  for f in files:
    docs.extend(d for d in read_file(f) if d)
    if max_documents and len(docs) >= max_documents:
      docs = docs[:max_documents]
      break
  if not docs:
    raise DLMError(f"data.path '{path or '<embedded corpus>'}' holds no text (all documents are empty); give it some text")
  return docs


# ----------------------------------------------------------------------------------------------------------------------
# Packing and split


class Sequences:
  """Random access to packed sequences [N, L] that are not held in memory: `read(rows)` returns those rows as int32
  [k, L]; indexing with an int, a slice or an index array (optionally followed by column indices, as numpy takes them)
  reads what it names and returns numpy arrays, so code written for an in-memory [N, L] array (`len`, `val[a:b]`,
  `val[:n, :m]`, `.shape`) works unchanged. `np.asarray` reads everything: meant for small sets only."""

  seq_len: int

  def __len__(self) -> int:
    raise NotImplementedError

  def read(self, rows: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  @property
  def shape(self) -> tuple[int, int]:
    return (len(self), self.seq_len)

  dtype = np.dtype(np.int32)
  ndim = 2

  def __getitem__(self, key):
    rest = ()
    if isinstance(key, tuple):
      key, rest = key[0], key[1:]
    if isinstance(key, (int, np.integer)):
      k = int(key) + (len(self) if key < 0 else 0)
      if not 0 <= k < len(self):
        raise IndexError(f"row {key} of {len(self)}")
      return self.read(np.array([k]))[0][rest] if rest else self.read(np.array([k]))[0]
    rows = np.arange(len(self))[key]
    out = self.read(rows)
    return out[(slice(None),) + rest] if rest else out

  def __iter__(self):
    for k in range(len(self)):
      yield self[k]

  def __array__(self, dtype=None, copy=None):
    out = self.read(np.arange(len(self)))
    return out if dtype is None else out.astype(dtype)

  def astype(self, dtype) -> np.ndarray:
    return np.asarray(self, dtype=dtype)


class PackedShards(Sequences):
  """The packed sequences of a pre-tokenized dataset (`dlm_jax/shards.py`), read on demand: sequence i is tokens
  [i L, (i + 1) L) of the stream "doc0 EOS doc1 EOS ..." exactly as `pack` cuts it, found through the index and read
  from the few records it overlaps. `max_documents` > 0 keeps the stream of the first documents only."""

  def __init__(self, dataset: shards.Dataset, seq_len: int, eos_id: int, max_documents: int = 0):
    self.dataset, self.seq_len, self.eos_id = dataset, seq_len, int(eos_id)
    self.num_documents = dataset.documents
    limit = dataset.records
    if max_documents and max_documents < dataset.documents:
      limit = int(np.searchsorted(dataset.doc_counts, max_documents, side="left"))
      self.num_documents = max_documents
    self.stream_tokens = int(dataset.offsets[limit])
    self._n = self.stream_tokens // seq_len

  def __len__(self) -> int:
    return self._n

  def read(self, rows) -> np.ndarray:
    rows = np.asarray(rows, np.int64).reshape(-1)
    L = self.seq_len
    out = np.empty((len(rows), L), np.int32)
    if not len(rows):
      return out
    if rows.min() < 0 or rows.max() >= self._n:
      raise IndexError(f"rows {rows.min()}..{rows.max()} of {self._n} packed sequences")
    offsets = self.dataset.offsets
    starts = rows * L
    first = np.searchsorted(offsets, starts, side="right") - 1  # the record holding each sequence's first token
    stop = np.searchsorted(offsets, starts + L, side="left")  # one past the record holding its last token
    ids = np.unique(np.concatenate([np.arange(a, b) for a, b in zip(first, stop)]))
    pieces = dict(zip(ids.tolist(), self.dataset.read_records(ids)))
    where = dict(zip(ids.tolist(), offsets[ids].tolist()))
    ends = dict(zip(ids.tolist(), self.dataset.ends(ids).tolist()))
    for row, s, a, b in zip(out, starts.tolist(), first.tolist(), stop.tolist()):
      for r in range(a, b):
        off, tokens = where[r] - s, pieces[r]  # the record's tokens sit at row positions [off, off + len)
        lo, hi = max(off, 0), min(off + len(tokens), L)
        if hi > lo:
          row[lo:hi] = tokens[lo - off:hi - off]
        if ends[r] and 0 <= off + len(tokens) < L:
          row[off + len(tokens)] = self.eos_id
    return out


class Rows(Sequences):
  """A selection of packed sequences, possibly over several sources: the rows `index` of each (source, index) part,
  concatenated. `Corpus.train` / `.val` of a dataset read from shards, and a mixture's validation set."""

  def __init__(self, parts: list[tuple[Sequences | np.ndarray, np.ndarray]]):
    self.parts = parts
    self.seq_len = int(parts[0][0].shape[1])
    self._starts = np.cumsum([0] + [len(i) for _, i in parts])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def read(self, rows) -> np.ndarray:
    rows = np.asarray(rows, np.int64).reshape(-1)
    out = np.empty((len(rows), self.seq_len), np.int32)
    part = np.searchsorted(self._starts, rows, side="right") - 1
    for p in np.unique(part):
      m = part == p
      source, index = self.parts[p]
      out[m] = take(source, index[rows[m] - self._starts[p]])
    return out


def take(source: Sequences | np.ndarray, rows: np.ndarray) -> np.ndarray:
  """Rows of an in-memory [N, L] array or of a `Sequences` source."""
  return source.read(rows) if isinstance(source, Sequences) else source[rows]


@dataclasses.dataclass
class Corpus:
  """Packed sequences [N, seq_len] (an array in memory, or `PackedShards` read from a pre-tokenized dataset) and the
  train / validation split of their indices."""

  sequences: np.ndarray | Sequences
  train_index: np.ndarray
  val_index: np.ndarray
  eos_id: int
  num_documents: int
  # per-row arrays [N, ...] that travel with the tokens into every batch under their names (post-training rows: the
  # response mask of SFT, the example index of RL prompts); none for packed pretraining text
  fields: dict = dataclasses.field(default_factory=dict)

  @property
  def train(self) -> np.ndarray | Sequences:
    if isinstance(self.sequences, np.ndarray):
      return self.sequences[self.train_index]
    return Rows([(self.sequences, self.train_index)])

  @property
  def val(self) -> np.ndarray | Sequences:
    if isinstance(self.sequences, np.ndarray):
      return self.sequences[self.val_index]
    return Rows([(self.sequences, self.val_index)])


@dataclasses.dataclass
class Mixture:
  """Several corpora drawn in fixed proportions (`data.mixture`). Each keeps its own validation split (data.val_fraction
  and data.split_seed, the same sequences as when it is trained alone); the mixture's validation set is their
  concatenation in the mixture's order, unweighted."""

  components: list[Corpus]
  weights: np.ndarray  # normalised to sum 1
  paths: list[str]

  @property
  def eos_id(self) -> int:
    return self.components[0].eos_id

  @property
  def num_documents(self) -> int:
    return sum(c.num_documents for c in self.components)

  @property
  def val(self) -> Sequences:
    return Rows([(c.sequences, c.val_index) for c in self.components])


def pack(token_docs: list[np.ndarray], eos_id: int, seq_len: int) -> np.ndarray:
  """Concatenates documents with EOS after each and cuts the stream into [N, seq_len] (the tail is dropped)."""
  total = sum(len(d) + 1 for d in token_docs)
  dtype = np.uint16 if max(eos_id, max((int(d.max()) for d in token_docs if len(d)), default=0)) < 65536 else np.int32
  stream = np.empty(total, dtype=dtype)
  pos = 0
  for d in token_docs:
    stream[pos:pos + len(d)] = d
    pos += len(d)
    stream[pos] = eos_id
    pos += 1
  n = total // seq_len
  return stream[: n * seq_len].reshape(n, seq_len)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A fixed pseudo-random choice of validation sequences (at least one when val_fraction > 0)."""
  n_val = 0 if val_fraction == 0 else max(1, int(round(val_fraction * n)))
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def load_corpus(cfg, tokenizer: Tokenizer) -> Corpus | Mixture:
  """The corpus of `cfg.data`: `data.path` (text in memory, or a pre-tokenized dataset read on demand), or the
  `data.mixture` of several."""
  d = cfg.data
  if d.mixture:
    parts = config_lib.parse_mixture(d.mixture)
    components = [_load_one(path, d, tokenizer, f"data.mixture component '{path}'") for path, _ in parts]
    weights = np.asarray([w for _, w in parts], np.float64)
    return Mixture(components, weights / weights.sum(), [p for p, _ in parts])
  return _load_one(d.path, d, tokenizer, f"data.path '{d.path or '<embedded corpus>'}'")


def _load_one(path: str, d, tokenizer: Tokenizer, what: str) -> Corpus:
  if shards.is_dataset(path):
    dataset = shards.Dataset(path)
    dataset.check_tokenizer(tokenizer, what.split(" '")[0])
    seqs = PackedShards(dataset, d.seq_len, tokenizer.eos_id, d.max_documents)
    total, num_documents = seqs.stream_tokens, seqs.num_documents
  else:
    docs = read_documents(path, d.max_documents)
    token_docs = tokenizer.encode_many(docs)
    total, num_documents = sum(len(t) + 1 for t in token_docs), len(docs)
    seqs = pack(token_docs, tokenizer.eos_id, d.seq_len)
  train_idx, val_idx = split_indices(len(seqs), d.val_fraction, d.split_seed)
  if len(train_idx) < 1:
    raise DLMError(f"{what} gives {total} tokens, which do not fill one training sequence of data.seq_len="
                   f"{d.seq_len} after the validation split; add text or lower data.seq_len / data.val_fraction")
  return Corpus(seqs, train_idx, val_idx, tokenizer.eos_id, num_documents)


def segment_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
  """Document index (int32) of every position in packed sequences (EOS belongs to the document it ends).

  The training pipeline computes it on the host (`train_iterator(..., segment_attention=True)`); it uses only array
  methods, so it also runs on a jax array.
  """
  is_eos = (tokens == eos_id).astype(np.int32)
  return is_eos.cumsum(axis=-1, dtype=np.int32) - is_eos


# ----------------------------------------------------------------------------------------------------------------------
# Mixtures

MIXTURE_PERIOD = 1 << 16  # slots of the mixing schedule: proportions are exact to 1 / 65536 over every period


def mixture_schedule(weights: np.ndarray, period: int = MIXTURE_PERIOD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The deterministic mixing schedule: (counts [C], component [period], rank [period]).

  Each period of `period` consecutive draws holds counts[c] draws of component c (weights rounded by largest remainder,
  at least 1 each), spread evenly: the i-th of them sits at time (i + 1/2) / counts[c] and slots follow time order. Any
  window of draws therefore holds each component within about one draw of its share (every global batch has the
  mixture's composition), and draw k maps to (component, that component's draw number) by arithmetic: random access,
  so the stream resumes at any batch."""
  w = np.asarray(weights, np.float64) / np.sum(weights)
  raw = w * period
  counts = np.floor(raw).astype(np.int64)
  for c in np.argsort(-(raw - counts), kind="stable")[:period - counts.sum()]:
    counts[c] += 1
  while (counts == 0).any():  # a weight below 1 / period still gets one slot
    counts[np.argmax(counts)] -= 1
    counts[np.argmin(counts)] += 1
  component = np.repeat(np.arange(len(w)), counts)
  rank = np.concatenate([np.arange(n) for n in counts])
  order = np.lexsort((component, (rank + 0.5) / counts[component]))
  return counts, component[order].astype(np.int32), rank[order]


class _MixtureDraw:
  """Draw k of a mixture -> (component, row of that component's training split). Each component walks its own
  per-epoch shuffle of its training rows (grain's shuffle over a range, as a single corpus does), seeded from the
  shuffle seed and the component's position."""

  def __init__(self, sizes: list[int], weights: np.ndarray, seed: int):
    import grain
    self.counts, self.component, self.rank = mixture_schedule(weights)
    self.orders = [grain.MapDataset.range(n).shuffle(seed=int(np.random.SeedSequence([seed, c]).generate_state(1)[0]))
                   .repeat() for c, n in enumerate(sizes)]

  def __call__(self, k: int) -> tuple[int, int]:
    cycle, slot = divmod(int(k), MIXTURE_PERIOD)
    c = int(self.component[slot])
    return c, int(self.orders[c][cycle * int(self.counts[c]) + int(self.rank[slot])])


# ----------------------------------------------------------------------------------------------------------------------
# grain pipeline


class _HostBatch:
  """The grain map from a global batch of row choices to this host's batch: only rows [lo, lo + per_host) are read."""

  def __init__(self, parts, lo: int, per_host: int, eos_id: int, segment_attention: bool, batch_fn):
    self.parts, self.lo, self.per_host, self.eos_id = parts, lo, per_host, eos_id
    self.segment_attention, self.batch_fn = segment_attention, batch_fn
    self.seq_len = int(parts[0][0].shape[1])

  def __call__(self, choice) -> dict:
    sl = slice(self.lo, self.lo + self.per_host)
    if isinstance(choice, tuple):  # a mixture: (component, row) per position
      component, rows = np.asarray(choice[0])[sl], np.asarray(choice[1])[sl]
    else:
      rows = np.asarray(choice)[sl]
      component = np.zeros(len(rows), np.int64)
    tokens = np.empty((self.per_host, self.seq_len), np.int32)
    fields = {name: np.empty((self.per_host,) + a.shape[1:], a.dtype) for name, a in self.parts[0][2].items()}
    for c in np.unique(component):
      m = component == c
      source, index, extra = self.parts[c]
      tokens[m] = take(source, index[rows[m]])
      for name, a in extra.items():
        fields[name][m] = a[index[rows[m]]]
    batch = {"tokens": tokens, **fields}
    if self.segment_attention:
      batch["segment_ids"] = segment_ids(tokens, self.eos_id)
    return batch if self.batch_fn is None else self.batch_fn(batch)


class BatchIterator:
  """This host's training batches, endless and resumable. `get_state()` is {"next_index": batches taken}, the form of
  grain's own iterator state that checkpoints held before, so those resume too; `set_state` restarts the pipeline at
  that batch (the global batch order is random access). Batches are read `read_threads` at a time and `prefetch`
  ahead; with `workers` > 0 by that many grain worker processes (mp_prefetch)."""

  def __init__(self, batches: grain.MapDataset, host: _HostBatch, read_threads: int, prefetch: int, workers: int):
    import grain
    self._batches, self._host = batches, host
    self._options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    self._workers = workers
    self._next = 0
    self._it = None

  def _start(self):
    import grain
    ds = self._batches[self._next:].map(self._host).to_iter_dataset(self._options)
    if self._workers:
      from absl import flags
      if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; a plain program never parsed them
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
    return iter(ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = self._start()
    batch = next(self._it)
    self._next += 1
    return batch

  def get_state(self) -> dict:
    return {"next_index": self._next}

  def set_state(self, state: dict) -> None:
    self.close()
    self._next = int(state["next_index"])

  def close(self) -> None:
    """Stops the prefetch threads / worker processes (the next batch starts them again)."""
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()


def train_iterator(corpus: Corpus | Mixture, batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1, *, rows: tuple[int, int] | None = None, segment_attention: bool = False,
                   batch_fn: Callable[[dict], dict] | None = None, read_threads: int = 2, prefetch: int = 4,
                   workers: int = 0) -> BatchIterator:
  """Infinite iterator of host-local training batches: dicts of arrays whose first axis is the batch
  (batch_size // process_count rows on this host).

  'tokens' int32 [B, L] always; 'segment_ids' int32 [B, L] (`segment_ids`, the document index of every position) when
  `segment_attention`; then whatever `batch_fn(batch) -> batch` adds (e.g. a 'loss_mask'). `batch_fn` runs on the host
  inside the grain map, on this host's rows; it must be a deterministic function of its input, so that a resumed run
  (the iterator state is in the checkpoint) sees the same batches.

  The global batch order depends only on the seed (reshuffled every epoch; a mixture draws its components by
  `mixture_schedule`); every host computes the whole order (row indices only) and reads just its contiguous slice of
  rows, so the global batch is identical for any number of hosts. `rows` = (lo, hi) names that slice explicitly (from
  the batch sharding: `sharding.host_batch_rows`, which differs from the process's 1/process_count share when a
  model-parallel mesh axis spans hosts); otherwise process_index's share.
  """
  import grain  # here, not at the top: importing grain imports jax, which dlm-tokenize's workers do not need
  if rows is not None:
    lo, per_host = rows[0], rows[1] - rows[0]
  else:
    if batch_size % process_count:
      raise DLMError(f"train.batch_size ({batch_size}) must be divisible by the number of hosts ({process_count})")
    per_host = batch_size // process_count
    lo = process_index * per_host
  if isinstance(corpus, Mixture):
    parts = [(c.sequences, c.train_index, {}) for c in corpus.components]
    draw = _MixtureDraw([len(i) for _, i, _ in parts], corpus.weights, seed)
    order = grain.MapDataset.range(sys.maxsize).map(draw)
  else:
    parts = [(corpus.sequences, corpus.train_index, corpus.fields)]
    order = grain.MapDataset.range(len(corpus.train_index)).shuffle(seed=seed).repeat()
  host = _HostBatch(parts, lo, per_host, corpus.eos_id, segment_attention, batch_fn)
  return BatchIterator(order.batch(batch_size, drop_remainder=True), host, read_threads, prefetch, workers)


def eval_batches(val, batch_size: int, max_batches: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Validation batches in a fixed order: (tokens [B, L], row_valid [B]); the last batch is padded with row 0. `val`
  is an [N, L] array or a `Sequences` source (read one batch at a time)."""
  n = len(val)
  nb = -(-n // batch_size)
  if max_batches:
    nb = min(nb, max_batches)
  for b in range(nb):
    rows = val[b * batch_size:(b + 1) * batch_size].astype(np.int32)
    valid = np.ones(batch_size, dtype=bool)
    if len(rows) < batch_size:
      valid[len(rows):] = False
      rows = np.concatenate([rows, np.repeat(rows[:1], batch_size - len(rows), axis=0)])
    yield rows, valid
