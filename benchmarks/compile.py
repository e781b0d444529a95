"""Will each preset fit its TPU slice, how fast, at which batch (issue 16's figures): `dlm-compile` over the presets.

  python benchmarks/compile.py [--presets mdlm_owt_110m,llada_8b] [--policies full,dots_saveable]
                               [--frontier_presets ...] [--no_find_batch] [--no_depth] [--unscanned_depth] [--json FILE]

Per preset (configs/NAME.py, on the slice its docstring's `dlm-compile ... --topology T` line names), the real train
step compiled through libtpu on this CPU host (`dlm_jax/aot.py`, no TPU needed):
  preset table  per-device memory (arguments + outputs + temporaries, less donated buffers) against the chip's HBM;
                FLOPs per device and step read from the compiled program (`dlm_jax.hlo_cost`: matmuls with every
                loop body times its trip count, plus the analytic attention FLOPs of a Pallas kernel) next to the
                analytic mask-aware count; its HBM bytes; est. step time (roofline: max of FLOPs / peak, HBM bytes /
                HBM bandwidth) and est. MFU = analytic FLOPs / (est. step time x peak); the compile wall time.
  frontier      per remat policy (--policies; default all of model.REMAT_POLICIES) the largest per-device batch that
                fits without accumulation (`aot.find_batch`) and its est. step time and MFU.
  depth         compile wall time of llada_8b's train step on its slice with 8 vs 32 layers under scan (should be
                ~flat), and unscanned for comparison with --unscanned_depth (minutes at 32 layers).
The est. MFU is an upper bound (no communication, perfect overlap of compute and memory traffic): a preset below 50%
here will not reach 50% on the chip. Each compile takes tens of seconds to minutes on a laptop core: the whole run takes
hours (run it in the background: nohup python benchmarks/compile.py > compile.txt &). Needs libtpu (the test extra).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from dlm_jax import aot  # noqa: E402
from dlm_jax import config as config_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("mdlm_owt_110m", "bd3_owt_110m", "flow_owt_110m", "langflow_owt_110m", "cobit_owt_110m", "llada_1b",
           "llada_8b")


def preset_slice(name: str) -> str:
  with open(os.path.join(ROOT, "configs", f"{name}.py")) as f:
    found = re.search(r"dlm-compile --config configs/\S+ --topology (\S+)", f.read())
  if not found:
    raise SystemExit(f"configs/{name}.py names no slice (a 'dlm-compile --config ... --topology T' line)")
  return found.group(1)


def say(line: str = "") -> None:
  print(line, flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--presets", default=",".join(PRESETS))
  p.add_argument("--policies", default="", help="remat policies for the frontier (default: all)")
  p.add_argument("--frontier_presets", default="", help="presets for the frontier (default: --presets)")
  p.add_argument("--no_find_batch", action="store_true")
  p.add_argument("--no_depth", action="store_true")
  p.add_argument("--unscanned_depth", action="store_true", help="also time the unscanned 8- and 32-layer compiles")
  p.add_argument("--json", default="", help="also write every figure to this file")
  a = p.parse_args(argv)
  from dlm_jax import model as model_lib
  policies = [x for x in a.policies.split(",") if x] or list(model_lib.REMAT_POLICIES)
  out = {"presets": {}, "frontier": {}, "depth": []}

  def dump():
    if a.json:
      with open(a.json, "w") as f:
        json.dump(out, f, indent=1)

  say("| preset | slice | params | batch (per device x accum) | remat | GiB / device (of HBM) | TFLOP / device "
      "(compiled) | analytic TFLOP / device | HBM GB / device | est. step s | est. MFU | compile s |")
  say("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for name in [x for x in a.presets.split(",") if x]:
    topology = preset_slice(name)
    devices = aot.topology_devices(topology)
    chip = aot.chip_of(topology)
    cfg = config_lib.load(os.path.join(ROOT, "configs", f"{name}.py"), [])
    try:
      rep, _ = aot.compile_train(cfg, devices, chip)
    except aot.DoesNotFit as e:
      say(f"| {name} | {topology} | | {cfg.train.batch_size} | {cfg.model.remat} | {e} | | | | | | |")
      out["presets"][name] = {"topology": topology, "does_not_fit": str(e)}
      dump()
      continue
    rep["topology"] = topology
    out["presets"][name] = rep
    compiled = rep.get("hlo_flops_per_device", 0.0) + rep.get("kernel_flops_per_device", 0.0)
    accum = rep["grad_accum_steps"]
    micro = rep["per_device_batch"] // accum
    say(f"| {name} | {topology} | {rep['num_params'] / 1e6:.0f}M | {rep['batch']} ({micro} x {accum}) | "
        f"{rep.get('remat')} | {rep['per_device_total_gib']:.2f} ({rep['hbm_gib']:.0f}) | {compiled / 1e12:.2f} | "
        f"{rep['analytic_flops_per_device'] / 1e12:.2f} | {(rep['hlo_hbm_bytes_per_device'] + rep.get('kernel_hbm_bytes_per_device', 0)) / 1e9:.1f} | "
        f"{rep['est_step_s']:.3f} | {rep['est_mfu']:.1%} | {rep['compile_s']} |")
    dump()
  if not a.no_depth:
    topology = preset_slice("llada_8b")
    devices = aot.topology_devices(topology)
    say(f"\nllada_8b train step on {topology}: compile wall time vs depth")
    say("| layers | scan | compile s | GiB / device |")
    say("|---|---|---|---|")
    for scan in (True, False) if a.unscanned_depth else (True,):
      for layers in (8, 32):
        cfg = config_lib.load(os.path.join(ROOT, "configs", "llada_8b.py"),
                              [("model.num_layers", layers), ("model.scan_layers", scan)])
        try:
          rep, _ = aot.compile_train(cfg, devices, aot.chip_of(topology))
          row = {"layers": layers, "scan": scan, "compile_s": rep["compile_s"], "gib": rep["per_device_total_gib"]}
        except aot.DoesNotFit as e:
          row = {"layers": layers, "scan": scan, "compile_s": None, "gib": str(e)}
        out["depth"].append(row)
        say(f"| {layers} | {scan} | {row['compile_s']} | {row['gib']} |")
        dump()
  if not a.no_find_batch:
    for name in [x for x in (a.frontier_presets or a.presets).split(",") if x]:
      topology = preset_slice(name)
      devices = aot.topology_devices(topology)
      cfg = config_lib.load(os.path.join(ROOT, "configs", f"{name}.py"), [])
      t0 = time.perf_counter()
      frontier = aot.find_batch(cfg, devices, aot.chip_of(topology), policies=policies)
      out["frontier"][name] = {"topology": topology, "rows": frontier, "seconds": round(time.perf_counter() - t0)}
      say(f"\n{name} on {topology}: largest per-device batch per remat policy (no accumulation), "
          f"{time.perf_counter() - t0:.0f} s")
      say(aot.frontier_table(frontier))
      dump()
  say(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
