"""Few-step distillation of a one-hot flow (FLM's flow map on a fixed grid; dlm_jax/posttrain/distill.py): a student
that samples in 4 Euler steps learns, step by step, where the teacher's 16 Euler steps land. The teacher is a run of
configs/flow_quickstart.py (same model keys); train it first:

  dlm-train --config configs/flow_quickstart.py --workdir runs/flow
  dlm-train --config configs/distill_flow.py --workdir runs/distill_flow --config.distill.teacher=runs/flow
  dlm-sample --workdir runs/distill_flow --num_samples 4 --output s.jsonl --show       (4 steps: sampler.steps)

For a one-step student (FMLM's setting): --config.distill.student_steps=1 --config.sampler.steps=1.
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "flow_quickstart.py"))
  c.train.objective = "distill"
  c.distill.teacher = "runs/flow"
  c.distill.student_steps = 4
  c.distill.teacher_steps = 16
  c.train.steps = 300
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 20
  c.train.eval_every = 0  # the ODE bound is not what the student optimises; compare samples at 4 steps instead
  c.sampler.steps = 4
  return c
