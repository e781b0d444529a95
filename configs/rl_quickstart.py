"""RL with verifiable rewards on the quickstart model (train.objective='grpo' = diffu-GRPO; 'wd1' for wd1;
dlm_jax/posttrain/rl.py).

  dlm-train --config configs/rl_quickstart.py --workdir runs/rl \
      --config.train.init_from=runs/sft --config.data.path=problems.jsonl

data.path: .jsonl with {"prompt": ... (or "messages": [...]), "answer": ...} per line; rl.reward names the reward
(exact_match: the final answer, <answer>..</answer> or \\boxed{..}; code_tests: the reply's program against the
answer's asserts in the sandbox; or module:function). d1's settings: group 6, clip 0.5, beta 0.04, prompt mask 0.15.
Rollouts use the configured sampler (here LLaDA low-confidence remasking in blocks of 32, as d1).
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
  c.train.objective = "grpo"
  c.train.steps = 200
  c.train.batch_size = 12  # 2 prompts x 6 completions
  c.train.learning_rate = 1e-5
  c.train.warmup_steps = 0
  c.train.grad_clip = 0.2
  c.train.ema_decay = 0.0
  c.train.eval_every = 50
  c.data.val_fraction = 0.05
  c.rl.group_size = 6
  c.rl.iterations = 2
  c.rl.prompt_length = 64
  c.rl.completion_length = 64
  c.sampler.name = "llada"
  c.sampler.steps = 32
  c.sampler.temperature = 0.9
  c.sampler.llada.block_length = 32
  return c
