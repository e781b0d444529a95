"""dlm-convert: Hugging Face LLaDA / Dream / Fast-dLLM v2 / SDAR checkpoints in and out of dlm_jax.

Parity: logits of the converted fixtures (tests/fixtures/hf/<arch>/, made with the reference modeling code by
tests/fixtures/make_hf_fixtures.py) against the recorded ones; round trip bit identity; the multi-shard, single-file
and tokenizer-less paths; bad input (one error line, nothing written); the CLI commands on converted workdirs.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_cli

from dlm_jax import convert
from dlm_jax.errors import DLMError
from dlm_jax.train import load_for_inference

FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf")
ARCHS = ("llada", "dream", "fast_dllm_v2", "sdar")
MASK_FLAG = {"fast_dllm_v2": 305}  # its config.json does not name the mask id (the real one is 151665)


def fixture(arch: str) -> str:
  path = os.path.join(FIXTURES, arch)
  if not os.path.isfile(os.path.join(path, "config.json")):
    pytest.skip(f"fixture {arch} not present")
  return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """{arch: workdir} of every fixture converted once (float32, as stored)."""
  root = tmp_path_factory.mktemp("converted")
  out = {}
  for arch in ARCHS:
    if os.path.isfile(os.path.join(FIXTURES, arch, "config.json")):
      out[arch] = str(root / arch)
      convert.from_hf(os.path.join(FIXTURES, arch), out[arch], mask_id=MASK_FLAG.get(arch))
  return out


def _tensors(hf_dir: str) -> dict[str, np.ndarray]:
  out = {}
  for shard in sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors")):
    header, base = convert.read_header(os.path.join(hf_dir, shard))
    for name, info in header.items():
      out[name] = np.array(convert.read_tensor(os.path.join(hf_dir, shard), info, base))
  return out


# --- parity with the reference code ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_reference(arch, converted):
  """Our forward on the converted checkpoint gives the reference logits (max abs diff <= 1e-4, float32): plain
  (bidirectional) inputs, Dream's left-padded input (4-D mask, positions cumsum - 1; pad rows not compared) and the
  block-causal inputs of Fast-dLLM v2 / SDAR (query i sees key j iff j // 4 <= i // 4)."""
  fixture(arch)
  cfg, run, params, _ = load_for_inference(converted[arch])
  e = np.load(os.path.join(FIXTURES, arch, "expected.npz"))
  x = jnp.asarray(e["logits_plain_input_ids"], jnp.int32)
  assert np.max(np.abs(np.asarray(run.apply_fn(params, x)) - e["logits_plain"])) <= 1e-4
  if "logits_blockcausal" in e:
    fn = run.apply_fn.logits_fn(params, block_size=cfg.diffusion.block_size)
    assert cfg.diffusion.block_size == 4
    assert np.max(np.abs(np.asarray(fn(x, None)) - e["logits_blockcausal"])) <= 1e-4
  if "logits_padded" in e:
    real = e["logits_padded_attention_mask"].astype(bool)
    canvas = jnp.asarray(np.where(real, e["logits_padded_input_ids"], -1), jnp.int32)
    got = np.asarray(run.apply_fn.logits_fn(params)(canvas, None))
    assert np.max(np.abs(np.where(real[..., None], got - e["logits_padded"], 0.0))) <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_converted_config(arch, converted):
  """The family, block size, mask id, logit shift and special ids come from the checkpoint."""
  fixture(arch)
  cfg, run, _, _ = load_for_inference(converted[arch])
  ref = json.load(open(os.path.join(FIXTURES, arch, "expected.json")))["config"]
  assert cfg.diffusion.process == ("block" if arch in ("fast_dllm_v2", "sdar") else "masked")
  assert run.process.mask_id == ref["mask_id"] and run.process.vocab_out == ref["vocab"] == cfg.model.vocab_size
  assert cfg.model.logit_shift == (arch in ("dream", "fast_dllm_v2")) == run.apply_fn.logit_shift
  assert not cfg.diffusion.suppress_mask_logit and not run.process.suppress_mask
  assert cfg.model.qkv_bias == (arch in ("dream", "fast_dllm_v2")) and cfg.model.qk_norm == (arch == "sdar")
  assert run.tokenizer.eos_id == ref.get("eos_id", ref.get("eos_id_config"))
  assert (cfg.data.tokenizer == "none") == (arch in ("fast_dllm_v2", "sdar"))
  if arch == "llada":
    assert run.tokenizer.eot_id == ref["eot_id"]
  if arch == "dream":
    assert run.tokenizer.eot_id == ref["im_end_id"]


# --- round trip ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_bit_identical(arch, converted, tmp_path):
  """HF -> dlm_jax -> HF: every tensor bit-identical, same shards, the same index, every other file copied."""
  src = fixture(arch)
  out = str(tmp_path / "hf")
  res = convert.to_hf(converted[arch], out)
  assert res["architecture"] == arch
  a, b = _tensors(src), _tensors(out)
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
    assert a[name].tobytes() == b[name].tobytes(), name
  assert sorted(f for f in os.listdir(src) if f.endswith(".safetensors")) == \
      sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  if os.path.isfile(os.path.join(src, convert.INDEX)):
    assert json.load(open(os.path.join(src, convert.INDEX)))["weight_map"] == \
        json.load(open(os.path.join(out, convert.INDEX)))["weight_map"]
  for name in os.listdir(src):
    if not name.endswith(".safetensors") and name != convert.INDEX:
      assert open(os.path.join(src, name), "rb").read() == open(os.path.join(out, name), "rb").read()


def test_written_files_read_by_safetensors(converted, tmp_path):
  """The shards --to_hf writes are ordinary safetensors files (the safetensors package reads them)."""
  fixture("dream")
  from safetensors.numpy import load_file
  out = str(tmp_path / "hf")
  convert.to_hf(converted["dream"], out)
  ours = _tensors(out)
  for shard in (f for f in os.listdir(out) if f.endswith(".safetensors")):
    for name, value in load_file(os.path.join(out, shard)).items():
      np.testing.assert_array_equal(value, ours[name])


def test_bfloat16_cast(tmp_path):
  """--dtype bfloat16 stores bfloat16 parameters (round to nearest; they restore as float32 holding bfloat16
  values); --to_hf casts back to the source dtype."""
  src = fixture("sdar")
  wd = str(tmp_path / "wd")
  convert.from_hf(src, wd, dtype="bfloat16")
  _, _, params, _ = load_for_inference(wd)
  embed = np.asarray(params["embed"])
  np.testing.assert_array_equal(embed, embed.astype(jnp.bfloat16).astype(np.float32))
  convert.to_hf(wd, str(tmp_path / "hf"))
  a, b = _tensors(src), _tensors(str(tmp_path / "hf"))
  for name in a:
    assert b[name].dtype == np.float32
    np.testing.assert_allclose(b[name], a[name], rtol=2 ** -8, atol=0)


# --- synthetic checkpoints: single file, tied head, bad input ---------------------------------------------------------


def _copy(src: str, dst) -> str:
  shutil.copytree(src, dst)
  return str(dst)


def _single_file(tmp_path) -> str:
  """The LLaDA fixture rewritten as one model.safetensors without an index (written with the safetensors package)."""
  from safetensors.numpy import save_file
  d = tmp_path / "single"
  d.mkdir()
  src = fixture("llada")
  save_file(_tensors(src), str(d / "model.safetensors"))
  for name in ("config.json", "tokenizer.json"):
    shutil.copy(os.path.join(src, name), d / name)
  return str(d)


def test_single_file_without_index(tmp_path):
  src = _single_file(tmp_path)
  wd = str(tmp_path / "wd")
  convert.from_hf(src, wd)
  _, run, params, _ = load_for_inference(wd)
  e = np.load(os.path.join(FIXTURES, "llada", "expected.npz"))
  out = run.apply_fn(params, jnp.asarray(e["logits_plain_input_ids"], jnp.int32))
  assert np.max(np.abs(np.asarray(out) - e["logits_plain"])) <= 1e-4
  convert.to_hf(wd, str(tmp_path / "back"))
  assert not os.path.exists(tmp_path / "back" / convert.INDEX)
  a, b = _tensors(src), _tensors(str(tmp_path / "back"))
  assert all(a[n].tobytes() == b[n].tobytes() for n in a)


def test_tied_head(tmp_path):
  """tie_word_embeddings: no lm_head tensor, our head is the input table (no `head` parameter)."""
  src = _copy(fixture("sdar"), tmp_path / "tied")
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg["tie_word_embeddings"] = True
  json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
  tensors = _tensors(src)
  del tensors["lm_head.weight"]
  for f in os.listdir(src):
    if f.endswith(".safetensors") or f == convert.INDEX:
      os.remove(os.path.join(src, f))
  from safetensors.numpy import save_file
  save_file(tensors, os.path.join(src, "model.safetensors"))
  wd = str(tmp_path / "wd")
  convert.from_hf(src, wd)
  _, run, params, _ = load_for_inference(wd)
  assert "head" not in params
  x = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
  logits = run.apply_fn(params, x)
  assert logits.shape == (1, 4, 320)


def _bad(src: str, tmp_path, match: str, **kw):
  out = tmp_path / "out"
  with pytest.raises(DLMError, match=match) as err:
    convert.from_hf(src, str(out), **kw)
  assert "\n" not in str(err.value)
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if ".converting-" in p]  # the staging directory is gone


