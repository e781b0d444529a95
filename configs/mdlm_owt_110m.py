"""MDLM on OpenWebText at GPT-2-small size (~110M with embeddings, 85M trunk): the recipe of Sahoo et al. 2024, "Simple
and Effective Masked Diffusion Language Models" (kuleshov-group/mdlm, configs/config.yaml + configs/model/small.yaml):
  model small: 12 blocks, hidden 768, 12 heads, L (model.length) 1024; GPT-2 tokenizer (50257 ids + the mask id)
  loader.global_batch_size 512; optim AdamW lr 3e-4, betas (0.9, 0.999), weight decay 0; grad clip 1.0
  lr_scheduler constant_warmup, 2500 warmup steps (here: warmup, then a constant rate: min_lr_ratio 1.0)
  training.ema 0.9999; trainer.max_steps 1_000_000; loglinear noise (our "loglinear" schedule), antithetic times
Differences: our trunk is LLaMA-style (RMSNorm, RoPE, SwiGLU 2048 ~ the DiT's 4x GELU MLP in parameters), no dropout
(MDLM: 0.1), no time conditioning (MDLM's default for masked diffusion).

Sized for a v5e-16 slice (v5e:4x4, 16 chips; batch 512 = 32 sequences per chip in 2 micro-batches). Data parallel
over all chips: the float32 weights, EMA and Adam moments (1.7 GiB) fit each chip, whereas FSDP makes XLA:TPU re-read
each micro-batch's activations once per weight shard in its windowed all-gather matmuls (twice the HBM traffic, half
the est. MFU). The 12 layers run under scan (model.scan_layers: a ~35 s compile instead of ~6.5 min unrolled, the same
losses) with remat "dots_saveable" (14.4 GiB of v5e's 16 per chip; `dlm-compile --find_batch` prints the frontier per
policy):
  dlm-compile --config configs/mdlm_owt_110m.py --topology v5e:4x4

Tokenizer: data.tokenizer is the path of GPT-2's tokenizer.json, which you provide (e.g. from the Hugging Face hub
repository openai-community/gpt2); `dlm-train` reads it, `dlm-compile` only needs its size (50257) and runs without it.
Point data.path at the OpenWebText text (a directory of .txt / .jsonl files; see README "Data"), or better at its
`dlm-tokenize` directory (tokenized once, read by random access: README "Pre-tokenized datasets").
"""

from dlm_jax.config import default_config

GPT2_TOKENIZER = "tokenizers/gpt2/tokenizer.json"  # override: --config.data.tokenizer=/path/to/gpt2/tokenizer.json


def get_config():
  c = default_config()
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.mlp_dim = 2048
  c.model.max_seq_len = 1024
  c.model.scan_layers = True
  c.model.remat = "dots_saveable"
  # splash tiles of 512 (MaxText's sa_block_q / sa_block_kv): a flash kernel re-reads keys and values once per query
  # tile, 8 times per pass at L 1024 with the default 128; est. MFU 72% instead of 59% on v5e:4x4
  c.model.attention_block_q = 512
  c.model.attention_block_kv = 512
  c.data.tokenizer = GPT2_TOKENIZER
  c.data.seq_len = 1024
  c.data.val_fraction = 0.005
  c.diffusion.process = "masked"
  c.diffusion.schedule = "loglinear"
  c.diffusion.antithetic = True
  c.train.steps = 1_000_000
  c.train.batch_size = 512
  c.train.grad_accum_steps = 2  # 16 sequences per chip per micro-batch (32 at once does not fit v5e's 16 GiB)
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 2500
  c.train.min_lr_ratio = 1.0  # MDLM: constant after warmup
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0
  c.train.adam_b1 = 0.9
  c.train.adam_b2 = 0.999
  c.train.ema_decay = 0.9999
  c.train.compute_dtype = "bfloat16"
  c.train.log_every = 100
  c.train.checkpoint_every = 5000
  c.train.eval_every = 10000
  c.eval.batch_size = 64
  c.eval.max_batches = 100
  c.sampler.steps = 1000
  c.mesh.data = -1  # data parallel over all chips (a 110M model's state fits each chip)
  c.mesh.fsdp = 1
  return c
