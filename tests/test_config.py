"""The config system: schema-locked config files, typed overrides, argv parsing, validation and the JSON round trip."""

from __future__ import annotations

import glob
import json
import os
import textwrap

import ml_collections
import pytest

from dlm_jax import config as config_lib
from dlm_jax.config import (apply_overrides, config_from_dict, default_config, flat_items, load, load_config_file,
                            parse_override_args, strip_override_args, to_dict, validate)
from dlm_jax.errors import DLMError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, body: str, name: str = "cfg.py") -> str:
  path = tmp_path / name
  path.write_text(textwrap.dedent(body))
  return str(path)


def _cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = default_config()
  apply_overrides(cfg, [(k.replace("__", "."), v) for k, v in overrides.items()])
  return cfg


# ----------------------------------------------------------------------------------------------------------------------
# Config files


def test_default_config_is_valid_and_locked():
  cfg = default_config()
  assert validate(cfg) is cfg
  with pytest.raises(AttributeError):
    cfg.model.nonexistent = 1
  with pytest.raises(AttributeError):
    cfg.brand_new_section = 1


def test_config_file_loads_values(tmp_path):
  path = _write(tmp_path, """
      from dlm_jax.config import default_config

      def get_config():
        c = default_config()
        c.model.num_layers = 3
        c.train.learning_rate = 5e-4
        c.data.path = "/some/where.txt"
        c.model.time_conditioning = True
        return c
      """)
  cfg = load_config_file(path)
  assert cfg.model.num_layers == 3
  assert cfg.train.learning_rate == 5e-4
  assert cfg.data.path == "/some/where.txt"
  assert cfg.model.time_conditioning is True
  assert cfg.model.d_model == default_config().model.d_model  # untouched keys keep their defaults
  with pytest.raises(AttributeError):  # the loaded config is locked
    cfg.train.nonexistent = 1


def test_config_file_unknown_key_is_error(tmp_path):
  path = _write(tmp_path, """
      from dlm_jax.config import default_config

      def get_config():
        c = default_config()
        c.model.nonexistent = 1
        return c
      """)
  with pytest.raises(DLMError) as e:
    load_config_file(path)
  msg = str(e.value)
  assert "nonexistent" in msg
  assert "unknown config key" in msg
  assert path in msg


def test_config_file_unknown_section_is_error(tmp_path):
  path = _write(tmp_path, """
      from dlm_jax.config import default_config

      def get_config():
        c = default_config()
        c.optimizer = 1
        return c
      """)
  with pytest.raises(DLMError, match="optimizer"):
    load_config_file(path)


def test_config_file_unknown_key_at_import_time(tmp_path):
  path = _write(tmp_path, """
      from dlm_jax.config import default_config

      C = default_config()
      C.train.stepz = 5

      def get_config():
        return C
      """)
  with pytest.raises(DLMError, match="stepz"):
    load_config_file(path)


def test_config_file_wrong_type_is_error(tmp_path):
  path = _write(tmp_path, """
      from dlm_jax.config import default_config

      def get_config():
        c = default_config()
        c.train.steps = "abc"
        return c
      """)
  with pytest.raises(DLMError) as e:
    load_config_file(path)
  assert "steps" in str(e.value)
  assert "type" in str(e.value)


def test_config_file_int_for_float_key_stays_float(tmp_path):
  path = _write(tmp_path, """
      from dlm_jax.config import default_config

      def get_config():
        c = default_config()
        c.train.learning_rate = 1
        c.train.weight_decay = 0
        return c
      """)
  cfg = load_config_file(path)
  assert type(cfg.train.learning_rate) is float and type(cfg.train.weight_decay) is float
  apply_overrides(cfg, [("train.learning_rate", "1e-3")])  # so later overrides are still parsed as numbers
  assert cfg.train.learning_rate == 1e-3


def test_config_file_bool_key_rejects_int(tmp_path):
  path = _write(tmp_path, """
      from dlm_jax.config import default_config

      def get_config():
        c = default_config()
        c.model.time_conditioning = 1
        return c
      """)
  with pytest.raises(DLMError, match="time_conditioning"):
    load_config_file(path)


def test_config_file_missing_get_config(tmp_path):
  path = _write(tmp_path, "X = 1\n")
  with pytest.raises(DLMError, match="get_config"):
    load_config_file(path)


