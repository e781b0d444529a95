"""The process interface: what the one training loop, the evaluator and `dlm-sample` need from a diffusion family.

A process is a frozen dataclass (hashable, so it is static under jit) of pure functions of arrays:

  vocab_in / vocab_out          the model's input and output vocabulary for a tokenizer of `vocab_size` tokens
  time_conditioned              whether the network receives the noise level
  model_options                 what the family fixes about the network (ModelConfig fields: time conditioning, bit
                                input, self-conditioning); {} for the mask-token families
  SAMPLERS, DEFAULT_SAMPLER     (class attributes) the sampler names this family accepts in sampler.name, and the one
                                sampler.name='' means
  init_state(key)               non-gradient state carried by the loop and saved in checkpoints (schedule tables,
                                buffers); {} for families without any
  loss(apply_fn, params, batch, key, state) -> (loss, metrics, new_state)
                                the training objective for one batch, corruption included (runs on device, in jit)
  bound(apply_fn, params, batch, key, state) -> (nats [B], tokens [B])
                                an upper bound on -log p(x) per sequence, for bits-per-token evaluation
  sample(apply_fn, params, key, canvas, sampler_cfg, state, gen_start=0, eos_id=None) -> (tokens, stats)
                                the sampler named by sampler_cfg on a canvas with `mask_id` at free positions, left
                                padding (samplers.PAD) and the generated region starting at gen_start; `key` is one
                                key or one per row. Block diffusion returns rows left-aligned (its blocks count
                                from each row's first token) with PAD after a row that stopped early

`apply_fn(params, tokens_or_inputs, t=..., segment_ids=...)` is the model's pure forward. `batch` is a dict with
'tokens' [B, L] int32 and optionally 'segment_ids' [B, L]. Block diffusion and the continuous families (flow, embedding
flow, bitstream) implement the same methods; the loop never branches on the family.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax

ApplyFn = Callable[..., jax.Array]


class Process(Protocol):
  name: str
  vocab_size: int

  @property
  def vocab_in(self) -> int: ...

  @property
  def vocab_out(self) -> int: ...

  @property
  def time_conditioned(self) -> bool: ...

  @property
  def model_options(self) -> dict: ...

  def init_state(self, key: jax.Array) -> Any: ...

  def loss(self, apply_fn: ApplyFn, params, batch: dict, key: jax.Array, state) -> tuple[jax.Array, dict, Any]: ...

  def bound(self, apply_fn: ApplyFn, params, batch: dict, key: jax.Array, state) -> tuple[jax.Array, jax.Array]: ...

  def sample(self, apply_fn: ApplyFn, params, key: jax.Array, canvas: jax.Array, sampler_cfg, state,
             gen_start: int = 0, eos_id: int | None = None) -> tuple[jax.Array, dict]: ...


class AbsorbingVocab:
  """The vocabulary of the mask-token (absorbing-state) families, masked and block diffusion: the tokenizer's
  `vocab_size` tokens plus one mask id (= vocab_size) on input, the tokens alone on output; no non-gradient state."""

  vocab_size: int

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  @property
  def vocab_in(self) -> int:
    return self.vocab_size + 1

  @property
  def vocab_out(self) -> int:
    return self.vocab_size

  model_options = {}

  def init_state(self, key):
    del key
    return {}
