"""Embedding flow (LangFlow): VP diffusion over normalised embeddings, self-conditioning, the learned Gumbel
schedule and the DDIM sampler in float64, at the README's scale (dlm_jax/processes/embedding_flow.py).

  dlm-train --config configs/langflow_quickstart.py --workdir runs/langflow
  dlm-eval --workdir runs/langflow        ODE likelihood bound (bits per token), comparable with the other presets
  dlm-sample --workdir runs/langflow --num_samples 4 --output s.jsonl --show
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
  c.diffusion.process = "embedding_flow"
  c.diffusion.bound_steps = 32  # Heun steps of the ODE bound during training evals (dlm-eval may raise it)
  c.eval.max_batches = 2
  return c
