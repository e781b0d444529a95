"""Everything a run needs, built from a config: tokenizer, process, model definition, mesh and shardings.

`dlm-train`, `dlm-eval`, `dlm-sample`, the benchmarks and the tests all start here, so they agree on shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlm_jax import model as model_lib
from dlm_jax import sharding as sharding_lib
from dlm_jax.data import Tokenizer, make_tokenizer
from dlm_jax.errors import DLMError
from dlm_jax.processes import Process, make_process


@dataclasses.dataclass
class Run:
  cfg: Any
  tokenizer: Tokenizer
  process: Process
  model_config: model_lib.ModelConfig
  graphdef: Any
  abstract_params: Any
  param_axes: Any
  mesh: Mesh

  @functools.cached_property
  def apply_fn(self):
    return model_lib.make_apply(self.graphdef, self.model_config.logit_shift)

  @functools.cached_property
  def param_shardings(self):
    return sharding_lib.param_shardings(self.param_axes, self.mesh)

  @property
  def batch_shards(self) -> int:
    """How many ways a batch is split: the mesh's data x fsdp axes."""
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def batch_sharding(self, ndim: int = 2) -> NamedSharding:
    return sharding_lib.batch_sharding(self.mesh, ndim)

  def jitted(self, name: str, fn):
    """`jax.jit(fn)`, compiled once per Run and name (the loop calls eval and sampling repeatedly)."""
    cache = self.__dict__.setdefault("_jit_cache", {})
    if name not in cache:
      cache[name] = jax.jit(fn)
    return cache[name]


def build(cfg, devices=None) -> Run:
  d = cfg.data
  tokenizer = make_tokenizer(d.tokenizer, d.eos_token, eos_id=d.eos_id, eot_id=d.eot_id, pad_id=d.pad_id,
                             vocab_size=cfg.model.vocab_size)
  process = make_process(cfg, tokenizer.vocab_size)
  devices = list(devices if devices is not None else jax.devices())
  try:
    mc = model_lib.ModelConfig.from_config(cfg, process.vocab_in, process.vocab_out, platform=devices[0].platform,
                                           **process.model_options)
  except ValueError as e:  # the model's own consistency checks (tied embeddings, attention kernel vs platform)
    if "model.attention" in str(e) or "model.head_dim" in str(e):
      raise DLMError(str(e)) from None
    raise DLMError(f"model.tie_embeddings with diffusion.process={cfg.diffusion.process!r}: {e}; set "
                   "model.vocab_size (a checkpoint's vocabulary) or model.tie_embeddings=False") from None
  graphdef, abstract_params, axes = model_lib.abstract(mc)
  dtype = param_dtype(cfg)  # master weights in train.param_dtype: restore targets and shardings carry it
  abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), abstract_params)
  mesh = sharding_lib.make_mesh(cfg.mesh, devices)
  return Run(cfg, tokenizer, process, mc, graphdef, abstract_params, axes, mesh)


def param_dtype(cfg):
  """The dtype of the master weights (and the EMA): train.param_dtype."""
  return jnp.dtype(cfg.train.param_dtype)


def init_params(run: Run, seed: int):
  """Parameters created directly with their shardings (no full copy on one device first), in train.param_dtype (the
  model initialises them in float32; bfloat16 ones are those values rounded)."""
  dtype = param_dtype(run.cfg)

  def make():
    return jax.tree.map(lambda p: p.astype(dtype), model_lib.init(run.model_config, seed)[1])

  return jax.jit(make, out_shardings=run.param_shardings)()
