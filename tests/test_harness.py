"""lm-evaluation-harness integration (dlm_jax/harness.py, evaluate.conditional_nll, sandbox.py), offline.

- The conditional bound (only the continuation masked) against the exact log p(continuation | context) of a toy joint
  distribution whose conditionals are computed by enumeration: unbiased for masked and block diffusion, exact for AR.
- An AR workdir: loglikelihood equals the sum of the token log-probabilities of the unpadded sequence (padding,
  buckets, truncation, empty contexts), rolling likelihood equals the windows' sum, the greedy check is right.
- A masked model trained on the Markov chain, end to end through lm-eval with local task YAMLs over JSONL files written
  here: multiple choice (accuracy far above chance, near the true chain's own accuracy), generation with exact match
  (equals scoring the logged generations by hand), code execution in the sandbox (equals running the programs here),
  and `dlm-eval --tasks` with its protocol record, `dlm-lm-eval` (the harness's CLI).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import markov
from conftest import TINY, run_cli, write_config

pytest.importorskip("lm_eval")

from dlm_jax import config as config_lib  # noqa: E402
from dlm_jax import sandbox  # noqa: E402
from dlm_jax.errors import DLMError  # noqa: E402
from dlm_jax.processes.block import BlockDiffusion  # noqa: E402
from dlm_jax.processes.masked import MaskedDiffusion  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# --- the estimator against enumeration ---------------------------------------------------------------------------------

V, N = 3, 6  # a 3-symbol Markov chain over 6 positions: 729 sequences, every conditional by enumeration
_rng = np.random.default_rng(0)
_P, _P0 = _rng.dirichlet(np.full(V, 0.7), size=V), _rng.dirichlet(np.ones(V))
SEQS = np.array(list(itertools.product(range(V), repeat=N)))
LOGP = np.log(_P0[SEQS[:, 0]]) + sum(np.log(_P[SEQS[:, i], SEQS[:, i + 1]]) for i in range(N - 1))


def _exact_conditionals(z):
  """logits [B, N, V]: log p(x_i = v | the unmasked tokens of z) under the toy chain (mask id = V)."""
  ok = jnp.all((z[:, None, :] == V) | (z[:, None, :] == jnp.asarray(SEQS)[None]), axis=-1)
  post = jax.nn.softmax(jnp.where(ok, jnp.asarray(LOGP, jnp.float32)[None], -jnp.inf), axis=-1)
  return jnp.log(jnp.maximum(jnp.einsum("bn,nlv->blv", post, jax.nn.one_hot(jnp.asarray(SEQS), V)), 1e-30))


def _masked_net(params, z, **kw):
  return _exact_conditionals(z)


def _block_net(bs):
  def net(params, zx, *, output_len, **kw):
    z, x = zx[:, :N], zx[:, N:]
    out = []
    for k in range(N // bs):  # block k sees the clean blocks before it and the unmasked tokens of its own
      seen = jnp.concatenate([x[:, :k * bs], z[:, k * bs:(k + 1) * bs], jnp.full((z.shape[0], N - (k + 1) * bs), V)], 1)
      out.append(_exact_conditionals(seen)[:, k * bs:(k + 1) * bs])
    return jnp.concatenate(out, axis=1)
  return net


def _exact_nll(x, target):
  keep = ~target
  cond = np.all(SEQS[:, keep] == x[keep], axis=-1)
  return -(LOGP[np.all(SEQS == x, axis=-1)][0] - np.log(np.exp(LOGP[cond]).sum()))


@pytest.mark.parametrize("family,sampling", [("masked", "stratified"), ("masked", "antithetic"), ("masked", "iid"),
                                             ("block2", "stratified"), ("block3", "stratified"), ("ar", "stratified")])
def test_conditional_bound_is_unbiased_for_the_exact_conditionals(family, sampling):
  """With the exact conditionals of a joint law the NELBO is tight, so the estimate of -log p(targets | rest) must
  average to the enumerated value: suffix, infix and whole-sequence targets, 2048 copies each with the masked counts
  drawn stratified / antithetic / iid (within 4 standard errors); block size 1 is exact on every copy."""
  from dlm_jax.evaluate import mask_draws
  if family == "masked":
    proc, net = MaskedDiffusion(vocab_size=V), _masked_net
  else:
    bs = {"block2": 2, "block3": 3, "ar": 1}[family]
    proc, net = BlockDiffusion(vocab_size=V, block_size=bs), _block_net(bs)
  copies = 2048
  fn = jax.jit(lambda b, k: proc.bound(net, None, b, k, {}))
  for i, target in enumerate([np.arange(N) >= 3, np.array([0, 1, 1, 0, 1, 0], bool), np.ones(N, bool)]):
    if family != "masked" and not target[3:].all() and target[:3].any():
      target = np.arange(N) >= 1  # block families: the condition is a prefix (what lm-eval asks)
    x = SEQS[(37 * i + 11) % len(SEQS)]
    u = mask_draws(copies, sampling, seed=i, request=0)
    batch = {"tokens": jnp.asarray(np.tile(x, (copies, 1))), "target": jnp.asarray(np.tile(target, (copies, 1))),
             "strata": jnp.asarray(u)}
    nats, n = fn(batch, jax.random.PRNGKey(i))
    nats = np.asarray(nats, np.float64)
    exact = _exact_nll(x, target)
    assert np.all(np.asarray(n) == target.sum())
    se = nats.std() / math.sqrt(copies)
    if family == "ar":
      assert np.allclose(nats, exact, atol=1e-4), (nats[:4], exact)
    else:
      assert abs(nats.mean() - exact) < 4 * se + 1e-3, (family, target, nats.mean(), se, exact)


def test_targets_default_to_the_whole_sequence():
  """Without 'target' / 'strata' the bound is the unconditional one (the same numbers as before the fields existed:
  the same keys give the same masks)."""
  x = jnp.asarray(SEQS[[5, 200, 411, 700]])
  for proc, net in ((MaskedDiffusion(vocab_size=V), _masked_net), (BlockDiffusion(vocab_size=V, block_size=2),
                                                                     _block_net(2))):
    key = jax.random.PRNGKey(3)
    a, na = proc.bound(net, None, {"tokens": x}, key, {})
    b, nb = proc.bound(net, None, {"tokens": x, "target": jnp.ones(x.shape, bool)}, key, {})
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.all(np.asarray(na) == N) and np.all(np.asarray(nb) == N)


# --- workdirs -----------------------------------------------------------------------------------------------------------


def _train(tmp, name, **overrides):
  from dlm_jax.train import train
  text = tmp / "chain.txt"
  if not text.exists():
    text.write_text(markov.generate(200_000, seed=0))
  values = dict(TINY)
  values.update({"data.path": str(text), "data.seq_len": 32, "model.max_seq_len": 64, "data.tokenizer": "bytes",
                 "model.num_layers": 2, "model.d_model": 32, "model.num_heads": 4, "model.mlp_dim": 128,
                 "train.batch_size": 32, "train.learning_rate": 3e-3, "train.warmup_steps": 50, "train.log_every": 100,
                 "sampler.steps": 16})
  values.update(overrides)
  values["train.checkpoint_every"] = values["train.steps"]
  wd = str(tmp / name)
  train(config_lib.load(write_config(str(tmp / f"{name}.py"), values)), wd, progress=False)
  return wd


@pytest.fixture(scope="module")
def ar_workdir(tmp_path_factory):
  return _train(tmp_path_factory.mktemp("ar"), "ar", **{"diffusion.process": "block", "diffusion.block_size": 1,
                                                        "train.steps": 200})


@pytest.fixture(scope="module")
def masked_workdir(tmp_path_factory):
  """A masked diffusion model of the chain (600 steps)."""
  return _train(tmp_path_factory.mktemp("masked"), "masked", **{"train.steps": 600})


class _Req:
  def __init__(self, *args):
    self.args = args


def _lm(workdir, **kw):
  from dlm_jax.harness import DLMJaxLM
  return DLMJaxLM(workdir=workdir, **kw)


def _causal_nll(lm, rows):
  """-log p(row[i] | row[<i]) of each row, straight from the process (no harness code). Rows are zero-filled on the
  right to the model's length (one compile): a causal model's prediction at i never sees what follows."""
  run, limit = lm.run, lm.cfg.model.max_seq_len
  rows = [np.asarray(r, np.int32) for r in rows]
  x = np.zeros((len(rows), limit), np.int32)
  for i, r in enumerate(rows):
    x[i, :len(r)] = r
  out = np.asarray(run.process.causal_nll(run.apply_fn, lm.params, {"tokens": jnp.asarray(x)}))
  return [o[:len(r)] for o, r in zip(out, rows)]


def test_ar_loglikelihood_is_the_exact_sum(ar_workdir):
  """Requests of many lengths (shared buckets, a context longer than the model's window, an empty context, a context
  ending in spaces) in batches of 8 rows: each log-likelihood equals the sum of the continuation's token
  log-probabilities computed on the sequence alone by the process's causal NLL."""
  from dlm_jax.harness import encode_pair
  lm = _lm(ar_workdir, batch_size=8, mc_samples=7)
  text = markov.generate(400, seed=9)
  # the harness's rows fall in buckets 16, 32 and 64 (the window)
  reqs = [_Req(text[:a], text[a:a + b]) for a, b in ((0, 16), (10, 6), (13, 3), (20, 12), (30, 2), (40, 24), (100, 8))]
  reqs.append(_Req(text[:12] + "  ", text[12:14]))
  out = lm.loglikelihood(reqs)
  assert lm.protocol()["loglikelihood"]["estimator"] == "exact"
  limit = lm.cfg.model.max_seq_len
  pairs = [encode_pair(lm.tokenizer, *r.args) for r in reqs]
  rows = [np.concatenate([ctx, cont])[-limit:] for ctx, cont in pairs]
  for r, (ll, greedy), (_, cont), ids, nll in zip(reqs, out, pairs, rows, _causal_nll(lm, rows)):
    expect = -nll[len(ids) - len(cont):].sum()
    assert ll == pytest.approx(expect, rel=1e-5, abs=1e-4), (r.args, ll, expect)
    assert greedy is False  # greedy_check off


