"""The registries of diffusion families and samplers: names -> implementations, filled by the modules that own them.

Nothing here implements a family or a sampler. A process module registers its class with `@register_process`; a
sampler module registers a `SamplerSpec` (its typed options class, the families it serves, and the function that maps
those options onto its call) with `register_sampler`, next to its code. The config schema (`dlm_jax.config`) and the
drivers read the registries through `processes()` / `samplers()`, which import the two provider packages on first use
(`PROVIDERS`: the only imports this module makes, so the config layer never imports an implementation module itself).

A sampler's options are a frozen dataclass whose fields are its config keys `sampler.<name>.<field>` (types and defaults
from the dataclass); `check(family, block_size)` raises `DLMError` naming the key and the fix. Options shared by several
samplers come from the mixins `Precision`, `Truncation` (top_k, top_p), `Draw` (both) and `Shift` (logit_shift), so
each is declared and checked once.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

from dlm_jax.errors import DLMError

PROVIDERS = ("dlm_jax.processes", "dlm_jax.samplers", "dlm_jax.attention")
PRECISIONS = ("float32", "float64")

_PROCESSES: dict[str, type] = {}
_SAMPLERS: dict[str, "SamplerSpec"] = {}
_FAMILY_OPTIONS: dict[str, type] = {}
_ATTENTION: list[str] = []


def _load() -> None:
  for module in PROVIDERS:
    importlib.import_module(module)


def processes() -> dict[str, type]:
  """{name: process class}, in registration order."""
  _load()
  return dict(_PROCESSES)


def samplers() -> dict[str, "SamplerSpec"]:
  """{name: SamplerSpec}, in registration order."""
  _load()
  return dict(_SAMPLERS)


def family_options() -> dict[str, type]:
  """{family: Options class} of the families whose generation has options of its own (config `sampler.<family>`)."""
  _load()
  return dict(_FAMILY_OPTIONS)


def attention_implementations() -> tuple[str, ...]:
  _load()
  return tuple(_ATTENTION)


def register_attention(names: tuple[str, ...]) -> tuple[str, ...]:
  _ATTENTION.extend(n for n in names if n not in _ATTENTION)
  return names


def register_family_options(family: str, cls: type) -> type:
  """Options of a family's own generation loop (block diffusion's block-by-block decoding), `sampler.<family>.*`."""
  _FAMILY_OPTIONS[family] = cls
  return cls


def register_process(cls: type) -> type:
  """Class decorator: registers a process class under its `name` field's default."""
  name = cls.__dataclass_fields__["name"].default
  if name in _PROCESSES and _PROCESSES[name] is not cls:
    raise ValueError(f"two processes are registered as {name!r}")
  _PROCESSES[name] = cls
  return cls


def register_sampler(spec: "SamplerSpec") -> "SamplerSpec":
  if spec.name in _SAMPLERS and _SAMPLERS[spec.name] is not spec:
    raise ValueError(f"two samplers are registered as {spec.name!r}")
  _SAMPLERS[spec.name] = spec
  return spec


def samplers_of(family: str) -> tuple[str, ...]:
  """The sampler names that serve `family`, in registration order."""
  return tuple(n for n, s in samplers().items() if family in s.families)


# --- what a sampler declares ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
  """Base of every sampler's options. Subclasses add fields (their config keys) and extend `check`."""

  def check(self, key: Callable[[str], str], family: str, block_size: Optional[int]) -> None:
    """Raises DLMError for values out of range. `key(field)` is the field's config key (for the message)."""
    del key, family, block_size

  @classmethod
  def fields(cls) -> dict[str, Any]:
    """{field: default}."""
    return {f.name: f.default for f in dataclasses.fields(cls)}

  def changed(self) -> dict[str, Any]:
    """The fields set to something other than their default."""
    return {k: getattr(self, k) for k, d in self.fields().items() if getattr(self, k) != d}


def need(ok: bool, message: str) -> None:
  if not ok:
    raise DLMError(message)


@dataclasses.dataclass(frozen=True)
class Precision(Options):
  """float64 Gumbel draws / state updates (64-bit JAX is turned on for the sampler) or float32."""
  precision: str = "float32"

  def check(self, key, family, block_size):
    super().check(key, family, block_size)
    need(self.precision in PRECISIONS, f"{key('precision')} must be one of {PRECISIONS}, got {self.precision!r}")


