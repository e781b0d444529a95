"""The training loop: resume = uninterrupted, SIGTERM, 1 vs 8 devices, gradient accumulation, non-finite guard."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, checkpoint_steps, losses, run_cli, train_and_resume
from dlm_jax import config as config_lib
from dlm_jax.errors import DLMError
from dlm_jax.train import train


def test_sigterm_saves_and_resume_reproduces_uninterrupted(tmp_path, tiny_config):
  cfg_path = tiny_config(train__steps=40, train__checkpoint_every=1000)
  straight = str(tmp_path / "straight")
  train(config_lib.load(cfg_path), straight, progress=False)
  want = losses(straight)
  assert sorted(want) == list(range(1, 41))

  resumed = str(tmp_path / "resumed")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
  proc = subprocess.Popen([sys.executable, "-c", "import sys; from dlm_jax.cli import train_main; sys.exit(train_main())",
                           "--config", cfg_path, "--workdir", resumed, "--no_progress"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(resumed, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline:
    if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 5:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err
  stopped = max(losses(resumed))
  assert 5 <= stopped < 40, "SIGTERM arrived too late to test resumption"
  assert os.path.isdir(os.path.join(resumed, "checkpoints", str(stopped))), "no checkpoint saved on SIGTERM"

  r = run_cli("train", "--config", cfg_path, "--workdir", resumed, "--no_progress")
  assert r.returncode == 0, r.stderr
  got = losses(resumed)
  assert sorted(got) == list(range(1, 41))
  for step in range(1, 41):
    assert got[step] == want[step], (step, got[step], want[step])  # bit-exact on CPU


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path, tiny_config):
  cfg_path = tiny_config(train__steps=4, model__d_model=64, model__num_heads=4, model__mlp_dim=128)
  one = str(tmp_path / "one")
  r1 = run_cli("train", "--config", cfg_path, "--workdir", one, "--no_progress")
  assert r1.returncode == 0, r1.stderr
  a = losses(one)
  for data, fsdp, tensor in ((4, 2, 1), (2, 2, 2)):
    eight = str(tmp_path / f"eight_{data}{fsdp}{tensor}")
    r8 = run_cli("train", "--config", cfg_path, "--workdir", eight, "--no_progress", f"--config.mesh.data={data}",
                 f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={tensor}",
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert r8.returncode == 0, r8.stderr
    assert "Involuntary full rematerialization" not in r8.stderr, "a sharding forces XLA to replicate a tensor"
    b = losses(eight)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-5)
  eight = str(tmp_path / "eight_421")
  e1 = run_cli("eval", "--workdir", one)
  e8 = run_cli("eval", "--workdir", eight, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert e1.returncode == 0 and e8.returncode == 0, e1.stderr + e8.stderr
  import json
  v1, v8 = json.loads(e1.stdout.strip().splitlines()[-1]), json.loads(e8.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(v8["nelbo_bits_per_token"], v1["nelbo_bits_per_token"], rtol=1e-4)
  # a checkpoint written on one device resumes on an (4 x 2) mesh and continues like the one-device run
  cont = run_cli("train", "--config", cfg_path, "--workdir", one, "--no_progress", "--config.train.steps=6")
  assert cont.returncode == 0, cont.stderr
  moved = str(tmp_path / "moved")
  import shutil
  shutil.copytree(one, moved)
  shutil.rmtree(os.path.join(moved, "checkpoints", "6"))
  os.remove(os.path.join(moved, "metrics.jsonl"))
  r = run_cli("train", "--config", cfg_path, "--workdir", moved, "--no_progress", "--config.train.steps=6",
              "--config.mesh.data=4", "--config.mesh.fsdp=2",
              env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert r.returncode == 0, r.stderr
  cont_losses, moved_losses = losses(one), losses(moved)
  assert sorted(moved_losses) == [5, 6]
  np.testing.assert_allclose([moved_losses[5], moved_losses[6]], [cont_losses[5], cont_losses[6]], rtol=2e-5)


def _eight_devices_match_one(tmp_path, cfg_path):
  """Training losses (3 steps), the validation bound and prompted samples on a (2, 2, 2) mesh equal the one-device
  run, with no involuntary rematerialisation."""
  import json
  eight_env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
  assert run_cli("train", "--config", cfg_path, "--workdir", one, "--no_progress").returncode == 0
  r8 = run_cli("train", "--config", cfg_path, "--workdir", eight, "--no_progress", "--config.mesh.data=2",
               "--config.mesh.fsdp=2", "--config.mesh.tensor=2", env=eight_env)
  assert r8.returncode == 0, r8.stderr
  assert "Involuntary full rematerialization" not in r8.stderr
  a, b = losses(one), losses(eight)
  assert sorted(a) == sorted(b) == [1, 2, 3]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-5)
  e1, e8 = run_cli("eval", "--workdir", one), run_cli("eval", "--workdir", one, env=eight_env)
  v1, v8 = (json.loads(e.stdout.strip().splitlines()[-1]) for e in (e1, e8))
  np.testing.assert_allclose(v8["nelbo_bits_per_token"], v1["nelbo_bits_per_token"], rtol=1e-4)
  rows = {}
  for name, env in (("one", None), ("eight", eight_env)):
    out = str(tmp_path / f"{name}.jsonl")
    r = run_cli("sample", "--workdir", one, "--num_samples", "8", "--output", out, "--prompt", "ab",
                "--config.sampler.batch_size=8", env=env)
    assert r.returncode == 0, r.stderr
    rows[name] = [json.loads(l)["tokens"] for l in open(out)]
  assert rows["one"] == rows["eight"]


@pytest.mark.slow
def test_block_diffusion_on_eight_devices_matches_one(tmp_path, tiny_config):
  """The [x_t | x_0] objective, its bound and block sampling on a (2, 2, 2) mesh equal the one-device run."""
  cfg_path = tiny_config(train__steps=3, model__d_model=64, model__num_heads=4, model__mlp_dim=128,
                         diffusion__process="block", diffusion__block_size=4)
  _eight_devices_match_one(tmp_path, cfg_path)


def test_gradient_accumulation_matches_large_batch(tmp_path, tiny_config):
  """Accumulating 4 micro-batches gives the same first step as one batch (same data; per-micro-batch noise draws
  differ, so compare with antithetic sampling off and a fixed time via t_min close to 1)."""
  base = dict(train__steps=2, diffusion__antithetic=False, diffusion__t_min=0.999999)
  big = str(tmp_path / "big")
  train(config_lib.load(tiny_config("a.py", **base)), big, progress=False)
  acc = str(tmp_path / "acc")
  train(config_lib.load(tiny_config("b.py", train__grad_accum_steps=4, **base)), acc, progress=False)
  a, b = losses(big), losses(acc)
  np.testing.assert_allclose(b[1], a[1], rtol=1e-5)  # t ~ 1: everything masked, so the loss is draw-independent
  np.testing.assert_allclose(b[2], a[2], rtol=1e-4)


def test_non_finite_loss_stops_without_touching_checkpoints(tmp_path, tiny_config):
  good = tiny_config("good.py", train__steps=3)
  wd = str(tmp_path / "wd")
  train(config_lib.load(good), wd, progress=False)
  ckpts = sorted(os.listdir(os.path.join(wd, "checkpoints")))
  bad = tiny_config("bad.py", train__steps=50, train__learning_rate=1e12, train__grad_clip=0.0,
                    train__warmup_steps=0, train__checkpoint_every=1)
  r = run_cli("train", "--config", bad, "--workdir", wd, "--no_progress")
  assert r.returncode == 2
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert lines[-1].startswith("dlm-train: error: non-finite loss"), r.stderr
  # The steps before the first non-finite one were finite but saved exploded parameters (learning rate 1e12): their
  # bound is non-finite, which dlm-eval reports as one error line (exit 2) rather than a JSON line holding NaN.
  e = run_cli("eval", "--workdir", wd)
  assert e.returncode == 2, e.stdout + e.stderr
  err = [l for l in e.stderr.strip().splitlines() if l.strip()]
  assert err[-1].startswith("dlm-eval: error: the likelihood bound of") and "is nan" in err[-1], e.stderr
  assert sum("error" in l for l in err) == 1, e.stderr
  assert "NaN" not in e.stdout
  for c in ckpts:
    assert os.path.exists(os.path.join(wd, "checkpoints", c))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(), ("--config.mesh.data=1", "--config.mesh.sequence=2", "--config.mesh.tensor=2")],
                         ids=["data", "sequence-across-hosts"])
def test_two_processes_match_one(tmp_path, tiny_config, layout):
  """Two local processes (loopback coordinator, as on a multi-host slice) reproduce the single-process losses: with
  the batch split over the hosts, and with 2 devices per process and a sequence axis spanning the hosts (both hosts
  then load the same rows of the global batch: sharding.host_batch_rows)."""
  cfg_path = tiny_config(train__steps=4, train__eval_every=2, train__eval_samples=1)
  one = str(tmp_path / "one")
  r1 = run_cli("train", "--config", cfg_path, "--workdir", one, "--no_progress")
  assert r1.returncode == 0, r1.stderr
  two = str(tmp_path / "two")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore", PATH=os.path.dirname(sys.executable) + ":" +
             os.environ.get("PATH", ""), DEVICES_PER_PROCESS="2" if layout else "1")
  r2 = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2", cfg_path, two,
                       "--no_progress", *layout], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert r2.returncode == 0, r2.stdout + r2.stderr
  a, b = losses(one), losses(two)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-5)


@pytest.mark.parametrize("overrides", [
    {"train__compute_dtype": "bfloat16"},
    {"model__time_conditioning": True, "diffusion__schedule": "cosine"},
    {"diffusion__objective": "llada"},
    {"diffusion__schedule": "loglinear", "data__segment_attention": True, "diffusion__antithetic": False},
    {"model__num_kv_heads": 1, "diffusion__schedule": "polynomial"},
    {"diffusion__process": "block", "diffusion__block_size": 4, "data__segment_attention": True,
     "train__compute_dtype": "bfloat16", "diffusion__t_min": 0.3, "diffusion__t_max": 0.8},
    {"diffusion__process": "block", "diffusion__block_size": 1, "model__num_kv_heads": 1},
], ids=["bf16", "time_cond_cosine", "llada", "loglinear_segments", "gqa_poly", "block4_segments_bf16_clipped",
        "autoregressive"])
def test_training_variants_learn_and_sample(tmp_path, tiny_config, overrides):
  """Every model / process option trains (loss falls), evaluates and samples through the one loop."""
  from dlm_jax.data import load_corpus
  from dlm_jax.evaluate import evaluate_bound, generate
  from dlm_jax.train import load_for_inference
  cfg = config_lib.load(tiny_config(train__steps=30, train__learning_rate=3e-3, train__checkpoint_every=30, train__ema_decay=0.5,
                                    **overrides))
  wd = str(tmp_path / "wd")
  train(cfg, wd, progress=False)
  ls = losses(wd)
  assert np.mean([ls[s] for s in range(26, 31)]) < 0.8 * np.mean([ls[s] for s in range(1, 6)]), ls
  cfg, run, params, pstate = load_for_inference(wd)
  ev = evaluate_bound(run, params, load_corpus(cfg, run.tokenizer).val, pstate, batch_size=8, max_batches=2)
  assert np.isfinite(ev["nelbo_bits_per_token"]) and ev["nelbo_bits_per_token"] < 7.0  # uniform over 257 bytes: 8.0
  toks, stats = generate(run, params, pstate, num_samples=3, length=16, seed=0)
  assert toks.shape == (3, 16) and (toks < run.tokenizer.vocab_size).all()
  if cfg.model.time_conditioning:
    assert stats["nfe_per_batch"] == cfg.sampler.steps  # no cache for a time-conditioned network


def test_hugging_face_tokenizer_trains_and_samples(tmp_path, markov_text, tiny_config):
  """A tokenizer.json (BPE trained here with the tokenizers library) through the whole CLI path."""
  from tokenizers import Tokenizer
  from conftest import train_bpe
  path = train_bpe(tmp_path / "tokenizer.json", [open(markov_text).read()])
  tok = Tokenizer.from_file(path)
  cfg_path = tiny_config(data__tokenizer=path, train__steps=4)
  wd = str(tmp_path / "wd")
  r = run_cli("train", "--config", cfg_path, "--workdir", wd, "--no_progress")
  assert r.returncode == 0, r.stderr
  out = str(tmp_path / "s.jsonl")
  r = run_cli("sample", "--workdir", wd, "--num_samples", "2", "--output", out, "--prompt", "abc")
  assert r.returncode == 0, r.stderr
  import json
  rows = [json.loads(line) for line in open(out)]
  vocab = tok.get_vocab_size()
  assert all(0 <= t < vocab for row in rows for t in row["tokens"])
  assert all(row["text"].startswith("abc") for row in rows)
  assert run_cli("eval", "--workdir", wd).returncode == 0


def test_sigterm_right_after_a_periodic_save(tmp_path, tiny_config):
  """With a checkpoint every step, SIGTERM always lands on an already-saved step: it must exit cleanly (143)."""
  import threading
  cfg = config_lib.load(tiny_config(train__steps=200, train__checkpoint_every=1, train__keep_checkpoints=2))
  wd = str(tmp_path / "wd")
  metrics = os.path.join(wd, "metrics.jsonl")

  def killer():
    deadline = time.time() + 300
    while time.time() < deadline:
      if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 3:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.02)

  threading.Thread(target=killer, daemon=True).start()
  with pytest.raises(SystemExit) as e:
    train(cfg, wd, progress=False)
  assert e.value.code == 143
  last = max(losses(wd))
  assert last < 200
  steps = checkpoint_steps(wd)
  assert steps[-1] == last and len(steps) <= 2


@pytest.mark.parametrize("process", ["embedding_flow", "bitstream"])
def test_schedule_state_is_checkpointed_and_resume_reproduces(tmp_path, tiny_config, process):
  """The learned noise schedules (LangFlow's Gumbel fit, CoBit's entropy table and buffer) live in process_state:
  stopping at step 4 and resuming gives the uninterrupted run's losses, schedule and parameters exactly."""
  from dlm_jax.train import load_for_inference
  base = dict(train__steps=8, train__checkpoint_every=4, diffusion__process=process,
              diffusion__schedule_update_every=3, diffusion__schedule_buffer=16, train__ema_decay=0.0)
  cfg = config_lib.load(tiny_config("a.py", **base))
  straight, resumed = train_and_resume(cfg, tmp_path, stop=4, last=8)
  _, _, pa, sa = load_for_inference(straight)
  _, _, pb, sb = load_for_inference(resumed)
  assert int(sa["calls"]) == 8  # two refits happened (after loss calls 3 and 6)
  if process == "embedding_flow":
    assert float(sa["mu"]) != 4.723
  else:
    assert int(sa["built"]) == 1
  for x, y in zip(jax_leaves(sa) + jax_leaves(pa), jax_leaves(sb) + jax_leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


@pytest.mark.slow
@pytest.mark.parametrize("process", ["bitstream"])
def test_continuous_family_on_eight_devices_matches_one(tmp_path, tiny_config, process):
  """Losses, the ODE bound and samples of a continuous family on a (2, 2, 2) mesh equal the one-device run (bitstream:
  the bit adapter, self-conditioning and the schedule state; the embedding families' table lookups are gathered the
  same way as the model's)."""
  cfg_path = tiny_config(train__steps=3, model__d_model=64, model__num_heads=4, model__mlp_dim=128,
                         diffusion__process=process, diffusion__bound_steps=4, diffusion__schedule_update_every=2,
                         diffusion__schedule_buffer=16)
  _eight_devices_match_one(tmp_path, cfg_path)


# ----------------------------------------------------------------------------------------------------------------------
# Loop hooks: objectives, extra batch fields and hooks plug into the one loop


def _train_rows(workdir):
  import json
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if '"train"' in line]


