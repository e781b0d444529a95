"""Block diffusion (BD3-LM) at the README's scale (configs/quickstart.py's model): blocks of 16 tokens, generated left
to right with a K/V cache of the clean blocks and the first-hitting sampler inside each block.

  dlm-train --config configs/bd3_quickstart.py --workdir runs/bd3
  dlm-eval --workdir runs/bd3                   NELBO (bits per token), comparable with the masked and AR presets
  dlm-eval --workdir runs/bd3 --clip_search     the noise interval (t_min, t_max) with the lowest loss variance
  dlm-sample --workdir runs/bd3 --num_samples 4 --output s.jsonl [--config.sampler.block.stop_at_eos=true]
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
  c.diffusion.process = "block"
  c.diffusion.block_size = 16
  return c
