"""BD3-LM on OpenWebText at GPT-2-small size (~110M with embeddings): the recipe of Arriola et al. 2025, "Block
Diffusion: Interpolating Between Autoregressive and Diffusion Language Models" (ICLR 2025), as kuleshov-group/bd3lms
sets it (commit 1c3e8f43; checked against these files):
  scripts/train/train_owt_bd3lm.sh: BLOCK_SIZE=16, loader.global_batch_size=512, model=small, algo=bd3lm,
    model.length=1024, algo.clip_search_widths=[0.5,0.6,0.7,0.8,0.9], training.resample=True, and
    training.from_pretrained=kuleshov-group/bd3lm-owt-block_size1024-pretrain (the script fine-tunes a block-1024
    model, "to train from scratch, set to null": start from a configs/mdlm_owt_110m.py checkpoint to do the same)
  configs/config.yaml: optim lr 3e-4, beta1 0.9, beta2 0.999, weight_decay 0; trainer.gradient_clip_val 1.0,
    max_steps 1_000_000; training.ema 0.9999, antithetic_sampling True, sampling_eps_min 1e-3, sampling_eps_max 1.0
    (= diffusion.t_min / t_max here: the unclipped interval it starts from)
  configs/lr_scheduler/constant_warmup.yaml: get_constant_schedule_with_warmup, num_warmup_steps 2500
  configs/noise/loglinear.yaml: the log-linear noise, alpha_t = 1 - t (our "linear" schedule for the block process)
  configs/model/small.yaml: 12 blocks, hidden 768, 12 heads, dropout 0.1 (none here), tie_word_embeddings True, which
    models/dit.py's DDiTFinalLayer stores but does not use (its own output Linear): the head is untied, as here
  configs/algo/bd3lm.yaml: var_min True, clip_search_delta 0.05: the clipped noise interval is searched for the
    lowest-variance loss during training; here `dlm-eval --clip_search` finds it, then resume with diffusion.t_min /
    t_max.
The trunk runs over [x_t | x_0] (2L = 2048 tokens) under the BD3 mask (splash visits 37.5% of its 256-tiles).

Sized for a v5e-32 slice (v5e:4x8, 32 chips; batch 512 = 16 sequences of 2L per chip in 2 micro-batches
(grad_accum_steps 2, from configs/mdlm_owt_110m.py), data parallel over all chips):
  dlm-compile --config configs/bd3_owt_110m.py --topology v5e:4x8

Tokenizer: as configs/mdlm_owt_110m.py (data.tokenizer = the path of GPT-2's tokenizer.json, which you provide).
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mdlm_owt_110m.py"))
  c.diffusion.process = "block"
  c.diffusion.block_size = 16
  c.diffusion.schedule = "linear"
  c.sampler.first_hitting.top_p = 0.9  # BD3-LM's nucleus
  # splash tiles of 256: the BD3 mask over 2L leaves 37.5% of them (31% of 128-tiles, ~50% of 512-tiles), and K/V are
  # re-read half as often as at 128: est. MFU 58% instead of 51% on v5e:4x8
  c.model.attention_block_q = 256
  c.model.attention_block_kv = 256
  return c
