"""LLaDA-1B (Nie et al. 2025, "Large Language Diffusion Models", arXiv 2502.09992, Appendix B Table 5 "Architectures of
LLaDA and the ARM baselines", column LLaDA 1B): 22 layers, d 2048, 32 attention heads (head dim 64) with 4 key/value
heads (grouped-query attention: the 8B has none, the 1B has it), SwiGLU 5634, vocabulary 126464 (LLaDA's tokenizer),
RoPE theta 500000, L 4096: 1.49B parameters, 0.97B without the embeddings, as the table gives (with 32 KV heads it would
be 1.65B; tests/test_compile_cli.py checks 1,487,243,264). Training as configs/llada_8b.py (objective "llada", AdamW
weight decay 0.1, lr 4e-4 after 2000 warmup steps decaying to 1e-5, bfloat16 compute, no EMA); the paper does not give
the 1B's own batch or schedule (its scaling study varies the FLOPs), so batch 512 x 4096 tokens here is ours.

Sized for a v5e-64 slice (v5e:8x8, 64 chips, 16 GiB HBM each; batch 512 x 4096 tokens = 8 sequences per chip in 4
micro-batches of 2 (8 at once need 27 GiB: the float32 logits over 126464 ids are 2 GiB per sequence), FSDP over all
chips, layers under scan with full rematerialisation):
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
  c.model.num_kv_heads = 4  # Table 5: 4 key/value heads at 1B
  c.model.head_dim = 64
  c.model.mlp_dim = 5634
  c.train.batch_size = 512
  c.train.grad_accum_steps = 4  # 2 sequences of 4096 per chip per micro-batch on v5e:8x8
  c.train.steps = 1_000_000
  return c
