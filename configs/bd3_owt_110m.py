"""BD3-LM on OpenWebText at GPT-2-small size (~110M with embeddings): the recipe of Arriola et al. 2025, "Block
Diffusion: Interpolating Between Autoregressive and Diffusion Language Models" (kuleshov-group/bd3lms,
configs/config.yaml + configs/model/small.yaml + configs/algo/bd3lm.yaml), which reuses MDLM's training setup:
  12 blocks, hidden 768, 12 heads, L 1024, block size 16 (the paper's OWT table: 4 / 8 / 16); GPT-2 tokenizer
  global batch 512; AdamW lr 3e-4, betas (0.9, 0.999), weight decay 0; grad clip 1.0; constant lr after 2500 warmup
  steps; EMA 0.9999; the clipped noise interval found by the variance search (`dlm-eval --clip_search`, then resume
  with diffusion.t_min / t_max; the full interval here).
The trunk runs over [x_t | x_0] (2L = 2048 tokens) under the BD3 mask (splash visits ~31% of the 128-tiles).

Sized for a v5e-32 slice (v5e:4x8, 32 chips; batch 512 = 16 sequences of 2L per chip in 2 micro-batches
(grad_accum_steps 2, from configs/mdlm_owt_110m.py), FSDP over all chips):
  dlm-compile --config configs/bd3_owt_110m.py --topology v5e:4x8

Tokenizer: as configs/mdlm_owt_110m.py (data.tokenizer = the path of GPT-2's tokenizer.json, which you provide).
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mdlm_owt_110m.py"))
  c.diffusion.process = "block"
  c.diffusion.block_size = 16
  c.diffusion.schedule = "linear"
  c.sampler.first_hitting.top_p = 0.9  # BD3-LM's nucleus
  return c
