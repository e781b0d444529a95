"""`dlm-compile`: will this config fit on that TPU slice, and how fast will it be? (ahead-of-time, on any host)

  dlm-compile --config configs/mdlm_owt_110m.py --topology v5e:4x4 [--config.KEY=VALUE ...]
              [--sampler] [--find_batch] [--num_slices N] [--vocab N] [--hlo FILE]

`jax.experimental.topologies.get_topology_desc(TOPOLOGY, platform="tpu", num_slices=N)` describes the chips of a slice
(compile-only devices; libtpu is the compiler, no TPU is needed). The run's mesh is built over them exactly as
`dlm-train` builds it (mesh.* keys), the jit-compiled train step of dlm_jax.train (or, with --sampler, one forward of
the model and the configured sampler) is lowered with abstract, sharded inputs (nothing is allocated) and compiled by
XLA:TPU. Printed: a table and one JSON line with the mesh, the parameter count, XLA's per-device memory (arguments,
outputs, temporaries, total) against the chip's HBM, the FLOPs per step from the analytic mask-aware count
(`step_flops`) next to XLA's cost analysis (which does not see inside Pallas kernels), and an estimated step time and
MFU at the chip's figures (`CHIPS`). XLA's own cost analysis (reported as xla_flops_per_device /
xla_bytes_accessed_per_device) cannot be the roofline on TPU: it counts a while loop's body once (a layer scan, the
gradient-accumulation loop, and the "windowed einsum" loops XLA:TPU makes of FSDP matmuls) and counts on-chip (VMEM)
traffic as memory traffic. The estimate reads the compiled program instead (`dlm_jax.hlo_cost`): its matmul FLOPs with
every loop body times its trip count (hlo_flops_per_device), its HBM bytes (hlo_hbm_bytes_per_device), and the
analytic FLOPs of the attention when a Pallas kernel runs it (kernel_flops_per_device: XLA sees a custom call, whose
operands the HLO count reads once; kernel_hbm_bytes_per_device adds a flash kernel's re-reads of keys and values).
est_step_s = the roofline max((HLO + kernel FLOPs) / bf16 peak, HBM bytes / HBM bandwidth) per device, est_mfu =
analytic FLOPs / (est_step_s x peak): an upper bound (no communication, perfect overlap), so a config below ~50% here
will not reach it on the chip. The layer scan needs no special treatment: its trip count multiplies its body.
A post-training config (train.objective sft, grpo or wd1) compiles that objective's step, with LoRA (lora.rank > 0)
over the adapters and the base a frozen argument: shapes only, train.init_from is not read (`post_training_step`;
distill is not covered).

Exit status: 0 = compiles and fits; 2 = a config or topology error, or "does not fit: needs X GiB of Y GiB per
device"; 1 = another error. `--find_batch` searches the largest per-device batch (train.batch_size = per-device x data
x fsdp, no accumulation) that fits, for each remat policy when the config has model.remat (secant steps on the
per-device memory line, each probe a compile: `largest_fitting`), and prints the frontier with each policy's est. step
time and MFU at that batch ("+": the search's limit, 4096, fits).

A tokenizer.json that is not on this machine (the presets name GPT-2's) does not stop a compile: only its size matters,
taken from --vocab (default: 50257 when the path names gpt2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time

from dlm_jax import config as config_lib
from dlm_jax import hlo_cost
from dlm_jax.errors import DLMError


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_gib: float  # HBM per chip
  peak_tflops: float  # dense bf16 TFLOP/s per chip
  hbm_gbps: float  # HBM bandwidth, GB/s per chip


# Per chip, from Google Cloud's TPU documentation (cloud.google.com/tpu/docs/system-architecture-tpu-vm and the
# per-generation pages /tpu/docs/v4, /v5e, /v5p, /v6e): HBM capacity, peak bf16 compute, HBM bandwidth.
CHIPS = {
    "v4": Chip("v4", 32.0, 275.0, 1200.0),
    "v5e": Chip("v5e", 16.0, 197.0, 819.0),
    "v5p": Chip("v5p", 95.0, 459.0, 2765.0),
    "v6e": Chip("v6e", 32.0, 918.0, 1640.0),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}

# XLA:TPU's out-of-memory messages: "... memory required for HLO temporaries (38.45G) exceeds available HBM (15.75G)",
# or "Used 38.5G of 15.75G hbm"
_OOM_PATTERNS = (re.compile(r"\(([0-9.]+)([KMGT]?)\) exceeds available HBM \(([0-9.]+)([KMGT]?)\)"),
                 re.compile(r"Used ([0-9.]+)([KMGT]?) of ([0-9.]+)([KMGT]?) hbm"))


def _gib(value: str, unit: str) -> float:
  return float(value) * {"": 2 ** -30, "K": 2 ** -20, "M": 2 ** -10, "G": 1.0, "T": 1024.0}[unit]


def chip_of(topology: str) -> Chip | None:
  gen = topology.split(":")[0].split("-")[0].lower()
  return CHIPS.get(_ALIASES.get(gen, gen))


class DoesNotFit(Exception):

  def __init__(self, needs_gib: float, hbm_gib: float):
    super().__init__(f"does not fit: needs {needs_gib:.2f} GiB of {hbm_gib:.2f} GiB per device")
    self.needs_gib, self.hbm_gib = needs_gib, hbm_gib


# --- analytic FLOPs ---------------------------------------------------------------------------------------------------


def train_flops_per_token(mc, seq_len: int, attention_fraction: float = 1.0) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), counted analytically.

  Matmuls: 6 x (attention and MLP weights + the output head). The embedding lookup is not a matmul.
  Attention: QK^T and AV cost 2 * 2 * L * d_attn per token per layer forward; `attention_fraction` is the share of the
  score matrix the mask leaves (1 for the bidirectional mask of masked diffusion, ~1/2 for causal).
  """
  d, h, k, hd, f = mc.d_model, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.mlp_dim
  per_layer = d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f
  matmul_params = mc.num_layers * per_layer + d * mc.vocab_out
  attn = mc.num_layers * 4 * seq_len * h * hd * attention_fraction
  return 6 * matmul_params + 3 * attn


