"""The train step and the sampler lower for GPU and TPU on this CPU-only host (jax.export), so accelerator-only
problems (unsupported ops, platform-specific lowering of the custom attention) show up in CI."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

from dlm_jax.build import build
from dlm_jax.config import default_config
from dlm_jax.samplers import ancestral
from dlm_jax.train import abstract_train_state, make_optimizer, make_train_step, state_shardings


def _tiny():
  cfg = default_config()
  cfg.model.num_layers, cfg.model.d_model, cfg.model.num_heads, cfg.model.mlp_dim = 1, 32, 2, 64
  cfg.model.num_kv_heads = 1
  cfg.data.seq_len, cfg.train.batch_size = 16, 4
  cfg.data.segment_attention = True
  return cfg


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_train_step_and_sampler_export(platform):
  cfg = _tiny()
  run = build(cfg)
  opt = make_optimizer(cfg)
  abstract = abstract_train_state(run, opt)
  step = make_train_step(run, opt, state_shardings(run, opt, abstract))
  exp = export.export(step, platforms=[platform])(abstract, jax.ShapeDtypeStruct((4, 16), jnp.int32))
  assert exp.platforms == (platform,)
  text = exp.mlir_module()
  assert "dot_general" in text

  def sample(params, key, canvas):
    fn = lambda toks, t: run.apply_fn(params, toks)
    return ancestral(fn, key, canvas, mask_id=run.process.mask_id, steps=4)

  exp2 = export.export(jax.jit(sample), platforms=[platform])(
      abstract["params"], jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((2, 16), jnp.int32))
  assert "stablehlo.while" in exp2.mlir_module()
