"""Diffusion processes (families), each registered in `dlm_jax.registry` by its module. `make_process(cfg, vocab_size)`
picks one by `diffusion.process`.

  masked          absorbing-state (MDLM / MD4 / LLaDA)            processes/masked.py
  block           block diffusion (BD3-LM; block size 1 = AR)      processes/block.py
  flow            one-hot rectified flow (FLM)                     processes/flow.py
  embedding_flow  VP diffusion over normalised embeddings (LangFlow) processes/embedding_flow.py
  bitstream       VE diffusion over bit strings (CoBit)            processes/bitstream.py
"""

from dlm_jax import registry
from dlm_jax.errors import DLMError
from dlm_jax.processes.base import Process
# registration order = the order names are listed in (importing a module registers its family)
from dlm_jax.processes.masked import MaskedDiffusion  # isort: skip
from dlm_jax.processes.block import BlockDiffusion  # isort: skip
from dlm_jax.processes.flow import OneHotFlow  # isort: skip
from dlm_jax.processes.embedding_flow import EmbeddingFlow  # isort: skip
from dlm_jax.processes.bitstream import Bitstream  # isort: skip


def config_vocab(cfg, vocab_size: int) -> dict:
  """The vocabulary a config fixes (converted checkpoints): `model.vocab_size` > 0 -> vocab_in = vocab_out = it,
  `diffusion.mask_id` >= 0 -> mask_id; {} = the family's convention."""
  vocab = {}
  if cfg.model.vocab_size:
    if vocab_size > cfg.model.vocab_size:
      raise DLMError(f"the tokenizer has {vocab_size} ids but model.vocab_size is {cfg.model.vocab_size}; use the "
                     "checkpoint's own tokenizer (data.tokenizer) or raise model.vocab_size")
    vocab.update(vocab_in=cfg.model.vocab_size, vocab_out=cfg.model.vocab_size)
  if cfg.diffusion.mask_id >= 0:
    vocab["mask_id"] = cfg.diffusion.mask_id
  return vocab


def make_process(cfg, vocab_size: int, **vocab) -> Process:
  """The process of `diffusion.process` for a tokenizer of `vocab_size` tokens. The vocabulary (mask_id, vocab_in,
  vocab_out) is the family's convention unless the config fixes it (`config_vocab`); `vocab` overrides both."""
  families = registry.processes()
  name = cfg.diffusion.process
  if name not in families:
    raise DLMError(f"diffusion.process {name!r} is not one of {sorted(families)}")
  return families[name].from_config(cfg, vocab_size, **{**config_vocab(cfg, vocab_size), **vocab})


__all__ = ["Process", "MaskedDiffusion", "BlockDiffusion", "OneHotFlow", "EmbeddingFlow", "Bitstream", "make_process"]
