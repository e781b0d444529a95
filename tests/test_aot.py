"""dlm-compile's inference path (dlm_jax/aot.py, --sampler): the forward and the configured sampler compiled for
abstract, sharded parameters, here on CPU devices (the same code compiles for a TPU topology through libtpu)."""

import json
import os

import jax
import pytest

from dlm_jax import config as config_lib
from dlm_jax import convert
from dlm_jax.build import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
  from dlm_jax import aot
  return aot


@pytest.mark.parametrize("arch,sampler", [("dream", "dream"), ("sdar", "sdar")])
def test_inference_programs_compile_from_an_hf_config(arch, sampler):
  with open(os.path.join(ROOT, "tests", "fixtures", "hf", arch, "config.json")) as f:
    hf = json.load(f)
  cfg = convert.build_config(convert.detect(hf), hf, convert.model_shape(convert.detect(hf), hf), None, {})
  config_lib.apply_overrides(cfg, [("sampler.name", sampler), ("sampler.length", 8), ("sampler.batch_size", 2),
                                   ("sampler.steps", 4)])
  config_lib.validate(cfg)
  run = build(cfg, devices=jax.devices()[:1])
  programs = _script()._inference_programs(run, "bfloat16", 4)
  assert programs["length"] == 12 and programs["sampler_name"] == sampler
  for name in ("forward", "sampler"):
    figures = _script()._figures(programs[name])
    assert figures["per_device_argument_size_in_bytes"] > 0, (name, figures)


def test_the_published_configs_build():
  """configs/hf/: the LLaDA-8B-Instruct and Dream-v0-Instruct-7B shapes (abstract: nothing is allocated)."""
  counts = {}
  for name in ("llada_8b_instruct", "dream_v0_instruct_7b"):
    with open(os.path.join(ROOT, "configs", "hf", f"{name}.json")) as f:
      hf = json.load(f)
    arch = convert.detect(hf)
    run = build(convert.build_config(arch, hf, convert.model_shape(arch, hf), None, {}), devices=jax.devices()[:1])
    counts[name] = sum(x.size for x in jax.tree.leaves(run.abstract_params))
  assert counts == {"llada_8b_instruct": 8_015_581_184, "dream_v0_instruct_7b": 7_615_616_512}
