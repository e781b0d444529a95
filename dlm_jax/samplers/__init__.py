"""Samplers: pure, jit-compiled decoding loops that take any `logits_fn`; none of them needs a dlm_jax model or
process. Each module registers its sampler (typed options, served families, the call) in `dlm_jax.registry`.

  ancestral      MDLM ancestral sampler (exact reverse process on a time grid, no-change cache)
  first_hitting  one uniformly chosen position per network call (exact, no discretisation)
  llada          LLaDA semi-autoregressive remasking + Fast-dLLM threshold / factor decoding, prefix / dual K/V caches,
                 Prophet early commit, Dream orderings and logit shift, classifier-free guidance, EOS stopping
  remdm          ReMDM remasking (decoded tokens may be revised; cap / rescale / conf strategies)
  maskgit        MaskGIT confidence decoding on a cosine (or linear) masking schedule
  dream          Dream's diffusion_generate (its time grid; origin / maskgit_plus / topk_margin / entropy unmasking)
  fastdllm_v2    Fast-dLLM v2's block decoding (sub-blocks, confidence threshold, carried first token, DualCache)
  sdar           SDAR's block decoding (per-block step quota; sequential / static / dynamic-threshold remasking)
  flow_euler / ddim / edm  the continuous families' samplers (FLM's Euler, LangFlow's DDIM, CoBit's EDM with churn) over
                 the family's network function (state, noise level[, self-conditioning]) -> logits (continuous.py)
  block_diffusion  block-by-block generation for block diffusion (BD3-LM) with a K/V cache of clean blocks, any of the
                 masked samplers inside a block, variable length; at block size 1 KV-cached autoregressive sampling

Calling convention: (logits_fn, key, canvas, **static options) -> (tokens, stats); conventions shared by all of them
(left padding with PAD, per-row keys, input checks, infilling) are in `dlm_jax.samplers.common`.
Adding a sampler: one module with the function, its Options dataclass and `registry.register_sampler(...)`, plus its
import line below.
"""

from dlm_jax.samplers.common import PAD, filter_logits, left_pad, suppress_mask, truncated
from dlm_jax.samplers.block import block_diffusion
# one line per sampler module (importing it registers it; the order is the order of the README's table)
from dlm_jax.samplers.ancestral import ancestral  # isort: skip
from dlm_jax.samplers.first_hitting import first_hitting  # isort: skip
from dlm_jax.samplers.llada import factor_count, llada  # isort: skip
from dlm_jax.samplers.remdm import remdm  # isort: skip
from dlm_jax.samplers.maskgit import maskgit  # isort: skip
from dlm_jax.samplers.dream import dream  # isort: skip
from dlm_jax.samplers.fastdllm_v2 import fastdllm_v2  # isort: skip
from dlm_jax.samplers.sdar import sdar  # isort: skip
from dlm_jax.samplers.continuous import ddim, edm, flow_euler  # isort: skip

__all__ = ["ancestral", "first_hitting", "llada", "remdm", "maskgit", "dream", "fastdllm_v2", "sdar", "block_diffusion", "flow_euler", "ddim", "edm",
           "factor_count", "suppress_mask", "filter_logits", "truncated", "left_pad", "PAD"]
