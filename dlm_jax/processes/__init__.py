"""Diffusion processes (families). `make_process(cfg, vocab_size)` picks one by `diffusion.process`."""

from dlm_jax.errors import DLMError
from dlm_jax.processes.base import Process
from dlm_jax.processes.block import BlockDiffusion
from dlm_jax.processes.masked import MaskedDiffusion
from dlm_jax.processes.schedules import Schedule

PROCESSES = {"masked": MaskedDiffusion, "block": BlockDiffusion}


def make_process(cfg, vocab_size: int) -> Process:
  name = cfg.diffusion.process
  if name not in PROCESSES:
    raise DLMError(f"diffusion.process {name!r} is not one of {sorted(PROCESSES)}")
  return PROCESSES[name].from_config(cfg, vocab_size)


__all__ = ["Process", "MaskedDiffusion", "BlockDiffusion", "Schedule", "make_process", "PROCESSES"]
