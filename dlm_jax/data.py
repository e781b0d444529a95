"""Data: corpus sources, tokenizers, packing, the validation split and the grain training pipeline.

Documents come from the embedded default corpus (this interpreter's standard-library `.py` files), a text file, a `.jsonl`
file with a `text` field, or a directory of such files. Each document is tokenized and followed by EOS; the token stream
is cut into fixed-length sequences (packing). A fixed pseudo-random subset of those sequences is the validation split, so
the split is deterministic and works for a single large file. Training batches come from a grain `MapDataset`
(shuffled per epoch, deterministically), whose iterator state is saved in checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sysconfig
from typing import Callable, Iterator, Protocol

import grain
import numpy as np

from dlm_jax.errors import DLMError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py", ".jsonl")


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
    if not os.path.isfile(path):
      raise DLMError(f"data.tokenizer '{path}' is not a file; use 'bytes' or the path of a tokenizer.json")
    try:
      self._tok = _T.from_file(path)
    except Exception as e:  # the library raises a bare Exception for malformed files
      raise DLMError(f"data.tokenizer '{path}' is not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    self.name = os.path.abspath(path)
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
    self._chat = _read_tokenizer_config(os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json"))

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
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
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
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


def _read_jsonl(path: str) -> list[str]:
  docs = []
  with open(path, "rb") as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise DLMError(f"{path}:{n}: not valid JSON ({e.msg}); each line of a .jsonl file must be one JSON object") from None
      if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DLMError(f"{path}:{n}: no string field 'text'; each line must look like {{\"text\": \"...\"}}")
      docs.append(obj["text"])
  return docs


def read_documents(path: str, max_documents: int = 0) -> list[str]:
  """Documents from `path` ("" = embedded corpus): a text file, a .jsonl file, or a directory of them."""
  if path == "":
    files = embedded_corpus_files()
    if not files:
      raise DLMError("the embedded corpus is empty (no standard-library .py files found); set data.path to your text")
  elif os.path.isdir(path):
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      files.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                   if f.endswith(TEXT_SUFFIXES) and not f.startswith("."))
    if not files:
      raise DLMError(f"data.path '{path}' has no {', '.join(TEXT_SUFFIXES)} files; point it at text, .jsonl, or a folder of them")
  elif os.path.isfile(path):
    files = [path]
  else:
    raise DLMError(f"data.path '{path}' does not exist; set data.path to a text file, a .jsonl file or a directory ('' = embedded corpus)")
  docs: list[str] = []
  for f in files:
    new = _read_jsonl(f) if f.endswith(".jsonl") else [_read_text(f)]
    docs.extend(d for d in new if d)
    if max_documents and len(docs) >= max_documents:
      docs = docs[:max_documents]
      break
  if not docs:
    raise DLMError(f"data.path '{path or '<embedded corpus>'}' holds no text (all documents are empty); give it some text")
  return docs


# ----------------------------------------------------------------------------------------------------------------------
# Packing and split


@dataclasses.dataclass
class Corpus:
  """Packed sequences [N, seq_len] and the train / validation split of their indices."""

  sequences: np.ndarray
  train_index: np.ndarray
  val_index: np.ndarray
  eos_id: int
  num_documents: int

  @property
  def train(self) -> np.ndarray:
    return self.sequences[self.train_index]

  @property
  def val(self) -> np.ndarray:
    return self.sequences[self.val_index]


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


def load_corpus(cfg, tokenizer: Tokenizer) -> Corpus:
  d = cfg.data
  docs = read_documents(d.path, d.max_documents)
  token_docs = tokenizer.encode_many(docs)
  total = sum(len(t) + 1 for t in token_docs)
  seqs = pack(token_docs, tokenizer.eos_id, d.seq_len)
  n = len(seqs)
  train_idx, val_idx = split_indices(n, d.val_fraction, d.split_seed)
  where = d.path or "<embedded corpus>"
  if len(train_idx) < 1:
    raise DLMError(f"data.path '{where}' gives {total} tokens, which do not fill one training sequence of data.seq_len="
                   f"{d.seq_len} after the validation split; add text or lower data.seq_len / data.val_fraction")
  return Corpus(seqs, train_idx, val_idx, tokenizer.eos_id, len(docs))


def segment_ids(tokens: np.ndarray, eos_id: int) -> np.ndarray:
  """Document index (int32) of every position in packed sequences (EOS belongs to the document it ends).

  The training pipeline computes it on the host (`train_iterator(..., segment_attention=True)`); it uses only array
  methods, so it also runs on a jax array.
  """
  is_eos = (tokens == eos_id).astype(np.int32)
  return is_eos.cumsum(axis=-1, dtype=np.int32) - is_eos


# ----------------------------------------------------------------------------------------------------------------------
# grain pipeline


def train_iterator(corpus: Corpus, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1, *,
                   rows: tuple[int, int] | None = None, segment_attention: bool = False,
                   batch_fn: Callable[[dict], dict] | None = None) -> grain.DatasetIterator:
  """Infinite iterator of host-local training batches: dicts of arrays whose first axis is the batch
  (batch_size // process_count rows on this host).

  'tokens' int32 [B, L] always; 'segment_ids' int32 [B, L] (`segment_ids`, the document index of every position) when
  `segment_attention`; then whatever `batch_fn(batch) -> batch` adds (e.g. a 'loss_mask'). `batch_fn` runs on the host
  inside the grain map, on this host's rows; it must be a deterministic function of its input, so that a resumed run
  (the iterator state is in the checkpoint) sees the same batches.

  The global batch order depends only on the seed (reshuffled every epoch); each host takes its contiguous slice of
  rows, so the global batch is identical for any number of hosts. `rows` = (lo, hi) names that slice explicitly (from
  the batch sharding: `sharding.host_batch_rows`, which differs from the process's 1/process_count share when a
  model-parallel mesh axis spans hosts); otherwise process_index's share.
  """
  if rows is not None:
    lo, per_host = rows[0], rows[1] - rows[0]
  else:
    if batch_size % process_count:
      raise DLMError(f"train.batch_size ({batch_size}) must be divisible by the number of hosts ({process_count})")
    per_host = batch_size // process_count
    lo = process_index * per_host
  eos_id = corpus.eos_id

  def host_batch(rows: np.ndarray) -> dict:
    tokens = np.asarray(rows[lo:lo + per_host], dtype=np.int32)
    batch = {"tokens": tokens}
    if segment_attention:
      batch["segment_ids"] = segment_ids(tokens, eos_id)
    return batch if batch_fn is None else batch_fn(batch)

  ds = (grain.MapDataset.source(corpus.train).shuffle(seed=seed).repeat()
        .batch(batch_size, drop_remainder=True)
        .map(host_batch))
  return iter(ds.to_iter_dataset())


def eval_batches(val: np.ndarray, batch_size: int, max_batches: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Validation batches in a fixed order: (tokens [B, L], row_valid [B]); the last batch is padded with row 0."""
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
