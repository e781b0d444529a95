"""Post-training: SFT rows and loss, RL losses against the papers' formulas, rewards, and short runs through the one
training loop (SFT learns an instruction task the base model cannot do; RL raises a verifiable reward)."""

import json
import os
import random
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY, run_cli, write_config
from dlm_jax import config as config_lib
from dlm_jax.build import build
from dlm_jax.data import ByteTokenizer
from dlm_jax.errors import DLMError
from dlm_jax.maths import PAD
from dlm_jax.posttrain import rewards, rl, sft

SMALL = dict(TINY, **{"model.num_layers": 2, "model.d_model": 64, "model.mlp_dim": 128, "data.seq_len": 32,
                      "train.batch_size": 16, "train.ema_decay": 0.0})


def digits(rng, n):
  return "".join(rng.choice("0123456789") for _ in range(n))


def increment(d: str) -> str:
  """The instruction task: add one to every digit (mod 10)."""
  return "".join(str((int(c) + 1) % 10) for c in d)


def digit_conversations(path, n, rng, nd=3):
  with open(path, "w") as f:
    for _ in range(n):
      d = digits(rng, nd)
      f.write(json.dumps({"messages": [{"role": "user", "content": d}, {"role": "assistant", "content": increment(d)}]})
              + "\n")
  return str(path)


@pytest.fixture(scope="module")
def digit_base(tmp_path_factory):
  """A tiny masked model pretrained for 40 steps on uniform digit strings (the base of the SFT and RL runs)."""
  from dlm_jax.train import train
  tmp = tmp_path_factory.mktemp("base")
  rng = random.Random(0)
  text = tmp / "digits.txt"
  text.write_text("\n".join(digits(rng, 12) for _ in range(3000)))
  train(make_cfg(tmp, "base", data__path=str(text), train__steps=40), str(tmp / "base"), progress=False)
  return str(tmp / "base")


def make_cfg(tmp_path, name, **values):
  v = dict(SMALL)
  v.update({k.replace("__", "."): x for k, x in values.items()})
  return config_lib.load(write_config(str(tmp_path / f"{name}.py"), v), [])


# --- SFT ------------------------------------------------------------------------------------------------------------


def test_sft_rows_prompt_response_padding():
  tok = ByteTokenizer()
  convs = [[{"role": "user", "content": "ab"}, {"role": "assistant", "content": "xyz"}],
           [{"role": "user", "content": "q" * 40}, {"role": "assistant", "content": "too long"}]]
  prompt = tok.encode("user: ab\nassistant: ")
  for train_on_padding in (True, False):
    rows, fields, dropped = sft.encode_conversations(convs, tok, 32, train_on_padding)
    assert dropped == 1 and rows.shape == (1, 32)
    p, n = len(prompt), len(prompt) + 4
    np.testing.assert_array_equal(rows[0, :p], prompt)
    np.testing.assert_array_equal(rows[0, p:n], list(b"xyz") + [tok.eos_id])
    assert (rows[0, n:] == tok.eos_id).all()
    target = fields["target"][0]
    assert not target[:p].any() and target[p:n].all()
    assert target[n:].all() == train_on_padding and target[n:].any() == train_on_padding
    if train_on_padding:
      assert "segment_ids" not in fields
    else:
      np.testing.assert_array_equal(fields["segment_ids"][0], (np.arange(32) >= n).astype(np.int32))


