"""Every (family, sampler, option) combination the registry allows, and the ones it forbids.

Allowed: setting the option to a non-default value (EXAMPLES) changes the traced sampler program (an option that is
accepted but ignored leaves it identical) and changes the output (tokens or stats) on a tiny random model, except
where the option is output-preserving by construction (OUTPUT_PRESERVING: exact caches, the arithmetic precision of
draws whose result the model's peaked distribution decides). Forbidden: a one-line DLMError naming the key.
"""

import dataclasses

import jax
import numpy as np
import pytest

import markov
from conftest import TINY, write_config
from dlm_jax import config as config_lib
from dlm_jax import registry
from dlm_jax.build import build, init_params
from dlm_jax.errors import DLMError
from dlm_jax.evaluate import make_canvas, sampler_fn

# A non-default value of every option (with the companion settings it needs to act), by (sampler or family, option).
# Keys with a dot are config keys set with it; keys starting with "@" are config keys set in both runs compared (a
# context in which the option can act on this tiny random model).
EXAMPLES = {
    "precision": {"precision": "float64"},
    "top_k": {"top_k": 2},
    "top_p": {"top_p": 0.5},
    "logit_shift": {"logit_shift": True},
    ("remdm", "strategy"): {"strategy": "conf", "eta": 0.5},
    ("remdm", "eta"): {"eta": 0.5},
    ("remdm", "t_on"): {"t_on": 0.5, "eta": 0.5},
    ("maskgit", "schedule"): {"schedule": "linear"},
    ("ddim", "precision"): {"precision": "float32"},
    ("maskgit", "choice_temperature"): {"choice_temperature": 0.0},
    ("llada", "block_length"): {"block_length": 2, "sampler.steps": 14},  # 7 blocks of the 14 generated tokens
    ("llada", "remasking"): {"remasking": "random"},
    ("llada", "confidence"): {"confidence": "margin"},
    ("llada", "threshold"): {"threshold": 0.5},
    ("llada", "factor"): {"factor": 1.0},
    ("llada", "cfg_scale"): {"cfg_scale": 2.0},
    ("llada", "position_temperature"): {"position_temperature": 0.5},
    ("llada", "cache"): {"cache": "dual"},
    ("llada", "cache_refresh"): {"cache": "dual", "cache_refresh": 2},
    ("llada", "prophet"): {"prophet": True, "@model.init_std": 1.0},  # a peaked model: large top-1 / top-2 gaps
    ("llada", "noise"): {"noise": "position"},
    # left to right in blocks of 2 (one token per step), EOS drawn often: rows that commit EOS stop there
    ("llada", "stop_at_eos"): {"stop_at_eos": True, "@sampler.temperature": 3.0, "@sampler.llada.block_length": 2,
                               "@sampler.steps": 14},
    ("dream", "alg"): {"alg": "maskgit_plus"},
    ("dream", "eps"): {"eps": 0.5, "@sampler.dream.alg": "entropy"},  # the confidence algorithms' counts follow eps
    ("dream", "alg_temp"): {"alg_temp": 0.5, "@sampler.dream.alg": "maskgit_plus"},
    ("fastdllm_v2", "small_block_size"): {"small_block_size": 2, "@sampler.fastdllm_v2.threshold": 0.3},
    ("fastdllm_v2", "threshold"): {"threshold": 0.3},
    ("fastdllm_v2", "use_block_cache"): {"use_block_cache": True, "@sampler.fastdllm_v2.small_block_size": 2},
    # batch_sample: a row that commits a stop id decodes the rest of its block (here: one more step, in the NFE)
    ("fastdllm_v2", "procedure"): {"procedure": "batch_sample", "@sampler.block.stop_at_eos": True,
                                   "@sampler.temperature": 3.0, "@sampler.fastdllm_v2.threshold": 0.05},
    ("sdar", "strategy"): {"strategy": "sequential"},
    ("sdar", "threshold"): {"threshold": 0.05},
    ("edm_churn", "churn"): {"churn": 0.4},
    ("edm_churn", "band_lo"): {"band_lo": 0.5},
    ("edm_churn", "band_hi"): {"band_hi": 0.5},
    ("block", "cache"): {"cache": "none"},
    ("block", "stop_at_eos"): {"stop_at_eos": True},
    ("block", "entropy_stop"): {"entropy_stop": 5.0, "entropy_window": 4},
    ("block", "entropy_window"): {"entropy_stop": 1.2, "entropy_window": 4},
}
# Options that leave the tokens as they are by construction (the traced program still differs): the prefix cache is
# exact; the precision of the arithmetic does not move an argmax or a Gumbel-max draw on this model's peaked
# distributions.
OUTPUT_PRESERVING = {("llada", "cache"), ("block", "cache"), ("*", "precision"),
                     ("fastdllm_v2", "use_block_cache")}  # DualCache: stale K/V after the sub-block only