def test_bad_input_unknown_architecture(tmp_path):
  src = _copy(fixture("llada"), tmp_path / "src")
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
  json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
  _bad(src, tmp_path, "model_type 'gpt2'.*supports LLaDA")


def test_bad_input_missing_shard(tmp_path):
  src = _copy(fixture("llada"), tmp_path / "src")
  os.remove(os.path.join(src, "model-00003-of-00004.safetensors"))
  _bad(src, tmp_path, "names the shard model-00003-of-00004.safetensors")


def test_bad_input_shape_mismatch(tmp_path):
  src = _copy(fixture("llada"), tmp_path / "src")
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg["mlp_hidden_size"] = 96
  json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
  _bad(src, tmp_path, "has shape .* but config.json implies")


def test_bad_input_index_names_wrong_file(tmp_path):
  src = _copy(fixture("llada"), tmp_path / "src")
  index = json.load(open(os.path.join(src, convert.INDEX)))
  name = "model.transformer.ln_f.weight"
  index["weight_map"][name] = next(f for f in sorted(set(index["weight_map"].values()))
                                   if f != index["weight_map"][name])
  json.dump(index, open(os.path.join(src, convert.INDEX), "w"))
  _bad(src, tmp_path, "does not hold it")


def test_bad_input_truncated_file(tmp_path):
  src = _copy(fixture("llada"), tmp_path / "src")
  path = os.path.join(src, "model-00002-of-00004.safetensors")
  data = open(path, "rb").read()
  open(path, "wb").write(data[:len(data) - 100])
  _bad(src, tmp_path, "truncated")