def test_sft_loss_scores_only_the_response_hand_computed(tmp_path):
  """The masked family's SFT loss on a tiny batch, recomputed by hand from the corrupted input the network saw: prompt
  tokens are never masked, only response tokens are scored, each row's masked-count estimate (n / m) sum CE is divided
  by its answer length n ('answer') or the batch's total ('tokens')."""
  rng = random.Random(0)
  path = digit_conversations(tmp_path / "c.jsonl", 8, rng)
  for normalize in ("answer", "tokens"):
    cfg = make_cfg(tmp_path, "c", data__path=path, train__objective="sft", sft__normalize=normalize,
                   sft__train_on_padding=False)
    run = build(cfg)
    corpus = sft.load(cfg, run.tokenizer)
    batch = {"tokens": jnp.asarray(corpus.sequences[:4]), **{k: jnp.asarray(v[:4]) for k, v in corpus.fields.items()}}
    params = jax.jit(lambda: __import__("dlm_jax.model", fromlist=["init"]).init(run.model_config, 0)[1])()
    seen = []

    class Recording:
      logit_shift = False

      def __call__(self, p, z, **kw):
        seen.append((np.asarray(z), kw))
        return run.apply_fn(p, z, **kw)

    loss, metrics, _ = sft.objective_fn(run.process, normalize)(Recording(), params, batch, jax.random.PRNGKey(3), {})
    (z, kw), = seen
    tokens, target = np.asarray(batch["tokens"]), np.asarray(batch["target"])
    masked = z == run.process.mask_id
    assert masked.any(axis=1).all() and not (masked & ~target).any()  # only response tokens are ever masked
    np.testing.assert_array_equal(z[~masked], tokens[~masked])
    logits = np.asarray(run.apply_fn(params, jnp.asarray(z), **kw), np.float64)[..., :run.process.vocab_size]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    ce = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    n, m = target.sum(1), masked.sum(1)
    per_row = n / m * np.where(masked, ce, 0).sum(1)
    want = np.mean(per_row / n) if normalize == "answer" else per_row.sum() / n.sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_sft_padding_stays_out_of_the_conversation(tmp_path):
  """sft.train_on_padding=False: a row's loss does not depend on how far it is padded, nor on the other rows (exact
  with the AR baseline, block size 1, whose SFT loss is the causal NLL of the response)."""
  rng = random.Random(1)
  path = digit_conversations(tmp_path / "c.jsonl", 6, rng)
  out = {}
  for seq_len in (32, 48):
    cfg = make_cfg(tmp_path, f"p{seq_len}", data__path=path, data__seq_len=seq_len, model__max_seq_len=48,
                   train__objective="sft", sft__train_on_padding=False, diffusion__process="block",
                   diffusion__block_size=1)
    run = build(cfg)
    corpus = sft.load(cfg, run.tokenizer)
    params = jax.jit(lambda: __import__("dlm_jax.model", fromlist=["init"]).init(run.model_config, 0)[1])()
    batch = {"tokens": jnp.asarray(corpus.sequences), **{k: jnp.asarray(v) for k, v in corpus.fields.items()}}
    nll, n = run.process.bound(run.apply_fn, params, batch, jax.random.PRNGKey(0), {})
    alone, _ = run.process.bound(run.apply_fn, params, jax.tree.map(lambda x: x[2:3], batch), jax.random.PRNGKey(5),
                                 {})
    np.testing.assert_allclose(float(alone[0]), float(nll[2]), rtol=1e-5)
    out[seq_len] = np.asarray(nll)
    np.testing.assert_array_equal(np.asarray(n), 4.0)  # 3 digits + the end token
    loss, _, _ = sft.objective_fn(run.process, "answer")(run.apply_fn, params, batch, jax.random.PRNGKey(0), {})
    np.testing.assert_allclose(float(loss), float(np.mean(np.asarray(nll) / 4.0)), rtol=1e-6)
  np.testing.assert_allclose(out[32], out[48], rtol=1e-5)


