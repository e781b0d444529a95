"""SFT of the quickstart model on conversations (train.objective='sft', dlm_jax/posttrain/sft.py).

  dlm-train --config configs/sft_quickstart.py --workdir runs/sft \
      --config.train.init_from=runs/quickstart --config.data.path=chats.jsonl

data.path: .jsonl with {"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}
per line; the last (assistant) message is trained and everything before it is the clean prompt (rendered with the
tokenizer's chat template; the byte tokenizer's is 'role: content' lines). train.init_from: the base run (the same
model keys). LLaDA's recipe: EOS padding of the response trained, loss / answer length.
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py"))
  c.train.objective = "sft"
  c.train.steps = 300
  c.train.learning_rate = 2e-4
  c.train.warmup_steps = 20
  c.data.val_fraction = 0.05
  c.sft.normalize = "answer"
  return c