def attention_mask(cfg):
  """(MaskSpec, trunk length) of the family's training forward: block diffusion runs the trunk over [x_t | x_0]
  (2L) under the BD3 mask; every other family attends bidirectionally over L."""
  from dlm_jax import masks
  length = cfg.data.seq_len
  if cfg.diffusion.process == "block":
    return masks.bd3(cfg.diffusion.block_size), 2 * length
  return masks.FULL, length


def step_flops(run, batch_size: int | None = None, tile: int = 128) -> dict:
  """Analytic FLOPs of one train step (forward + backward) of `run`, mask-aware: the attention share is the key tiles a
  block-sparse kernel visits at its model.attention_block_q x model.attention_block_kv tiles (0: `tile`, splash's
  default 128; `MaskSpec.tiles_visited`), the matmuls run over the trunk's tokens (2L for block diffusion) and the
  output head over L. The continuous flow's one-hot input projection counts as a matmul (forward and weight gradient:
  no gradient flows into the data); self-conditioning's first forward counts (LangFlow's embedding-space terms around
  the head, z E^T and softmax E, do not: its count is below the program's). With LoRA (lora.rank > 0) only the
  targeted weights get weight gradients (the adapters' own rank-r products are not counted)."""
  cfg, mc = run.cfg, run.model_config
  b = cfg.train.batch_size if batch_size is None else batch_size
  length = cfg.data.seq_len
  spec, n = attention_mask(cfg)
  tq, tk = (min(size or tile, n) for size in (cfg.model.attention_block_q, cfg.model.attention_block_kv))
  visited, dense = spec.tiles_visited(n, n, tq, tk) if n % tq == 0 and n % tk == 0 else (1, 1)
  frac = visited / dense
  d, h, k, hd, f = mc.d_model, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.mlp_dim
  layer_params = mc.num_layers * (d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f)
  head = d * mc.vocab_out
  inp = d * mc.vocab_in if cfg.diffusion.process == "flow" and not cfg.diffusion.flow_embed_state else 0
  # self-conditioning (embedding_flow, bitstream) runs a first, gradient-free forward over the whole batch (static
  # shapes): one more forward pass, 2 of the 6 FLOPs per parameter and token
  passes = 3 + (1 if cfg.diffusion.process in ("embedding_flow", "bitstream") and cfg.diffusion.self_cond_prob > 0
                else 0)
  # the one-hot input projection has no gradient with respect to its input (the data): forward + weight gradient
  matmul = 2 * passes * b * (n * layer_params + length * head) + 2 * (passes - 1) * b * n * inp
  if cfg.lora.rank:  # LoRA: the frozen weights (all but lora.targets, and the head) get no weight gradient
    per_target = {"q": d * h * hd, "k": d * k * hd, "v": d * k * hd, "o": h * hd * d, "gate": d * f, "up": d * f,
                  "down": d * f}
    targeted = mc.num_layers * sum(per_target[t.strip()] for t in cfg.lora.targets.split(","))
    matmul -= 2 * b * (n * (layer_params - targeted) + length * head)
  attention = passes * b * mc.num_layers * 4 * n * n * h * hd * frac
  total = matmul + attention
  return {"flops_per_step": float(total), "attention_flops_share": round(attention / total, 4), "passes": passes,
          "mask": str(spec), "mask_tiles_fraction": round(frac, 4), "attention_tiles": [tq, tk], "trunk_len": n}


# --- compiling --------------------------------------------------------------------------------------------------------