@pytest.mark.slow(minutes=1.5)
def test_sft_learns_an_instruction_task_the_base_cannot_do(tmp_path, digit_base):
  """A tiny masked model pretrained on digit strings, then SFT on 'add one to these digits' chat turns through
  dlm-train: its greedy answers (LLaDA low-confidence remasking, temperature 0) to held-out prompts are mostly right,
  the base model's almost never."""
  from dlm_jax.evaluate import generate
  from dlm_jax.train import load_for_inference
  rng = random.Random(0)
  path = digit_conversations(tmp_path / "sft.jsonl", 3000, rng)
  sft_cfg = write_config(str(tmp_path / "sft.py"), dict(SMALL, **{
      "data.path": path, "train.objective": "sft", "train.init_from": digit_base, "train.steps": 400,
      "train.batch_size": 32, "train.warmup_steps": 10, "train.checkpoint_every": 1000,
      "train.eval_every": 400, "train.log_every": 50}))
  res = run_cli("train", "--config", sft_cfg, "--workdir", str(tmp_path / "sft"), "--no_progress")
  assert res.returncode == 0, res.stderr[-2000:]
  tests = [digits(rng, 3) for _ in range(48)]
  acc = {}
  for name, workdir in (("base", digit_base), ("sft", str(tmp_path / "sft"))):
    cfg, run, params, ps = load_for_inference(workdir, [("sampler.temperature", 0.0),
                                                                     ("sampler.name", "llada"), ("sampler.steps", 4)])
    prompts = [run.tokenizer.encode(run.tokenizer.apply_chat_template([{"role": "user", "content": d}])) for d in tests]
    toks, st = generate(run, params, ps, num_samples=1, length=32, seed=0, prompts=prompts)
    outs = [run.tokenizer.decode(r[st["gen_start"]:][r[st["gen_start"]:] != run.tokenizer.eos_id]) for r in toks]
    acc[name] = float(np.mean([o == increment(d) for o, d in zip(outs, tests)]))
  print("greedy accuracy on held-out prompts", acc)
  assert acc["sft"] >= 0.6 and acc["base"] <= 0.1, (acc, outs[:4], tests[:4])
  rows = [json.loads(line) for line in open(tmp_path / "sft" / "metrics.jsonl")]
  ev = [r for r in rows if r["kind"] == "eval"]
  assert ev and ev[-1]["response_nelbo_bits_per_token"] < 1.0  # (uniform over 10 digits: 3.3 bits)


# --- RL: the losses against the papers' formulas ---------------------------------------------------------------------


def test_grpo_loss_matches_the_formula_on_a_tiny_batch():
  rng = np.random.default_rng(0)
  b, l, clip, beta = 4, 5, 0.2, 0.04
  logp, old, ref = (rng.normal(-2, 0.5, (b, l)) for _ in range(3))
  adv = rng.normal(size=b)
  got = np.asarray(rl.grpo_token_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv), clip,
                                      beta))
  for i in range(b):
    for k in range(l):
      ratio = np.exp(logp[i, k] - old[i, k])
      surrogate = min(ratio * adv[i], min(max(ratio, 1 - clip), 1 + clip) * adv[i])
      kl = np.exp(ref[i, k] - logp[i, k]) - (ref[i, k] - logp[i, k]) - 1
      np.testing.assert_allclose(got[i, k], -surrogate + beta * kl, rtol=1e-5)
  np.testing.assert_allclose(rl.group_advantages(np.array([1.0, 0, 0, 1, 2, 2]), 3),
                             [2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3])


