"""`dlm-compile` (dlm_jax/aot.py): the real train step AOT-compiled for a TPU topology on this CPU host through libtpu
(the test extra installs it; without it the compile tests skip), reported as fitting with its figures, an oversized
batch reported as "does not fit" with exit status 2, a bad topology name as a one-line error; and every preset in
configs/ loads and validates."""

from __future__ import annotations

import glob
import json
import os

import pytest

from dlm_jax import aot
from dlm_jax import config as config_lib
from dlm_jax.build import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("mdlm_owt_110m", "bd3_owt_110m", "flow_owt_110m", "langflow_owt_110m", "cobit_owt_110m", "llada_1b",
           "llada_8b")
FIELDS = ("mesh", "num_params", "per_device_argument_size_in_bytes", "per_device_output_size_in_bytes",
          "per_device_temp_size_in_bytes", "per_device_total_gib", "hbm_gib", "flops_per_step",
          "xla_flops_per_device", "est_step_s", "est_mfu")


def _libtpu():
  try:
    import libtpu  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  except ImportError:
    pytest.skip("libtpu is not installed: it is the TPU compiler these tests run (no TPU needed); "
                "pip install -e '.[test]' brings it")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _run(capsys, *argv):
  code = aot.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_validate_and_build(name):
  """Each preset loads (schema), validates, names its source and slice, and builds abstractly (a stand-in for a
  tokenizer.json that is not here); the 110M ones are ~110M parameters, LLaDA-8B is 8.02B."""
  import jax
  path = os.path.join(ROOT, "configs", f"{name}.py")
  cfg = config_lib.load(path, [])
  config_lib.validate(cfg)
  with open(path) as f:
    doc = f.read()
  assert "Sized for a v" in doc and "dlm-compile --config" in doc, name
  run = aot._build(cfg, jax.devices()[:1], 0)  # pylint: disable=protected-access
  n = sum(x.size for x in jax.tree.leaves(run.abstract_params))
  if name == "llada_8b":
    assert n == 8_015_581_184
  elif name.endswith("110m"):
    assert 80e6 < n < 250e6, (name, n)  # the one-hot flow adds a V x d input projection
  if "scan_layers" in cfg.model and name.startswith("llada"):
    assert cfg.model.scan_layers


def test_every_config_file_loads():
  for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    config_lib.load(path, [])


def test_analytic_flops_are_mask_aware():
  """The BD3 trunk over 2L visits fewer attention tiles than the full mask; the count matches 6 N T + attention."""
  import jax
  masked = config_lib.load(os.path.join(ROOT, "configs", "mdlm_owt_110m.py"), [])
  block = config_lib.load(os.path.join(ROOT, "configs", "bd3_owt_110m.py"), [])
  fm = aot.step_flops(aot._build(masked, jax.devices()[:1], 0))  # pylint: disable=protected-access
  fb = aot.step_flops(aot._build(block, jax.devices()[:1], 0))  # pylint: disable=protected-access
  assert fm["mask"] == "full" and fm["mask_tiles_fraction"] == 1.0 and fm["trunk_len"] == 1024
  assert fb["mask"] == "bd3(16)" and 0.25 < fb["mask_tiles_fraction"] < 0.35 and fb["trunk_len"] == 2048
  assert 6 * 512 * 1024 * 85e6 < fm["flops_per_step"] < 6 * 512 * 1024 * 160e6


def test_bad_topology_is_a_one_line_error(capsys):
  _libtpu()
  code, out, err = _run(capsys, "--config", os.path.join(ROOT, "configs", "bench_25m.py"), "--topology", "v99:9x9")
  assert code == 2 and out == ""
  assert err.count("\n") == 1 and "cannot describe TPU topology 'v99:9x9'" in err, err


@pytest.mark.slow(minutes=2)
def test_bench_25m_fits_on_v5e_2x2(capsys):
  _libtpu()
  code, out, err = _run(capsys, "--config", os.path.join(ROOT, "configs", "bench_25m.py"), "--topology", "v5e:2x2")
  assert code == 0, err
  report = json.loads(out.strip().splitlines()[-1])
  for key in FIELDS:
    assert key in report, key
  assert report["devices"] == 4 and report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert report["num_params"] == 25_436_160 and report["hbm_gib"] == 16.0
  assert 0 < report["per_device_total_gib"] < 16.0 and 0 < report["est_mfu"] <= 1.0
  assert "total / device" in out and "est. MFU" in out
  print(out)


@pytest.mark.slow(minutes=2)
def test_an_oversized_batch_does_not_fit(capsys):
  _libtpu()
  code, out, err = _run(capsys, "--config", os.path.join(ROOT, "configs", "bench_25m.py"), "--topology", "v5e:2x2",
                        "--config.train.batch_size=2048", "--config.model.attention=xla")
  assert code == 2, (out, err)
  lines = out.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("does not fit: needs ") and "GiB per device" in lines[0], out


@pytest.mark.slow(minutes=2)
def test_llada_8b_train_step_fits_on_its_v5p_slice(capsys):
  """configs/llada_8b.py on the slice it names (v5p:4x4x8, 128 chips, batch 1280 x 4096, layers under scan with full
  remat): ~54 GiB of 95 per chip; with scan the compile takes well under a minute."""
  _libtpu()
  cfg = config_lib.load(os.path.join(ROOT, "configs", "llada_8b.py"), [])
  if not cfg.model.get("scan_layers"):
    pytest.skip("model.scan_layers is not in this tree: the unrolled 32 layers compile too slowly for a test")
  code, out, err = _run(capsys, "--config", os.path.join(ROOT, "configs", "llada_8b.py"), "--topology", "v5p:4x4x8")
  assert code == 0, (out, err)
  report = json.loads(out.strip().splitlines()[-1])
  assert report["num_params"] == 8_015_581_184 and report["devices"] == 128
  assert report["per_device_total_gib"] < report["hbm_gib"] == 95.0
