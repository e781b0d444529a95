"""The Orbax adapter: the only module that talks to orbax-checkpoint, and the checkpoints' integrity.

A checkpoint is one step directory under `<workdir>/checkpoints/` (a local path or a gs:// URL) with four Orbax items:
`state` (params, optimizer state, EMA, step, process state), `data` (the grain iterator state, JSON), `config` (the
run's config, JSON) and `integrity` (JSON: a digest of every array and of both JSON items, computed when saving),
plus a file record `<step>.integrity.json` beside it (every file of the step with its size and checksum, and a digest
of the record itself), written once Orbax has committed the step.

Integrity. Orbax verifies none of the array bytes it reads (a flipped byte in an array file restores silently as
wrong values), so both layers are ours:
  - `verify(step)` compares every file with the record: a missing, truncated, extended or changed file, or an
    unexpected one, is damage naming that file. Local files are read and CRC-32'd; Cloud Storage objects are compared
    through the CRC-32C the server keeps (no bytes read).
  - every restore recomputes the digest of each array it read (on the device, whatever the mesh) and of the JSON
    items, and compares them with the `integrity` item: this also catches bytes damaged in transit.
A step without its file record was interrupted between Orbax's commit and the record (or is being written): it is
incomplete, and readers skip it. Damage is a `DamagedCheckpoint` (a DLMError naming the step and the item): dlm-eval
and dlm-sample stop with it; dlm-train moves damaged and incomplete steps to `checkpoints/damaged/` with a warning and
resumes from the newest intact one.

Saves are asynchronous: `save` computes the array digests, starts Orbax's save (which returns once the arrays are
copied off the devices) and a finisher thread that waits for the commit, writes the file record, and only then deletes
steps beyond `keep` (oldest first, record before directory). So a crash at any moment leaves every earlier intact
checkpoint in place, and the newest intact checkpoint is never deleted. Orbax writes a local step into a temporary
directory and renames it when complete; on Cloud Storage a step counts as complete only once its record exists.

Restores take abstract arrays with shardings, so a checkpoint restores onto any mesh, and in either layer layout
(model.scan_layers): a checkpoint saved with the other layout is read in its own and converted
(`dlm_jax.model.stack_layers` / `unstack_layers`) into the target's shardings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dlm_jax import storage
from dlm_jax.errors import DLMError

for _name in ("absl", "orbax"):
  logging.getLogger(_name).setLevel(logging.ERROR)

FORMAT = 1  # of the integrity item and the file record
RECORD_SUFFIX = ".integrity.json"
DAMAGED_DIR = "damaged"


def checkpoint_dir(workdir: str) -> str:
  return storage.join(storage.resolve(workdir), "checkpoints")


class DamagedCheckpoint(DLMError):
  """A checkpoint step whose bytes differ from what was saved (`item`: the file or array, `detail`: how)."""

  def __init__(self, directory: str, step: int, item: str, detail: str):
    self.directory, self.step, self.item, self.detail = directory, step, item, detail
    self.summary = f"checkpoint step {step} in {directory} is damaged: {item} ({detail})"
    super().__init__(f"{self.summary}; dlm-train resumes from "
                     f"the newest intact checkpoint (it moves damaged steps to {DAMAGED_DIR}/), or move step {step} "
                     f"away to use an earlier one")


# ----------------------------------------------------------------------------------------------------------------------
# Array digests: two 32-bit sums over every element's bits, the same on the device (any sharding) and on the host.
#   a = sum_i w_i * (2 i + 1)          (odd multipliers: any change of one element changes it)
#   b = sum_i fmix32(w_i ^ i * phi)    (MurmurHash3's finaliser: a nonlinear second sum)
# w_i = the element's bits as uint32 (bool, 1-, 2- and 4-byte types), i = its row-major index, arithmetic mod 2^32.
# Modular sums do not depend on the order of addition, so the digest is exact under any sharding or reduction tree.

_PHI, _M1, _M2 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def _terms(w, i, u32):
  a = w * (i * u32(2) + u32(1))
  x = w ^ (i * u32(_PHI))
  x = x ^ (x >> u32(16))
  x = x * u32(_M1)
  x = x ^ (x >> u32(13))
  x = x * u32(_M2)
  x = x ^ (x >> u32(16))
  return a, x


def _device_digest(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    w = x.astype(jnp.uint32)
  elif x.dtype.itemsize in _UINT:
    w = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(jnp.uint32)
  else:
    raise DLMError(f"checkpoint digests support 1-, 2- and 4-byte dtypes, not {x.dtype}")
  i, stride = jnp.zeros(x.shape, jnp.uint32), 1
  for d in reversed(range(x.ndim)):
    i = i + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride & 0xFFFFFFFF)
    stride *= x.shape[d]
  a, b = _terms(w, i, jnp.uint32)
  return jnp.stack([jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)])


_device_digests = jax.jit(lambda tree: jax.tree.map(_device_digest, tree))


def _host_digest(x: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
  """The digest of a host array (np.memmap included), `chunk` elements at a time."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    flat = x.reshape(-1)
  elif x.dtype.itemsize in _UINT:
    flat = np.ascontiguousarray(x).reshape(-1).view(_UINT[x.dtype.itemsize])
  else:
    raise DLMError(f"checkpoint digests support 1-, 2- and 4-byte dtypes, not {x.dtype}")
  a = b = np.zeros((), np.uint32)
  for s in range(0, flat.size, chunk):
    w = flat[s:s + chunk].astype(np.uint32)
    i = np.arange(s, s + w.size, dtype=np.uint64).astype(np.uint32)
    ta, tb = _terms(w, i, np.uint32)
    a = np.add(a, ta.sum(dtype=np.uint32), dtype=np.uint32)
    b = np.add(b, tb.sum(dtype=np.uint32), dtype=np.uint32)
  return np.array([a, b], np.uint32)


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _host_value(x) -> np.ndarray:
  """A replicated device result on this host (fully addressable or not)."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def array_digests(tree: Any) -> dict[str, dict]:
  """{path: {shape, dtype, digest}} of every array in a tree (device arrays on the device, host arrays on the host)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  on_device = [(p, x) for p, x in leaves if isinstance(x, jax.Array)]
  sums = dict(zip([_path_name(p) for p, _ in on_device], _device_digests([x for _, x in on_device]))) if on_device \
      else {}
  out = {}
  for p, x in leaves:
    name = _path_name(p)
    d = _host_value(sums[name]) if name in sums else _host_digest(x)
    out[name] = {"shape": list(np.shape(x)), "dtype": str(x.dtype), "digest": f"{int(d[0]):08x}{int(d[1]):08x}"}
  return out


