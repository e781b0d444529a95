"""FLM (one-hot flow matching: rectified flow over one-hot vectors, the Euler ODE sampler; dlm_jax/processes/flow.py)
on the OWT recipe of MDLM (kuleshov-group/mdlm) for everything that is not the family's: 12 layers, d 768, 12 heads,
L 1024, batch 512, AdamW lr 3e-4 with 2500 warmup steps then constant, grad clip 1, EMA 0.9999, GPT-2 tokenizer.

Sized for a v5e-16 slice (v5e:4x4, 16 chips; batch 512 = 32 sequences per chip in 4 micro-batches of 8 (16 at once
need 16.8 GiB: the one-hot input and its V x d projection), data parallel over all chips, as configs/mdlm_owt_110m.py):
  dlm-compile --config configs/flow_owt_110m.py --topology v5e:4x4

Tokenizer: as configs/mdlm_owt_110m.py (data.tokenizer = the path of GPT-2's tokenizer.json, which you provide).
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mdlm_owt_110m.py"))
  c.diffusion.process = "flow"
  c.diffusion.schedule = "linear"
  c.diffusion.bound_steps = 32
  c.train.grad_accum_steps = 4  # 8 sequences per chip per micro-batch on v5e:4x4
  return c
