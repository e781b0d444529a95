"""The house's structure, checked: the import graph matches docs/architecture.md's layers, every registered process
passes through the whole process interface (conformance), and the README's sampler table is the registry's."""

import ast
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, TINY, write_config
from dlm_jax import config as config_lib
from dlm_jax import registry
from dlm_jax.build import build, init_params
from dlm_jax.errors import DLMError

# The layers of docs/architecture.md, bottom up, and what each may import (besides itself).
LAYERS = {
    "foundation": ("dlm_jax.errors", "dlm_jax.maths", "dlm_jax.registry", "dlm_jax.masks", "dlm_jax.storage",
                   "dlm_jax.sandbox"),
    "package": ("dlm_jax",),  # dlm_jax/__init__.py: the version only
    "config": ("dlm_jax.config",),
    "data": ("dlm_jax.data", "dlm_jax.shards", "dlm_jax.pretokenize"),
    "model": ("dlm_jax.sharding", "dlm_jax.attention", "dlm_jax.kernels", "dlm_jax.model", "dlm_jax.lora"),
    "samplers": ("dlm_jax.samplers",),
    "processes": ("dlm_jax.processes",),
    "driver": ("dlm_jax.build", "dlm_jax.train", "dlm_jax.evaluate", "dlm_jax.checkpoint", "dlm_jax.logs",
               "dlm_jax.cli", "dlm_jax.convert", "dlm_jax.aot", "dlm_jax.hlo_cost", "dlm_jax.harness",
               "dlm_jax.posttrain"),
}
MAY_IMPORT = {
    "foundation": {"foundation"},
    "package": set(),
    "config": {"foundation"},  # registries are filled by the modules that own them, never imported here
    "data": {"foundation", "data", "config"},  # config only for parse_mixture (the syntax of data.mixture)
    "model": {"foundation", "model"},
    "samplers": {"foundation", "samplers"},  # no process, no model: samplers take any logits function
    "processes": {"foundation", "processes", "dlm_jax.sharding"},  # the model only through the Network adapter
    "driver": set(LAYERS) | {"driver"},
}


def _layer(module: str) -> str:
  for layer, prefixes in LAYERS.items():
    if any(module == p or (module.startswith(p + ".") and p != "dlm_jax") for p in prefixes):
      return layer
  raise AssertionError(f"{module} is in no layer of docs/architecture.md")


def import_graph() -> dict[str, set[str]]:
  """{module: dlm_jax modules it imports}, every import statement (function-local ones included)."""
  graph = {}
  root = os.path.join(REPO, "dlm_jax")
  for dirpath, _, files in os.walk(root):
    for f in files:
      if not f.endswith(".py"):
        continue
      path = os.path.join(dirpath, f)
      module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
      found = set()
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dlm_jax"):
          found |= {node.module + "." + a.name if os.path.exists(os.path.join(REPO, *(node.module + "." + a.name)
                                                                              .split("."))) or
                    os.path.exists(os.path.join(REPO, *(node.module + "." + a.name).split(".")) + ".py")
                    else node.module for a in node.names}
        elif isinstance(node, ast.Import):
          found |= {a.name for a in node.names if a.name.startswith("dlm_jax")}
      graph[module] = found - {module}
  return graph


def test_import_graph_matches_the_architecture_page():
  bad = []
  for module, imports in import_graph().items():
    layer = _layer(module)
    for target in imports:
      allowed = MAY_IMPORT[layer]
      if _layer(target) not in allowed and target not in allowed:
        bad.append(f"{module} ({layer}) imports {target} ({_layer(target)})")
  assert not bad, "imports against the layering of docs/architecture.md:\n" + "\n".join(bad)
  page = open(os.path.join(REPO, "docs", "architecture.md")).read()
  for layer, modules in LAYERS.items():
    if layer == "package":
      continue
    assert layer in page, f"docs/architecture.md does not name the {layer} layer"
    for m in modules:
      assert m.replace("dlm_jax.", "").replace(".", "/") in page, f"docs/architecture.md does not place {m}"


def test_readme_sampler_table_is_the_registry():
  readme = open(os.path.join(REPO, "README.md")).read()
  assert registry.sampler_table() in readme, "the README's sampler table is stale: paste `python -m dlm_jax.registry`"


def test_every_sampler_option_is_a_config_key_and_documented():
  cfg = config_lib.flat_items(config_lib.default_config())
  for name, spec in registry.samplers().items():
    assert spec.families and all(f in registry.processes() for f in spec.families), name
    for field, default in spec.options.fields().items():
      assert cfg[f"sampler.{name}.{field}"] == default
  for family, cls in registry.processes().items():
    assert cls.DEFAULT_SAMPLER in registry.samplers_of(family), family
    assert set(cls.CONFIG_KEYS) <= set(config_lib.default_config().diffusion), family


# --- conformance: every registered process through the whole interface ------------------------------------------------


def _run(tmp_path, family: str):
  values = dict(TINY)
  values.update({"diffusion.process": family, "sampler.batch_size": 2, "data.seq_len": 8, "model.max_seq_len": 16})
  if family == "block":
    values["diffusion.block_size"] = 4
  cfg = config_lib.load(write_config(str(tmp_path / f"{family}.py"), values))
  run = build(cfg, devices=jax.devices()[:1])
  return cfg, run, init_params(run, 0)


