"""Meshes and logical axis rules (MaxText style).

Parameters carry logical axis names in their metadata (`logical_axes`), activations are constrained with `constrain()`.
`RULES` maps logical names onto the mesh axes ("data", "fsdp", "tensor"); a dimension that a mesh axis does not divide is
replicated instead of failing, so small models run on any mesh.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlm_jax.errors import DLMError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "vocab": "tensor",
    "cond": None,
    "layers": None,  # the stacked layer axis of model.scan_layers (scanned over, never sharded)
}


def make_mesh(cfg_mesh, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices; -1 entries take whatever devices remain."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  sizes = [cfg_mesh.data, cfg_mesh.fsdp, cfg_mesh.tensor]
  fixed = math.prod(s for s in sizes if s != -1)
  fills = sizes.count(-1)
  if fills > 1:
    raise DLMError("at most one of mesh.data / mesh.fsdp / mesh.tensor may be -1")
  if fills == 1:
    if n % fixed:
      raise DLMError(f"{n} devices cannot be split into a mesh with fixed axes of total size {fixed}; change mesh.*")
    sizes = [n // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise DLMError(f"mesh data x fsdp x tensor = {sizes} uses {math.prod(sizes)} devices but {n} exist; "
                   "set one of mesh.data / mesh.fsdp / mesh.tensor to -1")
  return Mesh(np.array(devices).reshape(sizes), MESH_AXES)


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


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical axis names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, spec_for(logical_axes, x.shape, mesh))
