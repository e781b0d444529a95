"""LoRA adapters (dlm_jax/lora.py): the adapted forward, a fine-tune through the real loop that checkpoints only the
adapters, inference on a LoRA workdir, `dlm-convert --merge_lora`, and the config errors."""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import markov
from conftest import TINY, checkpoint_steps, losses, write_config
from dlm_jax import config as config_lib
from dlm_jax import lora
from dlm_jax import model as model_lib
from dlm_jax.build import build, init_params
from dlm_jax.errors import DLMError

SMALL = {"model.num_layers": 2, "train.ema_decay": 0.0}
ALL_TARGETS = "q,k,v,o,gate,up,down"


def _config(**values):
  cfg = config_lib.default_config()
  config_lib.apply_overrides(cfg, {**TINY, **SMALL, **values}.items())
  return config_lib.validate(cfg)


def _lora_config(**values):
  return _config(**{"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": ALL_TARGETS, "train.init_from": "/base",
                    "train.objective": "sft", **values})


def _randomised(adapter, seed=3):
  """The adapters with B drawn too (after init B = 0 and the adapted model is the base)."""
  leaves, tree = jax.tree.flatten(adapter)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_adapted_forward_is_the_merged_model(scan):
  cfg = _lora_config(**{"model.scan_layers": scan})
  run = build(cfg)
  space = lora.adapter_run(run)
  layer = "layers" if scan else "layer_0"
  lead = (2,) if scan else ()
  shapes = jax.tree.map(lambda s: s.shape, space.abstract_params)
  assert set(shapes) == ({"layers"} if scan else {"layer_0", "layer_1"})
  assert set(shapes[layer]) == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
  assert shapes[layer]["wo"] == {"a": (*lead, 32, 4), "b": (*lead, 4, 32)}  # [heads x head_dim, rank], [rank, d]
  assert shapes[layer]["w_down"] == {"a": (*lead, 64, 4), "b": (*lead, 4, 32)}
  axes = space.param_axes[layer]["wq"]
  assert axes["a"][1] == (*(("layers",) if scan else ()), "embed", None)
  assert axes["b"][1] == (*(("layers",) if scan else ()), None, "heads")

  base = init_params(run, 0)
  adapter = lora.init_adapter(space, seed=1)
  assert all(float(jnp.abs(x["b"]).max()) == 0 for x in adapter[layer].values())
  assert lora.scale(cfg.lora) == 2.0
  trained = _randomised(adapter)  # B drawn too

  @jax.jit
  def forwards(base, adapter, trained, tokens, t):
    net = lora.Adapted(run.apply_fn.graphdef, run.apply_fn.logit_shift, base=base, scale=lora.scale(cfg.lora))
    merged = lora.merge(base, trained, 2.0)
    return {"init": net(adapter, tokens), "base": run.apply_fn(base, tokens), "merged": merged,
            "adapted": net(trained, tokens), "direct": run.apply_fn(merged, tokens),
            "table": net.input_table(trained),
            # the sampler-facing forwards (the cached one reads the cache shapes from the merged parameters)
            "logits_fn": net.logits_fn(trained)(tokens, t), "logits_fn_ref": run.apply_fn.logits_fn(merged)(tokens, t),
            "cached": net.cached_logits_fn(trained)(tokens, t, 0, None)[0],
            "cached_ref": run.apply_fn.cached_logits_fn(merged)(tokens, t, 0, None)[0],
            # gradients reach the adapters only (the base is not an argument of the loss)
            "grads": jax.grad(lambda a: net(a, tokens).sum())(adapter)}

  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 200)
  out = forwards(base, adapter, trained, tokens, jnp.full((2,), 0.5))
  np.testing.assert_array_equal(out["init"], out["base"])  # B = 0: exactly the base
  merged = out["merged"]
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  np.testing.assert_array_equal(merged["embed"], base["embed"])
  np.testing.assert_array_equal(merged[layer]["attn_norm"], base[layer]["attn_norm"])
  w, ab = base[layer]["wo"], trained[layer]["wo"]
  np.testing.assert_allclose(merged[layer]["wo"], w + 2.0 * (ab["a"] @ ab["b"]).reshape(w.shape), atol=1e-6)
  np.testing.assert_allclose(out["adapted"], out["direct"], atol=1e-5)
  assert float(jnp.abs(out["adapted"] - out["base"]).max()) > 1e-3
  np.testing.assert_array_equal(out["table"], base["embed"])
  np.testing.assert_allclose(out["logits_fn"], out["logits_fn_ref"], atol=1e-5)
  np.testing.assert_allclose(out["cached"], out["cached_ref"], atol=1e-5)
  assert jax.tree.structure(out["grads"]) == jax.tree.structure(adapter)
  assert float(jnp.abs(out["grads"][layer]["wq"]["b"]).max()) > 0


