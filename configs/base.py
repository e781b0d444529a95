"""Base preset (~300M trunk parameters, MD4 "medium"-like): configs/small.py with a wider and deeper trunk.

For a TPU pod slice or a GPU node; point data.path at your corpus and data.tokenizer at a tokenizer.json.
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "small.py"))
  c.model.num_layers = 24
  c.model.d_model = 1024
  c.model.num_heads = 16
  c.model.mlp_dim = 2816
  return c