def test_config_file_not_a_configdict(tmp_path):
  path = _write(tmp_path, "def get_config():\n  return {'model': {}}\n")
  with pytest.raises(DLMError, match="ConfigDict"):
    load_config_file(path)


def test_config_file_not_from_defaults_is_missing_keys(tmp_path):
  path = _write(tmp_path, """
      import ml_collections

      def get_config():
        c = ml_collections.ConfigDict()
        c.model = ml_collections.ConfigDict()
        c.model.num_layers = 2
        return c
      """)
  with pytest.raises(DLMError, match="missing"):
    load_config_file(path)


def test_config_file_does_not_exist(tmp_path):
  with pytest.raises(DLMError, match="does not exist"):
    load_config_file(str(tmp_path / "nope.py"))
  with pytest.raises(DLMError, match="no config given"):
    load_config_file("")


def test_load_applies_overrides_and_validates(tmp_path):
  path = _write(tmp_path, """
      from dlm_jax.config import default_config

      def get_config():
        c = default_config()
        c.model.max_seq_len = 64
        c.data.seq_len = 32
        return c
      """)
  cfg = load(path, [("train.steps", "7"), ("data.seq_len", "64")])
  assert cfg.train.steps == 7 and cfg.data.seq_len == 64
  with pytest.raises(DLMError, match="data.seq_len"):
    load(path, [("data.seq_len", "65")])
  with pytest.raises(DLMError, match="train.stepz"):
    load(path, [("train.stepz", "1")])


SHIPPED = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def test_there_are_shipped_configs():
  names = {os.path.basename(p) for p in SHIPPED}
  assert "quickstart.py" in names


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_shipped_configs_load_and_validate(path):
  cfg = load(path)
  assert validate(cfg) is cfg
  assert set(flat_items(cfg)) == set(flat_items(default_config()))
  # And they survive the checkpoint JSON round trip.
  assert config_from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg


# ----------------------------------------------------------------------------------------------------------------------
# Overrides


def test_apply_overrides_coerces_strings_to_key_types():
  cfg = default_config()
  apply_overrides(cfg, [("train.steps", "3"), ("train.learning_rate", "1e-3"), ("model.time_conditioning", "true"),
                        ("data.path", "corpus.txt"), ("diffusion.schedule_power", "3"), ("mesh.data", "-1"),
                        ("train.batch_size", "0x10")])
  assert cfg.train.steps == 3 and type(cfg.train.steps) is int
  assert cfg.train.learning_rate == pytest.approx(1e-3) and type(cfg.train.learning_rate) is float
  assert cfg.model.time_conditioning is True
  assert cfg.data.path == "corpus.txt"
  assert cfg.diffusion.schedule_power == 3.0 and type(cfg.diffusion.schedule_power) is float
  assert cfg.mesh.data == -1
  assert cfg.train.batch_size == 16


@pytest.mark.parametrize("raw,expected", [("true", True), ("True", True), ("1", True), ("yes", True), ("false", False),
                                          ("FALSE", False), ("0", False), ("no", False), (True, True), (False, False)])
def test_apply_overrides_bool_values(raw, expected):
  cfg = default_config()
  cfg.model.time_conditioning = not expected
  apply_overrides(cfg, [("model.time_conditioning", raw)])
  assert cfg.model.time_conditioning is expected


def test_apply_overrides_non_string_values():
  cfg = default_config()
  apply_overrides(cfg, [("train.steps", 12), ("train.learning_rate", 2), ("train.grad_clip", 0.5)])
  assert cfg.train.steps == 12
  assert cfg.train.learning_rate == 2.0 and type(cfg.train.learning_rate) is float
  assert cfg.train.grad_clip == 0.5


@pytest.mark.parametrize("key,raw,words", [
    ("train.steps", "abc", ("train.steps", "integer", "abc")),
    ("train.steps", "3.5", ("train.steps", "integer")),
    ("train.steps", 3.5, ("train.steps", "integer")),
    ("train.steps", True, ("train.steps", "integer")),
    ("train.learning_rate", "fast", ("train.learning_rate", "number", "fast")),
    ("model.time_conditioning", "maybe", ("model.time_conditioning", "true or false", "maybe")),
    ("data.segment_attention", "2", ("data.segment_attention", "true or false")),
    ("eval.use_ema", 1, ("eval.use_ema", "true or false")),
])
def test_apply_overrides_wrong_type(key, raw, words):
  cfg = default_config()
  before = flat_items(cfg)
  with pytest.raises(DLMError) as e:
    apply_overrides(cfg, [(key, raw)])
  for w in words:
    assert w in str(e.value)
  assert flat_items(cfg) == before  # nothing was changed


