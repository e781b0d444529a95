"""The Orbax adapter: the only module that talks to orbax-checkpoint.

A checkpoint is one step directory under `<workdir>/checkpoints/` with three items: `state` (params, optimizer state,
EMA, step, process state), `data` (the grain iterator state, JSON) and `config` (the run's config, JSON). Orbax writes to
a temporary directory and renames it when complete, so an interrupted save never leaves a half-written step; saves are
asynchronous and the last `keep` steps are kept. Restores take abstract arrays with shardings, so a checkpoint restores
onto any mesh, and in either layer layout (model.scan_layers): a checkpoint saved with the other layout is read in its
own and converted (`dlm_jax.model.stack_layers` / `unstack_layers`) into the target's shardings.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dlm_jax.errors import DLMError

for _name in ("absl", "orbax"):
  logging.getLogger(_name).setLevel(logging.ERROR)


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


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
  """save / restore / latest_step over an Orbax CheckpointManager."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    if read_only and not os.path.isdir(self.directory):
      self._mngr = None
      return
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=not read_only, read_only=read_only))

  def latest_step(self) -> int | None:
    return None if self._mngr is None else self._mngr.latest_step()

  def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
    """Starts an asynchronous save of one step (`wait()` blocks until it is on disk)."""
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   data=ocp.args.JsonSave(data_state),
                                                   config=ocp.args.JsonSave(config)), force=True)

  def wait(self) -> None:
    if self._mngr is not None:
      self._mngr.wait_until_finished()

  def _fail(self, step: int, what: str, e: Exception) -> DLMError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if "do not match" in first or "shape" in first.lower():
      return DLMError(f"checkpoint step {step} in {self.directory} does not match this run's model or optimizer "
                      f"({what}: {first}); use the config it was trained with, or a new --workdir")
    return DLMError(f"checkpoint step {step} in {self.directory} is unreadable or corrupt ({what}: {first}); "
                    f"move that step directory away to resume from an earlier one, or use a new --workdir")

  def restore_config(self, step: int) -> dict:
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:  # orbax raises many exception types for unreadable files
      raise self._fail(step, "config", e) from None

  def _state_tree(self, step: int) -> dict:
    try:
      meta = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
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
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                              data=ocp.args.JsonRestore()))
    except Exception as e:
      raise self._fail(step, "state", e) from None
    state = _to_layout(out["state"], abstract_state, wanted) if saved else out["state"]
    return state, out["data"]

  def restore_subset(self, step: int, abstract_subset: dict) -> dict:
    """Only some top-level entries of the saved state (e.g. the EMA parameters for inference), read from disk
    without materialising the rest (the optimizer state is not loaded)."""
    saved, wanted = self._layouts(step, abstract_subset)
    target = _in_layout(abstract_subset, saved) if saved else abstract_subset
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          target, restore_args=restore_args, partial_restore=True)))
    except Exception as e:
      raise self._fail(step, "state", e) from None
    return _to_layout(out["state"], abstract_subset, wanted) if saved else out["state"]

  def close(self) -> None:
    if self._mngr is not None:
      self._mngr.wait_until_finished()
      self._mngr.close()
