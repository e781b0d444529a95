"""Samplers: pure, jit-compiled decoding loops that take any `logits_fn`.

`ancestral` is the MDLM ancestral sampler. The sampler library (remasking, semi-AR blocks, parallel decoding, caches)
adds its members here with the same calling convention: (logits_fn, key, canvas, **static options) -> (tokens, stats).
"""

from dlm_jax.samplers.ancestral import ancestral, gumbel_argmax, suppress_mask

SAMPLERS = {"ancestral": ancestral}

__all__ = ["ancestral", "gumbel_argmax", "suppress_mask", "SAMPLERS"]
