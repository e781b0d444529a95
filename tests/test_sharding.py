"""Sharding (dlm_jax/sharding.py): the mesh (data, fsdp, sequence, tensor; multi-slice data parallel over DCN) and the
logical-axis rules. Proven two ways:

  * on 8 forced CPU devices, a context-parallel mesh (mesh.sequence = 2, with fsdp / data / tensor / emulated slices)
    trains to the same losses and gradient norms as one device, with no involuntary rematerialisation;
  * the train step compiled for TPU topologies through libtpu (compile-only, on this CPU host) and its HLO read: with
    FSDP no parameter is all-gathered whole outside what FSDP must do (see `whole_weight_gathers`), the embedding
    table's gradient is reduce-scattered rather than all-reduced whole (`whole_all_reduces`), and the SPMD partitioner
    reports no involuntary full rematerialisation. LLaDA-8B compiles and fits on two v5p slices (mesh.dcn_data = 2).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import require_libtpu

from dlm_jax import config as config_lib
from dlm_jax import sharding
from dlm_jax.errors import DLMError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGHT = "--xla_force_host_platform_device_count=8"

# --- the mesh -------------------------------------------------------------------------------------------------------


def _mesh_cfg(**kw):
  base = {"data": -1, "fsdp": 1, "sequence": 1, "tensor": 1, "dcn_data": 1}
  base.update(kw)
  return types.SimpleNamespace(**base)


class _Dev:
  """A stand-in device: platform and slice index are all make_mesh reads."""

  def __init__(self, i, platform="tpu", slice_index=0):
    self.id, self.platform, self.slice_index = i, platform, slice_index

  def __repr__(self):
    return f"dev{self.id}@{self.slice_index}"


def test_mesh_axes_and_fill():
  devs = [_Dev(i, "cpu") for i in range(8)]
  m = sharding.make_mesh(_mesh_cfg(fsdp=2, sequence=2), devs)
  assert m.axis_names == ("data", "fsdp", "sequence", "tensor")
  assert dict(m.shape) == {"data": 2, "fsdp": 2, "sequence": 2, "tensor": 1}
  with pytest.raises(DLMError, match="at most one of"):
    sharding.make_mesh(_mesh_cfg(data=-1, sequence=-1), devs)
  with pytest.raises(DLMError, match="uses 12 devices but 8 exist"):
    sharding.make_mesh(_mesh_cfg(data=3, fsdp=2, sequence=2), devs)


def test_dcn_data_is_the_outer_factor_of_the_data_axis():
  """Two v5e:2x2 slices (libtpu's compile-only devices): the data axis is slice-major (its first half is slice 0), so
  only the data axis's gradient reduction crosses slices; the per-slice sizes split each slice. A mesh.dcn_data that
  is not the number of slices is a one-line error, on TPU and in dlm-compile."""
  require_libtpu()
  from dlm_jax import aot
  devs = aot.topology_devices("v5e:2x2", 2)
  m = sharding.make_mesh(_mesh_cfg(dcn_data=2, data=1, fsdp=2, sequence=2), devs)
  assert dict(m.shape) == {"data": 2, "fsdp": 2, "sequence": 2, "tensor": 1}
  assert {d.slice_index for d in m.devices[0].flat} == {0} and {d.slice_index for d in m.devices[1].flat} == {1}
  with pytest.raises(DLMError, match="span 2 slices.*set mesh.dcn_data=2"):
    sharding.make_mesh(_mesh_cfg(fsdp=2), devs)
  with pytest.raises(DLMError, match="one slice; set mesh.dcn_data=1"):
    sharding.make_mesh(_mesh_cfg(dcn_data=2), aot.topology_devices("v5e:2x2"))
  cfg = config_lib.default_config()
  aot.slices_mesh(cfg, 2)
  assert cfg.mesh.dcn_data == 2  # --num_slices 2 derives it from the default
  cfg.mesh.dcn_data = 4
  with pytest.raises(DLMError, match="mesh.dcn_data=4 but --num_slices 2"):
    aot.slices_mesh(cfg, 2)


def test_dcn_data_on_cpu_splits_the_device_list():
  """On CPU, consecutive groups of the device list stand for slices."""
  cpu = [_Dev(i, "cpu") for i in range(8)]
  m = sharding.make_mesh(_mesh_cfg(dcn_data=2, fsdp=4), cpu)
  assert dict(m.shape)["data"] == 2 and [d.id for d in m.devices[0].flat] == [0, 1, 2, 3]
  with pytest.raises(DLMError, match="does not divide the 8 devices"):
    sharding.make_mesh(_mesh_cfg(dcn_data=3), cpu)


def test_rules_split_length_over_sequence_and_weights_over_fsdp_and_sequence():
  devs = [_Dev(i, "cpu") for i in range(8)]
  m = sharding.make_mesh(_mesh_cfg(data=1, fsdp=2, sequence=2, tensor=2), devs)
  from jax.sharding import PartitionSpec as P
  assert sharding.spec_for(("batch", "length", "embed"), (8, 16, 64), m) == P("fsdp", "sequence", None)
  assert sharding.spec_for(("batch", "length", "heads", "kv"), (8, 16, 4, 16), m) == P("fsdp", "sequence", "tensor",
                                                                                        None)
  assert sharding.spec_for(("embed", "mlp"), (64, 128), m) == P(("fsdp", "sequence"), "tensor")
  assert sharding.spec_for(("layers", "embed", "mlp"), (2, 64, 128), m) == P(None, ("fsdp", "sequence"), "tensor")


def test_config_keys_are_validated():
  cfg = config_lib.default_config()
  assert cfg.mesh.sequence == 1 and cfg.mesh.dcn_data == 1
  for key, value, msg in (("mesh.sequence", "0", "mesh.sequence must be -1"),
                          ("mesh.dcn_data", "0", "mesh.dcn_data must be >= 1"),
                          ("mesh.sequence", "3", r"data.seq_len \(128\) must be divisible by mesh.sequence \(3\)")):
    c = config_lib.default_config()
    config_lib.apply_overrides(c, [("data.seq_len", "128"), (key, value)])
    with pytest.raises(DLMError, match=msg):
      config_lib.validate(c)


# --- 8 CPU devices vs one -------------------------------------------------------------------------------------------

# Runs in a subprocess with 8 forced host devices: for each named mesh, the same initial state and batches trained for
# 3 steps; prints {mesh: {"loss": [...], "grad_norm": [...]}} as one JSON line. "one" runs on the first device alone.
_TRAIN_SCRIPT = r"""
import json, sys
import jax, numpy as np
from dlm_jax import config as config_lib
from dlm_jax.build import build
from dlm_jax.train import abstract_train_state, init_train_state, make_optimizer, make_train_step, state_shardings

spec = json.loads(sys.argv[1])
rows = np.random.RandomState(0).randint(0, 200, size=(3, spec["batch"], spec["seq_len"])).astype(np.int32)
out = {}
for name, over in spec["meshes"].items():
  cfg = config_lib.default_config()
  config_lib.apply_overrides(cfg, list(spec["base"].items()) + list(over.items()))
  config_lib.validate(cfg)
  run = build(cfg, jax.devices()[:1] if name == "one" else jax.devices())
  opt = make_optimizer(cfg)
  shardings = state_shardings(run, opt, abstract_train_state(run, opt))
  state = init_train_state(run, opt, shardings)
  step = make_train_step(run, opt, shardings)
  got = {"loss": [], "grad_norm": [], "mesh": dict(run.mesh.shape)}
  with jax.set_mesh(run.mesh):
    for tokens in rows:
      state, metrics = step(state, jax.device_put(tokens, run.batch_sharding()))
      got["loss"].append(float(metrics["loss"]))
      got["grad_norm"].append(float(metrics["grad_norm"]))
  out[name] = got
print(json.dumps(out))
"""

_BASE = {"model.num_layers": "2", "model.d_model": "64", "model.num_heads": "4", "model.mlp_dim": "128",
         "model.max_seq_len": "32", "data.seq_len": "16", "train.batch_size": "8", "train.warmup_steps": "1",
         "train.learning_rate": "1e-3", "model.attention": "xla"}

# context parallel with each other axis; two emulated slices
_MESHES = {
    "one": {},
    "data2_fsdp2_seq2": {"mesh.data": "2", "mesh.fsdp": "2", "mesh.sequence": "2"},
    "fsdp2_seq2_tensor2": {"mesh.data": "1", "mesh.fsdp": "2", "mesh.sequence": "2", "mesh.tensor": "2"},
    "seq8": {"mesh.data": "1", "mesh.sequence": "8"},
    "dcn2_fsdp2_seq2": {"mesh.dcn_data": "2", "mesh.data": "1", "mesh.fsdp": "2", "mesh.sequence": "2"},
}


def _train_on_meshes(base: dict, meshes: dict) -> tuple[dict, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + EIGHT).strip()
  env["JAX_PLATFORMS"] = "cpu"
  spec = {"base": base, "meshes": meshes, "batch": int(base["train.batch_size"]), "seq_len": int(base["data.seq_len"])}
  r = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, json.dumps(spec)], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def _check_same(out: dict, stderr: str):
  assert "Involuntary full rematerialization" not in stderr, "a sharding forces XLA to replicate a tensor"
  one = out.pop("one")
  for name, got in out.items():
    np.testing.assert_allclose(got["loss"], one["loss"], rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(got["grad_norm"], one["grad_norm"], rtol=1e-4, err_msg=name)


@pytest.mark.slow(minutes=3)
@pytest.mark.parametrize("family", ["masked", "block"])
def test_context_parallel_meshes_train_like_one_device(family):
  """Masked diffusion (bidirectional attention over L) and block diffusion (the BD3 mask over the [x_t | x_0] trunk of
  2L, split along its length too) under layer scan: every mesh gives one device's losses and gradient norms."""
  base = dict(_BASE, **{"diffusion.process": family, "model.scan_layers": "True"})
  if family == "block":
    base["diffusion.block_size"] = "4"
  out, err = _train_on_meshes(base, _MESHES)
  assert out["seq8"]["mesh"] == {"data": 1, "fsdp": 1, "sequence": 8, "tensor": 1}
  assert out["dcn2_fsdp2_seq2"]["mesh"] == {"data": 2, "fsdp": 2, "sequence": 2, "tensor": 1}
  _check_same(out, err)


# --- the compiled HLO on TPU topologies -----------------------------------------------------------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ([a-z0-9]+)\[([0-9,]*)\]\S* ([a-z\-]+)\(")
# XLA:TPU writes a gather over DCN-spanning groups as an all-reduce of the shard placed in a zero buffer
_AS_GATHER = re.compile(r"all-reduce(?:-start)?\(%[\w.]*dynamic-update-slice")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply|branch_computations)=\{?%?([\w.\-]+)")


def all_gathers(hlo: str) -> list[dict]:
  """Every all-gather of a compiled HLO module (sync `all-gather` or async `all-gather-start`, array results; and
  the all-reduce of a dynamic-update-slice into zeros that XLA:TPU emits for a gather across slices): its
  computation, result dtype and dims, channel id, and whether it runs inside a while loop (the layer scan's bodies and
  whatever they call). XLA:TPU clones one collective into the fusions that start, continue and overlap it with a
  matmul: the clones share the channel id, so one gather is one channel."""
  calls, found, current = {}, [], None
  loops: set[str] = set()
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      calls.setdefault(current, set())
      continue
    if current is None:
      continue
    for kind, name in _CALLED.findall(line):
      calls[current].add(name)
      if kind == "body":
        loops.add(name)
    i = _INSTRUCTION.match(line)
    if i and (i.group(4) in ("all-gather", "all-gather-start") or
              (i.group(4) in ("all-reduce", "all-reduce-start") and _AS_GATHER.search(line))):
      dims = tuple(int(x) for x in i.group(3).split(",") if x)
      channel = re.search(r"channel_id=(\d+)", line)
      found.append({"name": i.group(1), "computation": current, "dtype": i.group(2), "dims": dims,
                    "channel": int(channel.group(1)) if channel else i.group(1)})
  in_loop, todo = set(), list(loops)
  while todo:
    c = todo.pop()
    if c not in in_loop:
      in_loop.add(c)
      todo.extend(calls.get(c, ()))
  for g in found:
    g["in_loop"] = g["computation"] in in_loop
  return found


def _key(dims) -> tuple:
  """Dims up to transposition and unit axes (XLA gathers a weight in the layout its matmul wants)."""
  return tuple(sorted(d for d in dims if d != 1))


def whole_weight_gathers(hlo: str, abstract_params, compute_dtype: str) -> tuple[list[str], dict]:
  """(problems, summary) of the all-gathers of whole weights in a compiled train step.

  FSDP keeps each weight matrix sharded and all-gathers it when used: once in the forward pass and once in the
  backward pass (with the layers under scan: per layer, inside the scan bodies; embedding and output head: in the
  step's top level). That is expected. A problem is:
    * a stacked weight of the layer scan ([layers, ...]) gathered whole: all layers' weights on every device at once;
    * a weight matrix gathered in float32 when train.compute_dtype is bfloat16: the cast belongs before the gather
      (half the bytes on the wire and in HBM);
    * a weight matrix gathered more than twice (forward + backward; one channel id is one gather) in the step's top
      level or in the loop bodies, i.e. repeatedly.
  Weight matrices are the parameters with two or more non-unit dimensions (the per-layer ones after the layer axis);
  norm scales and biases are vectors. Shapes are compared up to transposition and unit axes."""
  import jax
  weights = {}  # key -> (kind, [paths])
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    name = jax.tree_util.keystr(path)
    stacked = "['layers']" in name
    shape = leaf.shape[1:] if stacked else leaf.shape
    if len(_key(shape)) < 2:
      continue
    weights.setdefault(_key(shape), ("layer" if stacked else "whole", []))[1].append(name)
    if stacked:
      weights.setdefault(_key(leaf.shape), ("stacked", []))[1].append(name)
  problems, channels, summary = [], collections.defaultdict(set), collections.defaultdict(set)
  for g in all_gathers(hlo):
    kind, names = weights.get(_key(g["dims"]), (None, []))
    if kind is None:
      continue
    summary[f"{kind}{'_in_loop' if g['in_loop'] else ''}_{g['dtype']}"].add(g["channel"])
    channels[(g["in_loop"], _key(g["dims"]))].add(g["channel"])
    if kind == "stacked":
      problems.append(f"{g['name']}: all layers of {names[0]} gathered at once ({g['dtype']}{list(g['dims'])})")
    if compute_dtype == "bfloat16" and g["dtype"] == "f32":
      problems.append(f"{g['name']}: {names[0]} gathered in float32 ({list(g['dims'])}) with bfloat16 compute")
  for (in_loop, key), found in channels.items():
    kind, names = weights[key]
    if len(found) > 2 * len(names):
      problems.append(f"{names[0]} ({kind}, {len(names)} of that shape) gathered {len(found)} times "
                      f"{'in the loop bodies' if in_loop else 'in the top level'}")
  return problems, {k: len(v) for k, v in summary.items()}


_BAD_HLO = """HloModule bad

%body (p: (s32[], bf16[4,12,16])) -> (s32[], bf16[4,12,16]) {
  %ag.0 = bf16[4,12,16]{2,1,0} all-gather(bf16[2,12,16]{2,1,0} %x), channel_id=1, dimensions={0}
  %ag.1 = bf16[12,16]{1,0} all-gather(bf16[6,16]{1,0} %y), channel_id=2, dimensions={0}
}

%cond (p: (s32[], bf16[4,12,16])) -> pred[] {
}

ENTRY %main (a: f32[16,8]) -> f32[] {
  %ag.2 = f32[8,16]{1,0} all-gather(f32[4,16]{1,0} %a), channel_id=3, dimensions={0}
  %ag.3 = bf16[1,16,8]{2,1,0} all-gather(bf16[1,4,8]{2,1,0} %b), channel_id=4, dimensions={1}
  %ag.4 = bf16[16,8]{1,0} all-gather(bf16[4,8]{1,0} %c), channel_id=5, dimensions={0}
  %ag.4b = bf16[16,8]{1,0} all-gather-start(bf16[4,8]{1,0} %c), channel_id=5, dimensions={0}
  %w = (s32[], bf16[4,12,16]) while(%t), condition=%cond, body=%body
}
"""


def test_whole_weight_check_finds_stacked_float32_and_repeated_gathers():
  """The HLO check itself, on a hand-written module: a stacked layer weight gathered whole, the head gathered in
  float32 with bf16 compute, the head gathered three times (two instructions of one channel are one gather); the
  per-layer gather in the loop body is FSDP's and passes."""
  import jax
  import jax.numpy as jnp
  params = {"layers": {"w": jax.ShapeDtypeStruct((4, 12, 16), jnp.float32)},
            "head": jax.ShapeDtypeStruct((16, 8), jnp.float32), "norm": jax.ShapeDtypeStruct((16,), jnp.float32)}
  gathers = all_gathers(_BAD_HLO)
  assert [g["in_loop"] for g in gathers] == [True, True, False, False, False, False]
  problems, summary = whole_weight_gathers(_BAD_HLO, params, "bfloat16")
  assert summary == {"stacked_in_loop_bf16": 1, "layer_in_loop_bf16": 1, "whole_f32": 1, "whole_bf16": 2}
  assert len(problems) == 3, problems
  assert "ag.0: all layers of ['layers']['w'] gathered at once" in problems[0]
  assert "ag.2: ['head'] gathered in float32" in problems[1]
  assert "['head'] (whole, 1 of that shape) gathered 3 times in the top level" in problems[2]
  assert whole_weight_gathers(_BAD_HLO, params, "float32")[0] == problems[::2]


def whole_all_reduces(hlo: str, dims) -> list[str]:
  """The computations holding an all-reduce whose result has `dims` (up to transposition and unit axes) and that are
  not XLA:TPU's reduce-scatter (an `all-reduce-scatter` fusion keeps only the device's shard): a gradient summed whole
  on every device before it is sliced to its shard."""
  out, current = [], None
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(1)
      continue
    result = re.match(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) all-reduce(?:-start)?\(", line)
    if result is None or current.startswith("all-reduce-scatter"):
      continue
    for _, shape in re.findall(r"([a-z0-9]+)\[([0-9,]*)\]", result.group(1)):  # an array or a tuple of them
      if _key(int(x) for x in shape.split(",") if x) == _key(dims):
        out.append(current)
  return out


def _compile(tmp_path, *argv) -> tuple[dict, str, str]:
  """dlm-compile in a subprocess (the SPMD partitioner's warnings go to its stderr): (report, HLO text, stderr)."""
  require_libtpu()
  hlo = str(tmp_path / "step.hlo")
  env = dict(os.environ, TPU_WORKER_HOSTNAMES="localhost", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  r = subprocess.run([sys.executable, "-m", "dlm_jax.aot", *argv, "--hlo", hlo], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
  with open(hlo) as f:
    return json.loads(r.stdout.strip().splitlines()[-1]), f.read(), r.stderr


def _abstract_params(config: str, *overrides: str):
  import jax
  from dlm_jax import aot
  over = [kv for kv in config_lib.parse_override_args(list(overrides)) if not kv[0].startswith("mesh.")]
  cfg = config_lib.load(os.path.join(REPO, "configs", config), over)  # the parameters' shapes, on any mesh
  return aot._build(cfg, jax.devices()[:1], 0).abstract_params  # pylint: disable=protected-access


@pytest.mark.slow(minutes=4)
@pytest.mark.parametrize("topology,mesh", [
    ("v5e:2x2", ("--config.mesh.data=1", "--config.mesh.fsdp=4")),
    ("v5e:4x4", ("--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.sequence=2", "--config.mesh.tensor=2")),
])
def test_fsdp_train_step_gathers_no_whole_weights(tmp_path, topology, mesh):
  """bench_25m (6 layers under scan, bf16 compute) compiled for a TPU slice with FSDP (and context + tensor
  parallelism): no involuntary full rematerialisation in the partitioner's log, no stacked / float32 / repeated weight
  gathers (`whole_weight_gathers`), and the per-layer FSDP gathers inside the scan bodies."""
  over = (*mesh, "--config.train.compute_dtype=bfloat16", "--config.model.scan_layers=True")
  report, hlo, err = _compile(tmp_path, "--config", os.path.join(REPO, "configs", "bench_25m.py"), "--topology",
                              topology, *over)
  assert "Involuntary full rematerialization" not in err, [l for l in err.splitlines() if "Involuntary" in l][:3]
  problems, summary = whole_weight_gathers(hlo, _abstract_params("bench_25m.py", *over), "bfloat16")
  print(topology, report["mesh"], f"compile {report['compile_s']} s", summary)
  assert not problems, problems
  if "tensor=2" not in " ".join(mesh):  # with tensor parallelism a layer's gathered weights are its tensor shard
    assert summary.get("layer_in_loop_bf16") and not any(k.startswith("layer_") and "loop" not in k for k in summary)
  # the embedding table's gradient is reduce-scattered (`model.embed_lookup`), never all-reduced whole
  assert not whole_all_reduces(hlo, (258, 512)), whole_all_reduces(hlo, (258, 512))


@pytest.mark.slow(minutes=2)
def test_two_slices_data_parallel_over_dcn(tmp_path):
  """bench_25m on two v5e:2x2 slices (--num_slices 2 sets mesh.dcn_data = 2): the data axis is 2 slices x 1 within
  each, FSDP over each slice's 4 chips; it compiles, fits, and its HLO passes the whole-weight check. (LLaDA-8B on two
  v5p:4x4x4 slices, 62.1 of 95 GiB per chip, is the same check at scale: `dlm-compile --config configs/llada_8b.py
  --topology v5p:4x4x4 --num_slices 2`, ~2 min to compile here, so not in CI.)"""
  over = ("--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.train.compute_dtype=bfloat16",
          "--config.model.scan_layers=True")
  report, hlo, err = _compile(tmp_path, "--config", os.path.join(REPO, "configs", "bench_25m.py"), "--topology",
                              "v5e:2x2", "--num_slices", "2", *over)
  assert report["devices"] == 8 and report["num_slices"] == 2
  assert report["mesh"] == {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}
  assert report["per_device_total_gib"] < report["hbm_gib"]
  assert "Involuntary full rematerialization" not in err
  problems, summary = whole_weight_gathers(hlo, _abstract_params("bench_25m.py", *over), "bfloat16")
  print(f"compile {report['compile_s']} s, {report['per_device_total_gib']} GiB per chip", summary)
  assert not problems, problems


# Runs with 8 forced host devices: splash attention (Pallas interpret mode) on a (1, 2, 2, 2) mesh with the queries
# split along the sequence axis as the model leaves them; prints the largest differences from one device.
_KERNEL_SCRIPT = r"""
import json, types
import jax, jax.numpy as jnp, numpy as np
from dlm_jax import attention as attn_lib, masks, sharding

mesh = sharding.make_mesh(types.SimpleNamespace(data=1, fsdp=2, sequence=2, tensor=2, dcn_data=1))
out = {}
for spec in (masks.FULL, masks.bd3(16)):
  rng = np.random.default_rng(0)
  q, ct = (jnp.asarray(rng.standard_normal((2, 256, 4, 64)), jnp.float32) for _ in range(2))
  k, v = (jnp.asarray(rng.standard_normal((2, 256, 2, 64)), jnp.float32) for _ in range(2))
  seg = jnp.asarray([[0] * 200 + [1] * 56, [0] * 256], jnp.int32)  # two documents packed in the first row

  @jax.jit
  def run(q, k, v, ct):
    def f(q, k, v):
      q = sharding.constrain(q, ("batch", "length", "heads", "kv"))
      k, v = (sharding.constrain(x, ("batch", None, "heads", "kv")) for x in (k, v))
      o = attn_lib.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, mask=spec, implementation="splash",
                             interpret=True)
      return sharding.constrain(o, ("batch", "length", "heads", "kv"))
    o, vjp = jax.vjp(f, q, k, v)
    return (o,) + vjp(ct)

  one = run(q, k, v, ct)
  with jax.set_mesh(mesh):
    assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v, ct))
    many = run(q, k, v, ct)
  out[str(spec)] = [float(jnp.abs(a - b).max()) for a, b in zip(one, many)]
print(json.dumps(out))
"""


@pytest.mark.slow(minutes=1)
def test_splash_kernel_under_a_sequence_axis_matches_one_device():
  """The Pallas kernels take the whole sequence of their batch / head shard (`dlm_jax.kernels`): with the queries
  split over mesh.sequence (and fsdp, tensor), splash's outputs and gradients equal one device's, full and BD3 masks."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + EIGHT).strip()
  env["JAX_PLATFORMS"] = "cpu"
  r = subprocess.run([sys.executable, "-c", _KERNEL_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                     timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Involuntary full rematerialization" not in r.stderr
  for spec, diffs in json.loads(r.stdout.strip().splitlines()[-1]).items():
    assert max(diffs) < 1e-4, (spec, diffs)