@pytest.mark.parametrize("key", ["train.stepz", "model.nonexistent", "steps", "train", "nosection.steps",
                                 "train.steps.extra"])
def test_apply_overrides_unknown_key(key):
  cfg = default_config()
  with pytest.raises(DLMError) as e:
    apply_overrides(cfg, [(key, "1")])
  assert f"'{key}'" in str(e.value)
  assert "unknown config key" in str(e.value)


def test_apply_overrides_origin_in_message():
  with pytest.raises(DLMError, match=r"^my origin: "):
    apply_overrides(default_config(), [("train.steps", "x")], origin="my origin")


def test_apply_overrides_later_value_wins():
  cfg = default_config()
  apply_overrides(cfg, [("train.steps", "5"), ("train.steps", "9")])
  assert cfg.train.steps == 9


# ----------------------------------------------------------------------------------------------------------------------
# argv


def test_parse_override_args_both_forms():
  argv = ["--config", "configs/quickstart.py", "--config.train.steps=5", "--workdir", "/tmp/w",
          "--config.model.d_model", "64", "--config.data.path=a=b.txt", "--config.data.eos_token", "",
          "positional"]
  assert parse_override_args(argv) == [("train.steps", "5"), ("model.d_model", "64"), ("data.path", "a=b.txt"),
                                       ("data.eos_token", "")]
  assert strip_override_args(argv) == ["--config", "configs/quickstart.py", "--workdir", "/tmp/w", "positional"]


def test_parse_override_args_value_form_is_consumed_once():
  argv = ["--config.train.steps", "--config.train.seed=1"]  # the next token is the value, however it looks
  assert parse_override_args(argv) == [("train.steps", "--config.train.seed=1")]
  assert strip_override_args(argv) == []


def test_parse_override_args_without_overrides():
  argv = ["--config", "x.py", "--workdir", "w"]
  assert parse_override_args(argv) == []
  assert strip_override_args(argv) == argv
  assert parse_override_args([]) == [] and strip_override_args([]) == []


def test_parse_override_args_missing_value():
  with pytest.raises(DLMError, match="train.steps"):
    parse_override_args(["--config", "x.py", "--config.train.steps"])


def test_parsed_overrides_apply():
  argv = ["--config.train.steps", "11", "--config.train.learning_rate=2e-4", "--config.model.time_conditioning=yes"]
  cfg = default_config()
  apply_overrides(cfg, parse_override_args(argv))
  assert (cfg.train.steps, cfg.train.learning_rate, cfg.model.time_conditioning) == (11, 2e-4, True)


# ----------------------------------------------------------------------------------------------------------------------
# validate