def test_rl_objectives_on_a_tiny_rollout_batch(tmp_path):
  """The whole grpo / wd1 objective on a hand-made rollout batch equals the formulas computed here from the policy's
  token log-probabilities (masked prompt + fully masked completion, averaged over the scored tokens)."""
  cfg = make_cfg(tmp_path, "t", data__seq_len=16)
  run = build(cfg)
  from dlm_jax import model as model_lib
  params = model_lib.init(run.model_config, 0)[1]
  ref_params = model_lib.init(run.model_config, 1)[1]
  tokens = jnp.asarray(np.array([[PAD, PAD, 5, 6, 7, 8, 9, 256], [PAD, 1, 2, 3, 9, 256, 256, 256],
                                 [PAD, PAD, 5, 6, 10, 11, 12, 13], [PAD, 1, 2, 3, 30, 31, 256, 256]], np.int32))
  masks = rl.prompt_masks(jax.random.PRNGKey(0), tokens, 4, 0.5, 2)
  assert masks.shape == (2, 4, 8) and bool(masks[:, :, 4:].all()) and not bool((masks & (tokens == PAD)).any())
  scored = jnp.asarray(np.array([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1],
                                 [0, 0, 0, 0, 1, 1, 1, 0]], bool))
  reward = np.array([1.0, 0.0, 0.5, 0.5], np.float32)
  adv = rl.group_advantages(reward, 2)
  batch = {"tokens": tokens, "logp_mask": masks[0], "scored": scored, "reward": jnp.asarray(reward),
           "advantage": jnp.asarray(adv), "weight": jnp.asarray(rl.wd1_weights(adv, 2))}
  lp = np.asarray(rl.token_logp(run.process, run.apply_fn, params, tokens, masks[0]), np.float64)
  ref = np.asarray(rl.token_logp(run.process, run.apply_fn, ref_params, tokens, masks[0]), np.float64)
  s = np.asarray(scored, np.float64)
  kl = np.exp(ref - lp) - (ref - lp) - 1
  mean_tok = lambda x: (x * s).sum(1) / s.sum(1)
  frozen = {"reference": ref_params}
  loss, m, _ = rl.objective_fn(run.process, "grpo", 0.5, 0.1, 2)(run.apply_fn, params, batch, None, {}, frozen)
  np.testing.assert_allclose(float(loss), np.mean(mean_tok(-adv[:, None] + 0.1 * kl)), rtol=1e-5)
  np.testing.assert_allclose(float(m["reward"]), 0.5)
  loss, _, _ = rl.objective_fn(run.process, "wd1", 0.5, 0.1, 2)(run.apply_fn, params, batch, None, {}, frozen)
  w = rl.wd1_weights(adv, 2)
  np.testing.assert_allclose(float(loss), -np.sum(w * mean_tok(lp)) / 2 + 0.1 * np.mean(mean_tok(kl)), rtol=1e-5)
  # the gradient of the on-policy grpo loss (old = stop_gradient(logp)) is -A grad mean logp + beta grad KL
  g = jax.grad(lambda p: rl.objective_fn(run.process, "grpo", 0.5, 0.0, 2)(run.apply_fn, p, batch, None, {},
                                                                            frozen)[0])(params)
  g2 = jax.grad(lambda p: -jnp.mean(jnp.asarray(adv) * jnp.sum(
      rl.token_logp(run.process, run.apply_fn, p, tokens, masks[0]) * scored, 1) / jnp.sum(scored, 1)))(params)
  for a, b_ in zip(jax.tree.leaves(g), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-7)


def test_rewards():
  assert rewards.exact_match("so the answer is <answer> 1,000 </answer>", "1000") == 1.0
  assert rewards.exact_match("\\boxed{42}", "42.0") == 1.0
  assert rewards.exact_match("41", "42") == 0.0
  assert rewards.exact_match(" Paris. ", "paris") == 1.0
  assert rewards.code_tests("```python\ndef f(x):\n  return 2 * x\n```", "assert f(3) == 6") == 1.0
  assert rewards.code_tests("def f(x):\n  return x", "assert f(3) == 6") == 0.0
  assert rewards.code_tests("while True: pass", "", timeout=1.0) == 0.0
  with pytest.raises(DLMError, match="rl.reward"):
    rewards.resolve("nope")
  with pytest.raises(DLMError, match="cannot be imported"):
    rewards.resolve("no_such_module_xyz:f")
  assert rewards.resolve("dlm_jax.posttrain.rewards:exact_match") is rewards.exact_match


def sevens(completion, answer):
  """A verifiable toy reward: the fraction of the answer's digit among the first 8 characters of the completion."""
  return sum(ch == answer for ch in completion[:8]) / 8


@pytest.mark.slow(minutes=1.5)
@pytest.mark.parametrize("method", ["grpo", "wd1"])
def test_rl_raises_a_verifiable_reward(tmp_path, method, digit_base):
  """From a base model trained on uniform digit strings (reward about 0.1: one digit in ten is a 7), diffu-GRPO / wd1
  with 4 completions per prompt raise the mean reward far beyond the start's noise, and the KL to the reference
  stays bounded."""
  from dlm_jax.train import train
  prompts = tmp_path / "rl.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"q{i % 10}:", "answer": "7"}) + "\n" for i in range(200)))
  sys.path.insert(0, os.path.dirname(__file__))
  cfg = make_cfg(tmp_path, "rl", data__path=str(prompts), train__objective=method,
                 train__init_from=digit_base, train__steps=30, rl__group_size=4, rl__completion_length=8,
                 rl__prompt_length=4, rl__reward="test_posttrain:sevens", sampler__steps=8, train__log_every=1,
                 train__warmup_steps=0, train__learning_rate=2e-3, train__min_lr_ratio=1.0, train__eval_every=0)
  train(cfg, str(tmp_path / "rl"), progress=False)
  rows = [json.loads(line) for line in open(tmp_path / "rl" / "metrics.jsonl") if '"train"' in line]
  r = np.array([row["reward"] for row in rows])
  first, last = r[:5].mean(), r[-5:].mean()
  noise = r[:5].std() / np.sqrt(5) + 0.02
  print(method, "reward: first 5 steps", first, "last 5", last, "max KL", max(row["kl"] for row in rows))
  assert last > max(0.3, first + 10 * noise), (first, last, r)
  assert max(row["kl"] for row in rows) < 4.0  # (per token, k3; beta = 0.04)


