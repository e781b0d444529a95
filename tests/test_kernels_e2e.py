"""The Pallas kernels end to end, in interpret mode on CPU: training through `model.attention=splash` /
`pallas_gpu` gives the xla path's losses, and the samplers give the same tokens with the cached decode kernel as without.

Tolerances: the kernels sum the softmax in another order (online, tile by tile), so float32 logits differ from the xla
path's by ~1e-6; after a few Adam steps (whose update direction is gradient / sqrt(second moment), sensitive to tiny
gradients) losses agree to ~1e-5 relative; the test allows 1e-3. Samplers draw from the same keys, so a token can only
differ where two candidates' Gumbel-perturbed scores are within ~1e-6 of each other (LLaDA's runs are greedy).
"""

import jax
import numpy as np
import pytest

from conftest import losses
from dlm_jax import config as config_lib
from dlm_jax.build import build, init_params
from dlm_jax.evaluate import generate
from dlm_jax.train import train

KERNELS = ["splash", "pallas_gpu"]


def _losses(cfg, workdir, impl):
  cfg = config_lib.load(cfg) if isinstance(cfg, str) else cfg
  config_lib.apply_overrides(cfg, [("model.attention", impl), ("model.attention_interpret", impl != "xla")])
  train(cfg, workdir, progress=False)
  return losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("impl,process", [("splash", "masked"), ("splash", "block"), ("pallas_gpu", "block")])
def test_short_training_with_a_kernel_matches_xla(tmp_path, tiny_config, impl, process):
  """4 steps of masked diffusion (packed documents: segment ids) and of BD3 (the [x_t | x_0] mask, block 8)."""
  over = dict(train__steps=4, train__checkpoint_every=1000, data__seq_len=32, model__max_seq_len=64,
              model__d_model=64, model__num_heads=2, data__segment_attention=True)
  if process == "block":
    over.update(diffusion__process="block", diffusion__block_size=8)
  path = tiny_config(**over)
  want = _losses(path, str(tmp_path / "xla"), "xla")
  got = _losses(path, str(tmp_path / impl), impl)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  for step in want:
    np.testing.assert_allclose(got[step], want[step], rtol=1e-3, err_msg=f"step {step}")


@pytest.mark.parametrize("setting", [
    {"diffusion.process": "block", "diffusion.block_size": 4},  # block by block over the clean-block K/V cache
    {"diffusion.process": "block", "diffusion.block_size": 1},  # KV-cached autoregressive decoding
    {"sampler.name": "llada", "sampler.llada.cache": "dual", "sampler.llada.block_length": 8,  # Fast-dLLM dual cache
     "sampler.temperature": 0.0},
    {"sampler.name": "llada", "sampler.llada.cache": "prefix", "sampler.llada.block_length": 8,
     "sampler.temperature": 0.0},
])
@pytest.mark.parametrize("impl", KERNELS)
def test_samplers_with_the_cached_decode_kernel_match_xla(tiny_config, impl, setting):
  """Prompted rows of different lengths (left padding): same tokens with the kernels as with xla (same keys; greedy
  for LLaDA)."""
  cfg = config_lib.load(tiny_config(model__d_model=64, model__num_heads=2, model__init_std=0.5, sampler__steps=16,
                                    sampler__batch_size=4))
  config_lib.apply_overrides(cfg, list(setting.items()))
  config_lib.validate(cfg)
  run = build(cfg, devices=jax.devices()[:1])
  params = init_params(run, 0)
  prompts = [run.tokenizer.encode("ab"), run.tokenizer.encode("abcdefg")]
  # llada: 16 tokens after the longest prompt (2 blocks of 8); block diffusion: a multiple of its block size
  kw = dict(num_samples=2, length=23 if "sampler.name" in setting else 24, seed=3, prompts=prompts)
  want, _ = generate(run, params, {}, **kw)
  cfg2 = config_lib.load(tiny_config(name="k.py", model__d_model=64, model__num_heads=2, model__init_std=0.5,
                                     sampler__steps=16, sampler__batch_size=4))
  config_lib.apply_overrides(cfg2, list(setting.items()) + [("model.attention", impl),
                                                            ("model.attention_interpret", True)])
  config_lib.validate(cfg2)
  got, _ = generate(build(cfg2, devices=jax.devices()[:1]), params, {}, **kw)
  np.testing.assert_array_equal(got, want)
