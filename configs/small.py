"""Small preset (MDLM / MD4 "small" scale, ~85M trunk parameters): for an accelerator, not this CPU.

Point data.path at your corpus and data.tokenizer at a tokenizer.json (e.g. GPT-2's) for a real run.
Defaults follow MDLM / MD4: AdamW lr 3e-4, grad clip 1, EMA 0.9999, antithetic times, linear schedule.
"""

from dlm_jax.config import default_config


def get_config():
  c = default_config()
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.mlp_dim = 2048
  c.model.max_seq_len = 1024
  c.data.seq_len = 1024
  c.data.val_fraction = 0.005
  c.train.steps = 1_000_000
  c.train.batch_size = 512
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2500
  c.train.ema_decay = 0.9999
  c.train.compute_dtype = "bfloat16"
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.train.eval_every = 10000
  c.eval.batch_size = 64
  c.eval.max_batches = 100
  c.sampler.steps = 1024
  c.mesh.data = 1
  c.mesh.fsdp = -1  # fully sharded over all devices
  return c