def json_digest(obj: Any) -> str:
  """sha256 of an object's canonical JSON (what a JSON item restores as)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class _SequentialHostArrays(ocp.type_handlers.NumpyHandler):
  """Writes host arrays one at a time, without Orbax's defensive copy, and releases each memory-mapped array's pages
  once written: a tree of np.memmap leaves is saved with about one tensor resident at a time."""

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def _background_serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)
    for value, info, arg in zip(values, infos, args):
      await super()._background_serialize([value], [info], [arg])
      m = getattr(value, "_mmap", None)
      if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        m.madvise(mmap.MADV_DONTNEED)


@contextlib.contextmanager
def _streaming_host_arrays():
  """Orbax's handler of numpy leaves replaced by `_SequentialHostArrays` for the duration (process-wide; used by
  `save_host_params`, i.e. by dlm-convert's single-threaded save)."""
  previous = ocp.type_handlers.get_type_handler(np.ndarray)
  ocp.type_handlers.register_type_handler(np.ndarray, _SequentialHostArrays(), override=True)
  try:
    yield
  finally:
    ocp.type_handlers.register_type_handler(np.ndarray, previous, override=True)


def save_host_params(workdir: str, step: int, params: Any, config: dict) -> None:
  """A parameters-only checkpoint {'params', 'step'} (what `dlm_jax.convert` writes) from host arrays, typically
  np.memmap views of a scratch file: written one tensor at a time, so the host holds about one tensor (the
  training loop's `init_from_params` starts an optimizer for it)."""
  ckpt = Checkpointer(workdir, keep=1, async_save=False)
  with _streaming_host_arrays():
    ckpt.save(step, {"params": params, "step": np.zeros((), np.int32)}, {}, config)
    ckpt.wait()
  ckpt.close()