def test_adapters_same_in_both_layouts_and_param_dtype():
  unrolled = lora.init_adapter(lora.adapter_run(build(_lora_config())), seed=5)
  scanned = lora.init_adapter(lora.adapter_run(build(_lora_config(**{"model.scan_layers": True}))), seed=5)
  jax.tree.map(np.testing.assert_array_equal, model_lib.stack_layers(unrolled), scanned)
  space = lora.adapter_run(build(_lora_config(**{"train.param_dtype": "bfloat16", "lora.targets": "q,down"})))
  assert {x.dtype for x in jax.tree.leaves(space.abstract_params)} == {jnp.dtype(jnp.bfloat16)}
  assert set(space.abstract_params["layer_1"]) == {"wq", "w_down"}


def _digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      h.update(os.path.join(root, f).encode())
      h.update(open(os.path.join(root, f), "rb").read())
  return h.hexdigest()


def _size(path):
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


def _finetune(d):
  """A tiny base trained for a few steps in d/base, then a LoRA run on it in d/lora through the real loop (the
  objective: the family's loss, as an SFT-style post-training objective would wrap it; posttrain.make stands in for
  the objectives' own). Returns (base workdir, LoRA workdir, LoRA config, the base workdir's digest before)."""
  from dlm_jax import data, posttrain, train
  (d / "chain.txt").write_text(markov.generate(20_000, seed=4))
  common = {**TINY, **SMALL, "data.path": str(d / "chain.txt"), "model.d_model": 64, "model.mlp_dim": 128}
  base_wd, lora_wd = str(d / "base"), str(d / "lora")
  base_cfg = config_lib.load(write_config(str(d / "base.py"), {**common, "train.steps": 4,
                                                                "train.checkpoint_every": 4}))
  train.train(base_cfg, base_wd, progress=False)
  before = _digest(base_wd)
  cfg = config_lib.load(write_config(str(d / "lora.py"), {
      **common, "train.steps": 8, "train.learning_rate": 3e-3, "train.warmup_steps": 1, "train.checkpoint_every": 4,
      "lora.rank": 4, "lora.targets": ALL_TARGETS, "train.init_from": base_wd, "train.objective": "sft"}))

  def make(cfg, run, load):
    return posttrain.PostTraining(objective=None, corpus=data.load_corpus(cfg, run.tokenizer),
                                  init_params=load(cfg.train.init_from, "train.init_from"))

  process = build(cfg).process

  def objective(apply_fn, params, batch, key, pstate, frozen):
    assert isinstance(apply_fn, lora.Adapted) and set(frozen) == {"lora_base"}
    return process.loss(apply_fn, params, batch, key, pstate)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(posttrain, "make", make)
    train.train(cfg, lora_wd, progress=False, objective=objective)
  return base_wd, lora_wd, cfg, before


