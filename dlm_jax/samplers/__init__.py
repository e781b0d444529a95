"""Samplers: pure, jit-compiled decoding loops that take any `logits_fn`; none of them needs a dlm_jax model.

  ancestral      MDLM ancestral sampler (exact reverse process on a time grid, no-change cache)
  first_hitting  one uniformly chosen position per network call (exact, no discretisation)
  llada          LLaDA semi-autoregressive remasking + Fast-dLLM threshold / factor decoding, prefix / dual K/V caches,
                 Prophet early commit, Dream orderings and logit shift, classifier-free guidance, EOS stopping
  remdm          ReMDM remasking (decoded tokens may be revised; cap / rescale / conf strategies)
  flow_euler / ddim / edm  the continuous families' samplers (FLM's Euler, LangFlow's DDIM, CoBit's EDM with churn) over
                 the family's network function (state, noise level[, self-conditioning]) -> logits (continuous.py)
  block_diffusion  block-by-block generation for block diffusion (BD3-LM) with a K/V cache of clean blocks, any of the
                 samplers above inside a block, variable length; at block size 1 KV-cached autoregressive sampling

Calling convention: (logits_fn, key, canvas, **static options) -> (tokens, stats); conventions shared by all of them
(left padding with PAD, per-row keys, input checks, infilling) are in `dlm_jax.samplers.common`.
"""

from dlm_jax.samplers.ancestral import ancestral
from dlm_jax.samplers.block import block_diffusion
from dlm_jax.samplers.common import PAD, filter_logits, left_pad, suppress_mask, truncated
from dlm_jax.samplers.continuous import ddim, edm, flow_euler
from dlm_jax.samplers.first_hitting import first_hitting
from dlm_jax.samplers.llada import factor_count, llada
from dlm_jax.samplers.remdm import remdm

SAMPLERS = {"ancestral": ancestral, "first_hitting": first_hitting, "llada": llada, "remdm": remdm}

__all__ = ["ancestral", "first_hitting", "llada", "remdm", "block_diffusion", "flow_euler", "ddim", "edm", "factor_count",
           "suppress_mask",
           "filter_logits", "truncated",
           "left_pad", "PAD", "SAMPLERS"]
