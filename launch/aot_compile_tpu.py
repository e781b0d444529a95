"""Ahead-of-time compile the dlm_jax train step for a TPU topology on a machine without TPUs (e.g. a CPU laptop or CI).

  pip install libtpu            # (or: pip install -e ".[tpu]") - the TPU compiler; no TPU needed to compile
  python launch/aot_compile_tpu.py --config configs/bench_25m.py --topology v5e:2x2 [--config.KEY=VALUE ...]

`jax.experimental.topologies.get_topology_desc(TOPOLOGY, platform="tpu")` describes the chips of a slice (compile-only
devices). The script builds the run's mesh over them exactly as `dlm-train` would (mesh.* keys), lowers the jit-compiled
train step of dlm_jax.train with abstract, sharded inputs (no parameters are allocated) and compiles it with XLA:TPU.
It catches sharding and shape errors, and out-of-memory for that chip, before you pay for TPU time, and prints
XLA's per-device memory and FLOP estimates. Exit status 0 = the step compiles, 2 = a config error, 1 = another error.

Inference (`--sampler`): instead of the train step, compiles one forward of the model over a [sampler.batch_size,
length] canvas and the whole configured sampler (`dlm_jax.evaluate.sampler_fn`: the jit-compiled decoding loop with
the model inside), with the parameters in `--params_dtype` (bfloat16 = a bfloat16 checkpoint, as public DLMs ship).
`--hf_config FILE` takes the model from a Hugging Face config.json instead of `--config` (the config `dlm-convert`
would write for that checkpoint; no weights needed), e.g. the published LLaDA-8B-Instruct and Dream-v0-Instruct-7B
configs in configs/hf/:

  python launch/aot_compile_tpu.py --hf_config configs/hf/llada_8b_instruct.json --topology v5e:2x4 --sampler \
      --params_dtype bfloat16 --prompt_len 256 --config.sampler.length=512 --config.sampler.batch_size=8 \
      --config.mesh.tensor=8 --config.train.compute_dtype=bfloat16 --config.sampler.name=llada \
      --config.sampler.steps=256 --config.sampler.llada.block_length=32
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  from dlm_jax import config as config_lib
  from dlm_jax.errors import DLMError

  p = argparse.ArgumentParser(prog="aot_compile_tpu.py", description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--config", help="config file, e.g. configs/bench_25m.py")
  src.add_argument("--hf_config", help="a Hugging Face config.json (LLaDA, Dream, Fast-dLLM v2, SDAR), e.g. "
                   "configs/hf/llada_8b_instruct.json: the model dlm-convert would make of it")
  p.add_argument("--topology", required=True, help="TPU topology name, e.g. v5e:2x2, v4:2x2x2, v5p:2x2x1")
  p.add_argument("--sampler", action="store_true", help="compile a forward and the configured sampler (inference) "
                 "instead of the train step")
  p.add_argument("--params_dtype", choices=("float32", "bfloat16"), default="float32",
                 help="with --sampler: the parameters' dtype")
  p.add_argument("--prompt_len", type=int, default=0, help="with --sampler: prompt tokens before the generated ones")
  p.add_argument("--hlo", default="", help="also write the compiled HLO text to this file")
  try:
    overrides = config_lib.parse_override_args(argv)
    a = p.parse_args(config_lib.strip_override_args(argv))
    if a.config:
      cfg = config_lib.load(a.config, overrides)
    else:
      from dlm_jax import convert
      hf = convert._load_json(a.hf_config, "Hugging Face config")
      arch = convert.detect(hf)
      cfg = convert.build_config(arch, hf, convert.model_shape(arch, hf), None, {})
      config_lib.apply_overrides(cfg, overrides)
      config_lib.validate(cfg)
  except DLMError as e:
    print(f"aot_compile_tpu.py: error: {e}", file=sys.stderr)
    return 2

  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host discovery on non-TPU machines
  import jax
  from jax.experimental import topologies

  from dlm_jax.build import build
  from dlm_jax.train import check_batch

  try:
    topo = topologies.get_topology_desc(a.topology, platform="tpu")
  except Exception as e:  # libtpu missing or an unknown topology name
    print(f"aot_compile_tpu.py: error: cannot describe TPU topology '{a.topology}' ({str(e).splitlines()[0][:200]}); "
          "pip install libtpu and use a name like v5e:2x2 or v4:2x2x2", file=sys.stderr)
    return 2
  devices = list(topo.devices)
  try:
    run = build(cfg, devices=devices)
    check_batch(run)
  except DLMError as e:
    print(f"aot_compile_tpu.py: error: {e}", file=sys.stderr)
    return 2
  report = {"topology": a.topology, "devices": len(devices), "device_kind": devices[0].device_kind,
            "hosts": len({d.process_index for d in devices}), "mesh": dict(run.mesh.shape),
            "num_params": int(sum(x.size for x in jax.tree.leaves(run.abstract_params)))}
  if a.sampler:
    try:
      programs = _inference_programs(run, a.params_dtype, a.prompt_len)
    except DLMError as e:
      print(f"aot_compile_tpu.py: error: {e}", file=sys.stderr)
      return 2
    report.update({"params_dtype": a.params_dtype, "compute_dtype": cfg.train.compute_dtype,
                   "sampler_name": programs.pop("sampler_name"), "batch": cfg.sampler.batch_size,
                   "prompt_len": a.prompt_len, "length": programs.pop("length")})
    for name, compiled in programs.items():
      report[name] = _figures(compiled)
    compiled = programs["sampler"]
  else:
    lowered = lower_train_step(run)
    with jax.set_mesh(run.mesh):
      compiled = lowered.compile()
    report.update(_figures(compiled, flops_key="per_device_flops_per_step"))
  if a.hlo:
    with open(a.hlo, "w") as f:
      f.write(compiled.as_text())
    report["hlo"] = a.hlo
  print(json.dumps(report, indent=2))
  return 0


def lower_train_step(run, lowering_platforms=None):
  """The jit-compiled train step of dlm_jax.train (what `dlm-train` runs), lowered for abstract state and token batch
  in their shardings over `run.mesh` (nothing is allocated). `lowering_platforms`, e.g. ("cuda",): lower for a
  platform this host has no device of (StableHLO only; such a program cannot be compiled here). Call it outside
  `jax.set_mesh` (it sets the mesh for the trace itself; the optimizer's sharding tree is built eagerly, which fails
  under a mesh of compile-only TPU devices); compile the result under `jax.set_mesh(run.mesh)`."""
  import jax
  import jax.numpy as jnp

  from dlm_jax.train import abstract_train_state, make_optimizer, make_train_step, state_shardings, with_shardings

  cfg = run.cfg
  opt = make_optimizer(cfg)
  abstract = abstract_train_state(run, opt)
  shardings = state_shardings(run, opt, abstract)
  state = with_shardings(abstract, shardings)
  batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jnp.int32, sharding=run.batch_sharding())
  step = make_train_step(run, opt, shardings)
  with jax.set_mesh(run.mesh):
    traced = step.trace(state, batch)
    return traced.lower() if lowering_platforms is None else traced.lower(lowering_platforms=tuple(lowering_platforms))


def _figures(compiled, flops_key: str = "per_device_flops") -> dict:
  """XLA's per-device memory (bytes) and FLOP estimates of a compiled program."""
  out = {}
  mem = compiled.memory_analysis()
  if mem is not None:
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes"):
      if hasattr(mem, k):
        out[f"per_device_{k}"] = int(getattr(mem, k))
    out["per_device_total_gib"] = round(sum(out.get(f"per_device_{k}_size_in_bytes", 0)
                                            for k in ("argument", "output", "temp")) / 2 ** 30, 3)
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older JAX: one dict per computation
    cost = cost[0] if cost else None
  if cost and "flops" in cost:
    out[flops_key] = float(cost["flops"])
  return out