def test_finetune_inference_and_merge(tmp_path, capsys):
  """One test (the fine-tune is shared): the checkpoint holds only the adapters, the base stays untouched, the loss
  goes down, inference merges, dlm-convert --merge_lora writes a workdir that gives the same logits and trains on."""
  from dlm_jax import data, train
  from dlm_jax.checkpoint import Checkpointer
  from dlm_jax.cli import convert_main
  from dlm_jax.evaluate import evaluate_bound
  base_wd, lora_wd, cfg, before = _finetune(tmp_path)
  assert _digest(base_wd) == before, "the LoRA run changed its base's workdir"
  assert checkpoint_steps(lora_wd) == [4, 8]
  ckpt = Checkpointer(lora_wd, read_only=True)
  assert ckpt.restore_config(8)["lora"]["rank"] == 4
  ckpt.close()
  base_ckpt = os.path.join(base_wd, "checkpoints", str(checkpoint_steps(base_wd)[-1]))
  assert _size(os.path.join(lora_wd, "checkpoints", "8")) < _size(base_ckpt) / 3
  run = build(cfg)
  space = lora.adapter_run(run)
  opt = train.make_optimizer(cfg)
  abstract = train.abstract_train_state(space, opt)
  shardings = train.state_shardings(space, opt, abstract)
  ckpt = Checkpointer(lora_wd, read_only=True)
  state, _ = ckpt.restore(8, train.with_shardings(abstract, shardings))  # the adapters' state restores as is
  ckpt.close()
  assert jax.tree.structure(state["params"]) == jax.tree.structure(space.abstract_params)
  assert float(jnp.abs(state["params"]["layer_0"]["wq"]["b"]).max()) > 0  # B moved away from 0
  assert sorted(losses(lora_wd)) == list(range(1, 9))

  # inference on the LoRA workdir: its adapters merged into the base
  cfg2, run2, params, _ = train.load_for_inference(lora_wd)
  base = train.restore_params(base_wd, run2, "train.init_from")
  expect = lora.merge(base, state["params"], lora.scale(cfg.lora))
  jax.tree.map(np.testing.assert_array_equal, params, expect)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 200)
  assert float(jnp.abs(run2.apply_fn(params, tokens) - run2.apply_fn(base, tokens)).max()) > 1e-3
  # the fine-tune lowered the loss: the validation bound (deterministic: fixed times and masks) of the merged model
  # against the base's (the per-step training losses are too noisy to compare over a few steps)
  val = data.load_corpus(cfg2, run2.tokenizer).val
  bound = lambda p: evaluate_bound(run2, p, val, batch_size=8, seed=0)["nelbo_bits_per_token"]
  assert bound(params) < bound(base) - 0.05
  with pytest.raises(DLMError, match="lora.rank"):
    train.load_for_inference(lora_wd, [("lora.rank", "8")])

  # dlm-convert --merge_lora: a standalone workdir, no base needed
  out = str(tmp_path / "merged")
  assert convert_main(["--merge_lora", "--workdir", lora_wd, "--out", out]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["base"] == base_wd and summary["rank"] == 4 and summary["step"] == 8
  saved = json.load(open(os.path.join(out, "config.json")))
  assert saved["lora"] == config_lib.to_dict(config_lib.default_config())["lora"]
  assert saved["train"]["objective"] == "pretrain" and saved["train"]["init_from"] == ""
  moved = base_wd + ".moved"
  os.rename(base_wd, moved)  # the merged workdir stands alone; the LoRA run needs its base
  with pytest.raises(DLMError, match="train.init_from"):
    train.load_for_inference(lora_wd)
  _, run, merged, _ = train.load_for_inference(out)
  jax.tree.map(np.testing.assert_array_equal, merged, params)
  np.testing.assert_array_equal(run.apply_fn(merged, tokens), run2.apply_fn(params, tokens))
  # it trains further like any converted workdir (parameters-only checkpoint at step 0)
  more = train.workdir_config(out, [("train.steps", "1"), ("train.checkpoint_every", "1")])
  train.train(more, out, progress=False)
  assert checkpoint_steps(out) == [0, 1]

  # errors: one line, exit code 2
  assert convert_main(["--merge_lora", "--workdir", moved, "--out", str(tmp_path / "x")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "is not a LoRA run" in err[0] and err[0].startswith("dlm-convert: error: "), err
  assert not os.path.exists(tmp_path / "x")
  assert convert_main(["--merge_lora", "--workdir", lora_wd]) == 2
  assert "--out" in capsys.readouterr().err
  assert convert_main(["--merge_lora", "--workdir", lora_wd, "--out", out]) == 2  # not empty
  assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("values, message", [
    ({"lora.rank": 4, "train.objective": "sft"}, "set train.init_from"),
    ({"lora.rank": 4, "train.init_from": "/base"}, "needs a post-training objective"),
    ({"lora.rank": 4, "train.init_from": "/base", "train.objective": "sft", "lora.targets": "q,ffn"},
     "lora.targets='q,ffn'"),
    ({"lora.rank": 4, "train.init_from": "/base", "train.objective": "sft", "lora.targets": "q,q"}, "distinct"),
    ({"lora.rank": 4, "train.init_from": "/base", "train.objective": "sft", "lora.alpha": 0.0}, "lora.alpha"),
    ({"lora.rank": -1}, "lora.rank must be >= 0"),
    ({"lora.targets": "q,v"}, "no effect with lora.rank=0"),
])
def test_config_errors(values, message):
  with pytest.raises(DLMError, match=message) as e:
    _config(**values)
  assert "\n" not in str(e.value)


def test_cli_error_is_one_line(tmp_path, capsys):
  from dlm_jax.cli import train_main
  path = write_config(str(tmp_path / "c.py"), {**TINY, "data.path": str(tmp_path / "none.txt")})
  assert train_main(["--config", path, "--workdir", str(tmp_path / "wd"), "--config.lora.rank=4",
                     "--config.train.objective=sft"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0] == "dlm-train: error: lora.rank > 0 adapts a trained base: set train.init_from " \
      "to its workdir", err
  assert not os.path.exists(tmp_path / "wd")