def post_training_step(run):
  """(objective, abstract batch, space run, abstract frozen) of the step `dlm-train` runs for cfg.train.objective, from
  shapes alone (nothing is read: train.init_from and data.path need not exist). SFT: the conditional bound
  (`posttrain.sft.objective_fn`) over 'tokens', 'target' [B, L] bool and, without sft.train_on_padding, 'segment_ids';
  grpo / wd1: the rollout batch of `posttrain.rl` (L = rl.prompt_length + rl.completion_length; 'old_logp' when
  rl.iterations > 1 under grpo, the frozen 'reference' when rl.beta > 0). With lora.rank > 0 the state is the adapters
  and frozen['lora_base'] the base (`train.abstract_trainable`). Pretraining: (None, None, run, None)."""
  import jax
  import jax.numpy as jnp

  from dlm_jax.train import abstract_trainable

  cfg = run.cfg
  name = cfg.train.objective
  if name == "pretrain":
    return None, None, run, None
  b = cfg.train.batch_size
  rows = lambda length, dtype: jax.ShapeDtypeStruct((b, length), dtype, sharding=run.batch_sharding())  # noqa: E731
  per_row = lambda dtype: jax.ShapeDtypeStruct((b,), dtype, sharding=run.batch_sharding(1))  # noqa: E731
  if name == "sft":
    from dlm_jax.posttrain import sft
    sft.check(cfg, run)
    length = cfg.data.seq_len
    objective = sft.objective_fn(run.process, cfg.sft.normalize)
    batch = {"tokens": rows(length, jnp.int32), "target": rows(length, jnp.bool_)}
    if not cfg.sft.train_on_padding:
      batch["segment_ids"] = rows(length, jnp.int32)
    needs_reference = False
  elif name in ("grpo", "wd1"):
    from dlm_jax.posttrain import rl
    rl.check(cfg, run)
    r = cfg.rl
    length = r.prompt_length + r.completion_length
    objective = rl.objective_fn(run.process, name, r.clip, r.beta, r.group_size)
    batch = {"tokens": rows(length, jnp.int32), "logp_mask": rows(length, jnp.bool_),
             "scored": rows(length, jnp.bool_), "reward": per_row(jnp.float32)}
    batch["advantage" if name == "grpo" else "weight"] = per_row(jnp.float32)
    if name == "grpo" and r.iterations > 1:
      batch["old_logp"] = rows(length, jnp.float32)
    needs_reference = r.beta > 0
  else:
    raise DLMError(f"dlm-compile covers train.objective = pretrain, sft, grpo and wd1, not {name!r}")
  space, frozen = abstract_trainable(cfg, run, needs_reference)
  return objective, batch, space, frozen


def lower_train_step(run, lowering_platforms=None):
  """The jit-compiled train step of dlm_jax.train (what `dlm-train` runs), lowered for abstract state and token batch
  in their shardings over `run.mesh` (nothing is allocated). `lowering_platforms`, e.g. ("cuda",): lower for a
  platform this host has no device of (StableHLO only; such a program cannot be compiled here). Call it outside
  `jax.set_mesh` (it sets the mesh for the trace itself; the optimizer's sharding tree is built eagerly, which fails
  under a mesh of compile-only TPU devices); compile the result under `jax.set_mesh(run.mesh)`. A post-training
  objective (train.objective) compiles its own step: its batch fields, and with LoRA the adapters as the state and the
  base as a frozen argument (`post_training_step`)."""
  import jax
  import jax.numpy as jnp

  from dlm_jax.train import abstract_train_state, make_optimizer, make_train_step, state_shardings, with_shardings

  cfg = run.cfg
  opt = make_optimizer(cfg)
  objective, post_batch, space, frozen = post_training_step(run)
  abstract = abstract_train_state(space, opt)
  shardings = state_shardings(space, opt, abstract)
  state = with_shardings(abstract, shardings)
  if objective is None:
    batch = jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len), jnp.int32, sharding=run.batch_sharding())
    step = make_train_step(run, opt, shardings)
    args = (state, batch)
  else:
    step = make_train_step(space, opt, shardings, objective, frozen)
    args = (state, post_batch) if frozen is None else (state, post_batch, frozen)
  with jax.set_mesh(run.mesh):
    traced = step.trace(*args)
    return traced.lower() if lowering_platforms is None else traced.lower(lowering_platforms=tuple(lowering_platforms))


