"""Model at scale: layers under scan (model.scan_layers) equal the unrolled layers (logits, K/V cache, training losses,
checkpoints restored across layouts), and every rematerialisation policy (model.remat) gives the gradients of none."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import losses
from dlm_jax import config as config_lib
from dlm_jax import model as model_lib
from dlm_jax.build import build
from dlm_jax.checkpoint import Checkpointer
from dlm_jax.errors import DLMError
from dlm_jax.train import load_for_inference, train, with_shardings

SMALL = model_lib.ModelConfig(vocab_in=40, vocab_out=40, num_layers=3, d_model=32, num_heads=4, num_kv_heads=2,
                              head_dim=8, mlp_dim=64, max_seq_len=64, init_std=0.2)


def _both(**kw):
  """(graphdef, params) of the unrolled and the scanned model of one config and seed."""
  c = dataclasses.replace(SMALL, **kw)
  return model_lib.init(c, 0), model_lib.init(dataclasses.replace(c, scan_layers=True), 0)


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_scanned_layout_is_the_stacked_unrolled_one():
  (g, p), (gs, ps) = _both()
  assert set(ps) == {"embed", "head", "final_norm", "layers"} and ps["layers"]["wq"].shape == (3, 32, 4, 8)
  assert model_lib.layer_layout(p) == "unrolled" and model_lib.layer_layout(ps) == "scanned"
  assert model_lib.num_params(p) == model_lib.num_params(ps)
  assert model_lib.num_params(p, exclude_embeddings=True) == model_lib.num_params(ps, exclude_embeddings=True)
  _close(model_lib.stack_layers(p), ps, 0)  # the same seed gives the same parameters in both layouts
  _close(model_lib.unstack_layers(ps), p, 0)
  _, _, axes = model_lib.abstract(dataclasses.replace(SMALL, scan_layers=True))
  assert axes["layers"]["wo"] == ((3, 4, 8, 32), ("layers", "heads", "kv", "embed"))


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_scan_matches_unrolled_logits_and_cache(time_conditioning):
  (g, p), (gs, ps) = _both(time_conditioning=time_conditioning)
  if time_conditioning:  # adaLN starts at zero: give it weights so the condition reaches every block
    key = jax.random.PRNGKey(3)
    p = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(key, x.shape), p)
    ps = model_lib.stack_layers(p)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 40)
  kw = {"t": jnp.array([0.3, 0.8])} if time_conditioning else {}
  tol = 1e-4  # float32 logits of magnitude ~5 from the same ops in another order (XLA fuses scan bodies differently)
  _close(model_lib.apply(g, p, tokens, **kw), model_lib.apply(gs, ps, tokens, **kw), tol)
  # the samplers' cache-aware forward: a full pass, then a window written into the cache
  for params, graphdef in ((p, g), (ps, gs)):
    assert jax.tree.leaves(model_lib.empty_cache(params, 2, 16))[0].shape[-3:] == (16, 2, 8)
  out = []
  for graphdef, params in ((g, p), (gs, ps)):
    fn = model_lib.cached_logits_fn(model_lib.make_apply(graphdef), params, time_conditioned=time_conditioning)
    t = kw.get("t", jnp.zeros((2,)))
    full, cache = fn(tokens, t, 0, None)
    window, cache = fn(tokens[:, 4:8] % 7, t, 4, cache)
    out.append((full, window, cache["kv"]))
  _close(out[0][:2], out[1][:2], tol)
  _close(model_lib.stack_layers(out[0][2]), out[1][2], tol)


def test_remat_policies_give_the_gradients_of_none():
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 40)
  target = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 40)

  def grads(c):
    graphdef, params = model_lib.init(c, 0)

    def loss(params):
      logits = model_lib.apply(graphdef, params, tokens, t=jnp.array([0.2, 0.7]))
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), target[..., None], -1))

    return jax.jit(jax.grad(loss))(params)

  for scan in (False, True):
    c = dataclasses.replace(SMALL, num_layers=2, scan_layers=scan, time_conditioning=True)
    want = grads(c)
    for remat in ("full", "dots_saveable", "save_attention", "offload"):
      _close(grads(dataclasses.replace(c, remat=remat)), want, 1e-6)


def test_remat_value_is_checked(tiny_config):
  with pytest.raises(DLMError, match="model.remat must be one of"):
    config_lib.validate(config_lib.load(tiny_config(model__remat="dots")))


def test_training_and_checkpoints_across_layouts(tmp_path, tiny_config):
  """A checkpoint saved in one layout resumes in the other (scanned with remat) and every loss equals the unrolled
  run's; parameters restore for inference in the other layout."""
  base = dict(train__steps=4, train__checkpoint_every=2, model__num_layers=2)
  straight = str(tmp_path / "straight")
  train(config_lib.load(tiny_config("a.py", **base)), straight, progress=False)
  want = losses(straight)
  for first, then in ((False, True), (True, False)):
    wd = str(tmp_path / f"resume_{first}")
    train(config_lib.load(tiny_config("c.py", **{**base, "train__steps": 2}, model__scan_layers=first)), wd,
          progress=False)
    train(config_lib.load(tiny_config("d.py", **base, model__scan_layers=then, model__remat="full")), wd,
          progress=False)
    got = losses(wd)
    assert sorted(got) == [1, 2, 3, 4]
    np.testing.assert_allclose([got[s] for s in range(1, 5)], [want[s] for s in range(1, 5)], rtol=2e-5)

  # the inference path (Checkpointer.restore_subset): the last checkpoint (unrolled) read in the scanned layout
  wd = str(tmp_path / "resume_True")
  _, run_u, params_u, _ = load_for_inference(wd)
  assert model_lib.layer_layout(params_u) == "unrolled"
  run_s = build(config_lib.load(tiny_config("e.py", **base, model__scan_layers=True)))
  reader = Checkpointer(wd, read_only=True)
  which = "ema" if "ema" in reader.state_keys(reader.latest_step()) else "params"
  read = lambda run: reader.restore_subset(reader.latest_step(), {which: with_shardings(
      run.abstract_params, run.param_shardings)})[which]
  as_scanned, same = read(run_s), read(run_u)
  reader.close()
  assert model_lib.layer_layout(as_scanned) == "scanned"
  _close(model_lib.stack_layers(same), as_scanned, 0)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 0, 10)
  _close(run_u.apply_fn(same, tokens), run_s.apply_fn(as_scanned, tokens), 1e-4)