def test_posttrain_config_errors(tmp_path):
  for values, match in [
      ({"sft.normalize": "tokens"}, "sft.normalize='tokens' has no effect"),
      ({"train.objective": "grpo", "rl.group_size": 5}, "multiple of rl.group_size"),
      ({"train.objective": "wd1", "rl.group_size": 4, "rl.prompt_length": 8, "rl.completion_length": 8, "rl.clip": 0.2},
       "rl.clip has no effect"),
      ({"train.objective": "nope"}, "train.objective must be one of"),
      ({"train.init_from": "/x"}, "train.init_from starts a post-training run"),
  ]:
    with pytest.raises(DLMError, match=match):
      config_lib.validate(make_cfg(tmp_path, "e", **{k.replace(".", "__"): v for k, v in values.items()}))


def test_posttrain_data_errors(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
  cfg = write_config(str(tmp_path / "s.py"), dict(SMALL, **{"data.path": str(bad), "train.objective": "sft"}))
  res = run_cli("train", "--config", cfg, "--workdir", str(tmp_path / "w"))
  assert res.returncode == 2 and "bad.jsonl:1 is not a conversation" in res.stderr
  assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "w").exists()
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"prompt": "x" * 100, "answer": "1"}) + "\n")
  cfg = write_config(str(tmp_path / "r.py"), dict(SMALL, **{"data.path": str(prompts), "train.objective": "grpo",
                                                          "rl.group_size": 4, "rl.prompt_length": 8,
                                                          "rl.completion_length": 8}))
  res = run_cli("train", "--config", cfg, "--workdir", str(tmp_path / "w"))
  assert res.returncode == 2 and "longer than rl.prompt_length=8" in res.stderr
  cfg = write_config(str(tmp_path / "b.py"), dict(SMALL, **{"data.path": str(prompts), "train.objective": "grpo",
                                                          "rl.group_size": 4, "diffusion.process": "block",
                                                          "rl.prompt_length": 8, "rl.completion_length": 8}))
  res = run_cli("train", "--config", cfg, "--workdir", str(tmp_path / "w"))
  assert res.returncode == 2 and "use diffusion.process='masked'" in res.stderr


def test_sft_block_family_and_rl_with_lora_adapters(tmp_path, digit_base):
  """SFT of a block diffusion model (block size 4) and diffu-GRPO, both with LoRA adapters on a trained base: the
  reference policy of RL is the base (the initial adapters are zero), and the adapters move it."""
  from dlm_jax.train import train
  rng = random.Random(2)
  path = digit_conversations(tmp_path / "c.jsonl", 64, rng)
  block_base = tmp_path / "block_base"
  train(make_cfg(tmp_path, "bb", data__path=path, train__steps=1,
                 diffusion__process="block", diffusion__block_size=4, train__objective="sft"), str(block_base),
        progress=False)
  cfg = make_cfg(tmp_path, "bl", data__path=path, train__steps=3, diffusion__process="block",
                 diffusion__block_size=4, train__objective="sft", train__init_from=str(block_base), lora__rank=4)
  res = train(cfg, str(tmp_path / "block_lora"), progress=False)
  assert np.isfinite(res["loss"]) and res["response_tokens"] > 0
  prompts = tmp_path / "rl.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"q{i}:", "answer": "7"}) + "\n" for i in range(20)))
  sys.path.insert(0, os.path.dirname(__file__))
  cfg = make_cfg(tmp_path, "rl", data__path=str(prompts), train__objective="grpo", train__init_from=digit_base,
                 train__steps=2, rl__group_size=4, rl__completion_length=8, rl__prompt_length=4,
                 rl__reward="test_posttrain:sevens", sampler__steps=8, lora__rank=4, rl__iterations=2,
                 train__warmup_steps=0)
  train(cfg, str(tmp_path / "rl_lora"), progress=False)
  rows = [json.loads(line) for line in open(tmp_path / "rl_lora" / "metrics.jsonl") if '"train"' in line]
  assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0.0  # step 1: adapters zero, the policy is the reference (base)