def test_ar_greedy_check_and_rolling(ar_workdir):
  """is_greedy (greedy_check=True) is True for the model's own argmax continuation and False once a token of it
  changes; loglikelihood_rolling of a text longer than the window is the sum over its windows, each conditioned on
  the token before it (EOS before the first)."""
  lm = _lm(ar_workdir, batch_size=8, greedy_check=True)
  ctx = markov.generate(20, seed=3)
  ids = np.asarray(lm.tokenizer.encode(ctx), np.int32)
  greedy = []
  for _ in range(4):  # argmax continuation, one token at a time, from the process's own NLL of every candidate
    nll = _causal_nll(lm, [np.concatenate([ids, greedy, [v]]) for v in range(lm.tokenizer.vocab_size)])
    greedy.append(int(np.argmin([n[-1] for n in nll])))
  assert lm.tokenizer.eos_id not in greedy
  good = lm.tokenizer.decode(np.asarray(greedy))
  bad = lm.tokenizer.decode(np.asarray(greedy[:2] + [(greedy[2] - 97 + 1) % 4 + 97] + greedy[3:]))
  (ll_good, g_good), (ll_bad, g_bad) = lm.loglikelihood([_Req(ctx, good), _Req(ctx, bad)])
  assert g_good is True and g_bad is False and ll_good > ll_bad
  text = markov.generate(150, seed=4)
  (rolled,) = lm.loglikelihood_rolling([_Req(text)])
  ids = np.asarray(lm.tokenizer.encode(text), np.int32)
  step, total = lm.cfg.model.max_seq_len - 1, 0.0
  for start in range(0, len(ids), step):
    prev = [lm.tokenizer.eos_id] if start == 0 else [ids[start - 1]]
    row = np.concatenate([prev, ids[start:start + step]]).astype(np.int32)
    total += _causal_nll(lm, [row])[0][1:].sum()
  assert rolled == pytest.approx(-total, rel=1e-5)