@pytest.mark.parametrize("family", list(registry.processes()))
def test_process_conformance(tmp_path, family):
  """Every member of the Protocol in dlm_jax/processes/base.py, on a tiny random model of the family."""
  from dlm_jax.evaluate import generate, make_canvas
  cfg, run, params = _run(tmp_path, family)
  p = run.process
  assert p.name == family and registry.processes()[family] is type(p)
  assert p.DEFAULT_SAMPLER in p.samplers() and p.samplers() == registry.samplers_of(family)
  assert isinstance(p.capabilities, frozenset) and p.capabilities <= {"exact_nll", "clip_search", "infilling", "conditional"}
  assert p.vocab_in == run.model_config.vocab_in and p.vocab_out == run.model_config.vocab_out
  assert isinstance(p.time_conditioned, bool) and isinstance(p.model_options, dict)
  json.dumps(p.describe())
  hash(p)  # static under jit
  state = p.init_state(jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 8), 0, p.vocab_size)
  batch = {"tokens": tokens, "segment_ids": jnp.zeros_like(tokens)}
  loss, metrics, new_state = jax.jit(lambda pr, b, k, s: p.loss(run.apply_fn, pr, b, k, s))(
      params, batch, jax.random.PRNGKey(2), state)
  assert np.isfinite(float(loss)) and all(np.all(np.isfinite(np.asarray(v))) for v in metrics.values())
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  nats, ntok = jax.jit(lambda pr, b, k, s: p.bound(run.apply_fn, pr, b, k, s))(params, batch, jax.random.PRNGKey(3),
                                                                                state)
  assert nats.shape == ntok.shape == (4,) and np.all(np.isfinite(np.asarray(nats)))
  np.testing.assert_array_equal(np.asarray(ntok), 8)
  out, stats = generate(run, params, state, num_samples=2, length=8, seed=0)
  assert out.shape == (2, 8) and np.all((out >= 0) & (out < p.vocab_size)) and stats["nfe_per_batch"] >= 1
  if "exact_nll" in p.capabilities:
    assert p.causal_nll(run.apply_fn, params, batch).shape == (4, 8)
  if "clip_search" in p.capabilities:
    per_block, _ = p.per_block_loss(run.apply_fn, params, batch, jax.random.PRNGKey(4), 0.3, 0.8)
    assert per_block.shape == (4, 2)
  if "conditional" in p.capabilities:  # the last 5 tokens given the first 3; the first row conditions on all but 1
    target = np.tile(np.arange(8) >= 3, (4, 1))
    target[0] = np.arange(8) >= 7
    cond = dict(batch, target=jnp.asarray(target), strata=jnp.asarray([0.1, 0.4, 0.6, 0.9]))
    nats, ntok = jax.jit(lambda pr, b, k: p.bound(run.apply_fn, pr, b, k, state))(params, cond, jax.random.PRNGKey(5))
    assert np.all(np.isfinite(np.asarray(nats))) and np.asarray(ntok).tolist() == [1, 5, 5, 5]
  template = [np.array([1, p.mask_id, p.mask_id, 2], np.int32)]
  if "infilling" in p.capabilities:
    filled, _ = generate(run, params, state, num_samples=1, length=8, seed=0, prompts=template)
    assert filled[0, 0] == 1 and filled[0, 3] == 2 and np.all(filled[0, 1:3] < p.vocab_size)
  else:
    with pytest.raises(DLMError, match="infilling"):
      make_canvas(run, template, 8)


@pytest.mark.parametrize("family", [n for n, c in registry.processes().items()
                                    if any(b.__name__ == "AbsorbingVocab" for b in c.__mro__)])
def test_mask_id_inside_the_vocabulary(tmp_path, family):
  """LLaDA / Dream checkpoints keep their mask id inside the vocabulary: mask_id, vocab_in and vocab_out are
  constructor arguments, and nothing else assumes mask_id == vocab_size."""
  import dataclasses
  from dlm_jax.evaluate import generate
  cfg, run, _ = _run(tmp_path, family)
  v = run.process.vocab_size
  process = type(run.process).from_config(cfg, v, mask_id=v - 1, vocab_in=v, vocab_out=v)
  assert (process.mask_id, process.vocab_in, process.vocab_out) == (v - 1, v, v)
  mc = dataclasses.replace(run.model_config, vocab_in=v, vocab_out=v)
  from dlm_jax import model as model_lib
  graphdef, params = model_lib.init(mc, 0)
  run = dataclasses.replace(run, process=process, model_config=mc, graphdef=graphdef)
  run.__dict__.pop("apply_fn", None)
  run.__dict__.pop("_jit_cache", None)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 8), 0, v - 1)
  loss, _, _ = process.loss(run.apply_fn, params, {"tokens": tokens}, jax.random.PRNGKey(0), {})
  assert np.isfinite(float(loss))
  out, _ = generate(run, params, {}, num_samples=2, length=8, seed=0)
  assert np.all(out != v - 1), "the mask id was sampled as a token"
  with pytest.raises(DLMError, match="mask id"):
    type(run.process).from_config(cfg, v, mask_id=v + 1, vocab_in=v, vocab_out=v)