# Forbidden combinations the issue names, and the words their error must hold.
FORBIDDEN = [
    ({"diffusion.process": "block", "sampler.first_hitting.logit_shift": True}, ("logit_shift", "block diffusion")),
    ({"diffusion.process": "bitstream", "sampler.edm.top_p": 0.9}, ("sampler.edm has no option 'top_p'",)),
    ({"diffusion.process": "bitstream", "sampler.edm_churn.top_p": 0.9}, ("has no option 'top_p'",)),
    ({"sampler.llada.threshold": 0.9}, ("sampler.llada.threshold", "'llada'", "'ancestral' runs")),
    ({"sampler.llada.block_length": 4}, ("sampler.llada.block_length", "'ancestral' runs")),
    ({"sampler.remdm.eta": 0.5, "sampler.name": "llada"}, ("sampler.remdm.eta", "'llada' runs")),
    ({"sampler.block.entropy_stop": 4.0}, ("sampler.block.entropy_stop", "'masked'")),
    ({"diffusion.process": "block", "sampler.name": "llada", "sampler.llada.cache": "dual"}, ("sampler.block.cache",)),
    ({"diffusion.process": "block", "sampler.name": "llada", "sampler.llada.noise": "position"},
     ("sampler.llada.noise",)),
    ({"diffusion.process": "flow", "sampler.euler.logit_shift": True}, ("has no option 'logit_shift'",)),
    ({"sampler.name": "llada", "sampler.llada.cache_refresh": 2}, ("sampler.llada.cache_refresh",)),
    ({"sampler.threshold": 0.9}, ("sampler.threshold is now", "sampler.NAME.threshold", "llada")),
    ({"sampler.top_p": 0.9}, ("sampler.top_p", "sampler.NAME.top_p")),
    ({"sampler.remdm_strategy": "conf"}, ("sampler.remdm_strategy is now", "sampler.NAME.strategy", "remdm")),
    ({"sampler.ancestral.threshold": 0.9}, ("sampler.ancestral has no option 'threshold'", "sampler.llada")),
]
L = 16
ROWS = 8
INIT_STD = float(__import__("os").environ.get("SWEEP_INIT_STD", "0.3"))  # logits far from uniform, not one-hot


def _example(section: str, field: str) -> dict:
  return EXAMPLES.get((section, field)) or EXAMPLES[field]


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
  return markov.write_char_tokenizer(tmp_path_factory.mktemp("tok") / "chars.json")


def _config(tmp_path, chars, overrides: dict):
  values = dict(TINY)
  values.update({"data.tokenizer": chars, "data.seq_len": L, "model.max_seq_len": L, "model.init_std": INIT_STD,
                 "sampler.batch_size": ROWS, "sampler.temperature": 1.5})  # EOS (stop options) shows up often
  del values["sampler.steps"]  # the default budget, unless a test sets one
  if overrides.get("diffusion.process") == "block":
    values["diffusion.block_size"] = 8  # (at 4 tokens per block MaskGIT's cosine and linear schedules coincide)
  values.update({k: v for k, v in overrides.items() if k in ("diffusion.process", "model.init_std")})
  cfg = config_lib.load(write_config(str(tmp_path / "sweep.py"), values),
                        [(k, v) for k, v in overrides.items() if k not in ("diffusion.process", "model.init_std")])
  return cfg


_RUNS = {}