# --- local tasks ------------------------------------------------------------------------------------------------------

REVERSED = markov.TRANSITIONS.T / markov.TRANSITIONS.T.sum(1, keepdims=True)


def _chain_logp(s: str, prev: str) -> float:
  idx = {c: i for i, c in enumerate(markov.SYMBOLS)}
  out, p = 0.0, idx[prev]
  for c in s:
    out += math.log(markov.TRANSITIONS[p, idx[c]])
    p = idx[c]
  return out


def _write_tasks(d, n_mc=40, n_gen=16):
  """Three task YAMLs over JSONL files: chain_mc (the chain's continuation among 3 drawn from the reversed chain),
  chain_gen (continue the chain; exact match with the most likely next two symbols), chain_code (complete a string
  literal; the program's tests run in the sandbox). Returns the true chain's own accuracy on chain_mc."""
  rng = np.random.default_rng(5)
  mc, oracle = [], 0
  for i in range(n_mc):
    s = markov.generate(28, seed=100 + i)
    choices = [s[20:]] + [markov.generate(9, seed=1000 + 3 * i + j, p=REVERSED)[1:] for j in range(3)]
    perm = rng.permutation(4)
    label = int(np.argmax(perm == 0))
    mc.append({"question": s[:20], "choices": [choices[k] for k in perm], "label": label})
    oracle += int(np.argmax([_chain_logp(c, s[19]) for c in mc[-1]["choices"]]) == label)
  best = {c: markov.SYMBOLS[int(np.argmax(markov.TRANSITIONS[i]))] for i, c in enumerate(markov.SYMBOLS)}
  gen = []
  for i in range(n_gen):
    s = markov.generate(16, seed=300 + i)
    gen.append({"prompt": s, "answer": best[s[-1]] + best[best[s[-1]]]})
  code = [{"prompt": markov.generate(10, seed=500 + i), "tests": f"assert set(x) <= set('abcd')\nassert x[-1] in {'ab' if i % 2 else 'cd'!r}"}
          for i in range(8)]
  for name, rows in (("mc", mc), ("gen", gen), ("code", code)):
    with open(d / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  common = "dataset_path: json\ntest_split: test\n"
  (d / "chain_mc.yaml").write_text(
      f"task: chain_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\noutput_type: multiple_choice\n"
      "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\ntarget_delimiter: ''\n"
      "metric_list:\n  - metric: acc\n")
  (d / "chain_gen.yaml").write_text(
      f"task: chain_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'gen.jsonl'}\n"
      "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\ntarget_delimiter: ''\n"
      "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 2\n  do_sample: false\n"
      "metric_list:\n  - metric: exact_match\n    ignore_case: true\n")
  (d / "chain_code.yaml").write_text(
      f"task: chain_code\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'code.jsonl'}\n"
      "output_type: generate_until\ndoc_to_text: \"x = '{{prompt}}\"\ndoc_to_target: '{{tests}}'\n"
      "generation_kwargs:\n  until: [\"'\", '\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
      "process_results: !function code_utils.process_results\n"
      "metric_list:\n  - metric: pass_at_1\n    aggregation: mean\n    higher_is_better: true\n")
  (d / "code_utils.py").write_text(
      "from dlm_jax import sandbox\n\n\ndef process_results(doc, results):\n"
      "  program = \"x = '\" + doc['prompt'] + results[0] + \"'\"\n"
      "  return {'pass_at_1': float(sandbox.passes_tests(program, doc['tests'], timeout=10))}\n")
  return oracle / n_mc


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tasks")
  return d, _write_tasks(d)


@pytest.mark.slow(minutes=2)
def test_tasks_through_the_harness(masked_workdir, tasks_dir):
  """One simple_evaluate over the three local tasks: the chain model picks the chain's continuation far above chance
  (4 choices) and close to the chain's own accuracy; exact match and the code task's pass rate equal scoring the
  logged generations here (by hand, and by running each program in a subprocess)."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  d, oracle = tasks_dir
  lm = _lm(masked_workdir, batch_size=64, mc_samples=32, **{"sampler.name": "llada", "sampler.steps": 2})
  res = lm_eval.simple_evaluate(model=lm, tasks=["chain_mc", "chain_gen", "chain_code"], log_samples=True,
                                task_manager=TaskManager(include_path=str(d), include_defaults=False),
                                bootstrap_iters=0)
  r = res["results"]
  print({t: r[t] for t in r}, "oracle", oracle)
  assert r["chain_mc"]["acc,none"] >= max(0.6, oracle - 0.15), (r["chain_mc"], oracle)

  gens = res["samples"]["chain_gen"]
  hand = np.mean([float(s["filtered_resps"][0].strip().lower() == s["target"].strip().lower()) for s in gens])
  assert r["chain_gen"]["exact_match,none"] == pytest.approx(hand)
  assert hand >= 0.5  # greedy decoding of the two most likely next symbols
  for s in gens:
    assert "\n" not in s["resps"][0][0] and len(s["resps"][0][0]) <= 2

  code = res["samples"]["chain_code"]
  passed = []
  for s in code:
    program = "x = '" + s["doc"]["prompt"] + s["resps"][0][0] + "'\n" + s["doc"]["tests"] + "\n"
    passed.append(subprocess.run([sys.executable, "-c", program], capture_output=True).returncode == 0)
    assert "'" not in s["resps"][0][0]
  assert r["chain_code"]["pass_at_1,none"] == pytest.approx(np.mean(passed))
  assert 0 < np.mean(passed) < 1  # some programs pass, some fail: the score is not a constant

  proto = lm.protocol()
  assert proto["model"]["checkpoint_step"] == 600 and proto["loglikelihood"]["mc_samples"] == 32
  assert proto["speed"]["generated_tokens"] > 0 and proto["speed"]["tokens_per_forward"] > 0


@pytest.mark.slow(minutes=1)
def test_dlm_eval_tasks_writes_results_and_protocol(masked_workdir, tasks_dir, tmp_path):
  """`dlm-eval --tasks` (the thin front end): results.json, protocol.json (model, step, sampler and its keys, tokens
  per forward, tokens/s, hardware, versions, seed, task versions) and the logged samples; the same seed gives the
  same numbers."""
  d, _ = tasks_dir
  out = tmp_path / "out"
  base = ["--workdir", masked_workdir, "--tasks", "chain_mc,chain_gen", "--include_path", str(d), "--limit", "8",
          "--mc_samples", "8", "--batch_size", "16", "--seed", "3", "--config.sampler.name=llada",
          "--config.sampler.steps=2"]
  r = run_cli("eval", *base, "--output", str(out), "--log_samples")
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads(r.stdout.strip().splitlines()[-1])
  assert summary["output"] == str(out) and set(summary["results"]) == {"chain_mc", "chain_gen"}
  proto = json.loads((out / "protocol.json").read_text())
  results = json.loads((out / "results.json").read_text())
  assert proto["model"]["checkpoint_step"] == 600 and proto["model"]["process"] == "masked"
  assert proto["sampler"]["sampler"] == "llada" and proto["sampler"]["steps"] == 2 and "remasking" in proto["sampler"]
  assert proto["speed"]["tokens_per_forward"] == pytest.approx(1.0)  # 2 tokens in 2 steps
  assert proto["speed"]["generated_tokens_per_s"] > 0 and 0 <= proto["speed"]["harness_overhead"] < 1
  assert proto["hardware"]["platform"] == "cpu" and proto["software"]["jax"] == jax.__version__
  assert proto["harness"]["task_versions"].keys() == {"chain_mc", "chain_gen"} and proto["loglikelihood"]["seed"] == 3
  assert (out / "samples_chain_gen.jsonl").exists()
  from dlm_jax.harness import evaluate_tasks  # the function behind the CLI, again in this process: same numbers
  again = evaluate_tasks(masked_workdir, ["chain_mc", "chain_gen"], [("sampler.name", "llada"), ("sampler.steps", "2")],
                         output=str(tmp_path / "again"), include_path=str(d), limit=8, mc_samples=8, batch_size=16,
                         seed=3)
  assert again["results"] == summary["results"]
  assert json.loads((tmp_path / "again" / "results.json").read_text())["results"] == results["results"]


@pytest.mark.slow(minutes=1)
def test_dlm_lm_eval_is_the_harness_cli(masked_workdir, tasks_dir, tmp_path):
  """`dlm-lm-eval --model dlm_jax --model_args workdir=...,mc_samples=4 --tasks ...` (lm-eval's own flags) runs and
  prints the harness's table; a bad model arg or config key is a DLMError (one line at the CLI)."""
  d, _ = tasks_dir
  r = run_cli("lm_eval", "--model", "dlm_jax", "--model_args", f"workdir={masked_workdir},mc_samples=4",
              "--tasks", "chain_mc", "--include_path", str(d), "--limit", "4", "--batch_size", "8")
  assert r.returncode == 0, r.stderr[-3000:]
  assert re.search(r"chain_mc\s*\|", r.stdout), r.stdout
  with pytest.raises(DLMError, match="unknown dlm_jax model arg 'mc_sample'"):
    _lm(masked_workdir, mc_sample=4)
  with pytest.raises(DLMError, match="sampler.nme"):
    _lm(masked_workdir, **{"sampler.nme": "llada"})


@pytest.mark.slow(minutes=1)
def test_eight_devices_give_the_one_device_estimates(masked_workdir):
  """The rows of each batch are sharded over the mesh: on 8 devices (a subprocess) the Monte Carlo estimates equal
  the 1-device ones (same seed, same batches, so the same masks), to float tolerance."""
  text = markov.generate(300, seed=11)
  pairs = [(text[:a], text[a:a + b]) for a, b in ((5, 3), (20, 10), (50, 12), (0, 9), (31, 1))]
  code = ("import json\nfrom dlm_jax.harness import DLMJaxLM\n"
          "class R:\n  def __init__(self, *a): self.args = a\n"
          f"lm = DLMJaxLM(workdir={masked_workdir!r}, batch_size=16, mc_samples=8)\n"
          "import jax; assert jax.device_count() == 8 and lm.run.batch_shards == 8\n"
          f"print(json.dumps(lm.loglikelihood([R(*p) for p in {pairs!r}])))\n")
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"),
             JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  eight = json.loads(r.stdout.strip().splitlines()[-1])
  lm = _lm(masked_workdir, batch_size=16, mc_samples=8)
  assert lm.run.batch_shards == 1
  one = lm.loglikelihood([_Req(*p) for p in pairs])
  for (a, _), (b, _) in zip(one, eight):
    assert a == pytest.approx(b, rel=1e-4, abs=1e-4), (one, eight)


def test_continuous_families_have_no_conditional_estimate(tmp_path):
  """loglikelihood on a family without the "conditional" capability is one DLMError naming the fix."""
  from dlm_jax.build import build, init_params
  from dlm_jax.evaluate import conditional_nll
  values = dict(TINY, **{"diffusion.process": "flow", "data.tokenizer": "bytes"})
  cfg = config_lib.load(write_config(str(tmp_path / "flow.py"), values))
  run = build(cfg, devices=jax.devices()[:1])
  with pytest.raises(DLMError, match="no conditional likelihood estimate.*generate_until"):
    conditional_nll(run, init_params(run, 0), {}, [(np.array([1, 2]), np.array([3]))])


def test_bucket_lengths():
  from dlm_jax.evaluate import bucket_length
  assert [bucket_length(n, 64) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
  assert bucket_length(20, 100, 12) == 36 and bucket_length(50, 64, 16) == 64


def test_sandbox_limits():
  assert sandbox.run_python("print(1 + 1)").stdout == "2\n"
  assert sandbox.passes_tests("def f(x):\n  return x * 2", "assert f(3) == 6")
  assert not sandbox.passes_tests("def f(x):\n  return x", "assert f(3) == 6")
  slow = sandbox.run_python("while True:\n  pass", timeout=1.0)
  assert slow.status == "timeout" and not slow.passed
  big = sandbox.run_python("x = bytearray(2 << 30)", memory_mb=256)
  assert big.status == "failed" and "MemoryError" in big.stderr
  env = sandbox.run_python("import os; print(sorted(os.environ)); print(os.getcwd())")
  assert "PYTHONPATH" not in env.stdout and "dlm_sandbox_" in env.stdout