@pytest.mark.parametrize("overrides,words", [
    ({"data.seq_len": 2048}, ("data.seq_len", "model.max_seq_len")),
    ({"model.max_seq_len": 128, "data.seq_len": 129}, ("data.seq_len", "model.max_seq_len")),
    ({"data.seq_len": 1}, ("data.seq_len",)),
    ({"diffusion.schedule": "sqrt"}, ("diffusion.schedule", "sqrt")),
    ({"diffusion.process": "gaussian"}, ("diffusion.process",)),
    ({"diffusion.objective": "elbo"}, ("diffusion.objective",)),
    ({"train.batch_size": 10, "train.grad_accum_steps": 3}, ("train.batch_size", "train.grad_accum_steps")),
    ({"train.grad_accum_steps": 0}, ("train.grad_accum_steps",)),
    ({"model.num_heads": 3}, ("model.d_model", "model.num_heads")),
    ({"model.num_heads": 4, "model.num_kv_heads": 3}, ("model.num_kv_heads",)),
    ({"model.num_kv_heads": -1}, ("model.num_kv_heads",)),
    ({"model.d_model": 12, "model.num_heads": 4}, ("head dimension",)),  # head_dim 3 is odd
    ({"model.head_dim": 7}, ("model.head_dim",)),
    ({"model.num_layers": 0}, ("model.num_layers",)),
    ({"model.attention": "flash"}, ("model.attention",)),
    ({"model.rope_theta": 0.0}, ("model.rope_theta",)),
    ({"data.val_fraction": 1.0}, ("data.val_fraction",)),
    ({"data.val_fraction": -0.1}, ("data.val_fraction",)),
    ({"data.max_documents": -1}, ("data.max_documents",)),
    ({"data.tokenizer": ""}, ("data.tokenizer",)),
    ({"diffusion.t_min": 0.0}, ("diffusion.t_min",)),
    ({"diffusion.schedule_eps": 1.0}, ("diffusion.schedule_eps",)),
    ({"diffusion.schedule_power": 0.0}, ("diffusion.schedule_power",)),
    ({"train.steps": 0}, ("train.steps",)),
    ({"train.learning_rate": 0.0}, ("train.learning_rate",)),
    ({"train.learning_rate": "nan"}, ("train.learning_rate",)),
    ({"train.min_lr_ratio": 1.5}, ("train.min_lr_ratio",)),
    ({"train.ema_decay": 1.0}, ("train.ema_decay",)),
    ({"train.adam_b2": 1.0}, ("train.adam_b2",)),
    ({"train.grad_clip": -1.0}, ("train.grad_clip",)),
    ({"train.compute_dtype": "float16"}, ("train.compute_dtype",)),
    ({"train.log_every": 0}, ("train.log_every",)),
    ({"train.keep_checkpoints": 0}, ("train.keep_checkpoints",)),
    ({"train.eval_every": -1}, ("train.eval_every",)),
    ({"eval.batch_size": 0}, ("eval.batch_size",)),
    ({"sampler.name": "ddim"}, ("sampler.name",)),
    ({"diffusion.process": "bitstream", "diffusion.sigma_max": "inf"}, ("diffusion.sigma_max", "finite")),
    ({"diffusion.process": "bitstream", "diffusion.sigma_min": "nan"}, ("diffusion.sigma_min", "finite")),
    ({"diffusion.process": "bitstream", "diffusion.sigma_min": "100"}, ("diffusion.sigma_min", "diffusion.sigma_max")),
    ({"diffusion.process": "bitstream", "diffusion.sigma_data": "0"}, ("diffusion.sigma_data",)),
    ({"diffusion.process": "embedding_flow", "diffusion.gumbel_mu": "nan"}, ("diffusion.gumbel_mu", "finite")),
    ({"diffusion.process": "embedding_flow", "diffusion.gumbel_beta": "0"}, ("diffusion.gumbel_beta",)),
    ({"diffusion.process": "bitstream", "diffusion.self_cond_prob": "1.5"}, ("diffusion.self_cond_prob", "[0, 1]")),
    ({"diffusion.process": "embedding_flow", "diffusion.self_cond_prob": "-0.1"},
     ("diffusion.self_cond_prob", "[0, 1]")),
    ({"diffusion.process": "bitstream", "diffusion.bits": "31"}, ("diffusion.bits",)),
    ({"diffusion.process": "flow", "diffusion.bound_steps": "0"}, ("diffusion.bound_steps",)),
    ({"diffusion.process": "bitstream", "diffusion.schedule_buffer": "4"}, ("diffusion.schedule_buffer",)),
    ({"diffusion.gumbel_mu": "3.0"}, ("diffusion.gumbel_mu", "no effect", "'masked'", "embedding_flow")),
    ({"diffusion.t_max": "0.5"}, ("diffusion.t_max", "no effect", "block")),
    ({"diffusion.process": "flow", "sampler.name": "ancestral"}, ("sampler.name", "'flow'", "euler")),
    ({"diffusion.process": "bitstream", "sampler.edm_churn.churn": "-1"}, ("sampler.edm_churn.churn",)),
    ({"diffusion.process": "bitstream", "sampler.edm_churn.churn": "0.5"}, ("sampler.edm_churn.churn", "sqrt(2) - 1")),
    ({"diffusion.process": "bitstream", "sampler.edm_churn.band_lo": "0.8", "sampler.edm_churn.band_hi": "0.2"},
     ("churn band",)),
    ({"diffusion.process": "embedding_flow", "sampler.ddim.precision": "float16"}, ("sampler.ddim.precision",)),
    ({"sampler.edm_churn.churn": "0.1"}, ("sampler.edm_churn.churn", "'edm_churn'", "'ancestral' runs")),
    ({"diffusion.process": "block", "sampler.first_hitting.logit_shift": True},
     ("sampler.first_hitting.logit_shift", "block diffusion")),
    ({"sampler.block.cache": "none"}, ("sampler.block.cache", "'block'")),
    ({"diffusion.process": "block", "diffusion.block_size": 1, "sampler.name": "remdm", "sampler.remdm.eta": 0.1},
     ("sampler.remdm.eta", "block_size=1")),
    ({"sampler.steps": 0}, ("sampler.steps",)),
    ({"sampler.temperature": 0.0}, ("sampler.temperature",)),
    ({"sampler.length": 4096}, ("sampler.length", "model.max_seq_len")),
    ({"mesh.fsdp": 0}, ("mesh.fsdp",)),
    ({"mesh.data": -2}, ("mesh.data",)),
])
def test_validate_rejects(overrides, words):
  cfg = default_config()
  apply_overrides(cfg, overrides.items())
  with pytest.raises(DLMError) as e:
    validate(cfg)
  msg = str(e.value)
  for w in words:
    assert w in msg, f"{msg!r} should mention {w!r}"
  assert "\n" not in msg