def _layer_axis_sharding(sharding, add: bool):
  """The sharding of a parameter with its leading layer axis added (stacked) or removed (one layer)."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  spec = (None, *spec) if add else spec[1:]
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _in_layout(abstract: Any, layout: str) -> Any:
  """An abstract tree (ShapeDtypeStructs with shardings) converted to the given layer layout."""
  from dlm_jax import model as model_lib
  if layout == "unrolled":
    return model_lib.unstack_layers(abstract, take=lambda a, i: jax.ShapeDtypeStruct(
        a.shape[1:], a.dtype, sharding=_layer_axis_sharding(getattr(a, "sharding", None), add=False)))
  return model_lib.stack_layers(abstract, stack=lambda xs: jax.ShapeDtypeStruct(
      (len(xs), *xs[0].shape), xs[0].dtype, sharding=_layer_axis_sharding(getattr(xs[0], "sharding", None), add=True)))


def _to_layout(tree: Any, abstract: Any, layout: str) -> Any:
  """Restored arrays converted to the target's layer layout, placed in the target's shardings."""
  from dlm_jax import model as model_lib
  convert = model_lib.stack_layers if layout == "scanned" else model_lib.unstack_layers
  shardings = jax.tree.map(lambda a: getattr(a, "sharding", None), abstract)
  return jax.jit(convert, out_shardings=shardings)(tree)


class Checkpointer:
  """save / restore / verify over an Orbax CheckpointManager (module docstring: integrity, asynchronous saves).

  `keep`: how many complete checkpoints to keep (older ones are deleted once a newer one is complete). `read_only`:
  creates nothing (a missing checkpoints directory reads as no checkpoint)."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    self.keep, self.read_only = keep, read_only
    self._verified: set[int] = set()
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    self._mngr = None
    if read_only and not storage.isdir(self.directory):
      return
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save,
                                             create=not read_only, read_only=read_only))

  # -- listing ---------------------------------------------------------------------------------------------------------

  def _record_path(self, step: int) -> str:
    return storage.join(self.directory, f"{step}{RECORD_SUFFIX}")

  def _step_dirs(self) -> list[int]:
    if not storage.isdir(self.directory):
      return []
    return sorted(int(n) for n in storage.listdir(self.directory) if n.isdigit())

  def steps(self) -> list[int]:
    """The complete steps (directory and file record), ascending; whether their bytes are intact is `verify`'s job."""
    if not storage.isdir(self.directory):
      return []
    names = set(storage.listdir(self.directory))
    return sorted(int(n) for n in names if n.isdigit() and f"{n}{RECORD_SUFFIX}" in names)

  def incomplete_steps(self) -> list[int]:
    """Step directories without a file record: interrupted saves (or one being written right now)."""
    complete = set(self.steps())
    return [s for s in self._step_dirs() if s not in complete]

  def latest_step(self) -> int | None:
    """The newest complete step (None: none)."""
    steps = self.steps()
    return steps[-1] if steps else None

  # -- integrity -------------------------------------------------------------------------------------------------------

  def _files(self, step: int) -> dict[str, list]:
    root = storage.join(self.directory, str(step))
    return {f[len(root) + 1:]: [storage.size(f), storage.checksum(f)] for f in storage.walk_files(root, hidden=True)}

  def _write_record(self, step: int) -> None:
    files = self._files(step)
    record = {"format": FORMAT, "step": step, "files": files, "digest": json_digest(files)}
    storage.write_text(self._record_path(step), json.dumps(record, indent=1, sort_keys=True))

  def verify(self, step: int) -> None:
    """Raises DamagedCheckpoint unless every file of the step matches its record (sizes and checksums)."""
    if step in self._verified:
      return
    damaged = lambda item, detail: DamagedCheckpoint(self.directory, step, item, detail)
    path = self._record_path(step)
    try:
      record = json.loads(storage.read_text(path))
      files = record["files"]
      ok = isinstance(files, dict) and record.get("digest") == json_digest(files)
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise damaged(storage.basename(path), f"unreadable: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
    if not ok:
      raise damaged(storage.basename(path), "its contents do not match its own digest")
    root = storage.join(self.directory, str(step))
    present = set(f[len(root) + 1:] for f in storage.walk_files(root, hidden=True)) if storage.isdir(root) else set()
    for rel, (size, checksum) in sorted(files.items()):
      if rel not in present:
        raise damaged(rel, "the file is missing")
      got = storage.size(storage.join(root, rel))
      if got != size:
        raise damaged(rel, f"{got} bytes, saved with {size}: truncated or overwritten")
      if storage.checksum(storage.join(root, rel), checksum.partition(":")[0]) != checksum:
        raise damaged(rel, "its bytes changed since the save (checksum mismatch)")
    extra = sorted(present - set(files))
    if extra:
      raise damaged(extra[0], "a file that was not part of the save")
    self._verified.add(step)

  def _check_digests(self, step: int, saved: dict, tree: Any) -> None:
    """Compares the arrays read with the saved digests. An array restored into another dtype (Orbax casts to the
    target's, e.g. bfloat16 weights into a float32 run) is cast back first: exact for a widening cast, so a value
    that differs still shows."""
    def as_saved(path, x):
      want = saved.get(_path_name(path))
      return x.astype(want["dtype"]) if want and str(x.dtype) != want["dtype"] else x
    tree = jax.tree_util.tree_map_with_path(as_saved, tree)
    for name, got in array_digests(tree).items():
      want = saved.get(name)
      if want is None:
        raise DamagedCheckpoint(self.directory, step, f"array {name}", "no digest was saved for it")
      if got != want:
        raise DamagedCheckpoint(self.directory, step, f"array {name}",
                                f"read {got['shape']} {got['dtype']} with digest {got['digest']}, saved "
                                f"{want['shape']} {want['dtype']} with {want['digest']}")

  def _integrity(self, step: int) -> dict:
    item = self._restore_items(step, integrity=ocp.args.JsonRestore())["integrity"]
    if not isinstance(item, dict) or item.get("format") != FORMAT or not isinstance(item.get("arrays"), dict):
      raise DamagedCheckpoint(self.directory, step, "integrity item", "not a dlm_jax integrity record")
    return item

  def quarantine(self, step: int) -> str:
    """Moves a step (and its record) to `checkpoints/damaged/` (never deletes it); returns where it went."""
    dest_dir = storage.join(self.directory, DAMAGED_DIR)
    storage.makedirs(dest_dir)
    taken = set(storage.listdir(dest_dir))
    name = str(step)
    n = 1
    while name in taken:
      n += 1
      name = f"{step}.{n}"
    dest = storage.join(dest_dir, name)
    src = storage.join(self.directory, str(step))
    if storage.exists(src):
      storage.rename(src, dest)
    if storage.exists(self._record_path(step)):
      storage.rename(self._record_path(step), dest + RECORD_SUFFIX)
    self._verified.discard(step)
    return dest

  # -- saving ----------------------------------------------------------------------------------------------------------

  def _join(self) -> None:
    """Waits for the previous save's finisher; re-raises what it raised."""
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._error is not None:
      e, self._error = self._error, None
      raise e

  def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
    """Starts an asynchronous save of one step (`wait()` blocks until it is complete, record included)."""
    self._join()
    data_state = json.loads(json.dumps(data_state))  # the form the JSON item restores as
    integrity = {"format": FORMAT, "arrays": array_digests(state), "data": json_digest(data_state),
                 "config": json_digest(config)}
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state),
                                                   config=ocp.args.JsonSave(config),
                                                   integrity=ocp.args.JsonSave(integrity)), force=True)
    self._thread = threading.Thread(target=self._finish, args=(step,), name=f"checkpoint-{step}", daemon=True)
    self._thread.start()

  def _finish(self, step: int) -> None:
    try:
      self._mngr.wait_until_finished()
      if jax.process_index() == 0:
        self._write_record(step)
        self._verified.add(step)
        for old in self.steps()[:-self.keep]:  # the newest `keep` complete steps stay, the one just written among them
          storage.remove(self._record_path(old))
          storage.rmtree(storage.join(self.directory, str(old)))
    except BaseException as e:  # re-raised by the next save / wait / close on the main thread
      self._error = e

  def wait(self) -> None:
    if self._mngr is not None:
      self._join()
      self._mngr.wait_until_finished()

  # -- restoring -------------------------------------------------------------------------------------------------------

  def _fail(self, step: int, what: str, e: Exception) -> DLMError:
    if isinstance(e, DLMError):
      return e
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if "do not match" in first or "shape" in first.lower():
      return DLMError(f"checkpoint step {step} in {self.directory} does not match this run's model or optimizer "
                      f"({what}: {first}); use the config it was trained with, or a new --workdir")
    return DamagedCheckpoint(self.directory, step, what, f"unreadable: {first}")

  def _restore_items(self, step: int, **items) -> dict:
    self.verify(step)
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many exception types for unreadable files
      raise self._fail(step, "/".join(items), e) from None

  def restore_config(self, step: int) -> dict:
    out = self._restore_items(step, config=ocp.args.JsonRestore())["config"]
    if json_digest(out) != self._integrity(step)["config"]:
      raise DamagedCheckpoint(self.directory, step, "config item", "its contents differ from the saved digest")
    return out

  def _state_tree(self, step: int) -> dict:
    self.verify(step)
    try:
      meta = ocp.StandardCheckpointer().metadata(storage.join(self.directory, str(step), "state"))
      tree = getattr(meta, "item_metadata", meta)
      tree = getattr(tree, "tree", tree)
    except Exception as e:
      raise self._fail(step, "state metadata", e) from None
    if not hasattr(tree, "keys"):  # damaged metadata can read as nothing rather than fail
      raise self._fail(step, "state metadata", ValueError(f"no readable tree (got {type(tree).__name__})"))
    return tree

  def state_keys(self, step: int) -> set[str]:
    """The top-level entries of a step's saved state ({'params', 'step'} for a checkpoint dlm-convert wrote; the
    training loop's add 'opt_state', 'ema', 'process_state')."""
    return set(self._state_tree(step).keys())

  def _layouts(self, step: int, abstract: Any) -> tuple[str | None, str | None]:
    """(saved, wanted) layer layouts ("scanned" / "unrolled"; None: no layers in the tree, or the same layout)."""
    from dlm_jax import model as model_lib
    wanted = model_lib.layer_layout(abstract)
    if wanted is None:
      return None, None
    tree = self._state_tree(step)
    saved = model_lib.layer_layout({k: tree[k] for k in abstract if k in tree} if isinstance(abstract, dict) else tree)
    return (saved, wanted) if saved is not None and saved != wanted else (None, None)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    saved, wanted = self._layouts(step, abstract_state)
    target = _in_layout(abstract_state, saved) if saved else abstract_state
    integrity = self._integrity(step)
    out = self._restore_items(step, state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    self._check_digests(step, integrity["arrays"], out["state"])
    if json_digest(out["data"]) != integrity["data"]:
      raise DamagedCheckpoint(self.directory, step, "data item", "its contents differ from the saved digest")
    state = _to_layout(out["state"], abstract_state, wanted) if saved else out["state"]
    return state, out["data"]

  def restore_subset(self, step: int, abstract_subset: dict) -> dict:
    """Only some top-level entries of the saved state (e.g. the EMA parameters for inference), read from disk
    without materialising the rest (the optimizer state is not loaded)."""
    saved, wanted = self._layouts(step, abstract_subset)
    target = _in_layout(abstract_subset, saved) if saved else abstract_subset
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
    integrity = self._integrity(step)
    out = self._restore_items(step, state=ocp.args.PyTreeRestore(target, restore_args=restore_args,
                                                                 partial_restore=True))
    self._check_digests(step, integrity["arrays"], out["state"])
    return _to_layout(out["state"], abstract_subset, wanted) if saved else out["state"]

  def close(self) -> None:
    if self._mngr is not None:
      try:
        self._join()
        self._mngr.wait_until_finished()
      finally:
        self._mngr.close()
        self._mngr = None
