"""The process interface: everything the training loop, the evaluator and `dlm-sample` ask of a diffusion family.

A process is a frozen dataclass (hashable, so it is static under jit) of pure functions of arrays, registered with
`dlm_jax.registry.register_process`. Callers never test a process's name: what differs between families is asked of
the process (`Process` below), and optional capabilities are declared in `capabilities`:

  "exact_nll"    `causal_nll(net, params, batch) -> [B, L]`, the exact -log p(x_i | x_<i) (an autoregressive model):
                 `dlm-eval --score_samples` scores samples with it
  "clip_search"  `per_block_loss(net, params, batch, key, t_min, t_max) -> ([B, n], masked fraction)`, the training
                 estimator per block on a given noise interval: `dlm-eval --clip_search` (BD3-LM)
  "infilling"    sampling canvases may hold masks between fixed tokens (`<|mask:N|>` templates)
  "conditional"  `bound` reads the batch fields 'target' and 'strata' (below): the bound on -log p(targets | the
                 other tokens), the estimate lm-eval's loglikelihood requests need (`evaluate.conditional_nll`)

`net` is the model's adapter (`Network` below, built by `dlm_jax.model.make_apply`): the pure forward plus the few
things a family needs from the network besides its outputs (its input table; the sampler-facing forwards). Processes
never read parameter names or build model forwards themselves.

`batch` is a dict with 'tokens' [B, L] int32 and optionally 'segment_ids' [B, L] (packed documents). The loop passes
any further field of its batches (a post-training objective's loss mask, ...) to its objective; a family's own `loss`
reads only these two. A "conditional" family's `bound` also reads 'target' [B, L] bool (the tokens whose likelihood
is bounded; the others are held clean as the condition, or are padding in their own segment) and 'strata' [B] in
[0, 1) (the row's draw of the noise level, so that a caller can stratify the copies of one sequence; default: drawn
stratified over the batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol

import jax
import jax.numpy as jnp

from dlm_jax import registry
from dlm_jax.errors import DLMError
from dlm_jax.maths import shift_logits


class Network(Protocol):
  """The model as the processes see it. `logit_shift`: its logits at position i - 1 predict token i (Dream,
  Fast-dLLM v2); the absorbing families' losses and bounds shift them (`maths.shift_logits`) and their sampling_net
  tells the samplers (`SamplingNet.logit_shift`)."""

  logit_shift: bool

  def __call__(self, params, tokens, **kwargs) -> jax.Array:
    """The pure forward: logits (or (logits, cache)) for token ids, `embeddings=`, or `bits=` inputs."""

  def input_table(self, params) -> jax.Array:
    """[vocab_in, d_model] float32: the token embedding table (one-hot flow and embedding flow use it as E)."""

  def logits_fn(self, params, *, time_conditioned: bool = False, block_size: Optional[int] = None) -> Callable:
    """(tokens [B, L], t [B]) -> logits over a left-padded canvas (PAD never attended)."""

  def cached_logits_fn(self, params, *, time_conditioned: bool = False, block_size: Optional[int] = None) -> Callable:
    """(window, t, start, cache) -> (logits, cache): the K/V-cached forward."""


class Process(Protocol):
  name: str
  vocab_size: int  # the tokenizer's vocabulary

  CONFIG_KEYS: tuple[str, ...]  # the diffusion.* keys the family reads (any other must stay at its default)
  DEFAULT_SAMPLER: str  # the sampler sampler.name='' means
  capabilities: frozenset  # optional capabilities (module docstring)

  @classmethod
  def from_config(cls, cfg, vocab_size: int, **vocab) -> "Process":
    """The process for a validated config; `vocab` (mask_id, vocab_in, vocab_out) overrides the family's
    vocabulary convention (checkpoints whose mask id lies inside the vocabulary: LLaDA, Dream)."""

  @classmethod
  def check_config(cls, cfg) -> None:
    """Raises DLMError (one line, naming the key and the fix) for a bad value of the family's keys."""

  @classmethod
  def decode_block_size(cls, cfg) -> Optional[int]:
    """Block diffusion's block size (generation goes block by block); None for families that decode at once."""

  @property
  def mask_id(self) -> int: ...  # the id that marks free positions of sampling canvases

  @property
  def vocab_in(self) -> int: ...  # rows of the model's input table

  @property
  def vocab_out(self) -> int: ...  # the model's output classes

  @property
  def time_conditioned(self) -> bool: ...

  @property
  def model_options(self) -> dict: ...  # ModelConfig fields the family fixes (time conditioning, bit input, ...)

  @classmethod
  def samplers(cls) -> tuple[str, ...]: ...  # the registered samplers serving this family

  def init_state(self, key: jax.Array) -> Any: ...  # non-gradient state (learned schedules), saved in checkpoints

  def loss(self, net: Network, params, batch: dict, key: jax.Array, state) -> tuple[jax.Array, dict, Any]:
    """(loss, metrics, new state): the training objective for one batch, corruption included (in jit)."""

  def bound(self, net: Network, params, batch: dict, key: jax.Array, state) -> tuple[jax.Array, jax.Array]:
    """(nats [B], tokens [B]): an upper bound on -log p(x) per sequence (the exact NLL for an AR model)."""

  def sampling_net(self, net: Network, params, state, canvas: jax.Array, steps: int) -> registry.SamplingNet:
    """The family's side of sampling (in jit): its network as the samplers' logits function(s) for `canvas` and the
    family-specific sampler inputs for a budget of `steps` steps. `dlm_jax.samplers.run_sampler` does the rest."""

  def describe(self) -> dict:
    """Fields that identify the model in dlm-eval / dlm-sample records (e.g. block_size)."""


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The vocabulary fields every process has: the tokenizer's `vocab_size` and, as keyword-only constructor arguments,
  the canvas mask id and the model's input / output sizes (None = the family's convention: `default_vocab`)."""

  mask_id: Optional[int] = dataclasses.field(default=None, kw_only=True)
  vocab_in: Optional[int] = dataclasses.field(default=None, kw_only=True)
  vocab_out: Optional[int] = dataclasses.field(default=None, kw_only=True)

  capabilities = frozenset()
  DEFAULT_SAMPLER = ""
  CONFIG_KEYS = ()

  def default_vocab(self) -> dict:
    raise NotImplementedError

  def __post_init__(self):
    for key, value in self.default_vocab().items():
      if getattr(self, key) is None:
        object.__setattr__(self, key, value)
    if self.mask_id < 0:
      raise DLMError(f"the mask id must be >= 0, got {self.mask_id}")

  @classmethod
  def samplers(cls) -> tuple[str, ...]:
    return registry.samplers_of(cls.__dataclass_fields__["name"].default)

  @classmethod
  def check_config(cls, cfg) -> None:
    del cfg

  @classmethod
  def decode_block_size(cls, cfg) -> Optional[int]:
    del cfg
    return None

  def init_state(self, key):
    del key
    return {}

  def describe(self) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class AbsorbingVocab(Vocab):
  """The mask-token (absorbing-state) families, masked and block diffusion. Default vocabulary: the tokenizer's
  `vocab_size` tokens plus one mask id (= vocab_size) on input, the tokens alone on output. A checkpoint whose mask id
  lies inside its vocabulary (LLaDA, Dream) passes mask_id, vocab_in = vocab_out = its vocabulary.


  `suppress_mask` (config `diffusion.suppress_mask_logit`): when the mask id is also an output class, its logit is
  -inf in the losses, bounds and samplers (SUBS); False keeps it in the softmax, as the reference code of LLaDA / Dream
  / Fast-dLLM v2 / SDAR does (their converted workdirs set it, so our numbers are those of the reference model)."""

  suppress_mask: bool = dataclasses.field(default=True, kw_only=True)

  capabilities = frozenset({"infilling"})
  model_options = {}  # the network takes token ids, the mask id among them

  def default_vocab(self) -> dict:
    return {"mask_id": self.vocab_size, "vocab_in": self.vocab_size + 1, "vocab_out": self.vocab_size}

  def __post_init__(self):
    super().__post_init__()
    if self.mask_id >= self.vocab_in:
      raise DLMError(f"the mask id {self.mask_id} is outside the model's input vocabulary of {self.vocab_in} ids")

  def predictions(self, net, logits: jax.Array) -> jax.Array:
    """The network's logits [B, L, V] as the prediction of each position: shifted when the network predicts token i
    at position i - 1 (`net.logit_shift`), the mask class at -inf when it is an output class and `suppress_mask`."""
    if getattr(net, "logit_shift", False):
      logits = shift_logits(logits)
    if self.suppress_mask and self.mask_id < logits.shape[-1]:
      logits = logits.at[..., self.mask_id].set(-jnp.inf)
    return logits


def network_layout(batch: dict) -> dict:
  """The network keywords of a training / evaluation batch (packing segment ids when present)."""
  seg = batch.get("segment_ids")
  return {} if seg is None else {"segment_ids": seg}


def bound_targets(batch) -> tuple[jax.Array, jax.Array]:
  """(target [B, L] bool, number of targets per row [B] float32): batch['target'], or every token."""
  x = batch["tokens"]
  target = batch.get("target")
  target = jnp.ones(x.shape, bool) if target is None else target.astype(bool)
  return target, jnp.sum(target, axis=-1).astype(jnp.float32)


def choose_masked(key, target: jax.Array, n: jax.Array, u: jax.Array) -> jax.Array:
  """[..., L] bool: m = floor(u n) + 1 of the `target` positions of each row (n of them, u in [0, 1)), chosen
  uniformly; rows without targets mask nothing."""
  m = jnp.clip(jnp.floor(u * n).astype(jnp.int32) + 1, 1, jnp.maximum(n.astype(jnp.int32), 1))
  r = jnp.where(target, jax.random.uniform(key, target.shape), 2.0)  # non-targets rank last
  ranks = jnp.argsort(jnp.argsort(r, axis=-1), axis=-1)
  return (ranks < m[..., None]) & target
