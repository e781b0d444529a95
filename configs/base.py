"""Base preset (~300M trunk parameters, MD4 "medium"-like): for a TPU pod slice or a GPU node.

Point data.path at your corpus and data.tokenizer at a tokenizer.json for a real run.
"""

from dlm_jax.config import default_config


def get_config():
  c = default_config()
  c.model.num_layers = 24
  c.model.d_model = 1024
  c.model.num_heads = 16
  c.model.mlp_dim = 2816
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
  c.mesh.fsdp = -1
  return c
