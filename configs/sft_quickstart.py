"""SFT of the quickstart model on conversations (train.objective='sft', dlm_jax/posttrain/sft.py).

  dlm-train --config configs/sft_quickstart.py --workdir runs/sft \
      --config.train.init_from=runs/quickstart --config.data.path=chats.jsonl

data.path: .jsonl with {"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}
per line; the last (assistant) message is trained and everything before it is the clean prompt (rendered with the
tokenizer's chat template; the byte tokenizer's is 'role: content' lines). train.init_from: the base run (the same
model keys). LLaDA's recipe: EOS padding of the response trained, loss / answer length.
"""

from dlm_jax.config import default_config


def get_config():
  c = default_config()
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.mlp_dim = 768
  c.model.max_seq_len = 128
  c.data.seq_len = 128
  c.data.val_fraction = 0.002
  c.train.steps = 600
  c.train.batch_size = 16
  c.train.learning_rate = 1e-3
  c.train.warmup_steps = 50
  c.train.ema_decay = 0.99
  c.train.log_every = 20
  c.train.checkpoint_every = 200
  c.train.eval_every = 300
  c.eval.max_batches = 8
  c.sampler.steps = 128
  c.sampler.batch_size = 4
  c.train.objective = "sft"
  c.train.steps = 300
  c.train.learning_rate = 2e-4
  c.train.warmup_steps = 20
  c.data.val_fraction = 0.05
  c.sft.normalize = "answer"
  return c