@pytest.mark.slow
def test_rl_on_eight_devices_matches_one(tmp_path, digit_base):
  """diffu-GRPO through dlm-train on a (data 4, fsdp 2) mesh of 8 devices: the same rollouts (per-row keys), rewards
  and losses as on one device."""
  from conftest import losses
  prompts = tmp_path / "rl.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"q{i}:", "answer": "7"}) + "\n" for i in range(40)))
  cfg = write_config(str(tmp_path / "rl.py"), dict(SMALL, **{
      "data.path": str(prompts), "train.objective": "grpo", "train.init_from": digit_base, "train.steps": 3,
      "train.batch_size": 8, "rl.group_size": 4, "rl.completion_length": 8, "rl.prompt_length": 4,
      "rl.reward": "test_posttrain:sevens", "rl.iterations": 2, "sampler.steps": 8, "train.warmup_steps": 0}))
  env = {"PYTHONPATH": os.path.dirname(__file__)}
  one = run_cli("train", "--config", cfg, "--workdir", str(tmp_path / "one"), "--no_progress", env=env)
  assert one.returncode == 0, one.stderr[-2000:]
  eight = run_cli("train", "--config", cfg, "--workdir", str(tmp_path / "eight"), "--no_progress",
                  "--config.mesh.data=4", "--config.mesh.fsdp=2",
                  env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert eight.returncode == 0, eight.stderr[-2000:]
  rows = {}
  for name in ("one", "eight"):
    rows[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl") if '"train"' in line]
  assert [r["reward"] for r in rows["one"]] == [r["reward"] for r in rows["eight"]]
  a, b = losses(str(tmp_path / "one")), losses(str(tmp_path / "eight"))
  np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=2e-4, atol=1e-6)


def test_rl_resume_repeats_the_uninterrupted_run(tmp_path, digit_base):
  """With rl.iterations = 1 the rollouts are a function of the restored state and the step: a run stopped at step 2
  and resumed gives the uninterrupted run's losses bit for bit."""
  from conftest import train_and_resume
  prompts = tmp_path / "rl.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"q{i}:", "answer": "7"}) + "\n" for i in range(40)))
  sys.path.insert(0, os.path.dirname(__file__))
  cfg = make_cfg(tmp_path, "rl", data__path=str(prompts), train__objective="wd1", train__init_from=digit_base,
                 train__steps=4, train__batch_size=8, train__checkpoint_every=2, rl__group_size=4,
                 rl__completion_length=8, rl__prompt_length=4, rl__reward="test_posttrain:sevens", sampler__steps=8,
                 train__warmup_steps=0)
  train_and_resume(cfg, tmp_path, stop=2, last=4)


def test_grpo_without_reference_runs(tmp_path, digit_base):
  """rl.beta = 0 (no KL term) and no LoRA: the step has no frozen inputs."""
  from dlm_jax.train import train
  prompts = tmp_path / "rl.jsonl"
  prompts.write_text("".join(json.dumps({"prompt": f"q{i}:", "answer": "7"}) + "\n" for i in range(20)))
  sys.path.insert(0, os.path.dirname(__file__))
  cfg = make_cfg(tmp_path, "rl", data__path=str(prompts), train__objective="grpo", train__init_from=digit_base,
                 train__steps=1, train__batch_size=8, rl__group_size=4, rl__completion_length=8, rl__prompt_length=4,
                 rl__reward="test_posttrain:sevens", rl__beta=0.0, sampler__steps=8)
  res = train(cfg, str(tmp_path / "rl"), progress=False)
  assert np.isfinite(res["loss"]) and "kl" not in res
