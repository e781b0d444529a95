"""LLaDA-1B (Nie et al. 2025, "Large Language Diffusion Models", Table 5: the 1B model of the scaling study):
  22 layers, d 2048, 32 heads (head dim 64), SwiGLU 5634, vocabulary 126464 (LLaDA's tokenizer), RoPE theta 500000,
  L 4096; the rest as configs/llada_8b.py (objective "llada", AdamW weight decay 0.1, lr 4e-4 after 2000 warmup
  steps decaying to 1e-5, bfloat16 compute, no EMA).

Sized for a v5e-64 slice (v5e:8x8, 64 chips, 16 GiB HBM each; batch 512 x 4096 tokens = 8 sequences per chip, FSDP
over all chips, layers under scan with full rematerialisation):
  dlm-compile --config configs/llada_1b.py --topology v5e:8x8

Tokenizer: as configs/llada_8b.py (token ids; set data.tokenizer to LLaDA's tokenizer.json for text).
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llada_8b.py"))
  c.model.num_layers = 22
  c.model.d_model = 2048
  c.model.num_heads = 32
  c.model.num_kv_heads = 32
  c.model.head_dim = 64
  c.model.mlp_dim = 5634
  c.train.batch_size = 512
  c.train.steps = 1_000_000
  return c
