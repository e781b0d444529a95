"""The autoregressive baseline at configs/small.py's scale (~85M trunk, L = 1024): the scorer for generative
perplexity on a real corpus and the AR row of every likelihood table (block diffusion with block size 1)."""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "small.py"))
  c.diffusion.process = "block"
  c.diffusion.block_size = 1
  c.sampler.first_hitting.top_p = 0.95
  return c
