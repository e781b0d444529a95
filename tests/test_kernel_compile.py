"""The Pallas attention kernels inside the real train step (`dlm-train`'s, built by
`dlm_jax/aot.py: lower_train_step`), compiled or lowered on this CPU host for the accelerators it lacks.

  TPU   model.attention=splash: the step compiles for a v5e:2x2 slice with XLA:TPU and Mosaic (libtpu: the test extra
        installs it; without it these tests skip and say so). Its StableHLO holds the splash kernel (tpu_custom_call)
        and no dense score matrix; the compiled program calls the kernel's forward and fused dq / dk / dv backward
        once per layer; the model.attention=xla step, lowered, holds the dense scores (so the check can see them).
        The per-device memory of the two compiled steps is compared by `python benchmarks/attention.py`.
  GPU   model.attention=pallas_gpu: the step lowers for CUDA (no GPU needed to lower; PTX is made on a GPU) with our
        Triton kernels (__gpu$xla.gpu.triton: forward, dq, dk/dv in every layer) and no dense score matrix.

Configs: configs/bench_25m.py (masked diffusion, full mask, L = 512) and configs/bd3_quickstart.py at L = 256 (block
diffusion: the trunk sees [x_t | x_0], 2L = 512, BD3 mask with blocks of 16: 10 of the 16 splash tiles computed), both
cut to 2 layers (the kernel calls are per layer; more layers only lengthen the compile).
Compiling for a TPU costs about a minute of CPU per program here; no time is asserted.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re

import jax
import pytest

from conftest import require_libtpu

from dlm_jax import config as config_lib
from dlm_jax import model as model_lib
from dlm_jax.build import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "bench_25m": ("bench_25m.py", {"model.num_layers": 2}),
    "bd3": ("bd3_quickstart.py", {"data.seq_len": 256, "model.max_seq_len": 256, "model.num_layers": 2}),
}
TOPOLOGY = "v5e:2x2"


def _script():
  from dlm_jax import aot
  return aot


def _config(name: str, attention: str):
  path, overrides = CONFIGS[name]
  return config_lib.load(os.path.join(ROOT, "configs", path), [("model.attention", attention), *overrides.items()])


def _dense_scores(cfg, text: str) -> list[str]:
  """Tensor types in StableHLO `text` of rank >= 4 ending in [>= 64, n] (n: the trunk's length): the xla path's
  [B, K, G, Lq, n] scores and probabilities (it takes query chunks of at least 64 rows). The kernels' operands and
  outputs are [B, n, H, D] / [B, H, n, D]; splash's per-row statistics are [B, H, 1 or 8, n]."""
  n = cfg.data.seq_len * (2 if cfg.diffusion.process == "block" else 1)
  found = re.findall(rf"tensor<(?:\d+x){{2,}}(\d+)x{n}x(?:f32|bf16)>", text)
  return sorted({f"[.., {rows}, {n}]" for rows in found if int(rows) >= 64})


def _tpu_devices():
  require_libtpu()
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(topology_name=TOPOLOGY, platform="tpu").devices)


@pytest.mark.slow(minutes=2)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_step_with_splash_compiles_for_a_tpu_slice(name):
  devices = _tpu_devices()
  script = _script()
  figures = {}
  for attention in ("splash", "xla"):
    cfg = _config(name, attention)
    run = build(cfg, devices=devices)
    assert run.model_config.attention_impl == attention
    lowered = script.lower_train_step(run)
    text = lowered.as_text()
    dense = _dense_scores(cfg, text)
    if attention == "splash":
      assert "custom_call @tpu_custom_call" in text, name
      assert not dense, f"{name}: a dense score matrix {dense} is left in the splash step"
    else:  # the xla step, lowered only: the dense-score check above can see a score matrix where there is one
      assert "tpu_custom_call" not in text and dense, (name, dense)
      continue
    with jax.set_mesh(run.mesh):
      compiled = lowered.compile()
    # the compiled program names each Mosaic kernel call after the kernel: forward, and the fused dq / dk / dv backward
    calls = collections.Counter(re.findall(r"%(splash_mha_[a-z]+)[\w.]* = .*custom_call_target=\"tpu_custom_call\"",
                                           compiled.as_text()))
    assert calls == {"splash_mha_fwd": cfg.model.num_layers, "splash_mha_dkv": cfg.model.num_layers}, (name, calls)
    figures[attention] = script._figures(compiled)  # pylint: disable=protected-access
  mib = {k: round(figures["splash"][f"per_device_{k}_size_in_bytes"] / 2 ** 20, 1) for k in ("argument", "output",
                                                                                               "temp")}
  assert mib["argument"] > 0, mib
  print(f"\n{name} train step on {TOPOLOGY}, per device MiB: splash {mib}")


def _gpu_run(cfg):
  """The run `build(cfg)` makes on a GPU host: model.attention resolved for the "gpu" platform (on this host's CPU
  devices pallas_gpu is a config error), the mesh over this host's first device (the step is only lowered)."""
  on_cpu = config_lib.config_from_dict(config_lib.to_dict(cfg))
  config_lib.apply_overrides(on_cpu, [("model.attention", "xla")])
  run = build(on_cpu, devices=jax.devices()[:1])
  mc = model_lib.ModelConfig.from_config(cfg, run.process.vocab_in, run.process.vocab_out, platform="gpu",
                                         **run.process.model_options)
  graphdef, abstract_params, axes = model_lib.abstract(mc)
  return dataclasses.replace(run, cfg=cfg, model_config=mc, graphdef=graphdef, abstract_params=abstract_params,
                             param_axes=axes)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_step_with_pallas_gpu_lowers_for_cuda(name):
  cfg = _config(name, "pallas_gpu")
  run = _gpu_run(cfg)
  assert run.model_config.attention_impl == "pallas_gpu"
  text = _script().lower_train_step(run, lowering_platforms=("cuda",)).as_text()
  calls = text.count("custom_call @__gpu$xla.gpu.triton")
  names = sorted(set(re.findall(r'name = "(flash_gpu[^"]*)"', text)))
  print(f"\n{name}: {calls} Triton kernel calls in the CUDA lowering of the train step: {names}")
  assert calls >= 2 * cfg.model.num_layers, (name, calls)  # forward and backward pass(es) in every layer
  dense = _dense_scores(cfg, text)
  assert not dense, f"{name}: a dense score matrix {dense} is left in the pallas_gpu step"
