"""Samplers: pure, jit-compiled decoding loops that take any `logits_fn`.

`ancestral` is the MDLM ancestral sampler; `first_hitting` reveals one uniformly chosen position per network call
(exact, no discretisation); `llada` is LLaDA's semi-autoregressive remasking sampler with Fast-dLLM's
threshold / factor parallel decoding and classifier-free guidance. The sampler library (remasking, semi-AR blocks,
parallel decoding, caches) adds its members here with the same calling convention:
(logits_fn, key, canvas, **static options) -> (tokens, stats).
"""

from dlm_jax.samplers.ancestral import ancestral, gumbel_argmax, suppress_mask
from dlm_jax.samplers.first_hitting import first_hitting
from dlm_jax.samplers.llada import factor_count, llada

SAMPLERS = {"ancestral": ancestral, "first_hitting": first_hitting, "llada": llada}

__all__ = ["ancestral", "first_hitting", "llada", "factor_count", "gumbel_argmax", "suppress_mask", "SAMPLERS"]
