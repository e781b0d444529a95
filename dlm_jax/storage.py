"""Paths: the one abstraction every workdir, dataset and output path goes through.

A path is a local file name or a URL (`gs://bucket/dir`, any scheme etils-epath knows: `gs://` and `s3://` through
fsspec / gcsfs). Callers keep paths as strings and use the functions below; nothing else in dlm_jax calls `os.path` or
`open` on a workdir. Orbax writes checkpoints to the same URLs natively (tensorstore for arrays, epath for metadata).

Writes of small files (config.json, metrics, samples, manifests) are atomic: a local file is written beside its final
name and renamed; an object store makes an upload visible only when it completes, so a remote file is written directly.
`gs://` needs the `gcs` extra (`pip install 'dlm_jax[gcs]'`: gcsfs, google-cloud-storage).
"""

from __future__ import annotations

import os
import re
import uuid
from typing import IO, Iterator

from dlm_jax.errors import DLMError

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_EXTRA = {"gs": "gcsfs", "s3": "s3fs"}


def is_remote(path: str) -> bool:
  """True for a URL (gs://, s3://, ...), False for a local path."""
  return bool(_URL.match(str(path)))


def _epath(path: str):
  from etils import epath
  if is_remote(path):
    scheme = str(path).split("://", 1)[0]
    module = _EXTRA.get(scheme)
    if module is not None:
      try:
        __import__(module)
      except ImportError:
        raise DLMError(f"{path}: {scheme}:// paths need the '{module}' package; pip install 'dlm_jax[gcs]' "
                       f"(or pip install {module})") from None
  return epath.Path(path)


def resolve(path: str) -> str:
  """An absolute local path (user and relative parts expanded) or the URL unchanged; what workdirs are stored as."""
  path = str(path)
  if is_remote(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def join(path: str, *parts: str) -> str:
  path = str(path)
  if is_remote(path):
    return "/".join([path.rstrip("/"), *(p.strip("/") for p in parts)])
  return os.path.join(path, *parts)


def parent(path: str) -> str:
  path = str(path).rstrip("/")
  if is_remote(path):
    head, _, _ = path.rpartition("/")
    return head if "://" in head and not head.endswith(":/") else path
  return os.path.dirname(os.path.abspath(path))


def basename(path: str) -> str:
  return str(path).rstrip("/").rpartition("/")[2] if is_remote(path) else os.path.basename(os.path.normpath(path))


def exists(path: str) -> bool:
  return os.path.exists(path) if not is_remote(path) else _epath(path).exists()


def isdir(path: str) -> bool:
  return os.path.isdir(path) if not is_remote(path) else _epath(path).is_dir()


def isfile(path: str) -> bool:
  return os.path.isfile(path) if not is_remote(path) else _epath(path).is_file()


def makedirs(path: str) -> None:
  """Creates a directory and its parents (an object store has no directories: nothing to do there)."""
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Sorted names (not paths) of the entries of a directory."""
  if not is_remote(path):
    return sorted(os.listdir(path))
  return sorted(p.name for p in _epath(path).iterdir())


def walk_files(path: str, hidden: bool = False) -> Iterator[str]:
  """Every file under a directory, sorted; names that start with a dot (files and directories) only when `hidden`."""
  for name in listdir(path):
    if name.startswith(".") and not hidden:
      continue
    full = join(path, name)
    if isdir(full):
      yield from walk_files(full, hidden)
    else:
      yield full


def glob(pattern: str) -> list[str]:
  """Sorted matches of a glob pattern (local or remote: gs://bucket/dir/*.jsonl)."""
  if not is_remote(pattern):
    import glob as _glob
    return sorted(_glob.glob(os.path.expanduser(pattern)))
  scheme, _, rest = pattern.partition("://")
  parts = rest.split("/")
  first = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
  if first == len(parts):
    return [pattern] if exists(pattern) else []
  base = f"{scheme}://" + "/".join(parts[:first])
  return sorted(str(p) for p in _epath(base).glob("/".join(parts[first:])))


def size(path: str) -> int:
  return os.path.getsize(path) if not is_remote(path) else _epath(path).stat().length


def open_file(path: str, mode: str = "r") -> IO:
  """A file object ('r', 'rb', 'w', 'wb', 'a'); text modes are UTF-8. Appending to an object-store file rewrites
  the object (fine for small logs, which is all dlm_jax appends to)."""
  if not is_remote(path):
    return open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
  return _epath(path).open(mode)


def read_text(path: str) -> str:
  with open_file(path, "r") as f:
    return f.read()


def read_bytes(path: str) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file atomically: readers see the old file or the new one, never a part."""
  if is_remote(path):
    _epath(path).write_bytes(data)
    return
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
  """Deletes a file (no error when it is already gone)."""
  if is_remote(path):
    p = _epath(path)
    if p.exists():
      p.unlink()
  elif os.path.exists(path):
    os.remove(path)


def rmtree(path: str) -> None:
  if is_remote(path):
    p = _epath(path)
    if p.exists():
      p.rmtree()
  else:
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def rename(src: str, dst: str) -> None:
  """Renames a file or directory (on an object store: copy, then delete)."""
  if is_remote(src):
    _epath(src).rename(dst)
  else:
    os.replace(src, dst)


def checksum(path: str, algorithm: str | None = None) -> str:
  """A checksum of a file's bytes, "<algorithm>:<value>". Local files: CRC-32 of the bytes read. Cloud Storage objects:
  the CRC-32C the server keeps for every object (no bytes read), else CRC-32 of the bytes read. `algorithm`
  ("crc32" / "crc32c"): the one a recorded checksum used (a file recorded locally, then uploaded, is read again)."""
  if is_remote(path) and algorithm in (None, "crc32c"):
    try:
      import fsspec
      fs, key = fsspec.core.url_to_fs(path)
      info = fs.info(key)
    except Exception:  # an unknown scheme or no checksum support: read the bytes
      info = None
    if info and info.get("crc32c"):
      return f"crc32c:{info['crc32c']}"
  import zlib
  crc = 0
  with open_file(path, "rb") as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)
  return f"crc32:{crc:08x}"


def copy_tree(src: str, dst: str) -> None:
  """Copies a local directory tree to `dst` (local or remote), file by file."""
  for root, _, files in os.walk(src):
    rel = os.path.relpath(root, src)
    target = dst if rel == "." else join(dst, *rel.split(os.sep))
    makedirs(target)
    for name in sorted(files):
      with open(os.path.join(root, name), "rb") as f_in, open_file(join(target, name), "wb") as f_out:
        while chunk := f_in.read(1 << 24):
          f_out.write(chunk)
