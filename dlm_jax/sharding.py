"""Meshes and logical axis rules (MaxText style).

Parameters carry logical axis names in their metadata (`logical_axes`), activations are constrained with `constrain()`.
`RULES` maps logical names onto the mesh axes; a dimension that a mesh axis does not divide is replicated instead of
failing, so small models run on any mesh.

Mesh axes, outermost first (the last ones get the closest ICI neighbours):
  data      data parallel: the batch is split, parameters replicated. Across slices (`mesh.dcn_data` > 1) its outer
            factor runs over the data-center network (DCN) and the inner one (`mesh.data`) within each slice.
  fsdp      fully sharded data parallel (ZeRO-3): the batch is split and so are parameters and optimizer state (their
            "embed" dimension); each layer's weights are all-gathered when used and their gradients reduce-scattered.
  sequence  context parallelism: activations are split along their length (queries, MLP, logits); attention gathers
            the keys / values over it (each device attends its query shard to the whole sequence, as MaxText's
            context axis does: `activation_q_length` -> context, `activation_kv_length` unsharded). Its devices also
            hold shards of the parameters (like fsdp), since they compute the same weights' gradients.
  tensor    tensor (model) parallelism: attention heads, MLP hidden units and the vocabulary are split.

Multi-slice (MaxText's dcn_*_parallelism; Google Cloud's multislice): `make_mesh` builds the mesh with
`jax.experimental.mesh_utils.create_hybrid_device_mesh`: the per-slice (ICI) shape (mesh.data, fsdp, sequence, tensor)
and the DCN shape (mesh.dcn_data, 1, 1, 1), so only the data axis's gradient all-reduce crosses DCN.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlm_jax.errors import DLMError

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
ICI_KEYS = ("data", "fsdp", "sequence", "tensor")  # mesh.* keys: sizes within one slice (-1 = fill)

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). Parameters and activations share the names;
# an activation [batch, length, embed] takes data / fsdp for its batch and sequence for its length, so its embed
# dimension stays whole (a mesh axis is used once per tensor, first come first served).
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": "sequence",
    "embed": ("fsdp", "sequence"),
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "vocab": "tensor",
    "cond": None,
    "layers": None,  # the stacked layer axis of model.scan_layers (scanned over, never sharded)
}


def _ici_sizes(cfg_mesh, n: int, where: str) -> list[int]:
  """mesh.data / fsdp / sequence / tensor resolved over `n` devices (one -1 takes what the others leave)."""
  sizes = [getattr(cfg_mesh, key, 1) for key in ICI_KEYS]
  keys = " x ".join(f"mesh.{k}" for k in ICI_KEYS)
  fixed = math.prod(s for s in sizes if s != -1)
  fills = sizes.count(-1)
  if fills > 1:
    raise DLMError(f"at most one of {', '.join('mesh.' + k for k in ICI_KEYS)} may be -1, got {sizes}")
  if fills == 1:
    if n % fixed:
      raise DLMError(f"{n} devices{where} cannot be split into a mesh with fixed axes of total size {fixed}; "
                     "change mesh.*")
    sizes = [n // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise DLMError(f"{keys} = {sizes} uses {math.prod(sizes)} devices but {n} exist{where}; set one of them to -1")
  return sizes


def slices_of(devices: Sequence[jax.Device]) -> list[list[jax.Device]]:
  """The devices grouped by slice (TPU devices' `slice_index`; devices without one are one slice), in slice order."""
  groups: dict[int, list] = {}
  for d in devices:
    groups.setdefault(int(getattr(d, "slice_index", 0) or 0), []).append(d)
  return [groups[k] for k in sorted(groups)]


def make_mesh(cfg_mesh, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, sequence, tensor) mesh over all devices.

  mesh.data / fsdp / sequence / tensor are sizes within one slice (-1 = whatever devices remain); mesh.dcn_data is the
  number of slices, data parallel over DCN: the mesh's data axis has size dcn_data x mesh.data, slice-major. Devices
  that span k slices need mesh.dcn_data = k. On one slice, mesh.dcn_data > 1 is an error, except on CPU, where the
  device list is split into dcn_data consecutive groups that stand for slices (the same mesh layout, for tests)."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  dcn = getattr(cfg_mesh, "dcn_data", 1)
  if dcn < 1:
    raise DLMError(f"mesh.dcn_data must be >= 1 (the number of slices), got {dcn}")
  groups = slices_of(devices)
  if len(groups) > 1 and dcn != len(groups):
    raise DLMError(f"the {n} devices span {len(groups)} slices (DCN between them): set mesh.dcn_data={len(groups)} "
                   f"(data parallel across slices), got {dcn}")
  if len(groups) > 1 and len({len(g) for g in groups}) > 1:
    raise DLMError(f"the slices have different numbers of devices ({[len(g) for g in groups]}); use equal slices")
  if len(groups) == 1 and dcn > 1:
    if devices[0].platform != "cpu":
      raise DLMError(f"mesh.dcn_data={dcn} needs devices on {dcn} slices, but the {n} {devices[0].platform} devices "
                     "are one slice; set mesh.dcn_data=1 (or, for dlm-compile, pass --num_slices)")
    if n % dcn:
      raise DLMError(f"mesh.dcn_data={dcn} does not divide the {n} devices; change mesh.dcn_data")
    groups = [devices[i * (n // dcn):(i + 1) * (n // dcn)] for i in range(dcn)]  # CPU: consecutive groups as slices
  per_slice = len(groups[0])
  sizes = _ici_sizes(cfg_mesh, per_slice, " per slice" if dcn > 1 else "")
  if dcn == 1:
    return Mesh(np.array(devices).reshape(sizes), MESH_AXES)
  grid = None
  if devices[0].platform != "cpu":
    try:  # topology-aware placement within each slice (jax.experimental.mesh_utils)
      from jax.experimental import mesh_utils
      grid = mesh_utils.create_hybrid_device_mesh(sizes, [dcn, 1, 1, 1], devices)
    except (ValueError, NotImplementedError, AssertionError):
      grid = None  # a per-slice shape the physical topology cannot take as is: slices' devices in their listed order
  if grid is None:
    grid = np.stack([np.array(g).reshape(sizes) for g in groups]).reshape(dcn * sizes[0], *sizes[1:])
  return Mesh(grid, MESH_AXES)


def spec_for(logical_axes: Sequence[str | None] | None, shape: Sequence[int] | None = None,
             mesh: Mesh | None = None) -> P:
  """PartitionSpec for a tensor with the given logical axes; axes that do not divide the dimension are dropped."""
  if logical_axes is None:
    return P()
  out = []
  used: set[str] = set()
  for i, name in enumerate(logical_axes):
    target = RULES.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    keep = []
    for t in targets:
      if t in used:
        continue
      size = mesh.shape[t] if mesh is not None else 1
      dim = shape[i] if shape is not None else None
      if mesh is not None and size == 1:
        continue
      if dim is not None and mesh is not None and dim % (size * math.prod(mesh.shape[k] for k in keep)):
        continue
      keep.append(t)
    used.update(keep)
    out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
  return P(*out)


def param_shardings(params_meta: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of (shape, logical_axes) pairs (see model.param_axes)."""
  return jax.tree.map(lambda sa: NamedSharding(mesh, spec_for(sa[1], sa[0], mesh)), params_meta,
                      is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def host_batch_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
  """The rows [lo, hi) of the global batch that this process's devices hold under `batch_sharding`.

  Usually process p of P holds the p-th contiguous 1/P of the batch; when a mesh axis that does not split the batch
  (sequence, tensor) spans hosts, several processes hold the same rows and must each load them. Non-contiguous rows
  (a device order that interleaves hosts along the batch axes) are an error."""
  index = batch_sharding(mesh, 1).addressable_devices_indices_map((batch_size,))
  rows = sorted({(sl[0].start or 0, batch_size if sl[0].stop is None else sl[0].stop) for sl in index.values()})
  lo, hi = rows[0][0], rows[0][1]
  for a, b in rows[1:]:
    if a != hi:
      raise DLMError(f"process {jax.process_index()} holds rows {rows} of the global batch, which are not contiguous; "
                     "order the mesh so that each host's devices are adjacent along mesh.data x mesh.fsdp")
    hi = b
  return lo, hi


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical axis names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(logical_axes, x.shape, mesh))
