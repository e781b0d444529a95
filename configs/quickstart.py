"""The README's main job: a small masked diffusion LM on the embedded corpus (Python's own standard library), on CPU."""

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
  return c