def figures(compiled, flops_key: str = "per_device_flops") -> dict:
  """XLA's per-device memory (bytes) and FLOP estimates of a compiled program."""
  out = {}
  mem = compiled.memory_analysis()
  if mem is not None:
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes",
              "alias_size_in_bytes"):
      if hasattr(mem, k):
        out[f"per_device_{k}"] = int(getattr(mem, k))
    total = sum(out.get(f"per_device_{k}_size_in_bytes", 0) for k in ("argument", "output", "temp"))
    total -= out.get("per_device_alias_size_in_bytes", 0)  # donated state: outputs reuse the arguments' buffers
    out["per_device_total_gib"] = round(total / 2 ** 30, 3)
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older JAX: one dict per computation
    cost = cost[0] if cost else None
  if cost and "flops" in cost:
    out[flops_key] = float(cost["flops"])
  if cost and "bytes accessed" in cost:
    out["xla_bytes_accessed_per_device"] = float(cost["bytes accessed"])
  walked = hlo_cost.program_cost(compiled.as_text())
  out.update({"hlo_flops_per_device": walked.flops, "hlo_hbm_bytes_per_device": walked.hbm_bytes,
              "hlo_custom_calls": walked.custom_calls, "kernel_forward_calls": walked.kernel_forward_calls,
              "kernel_backward_calls": walked.kernel_backward_calls})
  if walked.unknown_trip_counts:
    out["hlo_unknown_trip_counts"] = walked.unknown_trip_counts  # such loops were counted once
  return out


_figures = figures  # the name launch/aot_compile_tpu.py's callers used


def inference_programs(run, params_dtype: str, prompt_len: int) -> dict:
  """Compiled {forward, sampler} for abstract parameters placed in their shardings (nothing is allocated)."""
  import jax
  import jax.numpy as jnp

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


_inference_programs = inference_programs


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """Compile-only devices of a TPU topology (DLMError for a name libtpu does not know, or without libtpu)."""
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host discovery on non-TPU machines
  from jax.experimental import topologies
  try:
    kw = {"num_slices": num_slices} if num_slices > 1 else {}
    topo = topologies.get_topology_desc(topology, platform="tpu", **kw)
  except Exception as e:  # pylint: disable=broad-except  (libtpu missing or an unknown topology name)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    raise DLMError(f"cannot describe TPU topology '{topology}' ({first}); use a name like v5e:2x2, v5p:2x2x1 or "
                   "v4:2x2x2 (pip install libtpu)") from None
  return list(topo.devices)


def slices_mesh(cfg, num_slices: int) -> None:
  """--num_slices N: the slices are data parallel over DCN (mesh.dcn_data = N; left at its default 1 it is set to N,
  any other value is an error). The per-slice mesh.* sizes then split each slice's chips (`sharding.make_mesh`)."""
  if num_slices > 1 and cfg.mesh.dcn_data == 1:
    cfg.mesh.dcn_data = num_slices
  elif cfg.mesh.dcn_data != num_slices:
    raise DLMError(f"mesh.dcn_data={cfg.mesh.dcn_data} but --num_slices {num_slices}: the slices are the DCN data "
                   f"axis; pass --num_slices {cfg.mesh.dcn_data} or set mesh.dcn_data={num_slices}")


def _build(cfg, devices, vocab: int):
  """dlm_jax.build.build over `devices`, with a stand-in tokenizer of `vocab` ids when data.tokenizer names a
  tokenizer.json that is not on this machine (only its size shapes the program)."""
  from dlm_jax import build as build_lib
  from dlm_jax import data
  from dlm_jax.train import check_batch
  tok = cfg.data.tokenizer
  if tok not in ("bytes", "none") and not os.path.isfile(tok):
    n = vocab or (50257 if "gpt2" in tok.lower() else 0)
    if not n:
      raise DLMError(f"data.tokenizer '{tok}' is not on this machine; pass --vocab N (its vocabulary size) to compile "
                     "without it")
    stand_in = data.NoTokenizer(n)
    stand_in.eos_id = n - 1
    stand_in.eot_id = None
    stand_in.pad_id = n - 1
    real = build_lib.make_tokenizer
    build_lib.make_tokenizer = lambda *a, **k: stand_in
    try:
      run = build_lib.build(cfg, devices=devices)
    finally:
      build_lib.make_tokenizer = real
  else:
    run = build_lib.build(cfg, devices=devices)
  check_batch(run)
  return run


def _oom(e: Exception) -> DoesNotFit | None:
  msg = str(e)
  for pattern in _OOM_PATTERNS:
    found = pattern.search(msg)
    if found:
      return DoesNotFit(_gib(found.group(1), found.group(2)), _gib(found.group(3), found.group(4)))
  if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
    return DoesNotFit(float("nan"), float("nan"))
  return None


def _compile_step(cfg, devices, chip: Chip | None, vocab: int):
  """(run, compiled train step, seconds): DoesNotFit when XLA runs out of the chip's HBM."""
  import jax
  run = _build(cfg, devices, vocab)
  t0 = time.perf_counter()
  try:
    lowered = lower_train_step(run)
    with jax.set_mesh(run.mesh):
      compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    oom = _oom(e)
    if oom is None:
      raise
    if chip and math.isnan(oom.hbm_gib):
      oom = DoesNotFit(oom.needs_gib, chip.hbm_gib)
    raise oom from None
  return run, compiled, time.perf_counter() - t0


