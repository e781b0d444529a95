"""The autoregressive baseline at the README's scale (configs/quickstart.py's model): block diffusion with block size
1, i.e. every token masked and the exact causal NLL, trained by the same loop as every diffusion family.

  dlm-train --config configs/ar_quickstart.py --workdir runs/ar
  dlm-eval --workdir runs/ar                                   exact NLL (bits per token) on the validation split
  dlm-sample --workdir runs/ar --num_samples 4 --output s.jsonl  KV-cached left-to-right decoding
  dlm-eval --workdir runs/ar --score_samples OTHER.jsonl         generative perplexity of any model's samples
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
  c.diffusion.process = "block"
  c.diffusion.block_size = 1
  c.sampler.first_hitting.top_p = 0.95  # nucleus sampling for the decoder (sampler.temperature / top_k / top_p)
  return c