def test_custom_objective_reads_an_extra_batch_field(tmp_path, tiny_config):
  """A post-training objective (twice the process loss, scaled by a per-row batch field the pipeline's batch_fn adds)
  runs through the same loop; gradient accumulation splits the extra field like the tokens."""
  import jax.numpy as jnp
  from dlm_jax.build import build
  cfg = config_lib.load(tiny_config(train__steps=2, train__grad_accum_steps=2, data__segment_attention=True))
  plain = str(tmp_path / "plain")
  train(cfg, plain, progress=False)
  process = build(cfg).process
  seen = []

  def add_scale(batch):
    return dict(batch, scale=np.full(batch["tokens"].shape[:1], 2.0, np.float32))

  def objective(apply_fn, params, batch, key, pstate):
    seen.append({k: v.shape for k, v in batch.items()})  # at trace time: the micro-batch's fields
    loss, metrics, pstate = process.loss(apply_fn, params, batch, key, pstate)
    return loss * jnp.mean(batch["scale"]), dict(metrics, scale=jnp.mean(batch["scale"])), pstate

  custom = str(tmp_path / "custom")
  out = train(cfg, custom, progress=False, objective=objective, batch_fn=add_scale)
  assert seen and all(s == {"tokens": (4, 16), "segment_ids": (4, 16), "scale": (4,)} for s in seen), seen
  a, b = losses(plain), losses(custom)
  assert sorted(b) == [1, 2]
  assert b[1] == 2 * a[1]  # same parameters, key and data at step 1
  assert out["scale"] == 2.0 and out["loss"] == b[2]