@pytest.mark.parametrize("overrides", [
    {"model.max_seq_len": 64, "data.seq_len": 64},
    {"train.batch_size": 12, "train.grad_accum_steps": 4},
    {"model.num_heads": 8, "model.num_kv_heads": 2},
    {"model.d_model": 100, "model.num_heads": 3, "model.head_dim": 16},
    {"diffusion.schedule": "cosine"}, {"diffusion.schedule": "polynomial"}, {"diffusion.schedule": "loglinear"},
    {"diffusion.objective": "llada"},
    {"data.val_fraction": 0.0}, {"train.ema_decay": 0.0}, {"train.grad_clip": 0.0}, {"train.eval_every": 0},
    {"train.compute_dtype": "bfloat16"}, {"mesh.data": 1, "mesh.fsdp": -1}, {"sampler.length": 1024},
])
def test_validate_accepts(overrides):
  cfg = default_config()
  apply_overrides(cfg, overrides.items())
  assert validate(cfg) is cfg


def test_validate_error_names_offending_values():
  cfg = _cfg(train__batch_size=10, train__grad_accum_steps=3)
  with pytest.raises(DLMError, match=r"train\.batch_size \(10\).*train\.grad_accum_steps \(3\)"):
    validate(cfg)
  cfg = _cfg(model__max_seq_len=100, data__seq_len=200)
  with pytest.raises(DLMError, match=r"data\.seq_len \(200\).*model\.max_seq_len \(100\)"):
    validate(cfg)


# ----------------------------------------------------------------------------------------------------------------------
# JSON round trip


def test_to_dict_is_plain_nested_json():
  d = to_dict(default_config())
  assert set(d) == {"model", "data", "diffusion", "train", "lora", "sft", "rl", "distill", "eval", "sampler", "mesh"}
  assert d["train"]["steps"] == 1000
  assert json.loads(json.dumps(d)) == d


def test_config_from_dict_round_trip():
  cfg = _cfg(model__num_layers=7, model__time_conditioning="true", train__learning_rate="1e-4", data__path="x.jsonl",
             diffusion__schedule="cosine", mesh__data="2", train__min_lr_ratio="0")
  d = json.loads(json.dumps(to_dict(cfg)))
  back = config_from_dict(d)
  assert back == cfg
  assert flat_items(back) == flat_items(cfg)
  for key, value in flat_items(back).items():
    assert type(value) is type(flat_items(cfg)[key]), key
  assert back.train.min_lr_ratio == 0.0 and type(back.train.min_lr_ratio) is float  # JSON 0.0 -> float
  assert back != default_config()


def test_config_from_dict_partial_uses_defaults():
  back = config_from_dict({"train": {"steps": 42}})
  assert back.train.steps == 42
  assert back.model.d_model == default_config().model.d_model


