"""Diffusion processes (families). `make_process(cfg, vocab_size)` picks one by `diffusion.process`.

  masked          absorbing-state (MDLM / MD4 / LLaDA)            processes/masked.py
  block           block diffusion (BD3-LM; block size 1 = AR)      processes/block.py
  flow            one-hot rectified flow (FLM)                     processes/flow.py
  embedding_flow  VP diffusion over normalised embeddings (LangFlow) processes/embedding_flow.py
  bitstream       VE diffusion over bit strings (CoBit)            processes/bitstream.py
"""

from dlm_jax.errors import DLMError
from dlm_jax.processes.base import Process
from dlm_jax.processes.bitstream import Bitstream
from dlm_jax.processes.block import BlockDiffusion
from dlm_jax.processes.embedding_flow import EmbeddingFlow
from dlm_jax.processes.flow import OneHotFlow
from dlm_jax.processes.masked import MaskedDiffusion
from dlm_jax.processes.schedules import Schedule

PROCESSES = {"masked": MaskedDiffusion, "block": BlockDiffusion, "flow": OneHotFlow, "embedding_flow": EmbeddingFlow,
             "bitstream": Bitstream}
CONTINUOUS = ("flow", "embedding_flow", "bitstream")


def make_process(cfg, vocab_size: int) -> Process:
  name = cfg.diffusion.process
  if name not in PROCESSES:
    raise DLMError(f"diffusion.process {name!r} is not one of {sorted(PROCESSES)}")
  return PROCESSES[name].from_config(cfg, vocab_size)


def sampler_name(cfg) -> str:
  """The sampler a config selects: sampler.name, or the family's default when it is ''."""
  return cfg.sampler.name or PROCESSES[cfg.diffusion.process].DEFAULT_SAMPLER


def sampler_precision(cfg) -> str:
  """sampler.precision, or the family's default when it is '' (float64 for embedding_flow, float32 otherwise)."""
  return cfg.sampler.precision or PROCESSES[cfg.diffusion.process].DEFAULT_PRECISION


__all__ = ["Process", "MaskedDiffusion", "BlockDiffusion", "OneHotFlow", "EmbeddingFlow", "Bitstream", "Schedule",
           "make_process", "sampler_name", "sampler_precision", "PROCESSES", "CONTINUOUS"]
