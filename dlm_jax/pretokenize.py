"""`dlm-tokenize`: text, .jsonl and .parquet files -> a pre-tokenized dataset (the format of `dlm_jax/shards.py`).

Documents are read as `data.path` reads them (a text file is one document, a .jsonl line's field, a .parquet column's
value; a directory contributes its files in `data.corpus_files` order; empty documents are skipped), so a corpus and
its tokenized directory pack into the same sequences.

The inputs are cut into units (a text file; up to 64 MiB of a .jsonl file, split at line starts; a row group of a
.parquet file), the units are dealt to the shards in order, contiguously and balanced by input bytes, and a pool of
worker processes writes one shard each, tokenizing its units in order. The record order is the input order whatever
the number of workers, so the output does not depend on --workers. Everything is written into a temporary directory
beside the output (hidden, `.NAME.tmp-XXXX`) and renamed into place when complete; a remote output (gs://) is written
locally first and uploaded with manifest.json last. A run that fails or is interrupted leaves no dataset behind.
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import json
import os
import shutil
import tempfile
import time
import uuid

import numpy as np

from dlm_jax import data as data_lib
from dlm_jax import shards, storage
from dlm_jax.errors import DLMError

JSONL_CHUNK = 64 << 20  # bytes of a .jsonl file per unit (a large file is tokenized by several workers)
SHARD_BYTES = 1 << 30  # default shard count: one per GiB of input, at least one per worker
ENCODE_BATCH = 512  # documents per tokenizer call


@dataclasses.dataclass(frozen=True)
class Unit:
  """A piece of one input file: all of a text file, bytes [start, end) of a .jsonl file (the lines that start there),
  or row groups [start, end) of a .parquet file. `size`: its input bytes, for balancing the shards."""

  path: str
  kind: str  # "text", "jsonl", "parquet"
  start: int = 0
  end: int = 0
  size: int = 0


def expand_inputs(inputs: list[str]) -> list[str]:
  """The input files, in order: each --input is a file, a directory (its corpus files) or a glob pattern (its matches,
  sorted; matching directories contribute their files)."""
  files: list[str] = []
  for spec in inputs:
    if _glob.has_magic(spec):
      matches = storage.glob(spec)
      if not matches:
        raise DLMError(f"--input {spec} matches no files; check the pattern (quote it so the shell does not expand it)")
    elif storage.isdir(spec) or storage.isfile(spec):
      matches = [spec]
    else:
      raise DLMError(f"--input {spec} does not exist; give a file, a directory or a glob pattern")
    found = []
    for m in matches:
      found.extend(data_lib.corpus_files(m) if storage.isdir(m) else [m])
    if not found:
      raise DLMError(f"--input {spec} holds no {', '.join(data_lib.TEXT_SUFFIXES)} files; point it at text, .jsonl "
                     "or .parquet files")
    for f in found:
      if f in files:
        raise DLMError(f"--input {spec} names {f} again (an earlier --input already did); give each file once")
      files.append(f)
  return files


def plan_units(files: list[str], field: str, jsonl_chunk: int = 0) -> tuple[list[Unit], list[dict]]:
  """(units, sources): the work units of the files in order (.jsonl files cut every `jsonl_chunk` bytes, default
  JSONL_CHUNK), and each file's {"path", "bytes"}. A parquet file without a string column `field` is an error here,
  before anything is tokenized."""
  jsonl_chunk = jsonl_chunk or JSONL_CHUNK
  units, sources = [], []
  for f in files:
    size = storage.size(f)
    sources.append({"path": f, "bytes": int(size)})
    if f.endswith(".jsonl"):
      for a in range(0, max(size, 1), jsonl_chunk):
        units.append(Unit(f, "jsonl", a, min(a + jsonl_chunk, size), min(jsonl_chunk, size - a)))
    elif f.endswith(".parquet"):
      with data_lib.parquet_file(f, field) as pf:
        meta = pf.metadata
      for g in range(meta.num_row_groups):
        units.append(Unit(f, "parquet", g, g + 1, int(meta.row_group(g).total_byte_size)))
    else:
      units.append(Unit(f, "text", size=size))
  return units, sources


def assign(units: list[Unit], num_shards: int) -> list[list[Unit]]:
  """The units dealt to `num_shards` shards in order, contiguously, each shard about the same number of input bytes
  (and at least one unit)."""
  sizes = np.asarray([max(u.size, 1) for u in units], np.float64)
  mid = np.cumsum(sizes) - sizes / 2  # a unit goes to the shard its middle byte falls in
  cut = np.searchsorted(mid, np.arange(1, num_shards) * sizes.sum() / num_shards)
  cut = np.maximum(cut, np.arange(1, num_shards))  # every shard gets a unit ...
  cut = np.minimum(cut, len(units) - num_shards + np.arange(1, num_shards))  # ... and leaves one for each after it
  cut = np.maximum.accumulate(cut)
  bounds = [0, *cut.tolist(), len(units)]
  return [units[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def read_unit(unit: Unit, field: str) -> list[str]:
  """The non-empty documents of a unit."""
  if unit.kind == "jsonl":
    docs = data_lib.read_jsonl(unit.path, field, unit.start, unit.end)
  elif unit.kind == "parquet":
    docs = data_lib.read_parquet(unit.path, field, list(range(unit.start, unit.end)))
  else:
    docs = [data_lib._read_text(unit.path)]  # pylint: disable=protected-access
  return [d for d in docs if d]


def write_shard(job: dict) -> dict:
  """One shard (a worker's task): tokenizes its units in order and writes their documents. Returns the per-record
  lengths / end flags and counts (`shards.ShardWriter.close`) and the documents of each unit."""
  tokenizer = data_lib.make_tokenizer(job["tokenizer"], job["eos_token"])
  writer = shards.ShardWriter(job["path"], job["dtype"])
  per_unit = []
  for unit in job["units"]:
    docs = read_unit(unit, job["field"])
    for a in range(0, len(docs), ENCODE_BATCH):
      for tokens in tokenizer.encode_many(docs[a:a + ENCODE_BATCH]):
        writer.add(tokens)
    per_unit.append(len(docs))
  out = writer.close()
  out["unit_documents"] = per_unit
  return out


def _worker_init() -> None:
  """A pool worker tokenizes on one thread: the pool is the parallelism (the tokenizers library would otherwise start
  a thread per CPU in every worker). A value the user set wins."""
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _check_output(output: str) -> None:
  if storage.exists(output) and (not storage.isdir(output) or storage.listdir(output)):
    raise DLMError(f"--output {output} already exists and is not empty; choose a new directory (or delete it)")


def tokenize(inputs: list[str], tokenizer: str, output: str, *, num_shards: int = 0, field: str = "text",
             workers: int = 0, eos_token: str = "") -> dict:
  """Writes the dataset of `inputs` tokenized by `tokenizer` ("bytes" or a tokenizer.json) into `output`; returns a
  summary (what dlm-tokenize prints). `num_shards` 0 = one per GiB of input, at least one per worker; `workers` 0 = one
  per CPU (capped at the shard count)."""
  t0 = time.perf_counter()
  if not inputs:
    raise DLMError("no --input given; name text, .jsonl or .parquet files, directories or glob patterns")
  if num_shards < 0 or workers < 0:
    raise DLMError("--shards and --workers must be >= 0 (0 = automatic)")
  if not field:
    raise DLMError("--field is empty; name the .jsonl field / .parquet column that holds the text")
  output = storage.resolve(output)
  _check_output(output)
  tok = data_lib.make_tokenizer(tokenizer, eos_token)
  if not hasattr(tok, "fingerprint") or tok.eos_id is None:
    raise DLMError(f"--tokenizer {tokenizer} cannot encode text; use 'bytes' or the path of a tokenizer.json")
  files = expand_inputs(inputs)
  units, sources = plan_units(files, field)
  total_bytes = sum(s["bytes"] for s in sources)
  workers = workers or os.cpu_count() or 1
  wanted = num_shards or max(workers, -(-total_bytes // SHARD_BYTES))
  num_shards = min(wanted, len(units))  # a shard holds at least one unit
  workers = min(workers, num_shards)
  dtype = shards.token_dtype(tok.vocab_size)

  remote = storage.is_remote(output)
  if remote:
    tmp = tempfile.mkdtemp(prefix="dlm-tokenize-")
  else:
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(output)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
  try:
    names = [shards.shard_name(s, num_shards) for s in range(num_shards)]
    jobs = [{"tokenizer": tok.name, "eos_token": eos_token, "dtype": dtype, "field": field, "units": group,
             "path": os.path.join(tmp, name)} for name, group in zip(names, assign(units, num_shards))]
    if workers == 1:
      results = [write_shard(job) for job in jobs]
    else:
      import multiprocessing
      # spawn, not fork: the parent may hold threads (tokenizers, grain) that a forked child would inherit broken
      with multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
        results = pool.map(write_shard, jobs, chunksize=1)
    documents = sum(r["documents"] for r in results)
    if documents == 0:
      raise DLMError(f"the inputs ({len(files)} files) hold no text (every document is empty); check --input and "
                     f"--field")
    index = shards.build_index(np.concatenate([r["lengths"] for r in results]),
                               np.concatenate([r["ends"] for r in results]))
    per_source: dict[str, int] = {}
    for job, r in zip(jobs, results):
      for unit, n in zip(job["units"], r["unit_documents"]):
        per_source[unit.path] = per_source.get(unit.path, 0) + n
    tokens = sum(r["tokens"] for r in results)
    manifest = {
        "format": shards.FORMAT, "version": shards.VERSION,
        "tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint, "eos_id": int(tok.eos_id),
                      "vocab_size": int(tok.vocab_size)},
        "dtype": dtype, "record_tokens": shards.RECORD_TOKENS, "writer_options": shards.WRITER_OPTIONS,
        "field": field, "documents": documents, "records": int(index.shape[1] - 1), "tokens": int(tokens),
        "stream_tokens": int(index[0, -1]),
        "shards": [{"file": name, "documents": r["documents"], "records": int(len(r["lengths"])),
                    "tokens": int(r["tokens"])} for name, r in zip(names, results)],
        "sources": [dict(s, documents=per_source.get(s["path"], 0)) for s in sources],
    }
    with open(os.path.join(tmp, shards.INDEX), "wb") as f:
      f.write(shards.index_bytes(index))
    manifest_text = json.dumps(manifest, indent=1) + "\n"
    if remote:
      _upload(tmp, output, names + [shards.INDEX], manifest_text)
    else:
      with open(os.path.join(tmp, shards.MANIFEST), "w") as f:
        f.write(manifest_text)
      _check_output(output)  # nobody wrote there meanwhile
      if os.path.isdir(output):
        os.rmdir(output)  # empty (checked): the rename puts the dataset in its place
      os.rename(tmp, output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  seconds = time.perf_counter() - t0
  summary = {"output": output, "documents": documents, "tokens": int(tokens), "stream_tokens": int(index[0, -1]),
             "shards": num_shards, "workers": workers, "dtype": dtype, "seconds": round(seconds, 3),
             "tokens_per_second": round(tokens / seconds)}
  if num_shards < wanted:
    summary["note"] = (f"{num_shards} shards, not {wanted}: the inputs make {len(units)} work units (a text file, "
                       f"{JSONL_CHUNK >> 20} MiB of a .jsonl file, a parquet row group)")
  return summary


def _upload(local: str, remote: str, names: list[str], manifest_text: str) -> None:
  """Copies the shards and the index to a remote directory, then writes the manifest (what makes it a dataset)."""
  storage.makedirs(remote)
  for name in names:
    with open(os.path.join(local, name), "rb") as src, storage.open_file(storage.join(remote, name), "wb") as dst:
      shutil.copyfileobj(src, dst, 16 << 20)
  storage.write_text(storage.join(remote, shards.MANIFEST), manifest_text)