def roofline(report: dict, chip: Chip, batch: int, seq_len: int) -> dict:
  """est_step_s = max((HLO FLOPs + Pallas kernel FLOPs) / peak, HLO HBM bytes / HBM bandwidth, analytic FLOPs / peak)
  per device and est_mfu = analytic FLOPs / (est_step_s x peak) (see the module docstring)."""
  peak = chip.peak_tflops * 1e12
  analytic = report["analytic_flops_per_device"]
  compute = report.get("hlo_flops_per_device", 0.0) + report.get("kernel_flops_per_device", 0.0)
  memory = (report.get("hlo_hbm_bytes_per_device", 0.0) + report.get("kernel_hbm_bytes_per_device", 0.0)) / (
      chip.hbm_gbps * 1e9)
  roof = max(analytic / peak, compute / peak, memory)
  return {"hbm_gib": chip.hbm_gib, "peak_tflops_per_chip": chip.peak_tflops, "hbm_gbps_per_chip": chip.hbm_gbps,
          "est_step_s_at_peak": round(analytic / peak, 4), "est_compute_s": round(compute / peak, 4),
          "est_hbm_s": round(memory, 4), "est_step_s": round(roof, 4),
          "est_mfu": round(min(1.0, analytic / (roof * peak)), 3), "tokens_per_s": round(batch * seq_len / roof)}


def _gib_per_device(tree) -> float:
  """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs, in GiB."""
  import jax
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)) / 2 ** 30


def post_training_figures(run) -> dict:
  """The objective, LoRA rank, trainable parameters and the per-device GiB of the train state (parameters or adapters,
  optimizer state, EMA) and of the frozen arguments (LoRA base, reference) of a post-training step."""
  import jax

  from dlm_jax.train import abstract_train_state, make_optimizer, state_shardings, with_shardings
  cfg = run.cfg
  _, _, space, frozen = post_training_step(run)
  opt = make_optimizer(cfg)
  abstract = abstract_train_state(space, opt)
  state = with_shardings(abstract, state_shardings(space, opt, abstract))
  return {"objective": cfg.train.objective, "lora_rank": int(cfg.lora.rank),
          "trainable_params": int(sum(x.size for x in jax.tree.leaves(space.abstract_params))),
          "state_gib_per_device": round(_gib_per_device(state), 4),
          "frozen_gib_per_device": round(_gib_per_device(frozen or {}), 4)}


def compile_train(cfg, devices, chip: Chip | None, vocab: int = 0) -> tuple[dict, object]:
  """Compile the train step of `cfg` over `devices`: (report, compiled). DoesNotFit when XLA runs out of HBM or the
  per-device total exceeds the chip's."""
  import jax
  from dlm_jax import attention
  run, compiled, seconds = _compile_step(cfg, devices, chip, vocab)
  report = {"mesh": dict(run.mesh.shape), "num_params": int(sum(x.size for x in jax.tree.leaves(run.abstract_params))),
            "batch": cfg.train.batch_size, "per_device_batch": cfg.train.batch_size // run.batch_shards,
            "grad_accum_steps": cfg.train.grad_accum_steps, "seq_len": cfg.data.seq_len,
            "compute_dtype": cfg.train.compute_dtype, "num_layers": cfg.model.num_layers}
  for key in ("remat", "scan_layers"):
    if key in cfg.model:
      report[key] = cfg.model[key]
  report["compile_s"] = round(seconds, 1)
  if cfg.train.objective != "pretrain":
    report.update(post_training_figures(run))
  report.update(figures(compiled, flops_key="xla_flops_per_device"))
  report.update(step_flops(run))
  n = len(devices)
  report["analytic_flops_per_device"] = report["flops_per_step"] / n
  impl = attention.resolve(cfg.model.attention, devices[0].platform, cfg.model.attention_interpret)
  report["attention"] = impl
  if impl in ("splash", "pallas_gpu") and report.get("hlo_custom_calls"):
    # XLA sees the kernel as a custom call: its FLOPs are the analytic attention FLOPs, one unit per forward and two
    # per backward, counting the forwards the compiled program runs per backward (self-conditioning's first pass and a
    # rematerialised layer's second forward included)
    units = report["passes"]
    if report.get("kernel_backward_calls"):
      units = report["kernel_forward_calls"] / report["kernel_backward_calls"] + 2
    attention_flops = report["flops_per_step"] * report["attention_flops_share"] / n
    report["kernel_flops_per_device"] = attention_flops * units / report["passes"]
    # the compiled program counts a kernel's operands once, where a flash kernel re-reads keys and values for each
    # query tile it visits (forward, dq) and queries / output gradients for each key tile (dkv): (tiles per row - 1,
    # at model.attention_block_q)
    # more reads of a [n, kv_heads, head_dim] pair per kernel unit, layer and sequence
    mc, trunk = run.model_config, report["trunk_len"]
    tiles = max(0.0, report["mask_tiles_fraction"] * trunk / report["attention_tiles"][0] - 1)
    itemsize = 2 if cfg.train.compute_dtype == "bfloat16" else 4
    pair = 2 * trunk * mc.num_kv_heads * mc.head_dim * itemsize
    report["kernel_hbm_bytes_per_device"] = units * tiles * pair * mc.num_layers * cfg.train.batch_size / n
  if chip and report.get("per_device_total_gib", 0) > chip.hbm_gib:
    raise DoesNotFit(report["per_device_total_gib"], chip.hbm_gib)
  if report.get("hlo_flops_per_device"):
    report["analytic_over_hlo_flops"] = round(
        report["analytic_flops_per_device"] / (report["hlo_flops_per_device"] +
                                               report.get("kernel_flops_per_device", 0.0)), 3)
  if chip:
    report.update(roofline(report, chip, cfg.train.batch_size, cfg.data.seq_len))
  return report, compiled


