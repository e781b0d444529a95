"""Few-step distillation of a masked diffusion model (SDTT; dlm_jax/posttrain/distill.py): a student that samples in
4 ancestral steps learns, step by step, the teacher's 8-step result. The teacher is a run of configs/quickstart.py
(same model keys); train it first:

  dlm-train --config configs/quickstart.py --workdir runs/quickstart
  dlm-train --config configs/distill_masked.py --workdir runs/distill_masked --config.distill.teacher=runs/quickstart
  dlm-sample --workdir runs/distill_masked --num_samples 4 --output s.jsonl --show     (4 steps: sampler.steps)
  dlm-sample --workdir runs/quickstart --config.sampler.steps=4 ...                   the teacher at 4 steps

SDTT's rounds (8 -> 4 -> 2 ...) are successive runs, each student the next teacher (set distill.student_steps and
sampler.steps to the new count). The student's per-position predictions stay factorised: it does not restore the
correlation of tokens revealed in one step (README, "Distillation").
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
  c.train.objective = "distill"
  c.distill.teacher = "runs/quickstart"
  c.distill.student_steps = 4
  c.distill.teacher_steps = 8
  c.train.steps = 300
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 20
  c.train.eval_every = 0  # the NELBO is not what the student optimises; compare samples at 4 steps instead
  c.sampler.steps = 4
  return c