def test_bad_input_out_not_empty(tmp_path):
  src = fixture("llada")
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("x")
  with pytest.raises(DLMError, match="already exists and is not empty"):
    convert.from_hf(src, str(out))
  assert os.listdir(out) == ["keep.txt"]


def test_bad_input_mask_id_outside_vocabulary(tmp_path):
  _bad(fixture("fast_dllm_v2"), tmp_path, "mask id 151665 is outside .* --mask_id")


# --- the commands on converted workdirs -------------------------------------------------------------------------------


def test_cli_convert_sample_eval(tmp_path):
  """dlm-convert, then dlm-sample (with its tokenizer) and dlm-eval on a text file run unchanged."""
  wd = str(tmp_path / "wd")
  r = run_cli("convert", "--from_hf", fixture("dream"), "--workdir", wd)
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["architecture"] == "dream"
  out = str(tmp_path / "s.jsonl")
  r = run_cli("sample", "--workdir", wd, "--num_samples", "2", "--output", out, "--prompt", "def f",
              "--config.sampler.length=24", "--config.sampler.steps=8")
  assert r.returncode == 0, r.stderr
  rows = [json.loads(line) for line in open(out)]
  assert len(rows) == 2 and all(isinstance(row["text"], str) for row in rows)
  text = tmp_path / "val.txt"
  text.write_text("def add(a, b):\n    return a + b\n" * 200)
  r = run_cli("eval", "--workdir", wd, f"--config.data.path={text}", "--config.data.seq_len=32",
              "--config.data.val_fraction=0.5", "--config.eval.batch_size=4", "--config.eval.max_batches=1")
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["nelbo_bits_per_token"] > 0