def largest_fitting(probe, limit: int) -> int:
  """The largest b in [1, limit] with probe(b)[0] true (0 if none), assuming fitting is monotone in b. probe(b) ->
  (fits, needs_gib, hbm_gib, fixed_gib): the per-device memory b needs (NaN when unknown) against the HBM, and the
  part of it that does not grow with b. Secant steps on the memory line (per-device memory is close to affine in the
  batch), clamped into the bracket [largest fitting, smallest not fitting], with bisection when two steps did not halve
  the bracket (XLA's memory grows in steps near the edge): typically 4-8 compiles instead of a binary search's
  ~2 log2(b)."""
  lo, hi = 0, limit + 1
  points = {}
  hbm = float("nan")
  b = 1
  widths = []
  while True:
    fits, needs, cap, fixed = probe(b)
    hbm = cap if math.isfinite(cap) else hbm
    if math.isfinite(needs):
      points[b] = needs
    if fits:
      lo = b
      if math.isfinite(fixed) and 0 not in points:
        points[0] = fixed
    else:
      hi = b
    if hi - lo <= 1:
      return lo
    widths.append(hi - lo)
    guess = None
    below = [k for k in points if k <= lo]
    above = [k for k in points if k >= hi]
    line = (max(below), min(above)) if below and above else tuple(sorted(below)[-2:]) if len(below) >= 2 else None
    if line and math.isfinite(hbm) and points[line[1]] != points[line[0]]:
      (b0, m0), (b1, m1) = ((k, points[k]) for k in line)
      guess = int(math.floor(b0 + (hbm - m0) * (b1 - b0) / (m1 - m0)))
    if guess is None:
      guess = 2 * lo if hi > limit else (lo + hi) // 2
    if guess <= lo or guess >= hi:
      guess = lo + 1 if guess <= lo else hi - 1
    if hi <= limit and len(widths) >= 3 and 2 * widths[-1] > widths[-3]:
      guess = (lo + hi) // 2  # the line walks the bracket slowly (memory grows in steps near the edge): bisect
    b = guess


def find_batch(cfg, devices, chip, vocab: int = 0, limit: int = 4096, policies=None, log=None) -> list[dict]:
  """Per remat policy (`policies`, default model.remat's choices when the config has it, else the current setting):
  the largest per-device batch (train.batch_size = per-device x data x fsdp, grad_accum_steps 1) that compiles and fits
  (`largest_fitting`), with its memory, est. step time and MFU. A policy this platform cannot compile (e.g. offload
  without host memory) gets its error in the row. `log(line)` hears every probe (default: stderr)."""
  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  if policies is None:
    policies = [None]
    if "remat" in cfg.model:
      from dlm_jax import model as model_lib
      policies = list(model_lib.REMAT_POLICIES)
  run_shards = _build(cfg, devices, vocab).batch_shards
  frontier = []
  for policy in policies:
    reports, errors = {}, []

    def config_at(per_device, policy=policy):
      over = [("train.batch_size", per_device * run_shards), ("train.grad_accum_steps", 1)]
      if policy is not None:
        over.append(("model.remat", policy))
      c = config_lib.config_from_dict(cfg.to_dict())
      config_lib.apply_overrides(c, over)
      return c

    def probe(per_device, policy=policy, reports=reports, errors=errors):
      nan = float("nan")
      if errors:
        return False, nan, nan, nan
      try:
        rep, _ = compile_train(config_at(per_device), devices, chip, vocab)
      except DoesNotFit as e:
        log(f"  remat={policy} per-device batch {per_device}: does not fit ({e.needs_gib:.2f} GiB of "
            f"{e.hbm_gib:.2f})")
        return False, e.needs_gib, e.hbm_gib, nan
      except Exception as e:  # pylint: disable=broad-except  (a policy this platform cannot compile, e.g. offload)
        errors.append((str(e).strip().splitlines() or [type(e).__name__])[0][:160])
        log(f"  remat={policy} per-device batch {per_device}: error: {errors[-1]}")
        return False, nan, nan, nan
      reports[per_device] = rep
      log(f"  remat={policy} per-device batch {per_device}: fits ({rep['per_device_total_gib']:.2f} GiB, compile "
          f"{rep['compile_s']} s)")
      total = rep["per_device_total_gib"]
      fixed = total - rep.get("per_device_temp_size_in_bytes", 0) / 2 ** 30
      return True, total, chip.hbm_gib if chip else nan, fixed

    lo = largest_fitting(probe, limit)
    row = {"remat": policy, "per_device_batch": lo, "batch": lo * run_shards, "limit": lo == limit}
    if errors and not lo:
      row["error"] = errors[0]
    if lo:
      rep = reports[lo]
      row.update({k: rep.get(k) for k in ("per_device_total_gib", "est_step_s", "est_mfu", "est_step_s_at_peak",
                                          "hlo_flops_per_device", "analytic_flops_per_device", "tokens_per_s")})
    frontier.append(row)
  return frontier


