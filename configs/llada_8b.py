"""LLaDA-8B pretraining (Nie et al. 2025, "Large Language Diffusion Models", Table 5 and section 2.2; the published
GSAI-ML/LLaDA-8B-Base config.json, as configs/hf/llada_8b_instruct.json):
  32 layers, d 4096, 32 heads (no GQA: 32 KV heads, head dim 128), SwiGLU 12288, vocabulary 126464 (mask id 126336,
  EOS 126081), RoPE theta 500000, RMSNorm eps 1e-5, L 4096, no tied embeddings: 8.02B parameters
  loss: masked diffusion with p_mask = t uniform in [eps, 1] and weight 1 / p_mask (our objective "llada")
  AdamW, weight decay 0.1, batch 1280 x 4096 tokens, 2.3T tokens (~440k steps). Schedule: warmup 2000 steps to 4e-4,
  constant 4e-4 to 1.2T tokens, 1e-4 to 2.0T, then linear decay 1e-4 -> 1e-5 (Warmup-Stable-Decay). Ours is warmup +
  cosine from 4e-4 to 1e-5 (min_lr_ratio 0.025) over the same steps: the same endpoints, not the same shape. No EMA.
  bfloat16 compute, float32 master weights and moments (train.param_dtype / moments_dtype where the config has them).

Sized for a v5p-256 slice (v5p:4x4x8, 128 chips, 95 GiB HBM each; batch 1280 = 10 sequences per chip, FSDP over all
chips, layers under scan with full rematerialisation):
  dlm-compile --config configs/llada_8b.py --topology v5p:4x4x8
Or on two v5p-128 slices (v5p:4x4x4 each), data parallel across them over DCN (mesh.dcn_data = 2, FSDP within each
slice; --num_slices sets mesh.dcn_data):
  dlm-compile --config configs/llada_8b.py --topology v5p:4x4x4 --num_slices 2

Tokenizer: LLaDA's own (126464 ids). The preset trains on token ids (data.tokenizer='none', as a converted checkpoint
without tokenizer files); for text set --config.data.tokenizer=/path/to/LLaDA/tokenizer.json (from
GSAI-ML/LLaDA-8B-Base).
"""

from dlm_jax.config import default_config


def get_config():
  c = default_config()
  c.model.num_layers = 32
  c.model.d_model = 4096
  c.model.num_heads = 32
  c.model.num_kv_heads = 32
  c.model.head_dim = 128
  c.model.mlp_dim = 12288
  c.model.max_seq_len = 4096
  c.model.rope_theta = 500000.0
  c.model.norm_eps = 1e-5
  c.model.vocab_size = 126464
  if "scan_layers" in c.model:  # layers under nnx.scan (compile time independent of depth)
    c.model.scan_layers = True
  if "remat" in c.model:
    c.model.remat = "full"
  c.data.tokenizer = "none"
  c.data.eos_id = 126081
  c.data.pad_id = 126081
  c.data.seq_len = 4096
  c.diffusion.process = "masked"
  c.diffusion.objective = "llada"
  c.diffusion.mask_id = 126336
  c.diffusion.suppress_mask_logit = False
  c.train.steps = 440_000
  c.train.batch_size = 1280
  c.train.learning_rate = 4e-4
  c.train.warmup_steps = 2000
  c.train.min_lr_ratio = 0.025
  c.train.weight_decay = 0.1
  c.train.grad_clip = 1.0
  c.train.ema_decay = 0.0
  c.train.compute_dtype = "bfloat16"
  c.train.log_every = 100
  c.train.checkpoint_every = 2000
  c.train.eval_every = 0
  c.eval.batch_size = 128
  c.sampler.steps = 256
  c.sampler.batch_size = 128
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
