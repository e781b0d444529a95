"""One-hot flow (FLM): rectified flow over one-hot vectors and the Euler ODE sampler, at the
README's scale (configs/quickstart.py's trunk; dlm_jax/processes/flow.py).

  dlm-train --config configs/flow_quickstart.py --workdir runs/flow
  dlm-eval --workdir runs/flow        ODE likelihood bound (bits per token), comparable with the other presets
  dlm-sample --workdir runs/flow --num_samples 4 --output s.jsonl --show
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
  c.diffusion.process = "flow"
  c.diffusion.bound_steps = 32  # Heun steps of the ODE bound during training evals (dlm-eval may raise it)
  c.eval.max_batches = 2
  return c
