"""CoBit (bitstream diffusion: tokens as 16-bit strings for GPT-2's 50257 ids, EDM noise sigma 0.002..80, sigma_data
0.5, a per-bit head; dlm_jax/processes/bitstream.py) on the MDLM OWT recipe (kuleshov-group/mdlm): 12 layers, d 768,
12 heads, L 1024, batch 512, AdamW lr 3e-4 with 2500 warmup steps then constant, grad clip 1, EMA 0.9999.

Sized for a v5e-16 slice (v5e:4x4, 16 chips; batch 512 = 32 sequences per chip in 2 micro-batches, data parallel
over all chips, as configs/mdlm_owt_110m.py):
  dlm-compile --config configs/cobit_owt_110m.py --topology v5e:4x4

Tokenizer: as configs/mdlm_owt_110m.py (data.tokenizer = the path of GPT-2's tokenizer.json, which you provide).
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mdlm_owt_110m.py"))
  c.diffusion.process = "bitstream"
  c.diffusion.schedule = "linear"
  c.diffusion.bound_steps = 32
  return c