def test_config_from_dict_unknown_key():
  d = to_dict(default_config())
  d["model"]["bogus"] = 3
  with pytest.raises(DLMError) as e:
    config_from_dict(d)
  assert "model.bogus" in str(e.value)
  assert "saved config" in str(e.value)


def test_config_from_dict_wrong_type():
  d = to_dict(default_config())
  d["train"]["steps"] = "many"
  with pytest.raises(DLMError, match="train.steps"):
    config_from_dict(d)


def test_shape_keys_exist():
  schema = flat_items(default_config())
  for key in config_lib.SHAPE_KEYS:
    assert key in schema


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_family_runs_from_every_shipped_config(path):
  """Switching diffusion.process on a shipped config gives a valid config and a buildable run: every family-specific
  key has a default for every family."""
  from dlm_jax.build import build
  from dlm_jax.registry import processes
  for process, family in processes().items():
    try:
      cfg = load(path, [("diffusion.process", process)])
    except DLMError as e:  # the preset sets a key the new family does not read (a diffusion key, a step budget or an
      msg = str(e)         # option of a sampler it does not run): one line naming that key
      # (or LLaDA's own vocabulary, model.vocab_size, which only the mask-token families take)
      assert "\n" not in msg and msg.split()[0].startswith(("sampler.", "diffusion.", "model.vocab_size=")), msg
      continue
    if cfg.data.tokenizer not in ("bytes", "none") and not os.path.isfile(cfg.data.tokenizer):
      cfg.data.tokenizer = "bytes"  # a preset naming a tokenizer.json the user provides (configs/mdlm_owt_110m.py)
    run = build(cfg, devices=__import__("jax").devices()[:1])
    assert run.process.name == process


def test_tied_embeddings_need_one_table_is_one_line_error():
  """The masked family's own vocabulary has one more input id (its mask) than output ids: tying needs
  model.vocab_size (a checkpoint's vocabulary), and the error says so in one line."""
  from dlm_jax.build import build
  cfg = default_config()
  cfg.model.tie_embeddings = True
  config_lib.validate(cfg)
  with pytest.raises(DLMError) as e:
    build(cfg)
  assert "model.tie_embeddings" in str(e.value) and "model.vocab_size" in str(e.value) and "\n" not in str(e.value)
  cfg.model.vocab_size, cfg.diffusion.mask_id = 300, 299
  assert build(cfg).model_config.tie_embeddings


def test_attention_kernels_are_resolved_per_platform_and_refused_where_they_cannot_run():
  """model.attention='auto' is xla on CPU, splash on TPU, pallas_gpu on GPU; a Pallas kernel on a platform it does not
  compile for is a one-line config error naming the fix (never a silent fallback), unless interpret mode is asked."""
  from dlm_jax import attention
  from dlm_jax.build import build
  assert [attention.resolve("auto", p) for p in ("cpu", "tpu", "gpu", "cuda")] == ["xla", "splash", "pallas_gpu",
                                                                                   "pallas_gpu"]
  cfg = default_config()
  assert cfg.model.attention == "auto" and build(cfg).model_config.attention_impl == "xla"
  for impl in ("splash", "pallas_gpu"):
    cfg.model.attention = impl
    config_lib.validate(cfg)
    with pytest.raises(DLMError) as e:
      build(cfg)
    msg = str(e.value)
    assert f"model.attention={impl!r}" in msg and "model.attention_interpret=True" in msg and "\n" not in msg
    cfg.model.attention_interpret = True
    assert build(cfg).model_config.attention_impl == impl
    cfg.model.attention_interpret = False
  cfg.model.attention_block_q = 100
  with pytest.raises(DLMError, match="model.attention_block_q"):
    config_lib.validate(cfg)
  # shapes a kernel cannot take are config errors too (checked when the model is configured, not when traced)
  cfg.model.attention_interpret = True
  for impl, key, value in (("splash", "attention_block_kv", 64), ("pallas_gpu", "head_dim", 24)):
    cfg.model.attention, cfg.model.attention_block_q = impl, 0
    setattr(cfg.model, key, value)
    config_lib.validate(cfg)
    with pytest.raises(DLMError) as e:
      build(cfg)
    assert f"model.{key}" in str(e.value) and "\n" not in str(e.value)
    setattr(cfg.model, key, 0)