def _run_of(cfg):
  key = (cfg.diffusion.process, cfg.model.init_std)
  if key not in _RUNS:
    run = build(cfg, devices=jax.devices()[:1])
    _RUNS[key] = (run, init_params(run, 0), run.process.init_state(jax.random.PRNGKey(0)))
  run, params, pstate = _RUNS[key]
  return dataclasses.replace(run, cfg=cfg), params, pstate


def _sample(cfg, run_it: bool = True):
  """(lowered program text, tokens, stats) of the configured sampler on 4 rows with the prompt 'ab' (without
  `run_it`: the text only, tokens and stats None)."""
  run, params, pstate = _run_of(cfg)
  prompt = np.asarray(run.tokenizer.encode("ab"), np.int32)
  canvas, gen_start = make_canvas(run, [prompt] * ROWS, L)
  fn, x64, _ = sampler_fn(run, gen_start)
  keys = jax.random.split(jax.random.PRNGKey(0), ROWS)
  with x64:
    lowered = jax.jit(fn).lower(params, keys, canvas, pstate)
    text = lowered.as_text()
    if not run_it:
      return text, None, None
    tokens, stats = lowered.compile()(params, keys, canvas, pstate)
  return text, np.asarray(tokens), jax.tree.map(np.asarray, stats)


def _combinations():
  out = []
  for family in registry.processes():
    for name in registry.samplers_of(family):
      for field in registry.samplers()[name].options.fields():
        out.append((family, name, name, field))
      for field in registry.family_options().get(family, registry.Options).fields():
        out.append((family, name, family, field))
  return out


def test_every_option_has_an_example():
  for _, _, section, field in _combinations():
    assert (section, field) in EXAMPLES or field in EXAMPLES, f"no sweep value for sampler.{section}.{field}"


@pytest.mark.slow(minutes=3)
@pytest.mark.parametrize("family", list(registry.processes()))
def test_sweep(tmp_path, chars, family):
  """Each allowed option acts (program and output); each forbidden one is a one-line error."""
  allowed, forbidden, unchanged, defaults = [], [], [], {}
  for fam, name, section, field in _combinations():
    if fam != family:
      continue
    base = {"diffusion.process": family, "sampler.name": name}
    if registry.samplers()[name].uses_steps(registry.samplers()[name].options()):
      base["sampler.steps"] = 4  # fewer steps than tokens: schedules matter
    example = _example(section, field)
    base.update({k[1:]: v for k, v in example.items() if k.startswith("@")})
    key = tuple(sorted(base.items()))  # several options of one sampler share their default run
    if key not in defaults:
      defaults[key] = _sample(_config(tmp_path, chars, base))
    default = defaults[key]
    change = {k if "." in k else f"sampler.{section}.{k}": v for k, v in example.items() if not k.startswith("@")}
    try:
      cfg = _config(tmp_path, chars, {**base, **change})
    except DLMError as e:
      msg = str(e)
      assert "\n" not in msg and f"sampler.{section}." in msg, msg
      forbidden.append(f"{name}/{section}.{field}: {msg}")
      continue
    preserving = (section, field) in OUTPUT_PRESERVING or ("*", field) in OUTPUT_PRESERVING
    text, tokens, stats = _sample(cfg, run_it=not preserving)  # output-preserving options: the program is the test
    assert text != default[0], f"{family}: sampler.{section}.{field} is accepted but does not change the sampler"
    if preserving:
      allowed.append(f"{name}/{section}.{field} (output-preserving)")
    else:
      same_output = np.array_equal(tokens, default[1]) and all(
          np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(default[2])))
      if same_output:
        unchanged.append(f"{name}/{section}.{field}")
      allowed.append(f"{name}/{section}.{field}")
  print(f"\n{family}: {len(allowed)} allowed: " + "; ".join(allowed))
  print(f"{family}: {len(forbidden)} forbidden:\n  " + "\n  ".join(forbidden))
  assert allowed
  assert not unchanged, f"{family}: these options change the program but not the output: {unchanged}"


@pytest.mark.parametrize("overrides,words", FORBIDDEN)
def test_forbidden_combinations(tmp_path, chars, overrides, words):
  with pytest.raises(DLMError) as e:
    _config(tmp_path, chars, overrides)
  msg = str(e.value)
  assert "\n" not in msg
  for w in words:
    assert w in msg, (msg, w)