# --- the command ------------------------------------------------------------------------------------------------------


def _table(report: dict) -> str:
  gib = lambda k: "-" if k not in report else f"{report[k] / 2 ** 30:.2f} GiB"  # noqa: E731
  rows = [("topology", f"{report['topology']} x {report.get('num_slices', 1)} slice(s), {report['devices']} chips "
           f"({report['device_kind']})"),
          ("mesh", " ".join(f"{k}={v}" for k, v in report["mesh"].items())),
          ("parameters", f"{report['num_params']:,}")]
  if "batch" in report:
    rows.append(("batch", f"{report['batch']} ({report.get('per_device_batch')} per device, accum "
                 f"{report.get('grad_accum_steps')}), L {report.get('seq_len')}, {report.get('compute_dtype')}"))
  if "objective" in report:
    rows.append(("objective", f"{report['objective']}, lora.rank {report['lora_rank']}: "
                 f"{report['trainable_params']:,} trainable; train state {report['state_gib_per_device']:.3f} GiB, "
                 f"frozen {report['frozen_gib_per_device']:.3f} GiB / device"))
  rows += [("arguments / device", gib("per_device_argument_size_in_bytes")),
           ("outputs / device", gib("per_device_output_size_in_bytes")),
           ("temporaries / device", gib("per_device_temp_size_in_bytes")),
           ("total / device", f"{report.get('per_device_total_gib', '-')} GiB of {report.get('hbm_gib', '?')} GiB HBM")]
  if "flops_per_step" in report:
    rows += [("FLOPs / step (analytic)", f"{report['flops_per_step']:.3e} (mask {report['mask']}, "
              f"{report['mask_tiles_fraction']:.3f} of the tiles; attention {report['attention_flops_share']:.1%})"),
             ("FLOPs / device", f"{report.get('hlo_flops_per_device', float('nan')):.3e} matmuls in the compiled "
              f"program + {report.get('kernel_flops_per_device', 0.0):.3e} in Pallas kernels (analytic "
              f"{report['analytic_flops_per_device']:.3e}; XLA's cost analysis, loop bodies once: "
              f"{report.get('xla_flops_per_device') or float('nan'):.3e})"),
             ("HBM bytes / device", f"{report.get('hlo_hbm_bytes_per_device', float('nan')) / 1e9:.2f} GB + "
              f"{report.get('kernel_hbm_bytes_per_device', 0.0) / 1e9:.2f} GB of Pallas kernel re-reads (XLA's "
              f"bytes accessed, on-chip included, loop bodies once: "
              f"{report.get('xla_bytes_accessed_per_device', float('nan')) / 1e9:.2f} GB)")]
  if "est_step_s_at_peak" in report:
    rows += [("est. step time", f"{report['est_step_s']:.4f} s (roofline: compute {report['est_compute_s']:.4f} s at "
              f"{report['peak_tflops_per_chip']:.0f} TFLOP/s, HBM {report['est_hbm_s']:.4f} s at "
              f"{report['hbm_gbps_per_chip']:.0f} GB/s; analytic FLOPs at peak {report['est_step_s_at_peak']:.4f} s)"),
             ("est. MFU", f"{report['est_mfu']:.1%} (analytic FLOPs / est. step time / peak)")]
  for name in ("forward", "sampler"):
    if name in report:
      rows.append((f"{name} total / device", f"{report[name].get('per_device_total_gib', '-')} GiB"))
  if "compile_s" in report:
    rows.append(("compile", f"{report['compile_s']} s"))
  w = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def frontier_table(frontier: list[dict]) -> str:
  lines = [f"{'remat':<14} {'per-device batch':>16} {'batch':>7} {'GiB/device':>10} {'est. step s':>11} "
           f"{'est. MFU':>8}"]
  for r in frontier:
    mfu = "-" if r.get("est_mfu") is None else f"{r['est_mfu']:.1%}"
    step = "-" if r.get("est_step_s") is None else f"{r['est_step_s']:.4f}"
    lines.append(f"{str(r['remat']):<14} {r['per_device_batch']:>16}{'+' if r.get('limit') else ' '}"
                 f"{r['batch']:>7} {str(r.get('per_device_total_gib', '-')):>10} {step:>11} {mfu:>8}"
                 + (f"  ({r['error']})" if "error" in r else ""))
  return "\n".join(lines)


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise DLMError(f"{message}; see --help")