def test_an_extra_batch_field_the_family_loss_does_not_read_is_an_error(tmp_path, tiny_config):
  """A batch_fn's field (a loss mask) with the family's own loss would be silently ignored: one-line error instead."""
  cfg = config_lib.load(tiny_config(train__steps=2))

  def add_mask(batch):
    return dict(batch, loss_mask=np.ones(batch["tokens"].shape, np.float32))

  with pytest.raises(DLMError, match="loss_mask.*does not read"):
    train(cfg, str(tmp_path / "w"), progress=False, batch_fn=add_mask)
  assert not os.path.exists(tmp_path / "w" / "checkpoints" / "2")


def test_hooks_see_every_step_and_metrics_are_fetched_only_at_log_steps(tmp_path, tiny_config, monkeypatch):
  """An extra hook gets on_start, on_step for every step (after the built-in hooks) and on_end; the built-in hooks copy
  metrics to the host only at log steps (here 3, 6, 7; the final checkpoint reuses step 7's copy)."""
  import jax
  from dlm_jax import train as train_lib
  cfg = config_lib.load(tiny_config(train__steps=7, train__log_every=3, train__checkpoint_every=100))
  calls = []
  device_get = jax.device_get

  def counting(x):
    if sys._getframe(1).f_code.co_filename == train_lib.__file__:
      calls.append(x)
    return device_get(x)

  monkeypatch.setattr(jax, "device_get", counting)

  class Recorder(train_lib.Hook):
    def __init__(self):
      self.steps, self.fetched, self.ended, self.closed = [], [], None, False

    def on_step(self, step, state, fetch):
      assert fetch.step == step and self.trainer.state is state
      self.steps.append(step)
      self.fetched.append(fetch.fetched)

    def on_end(self, step, state):
      self.ended = step

    def close(self):
      self.closed = True

  rec = Recorder()
  wd = str(tmp_path / "wd")
  train(cfg, wd, progress=False, hooks=[rec])
  assert rec.steps == list(range(1, 8)) and rec.ended == 7 and rec.closed
  assert [s for s, f in zip(rec.steps, rec.fetched) if f] == [3, 6, 7]
  assert len(calls) == 3, calls
  assert sorted(losses(wd)) == [3, 6, 7]
  # resuming past the end runs no step; the hook still starts, ends and closes
  rec2 = Recorder()
  train(cfg, wd, progress=False, hooks=[rec2])
  assert rec2.steps == [] and rec2.ended == 7 and rec2.closed


