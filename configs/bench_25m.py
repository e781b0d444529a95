"""The throughput benchmark model: LLaMA-style, 6 layers, d_model 512, 8 heads, SwiGLU 2048, bytes, L=512, batch 8, fp32."""

from dlm_jax.config import default_config


def get_config():
  c = default_config()
  c.model.num_layers = 6
  c.model.d_model = 512
  c.model.num_heads = 8
  c.model.mlp_dim = 2048
  c.model.max_seq_len = 512
  c.data.seq_len = 512
  c.train.batch_size = 8
  c.train.compute_dtype = "float32"
  c.train.steps = 20
  c.train.warmup_steps = 2
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 1000
  return c