def main(argv=None, prog: str = "dlm-compile") -> int:
  argv = sys.argv[1:] if argv is None else argv
  p = _Parser(prog=prog, description=__doc__.split("\n\n")[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--config", help="config file, e.g. configs/mdlm_owt_110m.py")
  src.add_argument("--hf_config", help="a Hugging Face config.json (LLaDA, Dream, Fast-dLLM v2, SDAR), e.g. "
                   "configs/hf/llada_8b_instruct.json: the model dlm-convert would make of it")
  p.add_argument("--topology", required=True, help="TPU topology name, e.g. v5e:2x2, v5e:16x16, v5p:2x2x2, v4:2x2x2")
  p.add_argument("--num_slices", type=int, default=1, help="slices of the topology (multi-slice: DCN between them)")
  p.add_argument("--sampler", action="store_true", help="compile a forward and the configured sampler (inference) "
                 "instead of the train step")
  p.add_argument("--params_dtype", choices=("float32", "bfloat16"), default="float32",
                 help="with --sampler: the parameters' dtype")
  p.add_argument("--prompt_len", type=int, default=0, help="with --sampler: prompt tokens before the generated ones")
  p.add_argument("--find_batch", action="store_true", help="the largest per-device batch that fits, per remat policy")
  p.add_argument("--vocab", type=int, default=0, help="vocabulary size when data.tokenizer's file is not here")
  p.add_argument("--hlo", default="", help="also write the compiled HLO text to this file")
  try:
    overrides = config_lib.parse_override_args(argv)
    a = p.parse_args(config_lib.strip_override_args(argv))
    if a.config:
      cfg = config_lib.load(a.config, overrides)
    else:
      from dlm_jax import convert
      hf = convert._load_json(a.hf_config, "Hugging Face config")  # pylint: disable=protected-access
      arch = convert.detect(hf)
      cfg = convert.build_config(arch, hf, convert.model_shape(arch, hf), None, {})
      config_lib.apply_overrides(cfg, overrides)
      config_lib.validate(cfg)
    if a.num_slices < 1:
      raise DLMError(f"--num_slices must be >= 1, got {a.num_slices}")
    chip = chip_of(a.topology)
    devices = topology_devices(a.topology, a.num_slices)
    slices_mesh(cfg, a.num_slices)
    report = {"topology": a.topology, "num_slices": a.num_slices, "devices": len(devices),
              "device_kind": devices[0].device_kind, "hosts": len({d.process_index for d in devices})}
    if a.find_batch:
      frontier = find_batch(cfg, devices, chip, a.vocab)
      print(frontier_table(frontier))
      print(json.dumps({**report, "frontier": frontier}))
      return 0
    if a.sampler:
      import jax
      run = _build(cfg, devices, a.vocab)
      report.update({"mesh": dict(run.mesh.shape),
                     "num_params": int(sum(x.size for x in jax.tree.leaves(run.abstract_params)))})
      programs = inference_programs(run, a.params_dtype, a.prompt_len)
      report.update({"params_dtype": a.params_dtype, "compute_dtype": cfg.train.compute_dtype,
                     "sampler_name": programs.pop("sampler_name"), "sampler_batch": cfg.sampler.batch_size,
                     "prompt_len": a.prompt_len, "length": programs.pop("length")})
      for name, compiled in programs.items():
        report[name] = figures(compiled)
      compiled = programs["sampler"]
      if chip:
        report["hbm_gib"] = chip.hbm_gib
        worst = max(report[name].get("per_device_total_gib", 0) for name in programs)
        if worst > chip.hbm_gib:
          raise DoesNotFit(worst, chip.hbm_gib)
    else:
      rep, compiled = compile_train(cfg, devices, chip, a.vocab)
      report.update(rep)
    if a.hlo:
      with open(a.hlo, "w") as f:
        f.write(compiled.as_text())
      report["hlo"] = a.hlo
  except DoesNotFit as e:
    print(str(e))
    return 2
  except DLMError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  print(_table(report))
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
