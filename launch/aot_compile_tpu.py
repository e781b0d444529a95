"""Ahead-of-time compile the dlm_jax train step for a TPU topology on a machine without TPUs (e.g. a CPU laptop or CI).

  pip install libtpu            # (or: pip install -e ".[tpu]") - the TPU compiler; no TPU needed to compile
  python launch/aot_compile_tpu.py --config configs/bench_25m.py --topology v5e:2x2 [--config.KEY=VALUE ...]

`jax.experimental.topologies.get_topology_desc(TOPOLOGY, platform="tpu")` describes the chips of a slice (compile-only
devices). The script builds the run's mesh over them exactly as `dlm-train` would (mesh.* keys), lowers the jit-compiled
train step of dlm_jax.train with abstract, sharded inputs (no parameters are allocated) and compiles it with XLA:TPU.
It catches sharding and shape errors, and out-of-memory for that chip, before you pay for TPU time, and prints
XLA's per-device memory and FLOP estimates. Exit status 0 = the step compiles, 2 = a config error, 1 = another error.
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
  p.add_argument("--config", required=True, help="config file, e.g. configs/bench_25m.py")
  p.add_argument("--topology", required=True, help="TPU topology name, e.g. v5e:2x2, v4:2x2x2, v5p:2x2x1")
  p.add_argument("--hlo", default="", help="also write the compiled HLO text to this file")
  try:
    overrides = config_lib.parse_override_args(argv)
    a = p.parse_args(config_lib.strip_override_args(argv))
    cfg = config_lib.load(a.config, overrides)
  except DLMError as e:
    print(f"aot_compile_tpu.py: error: {e}", file=sys.stderr)
    return 2

  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host discovery on non-TPU machines
  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies

  from dlm_jax.build import build
  from dlm_jax.train import (abstract_train_state, check_batch, make_optimizer, make_train_step, state_shardings,
                             with_shardings)

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
  opt = make_optimizer(cfg)
  abstract = abstract_train_state(run, opt)
  shardings = state_shardings(run, opt, abstract)
  state = with_shardings(abstract, shardings)
  batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jnp.int32, sharding=run.batch_sharding())
  step = make_train_step(run, opt, shardings)
  with jax.set_mesh(run.mesh):
    compiled = step.lower(state, batch).compile()

  report = {"topology": a.topology, "devices": len(devices), "device_kind": devices[0].device_kind,
            "hosts": len({d.process_index for d in devices}), "mesh": dict(run.mesh.shape),
            "num_params": int(sum(x.size for x in jax.tree.leaves(abstract["params"])))}
  mem = compiled.memory_analysis()
  if mem is not None:
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes"):
      if hasattr(mem, k):
        report[f"per_device_{k}"] = int(getattr(mem, k))
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older JAX: one dict per computation
    cost = cost[0] if cost else None
  if cost and "flops" in cost:
    report["per_device_flops_per_step"] = float(cost["flops"])
  if a.hlo:
    with open(a.hlo, "w") as f:
      f.write(compiled.as_text())
    report["hlo"] = a.hlo
  print(json.dumps(report, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