def test_non_finite_step_is_named_at_the_next_check_and_nothing_is_saved(tmp_path, tiny_config):
  """With metrics fetched only every 20 steps, a non-finite step still stops the run with the message of the
  step-by-step run (the first non-finite step and its loss), no later than the next checkpoint step, which is not
  written."""
  bad = dict(train__steps=20, train__learning_rate=1e12, train__grad_clip=0.0, train__warmup_steps=0)
  with pytest.raises(DLMError) as every_step:
    train(config_lib.load(tiny_config("a.py", train__log_every=1, train__checkpoint_every=100, **bad)),
          str(tmp_path / "a"), progress=False)
  first = int(str(every_step.value).split("at step ")[1].split(" ")[0])
  assert 1 <= first < 5, str(every_step.value)
  wd = str(tmp_path / "b")
  with pytest.raises(DLMError) as lazy:
    train(config_lib.load(tiny_config("b.py", train__log_every=20, train__checkpoint_every=5, **bad)), wd,
          progress=False)
  assert str(lazy.value) == str(every_step.value)
  assert "\n" not in str(lazy.value)
  assert not [d for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit()]
  assert _train_rows(wd) == []


def test_train_step_takes_the_pipeline_segment_ids(tiny_config):
  """The step uses the batch's segment ids as given (the pipeline computes them on the host); a bare token array is
  the batch the pipeline makes of it."""
  import jax
  from dlm_jax.build import build
  from dlm_jax.data import segment_ids
  from dlm_jax.train import (abstract_batch, abstract_train_state, init_train_state, make_optimizer, make_train_step,
                             state_shardings)
  cfg = config_lib.load(tiny_config(data__segment_attention=True))
  run = build(cfg)
  opt = make_optimizer(cfg)
  shardings = state_shardings(run, opt, abstract_train_state(run, opt))
  step = make_train_step(run, opt, shardings)
  tokens = np.random.default_rng(0).integers(0, 257, (8, 16)).astype(np.int32)
  tokens[:, ::5] = run.tokenizer.eos_id
  assert set(abstract_batch(run)) == {"tokens", "segment_ids"}

  def loss(batch):
    with jax.set_mesh(run.mesh):
      return float(step(init_train_state(run, opt, shardings), batch)[1]["loss"])

  right = loss({"tokens": tokens, "segment_ids": segment_ids(tokens, run.tokenizer.eos_id)})
  assert loss(tokens) == right
  assert loss({"tokens": tokens, "segment_ids": np.zeros_like(tokens)}) != right


def test_resumed_run_rewrites_metrics_after_its_checkpoint(tmp_path):
  """Steps an interrupted run logged after its last checkpoint are run again on resume: metrics.jsonl keeps each step
  once (the killed run's later rows and a torn last line are dropped), and TensorBoard purges events after it."""
  import json as json_lib
  from dlm_jax.logs import MetricWriter, read_metrics
  rows = [json_lib.dumps({"step": s, "kind": "train", "loss": float(s)}) + "\n" for s in range(1, 11)]
  (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 11, "kind": "tr')
  writer = MetricWriter(str(tmp_path), resume_step=5)
  writer.write(6, "train", {"loss": 60.0})
  writer.close()
  got = [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path))]
  assert got == [(s, float(s)) for s in range(1, 6)] + [(6, 60.0)]
  assert not (tmp_path / "metrics.jsonl.tmp").exists()
  fresh = tmp_path / "fresh"
  MetricWriter(str(fresh), resume_step=None).close()
  assert read_metrics(str(fresh)) == []
