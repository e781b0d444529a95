"""The CLI contract (dlm-train / dlm-eval / dlm-sample) and bad input: one clear line, non-zero exit, nothing damaged."""

import hashlib
import json
import math
import os

import pytest

from conftest import checkpoint_steps, run_cli
from dlm_jax.errors import DLMError


def _error_line(r, prog):
  assert r.returncode != 0, (r.stdout, r.stderr)
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert lines, "no error message"
  assert lines[-1].startswith(f"{prog}: error: "), r.stderr
  assert "Traceback" not in r.stderr, r.stderr
  return lines[-1]


def _tree_digest(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(root, f)
      h.update(p.encode())
      h.update(open(p, "rb").read())
  return h.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One tiny trained workdir shared by the tests below (they must not change it)."""
  import markov
  from conftest import TINY, write_config
  d = tmp_path_factory.mktemp("trained")
  (d / "chain.txt").write_text(markov.generate(20_000, seed=2))
  cfg = write_config(str(d / "cfg.py"), dict(TINY, **{"data.path": str(d / "chain.txt")}))
  wd = str(d / "wd")
  r = run_cli("train", "--config", cfg, "--workdir", wd, "--no_progress")
  assert r.returncode == 0, r.stderr
  return cfg, wd


def test_train_eval_sample_contract(trained, tmp_path):
  cfg, wd = trained
  assert os.path.exists(os.path.join(wd, "metrics.jsonl"))
  assert os.listdir(os.path.join(wd, "tensorboard")), "no TensorBoard event files"
  r = run_cli("eval", "--workdir", wd)
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout.strip().splitlines()[-1])
  for key in ("nelbo_bits_per_token", "perplexity_bound", "num_tokens"):
    assert key in out
  assert out["num_tokens"] > 0 and out["perplexity_bound"] > 1
  r2 = run_cli("eval", "--workdir", wd)
  assert json.loads(r2.stdout.strip().splitlines()[-1]) == out, "dlm-eval is not deterministic"

  samples = str(tmp_path / "s.jsonl")
  r = run_cli("sample", "--workdir", wd, "--num_samples", "5", "--output", samples, "--prompt", "abca",
              "--config.sampler.steps=4")
  assert r.returncode == 0, r.stderr
  rows = [json.loads(l) for l in open(samples)]
  assert len(rows) == 5
  for row in rows:
    assert len(row["tokens"]) == 16 and row["tokens"][:4] == [ord(c) for c in "abca"]
    assert isinstance(row["text"], str) and row["text"].startswith("abca")
    assert all(0 <= t < 257 for t in row["tokens"])


BAD_TRAIN = [
    ("data.path", "'/nonexistent/corpus.txt'", "does not exist"),
    ("data.seq_len", "64", "exceeds model.max_seq_len"),
    ("diffusion.schedule", "'sigmoid'", "diffusion.schedule"),
    ("train.batch_size", "0", "train.batch_size"),
]


@pytest.mark.parametrize("key,value,expect", BAD_TRAIN)
def test_bad_config_values(tmp_path, tiny_config, key, value, expect):
  r = run_cli("train", "--config", tiny_config(), "--workdir", str(tmp_path / "w"), f"--config.{key}={value.strip(chr(39))}")
  assert expect in _error_line(r, "dlm-train")
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_unknown_key_and_wrong_type(tmp_path, tiny_config):
  assert "unknown config key 'model.widht'" in _error_line(
      run_cli("train", "--config", tiny_config(), "--workdir", str(tmp_path / "w"), "--config.model.widht=3"), "dlm-train")
  assert "must be an integer" in _error_line(
      run_cli("train", "--config", tiny_config(), "--workdir", str(tmp_path / "w"), "--config.train.steps=many"),
      "dlm-train")
  bad_file = tmp_path / "bad.py"
  bad_file.write_text("from dlm_jax.config import default_config\n\ndef get_config():\n  c = default_config()\n"
                      "  c.train.stepz = 3\n  return c\n")
  assert "stepz" in _error_line(run_cli("train", "--config", str(bad_file), "--workdir", str(tmp_path / "w")),
                                "dlm-train")
  assert "does not exist" in _error_line(run_cli("train", "--config", str(tmp_path / "nope.py"), "--workdir",
                                                 str(tmp_path / "w")), "dlm-train")


def test_empty_and_short_corpora(tmp_path, tiny_config):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  assert "no text" in _error_line(run_cli("train", "--config", tiny_config(), "--workdir", str(tmp_path / "w"),
                                          f"--config.data.path={empty}"), "dlm-train")
  short = tmp_path / "short.txt"
  short.write_text("abc")
  assert "do not fill one training sequence" in _error_line(
      run_cli("train", "--config", tiny_config(), "--workdir", str(tmp_path / "w"), f"--config.data.path={short}"),
      "dlm-train")


def test_different_model_shape_and_corrupt_checkpoint(trained, tmp_path, tiny_config):
  _, wd = trained
  before = _tree_digest(os.path.join(wd, "checkpoints"))
  msg = _error_line(run_cli("train", "--config", tiny_config(), "--workdir", wd, "--config.model.d_model=64"),
                    "dlm-train")
  assert "model.d_model" in msg and "new --workdir" in msg
  assert _tree_digest(os.path.join(wd, "checkpoints")) == before

  import shutil
  broken = str(tmp_path / "broken")
  shutil.copytree(wd, broken)
  latest = checkpoint_steps(broken)[-1]
  state_dir = os.path.join(broken, "checkpoints", str(latest), "state")
  for root, _, files in os.walk(state_dir):
    for f in files:
      p = os.path.join(root, f)
      if os.path.getsize(p) > 0:
        with open(p, "r+b") as fh:
          fh.write(b"\x00garbage\xff" * 8)
  digest = _tree_digest(os.path.join(broken, "checkpoints"))
  for prog, args in (("eval", []), ("sample", ["--num_samples", "1", "--output", str(tmp_path / "o.jsonl")])):
    msg = _error_line(run_cli(prog, "--workdir", broken, *args), f"dlm-{prog}")
    assert f"checkpoint step {latest} in " in msg and "is damaged" in msg
  # (dlm-train sets such a step aside and resumes from an earlier one: tests/test_integrity.py)
  assert _tree_digest(os.path.join(broken, "checkpoints")) == digest
  assert not os.path.exists(tmp_path / "o.jsonl")


def test_eval_and_sample_need_a_checkpoint(tmp_path):
  (tmp_path / "empty").mkdir()
  for prog, args in (("eval", []), ("sample", ["--num_samples", "2", "--output", str(tmp_path / "o.jsonl")])):
    msg = _error_line(run_cli(prog, "--workdir", str(tmp_path / "empty"), *args), f"dlm-{prog}")
    assert "no checkpoint" in msg
    msg = _error_line(run_cli(prog, "--workdir", str(tmp_path / "missing"), *args), f"dlm-{prog}")
    assert "does not exist" in msg


def test_sample_rejects_bad_requests(trained, tmp_path):
  _, wd = trained
  out = str(tmp_path / "o.jsonl")
  assert "canvas" in _error_line(run_cli("sample", "--workdir", wd, "--num_samples", "1", "--output", out,
                                         "--prompt", "a" * 40), "dlm-sample")
  assert "model" in _error_line(run_cli("sample", "--workdir", wd, "--num_samples", "1", "--output", out,
                                        "--config.model.d_model=8"), "dlm-sample")
  assert "sampler.steps" in _error_line(run_cli("sample", "--workdir", wd, "--num_samples", "1", "--output", out,
                                                "--config.sampler.steps=0"), "dlm-sample")
  assert not os.path.exists(out)
  from conftest import TINY  # the trained values themselves are accepted (nothing changes)
  r = run_cli("eval", "--workdir", wd, "--config.diffusion.process=masked",
              f"--config.model.d_model={TINY['model.d_model']}", "--config.eval.max_batches=1")
  assert r.returncode == 0, r.stderr
  assert math.isfinite(json.loads(r.stdout.strip().splitlines()[-1])["nelbo_bits_per_token"])


def test_printed_json_is_strict_and_a_non_finite_bound_is_an_error():
  from dlm_jax import cli
  assert cli.json_line({"a": float("nan"), "b": [1.5, float("inf")], "c": "x"}) == '{"a": null, "b": [1.5, null], "c": "x"}'
  with pytest.raises(DLMError, match="likelihood bound of wd is nan"):
    cli.check_bound({"nelbo_bits_per_token": float("nan")}, "wd")
  assert cli.check_bound({"nelbo_bits_per_token": 3.5}, "wd")["nelbo_bits_per_token"] == 3.5


def test_sample_with_llada_sampler_from_the_cli(trained, tmp_path):
  _, wd = trained
  out = str(tmp_path / "l.jsonl")
  for extra in (["--config.sampler.steps=12"], ["--config.sampler.llada.threshold=0.9", "--config.sampler.temperature=0"],
                ["--config.sampler.llada.factor=1.0", "--config.sampler.llada.cfg_scale=0.5", "--config.sampler.temperature=0"]):
    r = run_cli("sample", "--workdir", wd, "--num_samples", "3", "--output", out, "--prompt", "abca",
                "--config.sampler.name=llada", "--config.sampler.llada.block_length=4", *extra)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in open(out)]
    assert len(rows) == 3 and all(row["tokens"][:4] == [ord(c) for c in "abca"] for row in rows)
    assert all(row["sampler"] == "llada" and all(0 <= t < 257 for t in row["tokens"]) for row in rows)
  r = run_cli("sample", "--workdir", wd, "--num_samples", "2", "--output", out, "--prompt", "ab",
              "--config.sampler.name=first_hitting")
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stderr.strip().splitlines()[-1])["nfe_per_batch"] == 14  # one call per generated position
  os.remove(out)
  msg = _error_line(run_cli("sample", "--workdir", wd, "--num_samples", "1", "--output", out, "--prompt", "abca",
                            "--config.sampler.name=llada", "--config.sampler.llada.block_length=5"), "dlm-sample")
  assert "block_length" in msg
  assert "sampler.llada.threshold" in _error_line(run_cli("sample", "--workdir", wd, "--num_samples", "1", "--output",
                                                          out, "--config.sampler.name=llada",
                                                          "--config.sampler.llada.threshold=1.5"), "dlm-sample")
  assert not os.path.exists(out)


def _sample(wd, out, *args, n=2):
  r = run_cli("sample", "--workdir", wd, "--num_samples", str(n), "--output", out, *args)
  assert r.returncode == 0, r.stderr
  return [json.loads(l) for l in open(out)], json.loads(r.stderr.strip().splitlines()[-1])


def test_prompt_file_batches_prompts_of_different_lengths(trained, tmp_path):
  _, wd = trained
  prompts = ["abcab", "a", "cab"]
  pf = tmp_path / "prompts.jsonl"
  pf.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
  greedy = ["--config.sampler.name=llada", "--config.sampler.temperature=0", "--config.sampler.llada.block_length=11",
            "--config.sampler.steps=11", "--config.sampler.batch_size=8"]
  rows, _ = _sample(wd, str(tmp_path / "b.jsonl"), "--prompt_file", str(pf), *greedy)
  assert [r["prompt"] for r in rows] == [p for p in prompts for _ in range(2)]
  for p in prompts:  # left padding never shows: each row is the prompt followed by 16 - 5 generated tokens
    mine = [r for r in rows if r["prompt"] == p]
    assert all(r["tokens"][:len(p)] == [ord(c) for c in p] and len(r["tokens"]) == len(p) + 11 for r in mine)
  # the 'a' rows equal a run of that prompt alone padded to the same generated length
  alone, _ = _sample(wd, str(tmp_path / "a.jsonl"), "--prompt", "a", *greedy, "--config.sampler.length=12")
  assert [r["tokens"] for r in alone] == [r["tokens"] for r in rows if r["prompt"] == "a"]
  (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
  msg = _error_line(run_cli("sample", "--workdir", wd, "--num_samples", "1", "--output", str(tmp_path / "o.jsonl"),
                            "--prompt_file", str(tmp_path / "bad.jsonl")), "dlm-sample")
  assert "bad.jsonl:1" in msg and "'prompt'" in msg


def test_infilling_template_from_the_cli(trained, tmp_path):
  _, wd = trained
  for sampler in ("ancestral", "llada", "remdm", "first_hitting", "maskgit"):
    steps = [] if sampler == "first_hitting" else ["--config.sampler.steps=5"]  # first_hitting: one step per token
    rows, _ = _sample(wd, str(tmp_path / "i.jsonl"), "--prompt", "ab<|mask:3|>ca<|mask:2|>b",
                      f"--config.sampler.name={sampler}", *steps)
    for r in rows:
      t = r["tokens"]
      assert len(t) == 10 and t[:2] == [97, 98] and t[5:7] == [99, 97] and t[9] == 98, (sampler, t)
      assert all(0 <= x < 257 for x in t)
  assert "N >= 1" in _error_line(run_cli("sample", "--workdir", wd, "--num_samples", "1", "--output",
                                         str(tmp_path / "o.jsonl"), "--prompt", "a<|mask:0|>"), "dlm-sample")


@pytest.mark.slow
def test_sampler_options_from_the_cli(trained, tmp_path):
  _, wd = trained
  out = str(tmp_path / "o.jsonl")
  llada_opts = ["--config.sampler.name=llada", "--config.sampler.llada.block_length=4", "--config.sampler.steps=12",
                "--prompt", "abca"]
  # every option reaches its sampler from the command line (their effects are tested in-process:
  # test_llada_sampler.py, test_sampler_library.py); options that combine share a run
  for extra in (["--config.sampler.llada.cache=dual", "--config.sampler.llada.threshold=0.5",
                 "--config.sampler.steps=128", "--config.sampler.llada.cfg_scale=1.0",
                 "--config.sampler.llada.logit_shift=true"],
                ["--config.sampler.llada.cache=prefix", "--config.sampler.llada.cache_refresh=2",
                 "--config.sampler.llada.prophet=true", "--config.sampler.llada.stop_at_eos=true"],
                ["--config.sampler.llada.confidence=margin", "--config.sampler.llada.position_temperature=0.5",
                 "--config.sampler.llada.logit_shift=true", "--config.sampler.llada.precision=float64",
                 "--config.sampler.temperature=1.0"]):
    rows, stats = _sample(wd, out, *llada_opts, *extra)
    assert all(r["tokens"][:4] == [97, 98, 99, 97] and len(r["tokens"]) == 16 for r in rows), extra
  rows, _ = _sample(wd, out, "--config.sampler.name=remdm", "--config.sampler.remdm.strategy=rescale",
                    "--config.sampler.remdm.eta=0.3")
  assert all(len(r["tokens"]) == 16 and all(0 <= x < 257 for x in r["tokens"]) for r in rows)
  os.remove(out)
  for args, expect in ((["--config.sampler.llada.cache=dual"], "sampler.llada.cache is an option of sampler.name='llada'"),
                       (["--config.sampler.cache=dual"], "sampler.cache is now an option of each sampler"),
                       (["--config.sampler.name=fancy"], "is not a sampler of diffusion.process"),
                       (["--config.sampler.no_such_key=1"], "no_such_key"),
                       (["--config.sampler.ancestral.precision=float16"], "sampler.ancestral.precision")):
    assert expect in _error_line(run_cli("sample", "--workdir", wd, "--num_samples", "1", "--output", out, *args),
                                 "dlm-sample")
  assert not os.path.exists(out)


def test_sampling_benchmark_runs(trained):
  """benchmarks/sampling.py end to end on the tiny workdir (figures are not checked: this only keeps it runnable)."""
  import subprocess
  import sys
  from conftest import REPO
  _, wd = trained
  r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "sampling.py"), "--workdir", wd,
                      "--gen_length", "8", "--block_length", "4", "--prompt_length", "4", "--num_prompts", "2",
                      "--batch_size", "2", "--repeats", "1"], capture_output=True, text=True, timeout=900,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
  settings = [row.get("setting", "") for row in rows[1:]]
  assert any("dual cache" in s for s in settings) and rows[-1]["same_tokens_eager"] and rows[-1]["same_tokens_loop"]
  assert all(0 <= row.get("agreement", 1) <= 1 for row in rows[1:])


# --- block diffusion and the autoregressive baseline through the CLI ------------------------------------------------


@pytest.fixture(scope="module")
def block_workdirs(tmp_path_factory):
  """Tiny trained BD3 (block size 4) and AR (block size 1) workdirs on the same data and tokenizer."""
  import markov
  from conftest import TINY, write_config
  d = tmp_path_factory.mktemp("block")
  (d / "chain.txt").write_text(markov.generate(20_000, seed=3))
  out = {}
  for name, bs in (("bd3", 4), ("ar", 1)):
    cfg = write_config(str(d / f"{name}.py"), dict(TINY, **{"data.path": str(d / "chain.txt"),
                                                            "diffusion.process": "block", "diffusion.block_size": bs}))
    out[name] = str(d / name)
    r = run_cli("train", "--config", cfg, "--workdir", out[name], "--no_progress")
    assert r.returncode == 0, r.stderr
  return out


def test_block_and_ar_train_eval_sample_and_score(block_workdirs, tmp_path):
  bd3, ar = block_workdirs["bd3"], block_workdirs["ar"]
  res = {}
  for name, wd in (("bd3", bd3), ("ar", ar)):
    r = run_cli("eval", "--workdir", wd)
    assert r.returncode == 0, r.stderr
    res[name] = json.loads(r.stdout.strip().splitlines()[-1])
    assert res[name]["process"] == "block" and res[name]["nelbo_bits_per_token"] > 0
  assert res["ar"]["exact_nll"] is True and res["bd3"]["exact_nll"] is False
  samples = str(tmp_path / "bd3.jsonl")
  rows, stats = _sample(bd3, samples, "--prompt", "abca", "--config.sampler.block.stop_at_eos=true",
                        "--config.sampler.first_hitting.top_p=0.9", n=3)
  for row in rows:
    assert row["tokens"][:4] == [97, 98, 99, 97] and 4 < len(row["tokens"]) <= 16
    assert row["process"] == "block" and row["block_size"] == 4 and row["sampler"] == "first_hitting"
    assert row["tokenizer"] == "bytes" and row["prompt_tokens"] == 4 and row["top_p"] == 0.9
    assert row["block.stop_at_eos"] is True and "steps" not in row  # first_hitting does not read sampler.steps
  for extra in (["--config.sampler.name=llada", "--config.sampler.llada.threshold=0.5",
                 "--config.sampler.llada.block_length=2"],
                ["--config.sampler.name=ancestral", "--config.sampler.block.cache=none"],
                ["--config.sampler.name=remdm", "--config.sampler.remdm.eta=0.2"],
                ["--config.sampler.name=maskgit", "--config.sampler.steps=2"]):
    rows_x, _ = _sample(bd3, str(tmp_path / "x.jsonl"), "--prompt", "ab", *extra)
    assert all(r["tokens"][:2] == [97, 98] and len(r["tokens"]) == 16 for r in rows_x), extra
  ar_rows, _ = _sample(ar, str(tmp_path / "ar.jsonl"), "--config.sampler.temperature=0",
                       "--config.sampler.first_hitting.top_k=3")
  assert all(len(r["tokens"]) == 16 for r in ar_rows)

  r = run_cli("eval", "--workdir", ar, "--score_samples", samples)
  assert r.returncode == 0, r.stderr
  score = json.loads(r.stdout.strip().splitlines()[-1])
  assert score["gen_ppl"] > 1 and score["mean_unigram_entropy"] > 0 and score["num_samples"] == 3
  assert score["sampler"] == "first_hitting" and score["precision"] == "float32" and score["seed"] == 0
  assert score["num_tokens"] == sum(len(row["tokens"]) - 4 for row in rows)  # the generated tokens only

  assert "needs an autoregressive model" in _error_line(
      run_cli("eval", "--workdir", bd3, "--score_samples", samples), "dlm-eval")
  other = tmp_path / "other.jsonl"
  other.write_text("".join(json.dumps(dict(row, tokenizer="tokenizer.json sha256:0123")) + "\n" for row in rows))
  assert "same data.tokenizer" in _error_line(run_cli("eval", "--workdir", ar, "--score_samples", str(other)),
                                              "dlm-eval")
  assert "does not exist" in _error_line(run_cli("eval", "--workdir", ar, "--score_samples",
                                                 str(tmp_path / "no.jsonl")), "dlm-eval")
  assert "needs a block diffusion model" in _error_line(run_cli("eval", "--workdir", ar, "--clip_search"), "dlm-eval")
  r = run_cli("eval", "--workdir", bd3, "--clip_search", "--clip_widths", "0.5,0.9")
  assert r.returncode == 0, r.stderr
  search = json.loads(r.stdout.strip().splitlines()[-1])
  lo, hi = search["best_interval"]
  assert 0 < lo < hi <= 1 and search["best_variance"] <= search["default_interval_variance"]
  assert len(search["intervals"]) == 1 + 11 + 3 and search["use"].startswith("--config.diffusion.t_min=")
  assert "infilling" in _error_line(run_cli("sample", "--workdir", bd3, "--num_samples", "1", "--output",
                                            str(tmp_path / "i.jsonl"), "--prompt", "ab<|mask:3|>c"), "dlm-sample")


def test_gen_ppl_of_real_sequences_is_the_exact_nll(block_workdirs):
  """Scoring validation sequences as 'samples' gives exactly dlm-eval's exact NLL of the same sequences."""
  import math
  import numpy as np
  from dlm_jax.data import load_corpus
  from dlm_jax.evaluate import evaluate_bound, score_samples
  from dlm_jax.train import load_for_inference
  cfg, run, params, pstate = load_for_inference(block_workdirs["ar"])
  val = load_corpus(cfg, run.tokenizer).val[:8].astype(np.int32)
  assert not (val == run.tokenizer.eos_id).any()
  score = score_samples(run, params, [{"tokens": row.tolist(), "tokenizer": "bytes"} for row in val], batch_size=4)
  exact = evaluate_bound(run, params, val, pstate, batch_size=8)
  assert score["num_tokens"] == val.size
  assert math.isclose(score["nll_nats_per_token"], exact["nelbo_nats_per_token"], rel_tol=1e-5)


BAD_BLOCK = [
    ({"diffusion.block_size": "5"}, "must divide data.seq_len"),
    ({"diffusion.t_max": "1.5"}, "must lie in (0, 1]"),
    ({"diffusion.t_min": "0.6", "diffusion.t_max": "0.5"}, "non-empty"),
    ({"model.time_conditioning": "true"}, "model.time_conditioning=False"),
    ({"sampler.block.cache": "dual"}, "use 'prefix' or 'none'"),
]


@pytest.mark.parametrize("overrides,expect", BAD_BLOCK)
def test_bad_block_configs(tmp_path, tiny_config, overrides, expect):
  args = [f"--config.{k}={v}" for k, v in overrides.items()]
  r = run_cli("train", "--config", tiny_config(), "--workdir", str(tmp_path / "w"), "--config.diffusion.process=block",
              "--config.diffusion.block_size=4", *args)
  assert expect in _error_line(r, "dlm-train")
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


# --- continuous families -------------------------------------------------------------------------------------------

CONTINUOUS = ("flow", "embedding_flow", "bitstream")


@pytest.fixture(scope="module")
def continuous_workdirs(tmp_path_factory):
  """Tiny trained workdirs of the three continuous families on the same Markov text."""
  import markov
  from conftest import TINY, write_config
  d = tmp_path_factory.mktemp("continuous")
  (d / "chain.txt").write_text(markov.generate(20_000, seed=4))
  out = {}
  for name in CONTINUOUS:
    learned = {"diffusion.schedule_update_every": 2, "diffusion.schedule_buffer": 16} if name != "flow" else {}
    cfg = write_config(str(d / f"{name}.py"), dict(TINY, **{
        "data.path": str(d / "chain.txt"), "diffusion.process": name, "diffusion.bound_steps": 8, **learned}))
    out[name] = str(d / name)
    r = run_cli("train", "--config", cfg, "--workdir", out[name], "--no_progress")
    assert r.returncode == 0, r.stderr
  return out


@pytest.mark.parametrize("name", CONTINUOUS)
def test_continuous_train_eval_sample(continuous_workdirs, tmp_path, name):
  """Each continuous family through dlm-train / dlm-eval / dlm-sample: a bound in bits per token on the validation
  split, the family's default sampler, prompts kept, records naming the sampler."""
  wd = continuous_workdirs[name]
  r = run_cli("eval", "--workdir", wd)
  assert r.returncode == 0, r.stderr
  res = json.loads(r.stdout.strip().splitlines()[-1])
  assert res["process"] == name and 0 < res["nelbo_bits_per_token"] < float("inf") and res["num_tokens"] > 0
  default = {"flow": "euler", "embedding_flow": "ddim", "bitstream": "edm_churn"}[name]
  rows, stats = _sample(wd, str(tmp_path / "s.jsonl"), "--prompt", "abc", n=3)
  for row in rows:
    assert row["tokens"][:3] == [97, 98, 99] and len(row["tokens"]) == 16
    assert row["process"] == name and row["sampler"] == default
  assert rows[0]["precision"] == ("float64" if name == "embedding_flow" else "float32")
  assert stats["nfe_per_batch"] == 8 + (name != "flow")
  if name == "bitstream":
    det, _ = _sample(wd, str(tmp_path / "d.jsonl"), "--config.sampler.name=edm", n=2)
    det2, _ = _sample(wd, str(tmp_path / "d2.jsonl"), "--config.sampler.name=edm", n=2)
    assert [r["tokens"] for r in det] == [r["tokens"] for r in det2] and det[0]["sampler"] == "edm"
    assert "top_p" not in det[0] and "churn" not in det[0] and rows[0]["churn"] == 0.2
    assert "top_p" in _error_line(run_cli("sample", "--workdir", wd, "--num_samples", "1", "--output",
                                          str(tmp_path / "x.jsonl"), "--config.sampler.edm.top_p=0.9"), "dlm-sample")
  # infilling: fixed tokens on both sides of a span are kept
  fill, _ = _sample(wd, str(tmp_path / "f.jsonl"), "--prompt", "ab<|mask:4|>cd", n=1)
  assert fill[0]["tokens"][:2] == [97, 98] and fill[0]["tokens"][-2:] == [99, 100] and len(fill[0]["tokens"]) == 8
  line = _error_line(run_cli("sample", "--workdir", wd, "--num_samples", "1", "--output", str(tmp_path / "x.jsonl"),
                             "--config.sampler.name=llada"), "dlm-sample")
  assert "is not a sampler of diffusion.process" in line and default in line


BAD_CONTINUOUS = [
    ("bitstream", {"diffusion.bits": "8"}, "cannot hold a vocabulary of 257 tokens"),
    ("bitstream", {"diffusion.sigma_max": "inf"}, "diffusion.sigma_max must be a finite number"),
    ("embedding_flow", {"diffusion.self_cond_prob": "1.5"}, "must be in [0, 1]"),
    ("flow", {"sampler.steps": "0"}, "sampler.steps must be >= 1"),
]


@pytest.mark.parametrize("process,overrides,expect", BAD_CONTINUOUS)
def test_bad_continuous_configs(tmp_path, tiny_config, process, overrides, expect):
  """One error line from dlm-train and nothing written (the rest of the checks: tests/test_config.py)."""
  args = [f"--config.{k}={v}" for k, v in overrides.items()]
  r = run_cli("train", "--config", tiny_config(), "--workdir", str(tmp_path / "w"),
              f"--config.diffusion.process={process}", *args)
  assert expect in _error_line(r, "dlm-train")
  assert not os.path.exists(tmp_path / "w")
