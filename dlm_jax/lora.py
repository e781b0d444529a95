"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685).

A targeted weight W of every block is used as W + (alpha / rank) A B, with W frozen and only A [in, rank] and
B [rank, out] trained; W's input dimensions (the ones `model.dense` contracts) are flattened into `in`, its output
dimensions into `out`. A is random and B zero at the start, so the adapted model starts exactly as the base.

The adapters are a params-shaped tree of their own, {'layer_i' | 'layers': {weight name: {'a', 'b'}}}, whose abstract
arrays and logical axes come from `adapter_run`: the loop's train state, optimizer, EMA and checkpoints then hold
only them (`train._trainable`), the base travels as a frozen pytree, and the model runs on `merge(base, adapter)`
(`Adapted`, the `Network` the objective and the samplers see). In the scanned layout (`model.scan_layers`) the
adapters keep the leading "layers" axis, so checkpoints convert between layouts like the model's parameters.

Training merges the adapters into the targeted weights inside the step (one [in, rank] x [rank, out] product per
weight): the forward is the base model's, unchanged, at the memory of one extra copy of the targeted weights and
their gradients; the optimizer state is the adapters' only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from dlm_jax import model as model_lib

# lora.targets name -> (the Block parameter, how many of its leading dimensions are inputs, as model.dense uses it)
TARGETS = {"q": ("wq", 1), "k": ("wk", 1), "v": ("wv", 1), "o": ("wo", 2), "gate": ("w_gate", 1),
           "up": ("w_up", 1), "down": ("w_down", 1)}


def scale(lora_cfg) -> float:
  """The factor of the update A B: lora.alpha / lora.rank."""
  return float(lora_cfg.alpha) / int(lora_cfg.rank)


def targets(lora_cfg) -> tuple[str, ...]:
  """The Block parameter names lora.targets selects (validated by `config.validate`)."""
  return tuple(TARGETS[name.strip()][0] for name in lora_cfg.targets.split(","))


def _is_layer(key: str) -> bool:
  return key == "layers" or key.startswith("layer_")


def adapter_run(run):
  """A copy of `run` (a `build.Run`) whose abstract_params / param_axes are the adapters': for each targeted weight W
  of every block (`lora.targets`), 'a' [in, rank] and 'b' [rank, out] in the run's parameter dtype. 'a' shards its
  input like W's first input dimension, 'b' its output like W's first output dimension, the rank is replicated; the
  scanned layout keeps the leading "layers" axis."""
  rank, names = int(run.cfg.lora.rank), targets(run.cfg.lora)
  dtype = jax.tree.leaves(run.abstract_params)[0].dtype
  n_in = dict(TARGETS.values())
  abstract, axes = {}, {}
  for layer, weights in run.param_axes.items():
    if not _is_layer(layer):
      continue
    lead = 1 if layer == "layers" else 0
    abstract[layer], axes[layer] = {}, {}
    for name in names:
      shape, logical = weights[name]
      k = lead + n_in[name]
      fan_in, fan_out = math.prod(shape[lead:k]), math.prod(shape[k:])
      a_shape, b_shape = (*shape[:lead], fan_in, rank), (*shape[:lead], rank, fan_out)
      axes[layer][name] = {"a": (a_shape, (*logical[:lead], logical[lead], None)),
                           "b": (b_shape, (*logical[:lead], None, logical[k]))}
      abstract[layer][name] = {"a": jax.ShapeDtypeStruct(a_shape, dtype), "b": jax.ShapeDtypeStruct(b_shape, dtype)}
  return dataclasses.replace(run, abstract_params=abstract, param_axes=axes)


def init_adapter(space_run, seed: int) -> dict:
  """The initial adapters of `space_run` (an `adapter_run`), created directly with its shardings: A ~ N(0, 1 / in)
  (the fan-in scale of a linear layer; Hu et al. 2021 draw A from a Gaussian) and B = 0, so `merge(base, adapters)`
  is the base exactly. Each layer's and weight's draws depend only on the seed, the weight and the layer index: the
  same seed gives the same adapters in both layer layouts."""
  abstract = space_run.abstract_params
  order = [weight for weight, _ in TARGETS.values()]

  def make():
    key = jax.random.PRNGKey(seed)
    out = {}
    for layer, weights in abstract.items():
      out[layer] = {}
      for name, ab in weights.items():
        a, b = ab["a"], ab["b"]
        k = jax.random.fold_in(key, order.index(name))
        draw = lambda i, shape: jax.random.normal(jax.random.fold_in(k, i), shape, jnp.float32)
        if layer == "layers":
          value = jax.vmap(lambda i: draw(i, a.shape[1:]))(jnp.arange(a.shape[0]))
        else:
          value = draw(int(layer.removeprefix("layer_")), a.shape)
        out[layer][name] = {"a": (value * a.shape[-2] ** -0.5).astype(a.dtype), "b": jnp.zeros(b.shape, b.dtype)}
    return out

  return jax.jit(make, out_shardings=space_run.param_shardings)()


def merge(base: dict, adapter: dict, scale: float) -> dict:
  """The base parameters with every adapted weight W replaced by W + scale * (A @ B) (reshaped to W's shape),
  computed in float32 and cast to W's dtype; every other entry is the base's own array. Pure and jit-able."""
  out = dict(base)
  for layer, weights in adapter.items():
    merged = dict(base[layer])
    for name, ab in weights.items():
      w = base[layer][name]
      delta = jnp.matmul(ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
      merged[name] = (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)
    out[layer] = merged
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class Adapted(model_lib.Network):
  """The model adapted around a frozen base: its `params` are the adapters, the forward runs on
  `merge(base, params, scale)`. The input table is the base's (embeddings are never adapted). The sampler-facing
  forwards merge once per logits function, not per call."""
  base: Any = dataclasses.field(default=None, kw_only=True)
  scale: float = dataclasses.field(default=1.0, kw_only=True)

  def _model(self) -> model_lib.Network:
    return model_lib.Network(self.graphdef, self.logit_shift)

  def __call__(self, params: dict, tokens, **kwargs):
    return super().__call__(merge(self.base, params, self.scale), tokens, **kwargs)

  def input_table(self, params: dict) -> jax.Array:
    return super().input_table(self.base)

  def logits_fn(self, params: dict, *, time_conditioned: bool = False, block_size: int | None = None):
    return self._model().logits_fn(merge(self.base, params, self.scale), time_conditioned=time_conditioned,
                                   block_size=block_size)

  def cached_logits_fn(self, params: dict, *, time_conditioned: bool = False, block_size: int | None = None):
    # the K/V cache's shapes are read from the (merged) parameters (`model.empty_cache`)
    return self._model().cached_logits_fn(merge(self.base, params, self.scale), time_conditioned=time_conditioned,
                                          block_size=block_size)