def _inference_programs(run, params_dtype: str, prompt_len: int) -> dict:
  """Compiled {forward, sampler} for abstract parameters placed in their shardings (nothing is allocated)."""
  import jax
  import jax.numpy as jnp

  from dlm_jax import config as config_lib
  from dlm_jax.errors import DLMError
  from dlm_jax.evaluate import sampler_fn

  cfg = run.cfg
  gen = cfg.sampler.length or cfg.data.seq_len
  length = prompt_len + gen
  if length > cfg.model.max_seq_len:
    raise DLMError(f"--prompt_len {prompt_len} + sampler.length {gen} exceeds model.max_seq_len "
                   f"{cfg.model.max_seq_len}")
  batch = cfg.sampler.batch_size
  if batch % run.batch_shards:
    raise DLMError(f"sampler.batch_size={batch} must be a multiple of the mesh's data x fsdp = {run.batch_shards}")
  dt = jnp.bfloat16 if params_dtype == "bfloat16" else jnp.float32
  params = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, dt, sharding=sh), run.abstract_params,
                        run.param_shardings)
  canvas = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=run.batch_sharding())
  keys = jax.ShapeDtypeStruct((batch, 2), jnp.uint32, sharding=run.batch_sharding())
  pstate = jax.eval_shape(run.process.init_state, jax.random.PRNGKey(0))
  sample, x64, _ = sampler_fn(run, prompt_len)

  def forward(p, c):  # one network call of the sampler: the family's own forward over the canvas
    net = run.process.sampling_net(run.apply_fn, p, pstate, c, cfg.sampler.steps)
    return net.logits_fn(c, jnp.full((batch,), 0.5, jnp.float32))

  out = {"length": length, "sampler_name": config_lib.sampler_options(cfg)[0].name}
  with jax.set_mesh(run.mesh), x64:
    try:  # the token-id families; the continuous ones' sampling nets take their own states, not a token canvas
      jax.eval_shape(forward, params, canvas)
    except (TypeError, ValueError):
      pass
    else:
      out["forward"] = jax.jit(forward).lower(params, canvas).compile()
    out["sampler"] = jax.jit(sample).lower(params, keys, canvas, pstate).compile()
  return out


if __name__ == "__main__":
  sys.exit(main())
