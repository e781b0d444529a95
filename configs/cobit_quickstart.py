"""Bitstream diffusion (CoBit): tokens as 9-bit strings, EDM noise, a per-bit head, the entropy-rate schedule and
the entropy-gated churn sampler, at the README's scale (dlm_jax/processes/bitstream.py).

  dlm-train --config configs/cobit_quickstart.py --workdir runs/cobit
  dlm-eval --workdir runs/cobit        ODE likelihood bound (bits per token), comparable with the other presets
  dlm-sample --workdir runs/cobit --num_samples 4 --output s.jsonl --show
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
  c.diffusion.process = "bitstream"
  c.diffusion.bound_steps = 32  # Heun steps of the ODE bound during training evals (dlm-eval may raise it)
  c.eval.max_batches = 2
  return c