@dataclasses.dataclass(frozen=True)
class Truncation(Options):
  """Top-k and nucleus truncation of the model's token distribution (Holtzman et al. 2020)."""
  top_k: int = 0  # 0 = off; else sample only among the k most likely tokens
  top_p: float = 1.0  # 1 = off; else the smallest set of tokens holding probability top_p

  def check(self, key, family, block_size):
    super().check(key, family, block_size)
    need(self.top_k >= 0, f"{key('top_k')} must be >= 0 (0 = off), got {self.top_k}")
    need(0 < self.top_p <= 1, f"{key('top_p')} must be in (0, 1] (1 = off), got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class Draw(Precision, Truncation):
  """Options of samplers that draw tokens from the model's categorical distribution."""


@dataclasses.dataclass(frozen=True)
class Shift(Options):
  """Logit shift: for models trained to predict token i at position i - 1 (Dream)."""
  logit_shift: bool = False

  def check(self, key, family, block_size):
    super().check(key, family, block_size)
    need(not (self.logit_shift and block_size is not None),
         f"{key('logit_shift')}: block diffusion predicts every position of a block from the block itself (no shifted "
         "head); drop it")


DRAW_FIELDS = ("precision", "top_k", "top_p")


@dataclasses.dataclass
class SamplingNet:
  """What a family hands its samplers (built by `Process.sampling_net` inside jit): the network as the samplers'
  logits function(s), the canvas's mask id, and family-specific inputs.

  logits_fn         masked / block: (tokens [B, L], t [B]) -> logits; continuous: the family's state function
  cached_logits_fn  (window, t, start, cache) -> (logits, cache), or None when the family has no K/V cache
  block_size        block diffusion: generate block by block (1 = autoregressive); None = the whole canvas at once
  arguments         keyword inputs of the family's samplers (a schedule, noise grids, tables, ...)
  logit_shift       the network predicts token i at position i - 1 (Dream, Fast-dLLM v2): the samplers shift its
                    logits (as their own `logit_shift` option does for any logits function)
  suppress_mask     the samplers give the mask class probability 0 (False: keep it in the softmax, as the reference
                    code of checkpoints whose mask id lies inside the output vocabulary does: LLaDA, Dream, ...)
  """
  mask_id: int
  logits_fn: Callable
  cached_logits_fn: Optional[Callable] = None
  block_size: Optional[int] = None
  arguments: dict = dataclasses.field(default_factory=dict)
  logit_shift: bool = False
  suppress_mask: bool = True


@dataclasses.dataclass(frozen=True)
class Shared:
  """The sampler keys every sampler shares (`sampler.steps`, `sampler.temperature`)."""
  steps: int
  temperature: float


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """A sampler as the config and the drivers see it.

  name, families     `sampler.name` and the `diffusion.process` names it serves
  options            its Options dataclass (config section `sampler.<name>`)
  run                (net, options, shared, key, canvas, gen_start, eos_id) -> (tokens, stats)
  summary            one line for the README's sampler table
  uses_steps         options -> whether `sampler.steps` is read (the README table and sample records say when not);
                     steps_note says what sets the number of steps instead (shown in the table)
  greedy             whether temperature 0 (argmax) is allowed
  """
  name: str
  families: tuple[str, ...]
  options: type
  run: Callable
  summary: str
  uses_steps: Callable[[Any], bool] = lambda options: True
  steps_note: str = ""
  greedy: bool = False

  def section(self) -> str:
    return f"sampler.{self.name}"

  def key(self, field: str) -> str:
    return f"sampler.{self.name}.{field}"


def sampler_table() -> str:
  """The README's sampler table (markdown), generated from the registry: `python -m dlm_jax.registry` prints it and a
  test checks the README holds exactly this."""
  defaults = {}
  for family, cls in processes().items():
    defaults.setdefault(cls.DEFAULT_SAMPLER, []).append(family)
  rows = ["| `sampler.name` | families | what | its options (`sampler.<name>.*`) |", "| --- | --- | --- | --- |"]
  for name, spec in samplers().items():
    default = f" (default of {', '.join(defaults[name])})" if name in defaults else ""
    steps = "" if spec.uses_steps(spec.options()) else "; does not read `sampler.steps`" + (
        f" ({spec.steps_note})" if spec.steps_note else "")
    greedy = "; temperature 0 = greedy" if spec.greedy else ""
    options = ", ".join(f"`{k}`={v!r}" for k, v in spec.options.fields().items()) or "-"
    rows.append(f"| `{name}`{default} | {', '.join(spec.families)} | {spec.summary}{steps}{greedy} | {options} |")
  for family, cls in family_options().items():
    options = ", ".join(f"`{k}`={v!r}" for k, v in cls.fields().items())
    rows.append(f"| (`sampler.{family}.*`) | {family} | {cls.__doc__.split(' (sampler.')[0]} | {options} |")
  return "\n".join(rows)


if __name__ == "__main__":  # run as a script this file is `__main__`: the registries live in dlm_jax.registry
  print(importlib.import_module("dlm_jax.registry").sampler_table())
