"""LoRA SFT of LLaDA-8B-Instruct on a small slice: configs/llada_8b.py's architecture (8.02B parameters, bfloat16), the
SFT objective of dlm_jax/posttrain/sft.py (LLaDA's recipe: prompt clean, response masked, EOS padding trained, loss per
answer length) and LoRA adapters (dlm_jax/lora.py) of rank 16 on the attention projections q, k, v, o. The base stays
frozen on the chips in bfloat16 (16 GB, sharded FSDP over all of them); only the 16.8M adapter parameters
(0.2% of the model) have gradients, Adam moments and checkpoints.

Why rank 16 on q, k, v, o: the base is already instruction-tuned, and Hu et al. 2021 find low ranks enough for the
attention projections; the adapters' memory is small at any rank (the train state is 0.12 GiB per chip at rank 16, 0.94
GiB at d1's rank 128: 12.5 and 14.0 GiB per chip in all). d1 (diffu-GRPO) uses r=128 / alpha=64 on a 4-bit base, where
the rank also makes up for the quantisation; set --config.lora.rank=128 --config.lora.alpha=64 for that. The targets
matter more: the step merges W + alpha / rank x A B for every targeted weight (one more copy of those weights and their
gradients), and q, k, v, o are 2.1B of the 8.0B parameters; adding the MLP (gate, up, down: 4.8B more) needs a larger
slice.

Sized for a v5e-4 slice (v5e:2x2, 4 chips, 16 GiB HBM each; 1 sequence of 4096 per chip per micro-batch, 8
micro-batches: 32 conversations per step, layers under scan with full rematerialisation). Full fine-tuning
(lora.rank=0) of the same model does not fit there: its train state alone is 22.4 GiB per chip, and XLA's temporaries
need 36.1 GiB more; it first fits on v5e:4x4 (15.7 of 16 GiB; README "LoRA on small slices"). This preset: 12.5 GiB.
  dlm-compile --config configs/sft_llada_8b_lora.py --topology v5e:2x2
  dlm-compile --config configs/sft_llada_8b_lora.py --topology v5e:2x2 --config.lora.rank=0 --config.lora.alpha=16

Run: convert the Hugging Face checkpoint (its tokenizer, with the chat template, lands in OUT/hf/; its <|eot_id|> id
in OUT/config.json's data.eot_id), then train on conversations (.jsonl, {"messages": [...]} per line) from it:
  dlm-convert --from_hf ~/hf/LLaDA-8B-Instruct --workdir workdir/llada8b_instruct --dtype bfloat16
  dlm-train --config configs/sft_llada_8b_lora.py --workdir workdir/llada8b_sft_lora \\
      --config.train.init_from=workdir/llada8b_instruct --config.data.path=chats.jsonl \\
      --config.data.tokenizer=workdir/llada8b_instruct/hf/tokenizer.json --config.data.eot_id=EOT_ID
(EOT_ID: data.eot_id of workdir/llada8b_instruct/config.json). `dlm-convert --merge_lora --workdir
workdir/llada8b_sft_lora --out OUT` writes the merged model.
"""

import os

from dlm_jax.config import load_config_file


def get_config():
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "llada_8b.py"))
  c.train.objective = "sft"
  c.train.init_from = "workdir/llada8b_instruct"  # the dlm-convert'ed LLaDA-8B-Instruct (the frozen base)
  c.lora.rank = 16
  c.lora.alpha = 32.0  # the update is alpha / rank x A B = 2 A B
  c.lora.targets = "q,k,v,o"
  c.train.param_dtype = "bfloat16"  # the base (and the adapters) in bfloat16; Adam moments stay float32
  c.train.batch_size = 32
  c.train.grad_accum_steps = 8  # 1 sequence of 4096 per chip per micro-batch on v5e:2x2
  c.train.steps = 3000
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 50
  c.train.min_lr_ratio = 0.1
  c.train.weight_decay = 0.0
  c.train.checkpoint_every = 500
  c.train.eval_every = 500
  c.data.val_fraction = 0.01
  c.eval.batch_size = 4
  c.eval.max_batches = 16
  c.sampler.batch_size = 4
  c.sft.normalize = "answer"  # LLaDA: each row's loss / its answer length (EOS padding included)
  return c