def test_cli_no_tokenizer_error(tmp_path):
  wd = str(tmp_path / "wd")
  r = run_cli("convert", "--from_hf", fixture("sdar"), "--workdir", wd)
  assert r.returncode == 0, r.stderr
  for cmd, args in (("sample", ("--num_samples", "1", "--output", str(tmp_path / "s.jsonl"))), ("eval", ())):
    r = run_cli(cmd, "--workdir", wd, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no tokenizer" in lines[0], r.stderr


def test_cli_bad_input_one_line(tmp_path):
  src = _copy(fixture("llada"), tmp_path / "src")
  os.remove(os.path.join(src, "config.json"))
  r = run_cli("convert", "--from_hf", src, "--workdir", str(tmp_path / "out"))
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "config.json" in r.stderr
  assert not (tmp_path / "out").exists()
  r = run_cli("convert", "--workdir", str(tmp_path / "out"))
  assert r.returncode == 2 and "--from_hf" in r.stderr


def test_train_continues_from_converted(tmp_path):
  """dlm-train without --config continues from a converted workdir: fresh optimizer, the checkpoint's parameters,
  finite losses; the new checkpoint restores as usual."""
  wd = str(tmp_path / "wd")
  convert.from_hf(fixture("llada"), wd)
  text = tmp_path / "train.txt"
  text.write_text("def add(a, b):\n    return a + b\n" * 400)
  r = run_cli("train", "--workdir", wd, "--no_progress", f"--config.data.path={text}", "--config.data.seq_len=32",
              "--config.train.steps=3", "--config.train.batch_size=4", "--config.train.eval_every=0",
              "--config.train.log_every=1", "--config.train.checkpoint_every=3", "--config.train.warmup_steps=1",
              "--config.train.eval_samples=0")
  assert r.returncode == 0, r.stderr
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  losses = [row["loss"] for row in rows if row["kind"] == "train"]
  assert len(losses) == 3 and all(np.isfinite(losses))
  cfg, run, params, _ = load_for_inference(wd)
  assert cfg.model.vocab_size == 320 and params["embed"].dtype == jnp.float32


def test_tokenizer_less_sampling_from_python(converted):
  """A workdir without tokenizer samples at the token-id level from Python (the family's generation over the
  checkpoint's block-causal forward); text is refused with the one-line error."""
  fixture("sdar")
  from dlm_jax.evaluate import generate
  cfg, run, params, pstate = load_for_inference(converted["sdar"])
  tokens, stats = generate(run, params, pstate, num_samples=2, length=8, seed=0)
  assert tokens.shape == (2, 8) and ((tokens >= 0) & (tokens < 320)).all() and stats["nfe_per_batch"] > 0
  with pytest.raises(DLMError, match="has no tokenizer"):
    run.tokenizer.decode(tokens[0])


def test_to_hf_from_a_scanned_checkpoint(converted, tmp_path):
  """A workdir whose checkpoint holds stacked layers (model.scan_layers) writes the same HF tensors."""
  import shutil
  from dlm_jax import model as model_lib
  from dlm_jax.checkpoint import save_host_params
  from dlm_jax.train import load_for_inference
  cfg, _, params, _ = load_for_inference(converted["llada"])
  work = str(tmp_path / "scanned")
  shutil.copytree(converted["llada"], work)
  shutil.rmtree(os.path.join(work, "checkpoints"))
  cfg.model.scan_layers = True
  save_host_params(work, 0, jax.tree.map(np.asarray, model_lib.stack_layers(params)), cfg.to_dict())
  out = str(tmp_path / "hf")
  convert.to_hf(work, out)
  a, b = _tensors(fixture("llada")), _tensors(out)
  assert sorted(a) == sorted(b) and all(a[n].tobytes() == b[n].tobytes() for n in a)
  # how the model runs may be chosen at inference: the scanned checkpoint restores unrolled (model.scan_layers=false)
  _, run, again, _ = load_for_inference(work, [("model.scan_layers", "false"), ("model.attention", "reference")])
  assert run.model_config.attention_impl == "reference" and "layer_0" in again
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
