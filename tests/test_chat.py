"""dlm-sample --chat on converted checkpoints: the checkpoint's chat template renders the conversation exactly as
transformers' apply_chat_template did when the fixtures were made (tests/fixtures/hf/*/expected.json), generation
stops at the end-of-turn token, and the samples record the raw and the decoded reply."""

import json
import os

import numpy as np
import pytest

from conftest import REPO, run_cli
from dlm_jax import convert
from dlm_jax.data import make_tokenizer
from dlm_jax.errors import DLMError

FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf")
MESSAGES = {"dream": "Tell me a short story.", "llada": "What is the capital of the moon?"}


def _expected(arch):
  with open(os.path.join(FIXTURES, arch, "expected.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("arch", ["dream", "llada"])
def test_template_matches_transformers(arch):
  tok = make_tokenizer(os.path.join(FIXTURES, arch, "tokenizer.json"))
  text = tok.apply_chat_template([{"role": "user", "content": MESSAGES[arch]}])
  assert text == _expected(arch)["chat_prompt_text"]
  no_prompt = tok.apply_chat_template([{"role": "user", "content": MESSAGES[arch]}], add_generation_prompt=False)
  assert text.startswith(no_prompt) and len(no_prompt) < len(text)


def test_tokenizer_without_template_is_one_line_error(tmp_path):
  (tmp_path / "tokenizer.json").write_bytes(open(os.path.join(FIXTURES, "dream", "tokenizer.json"), "rb").read())
  tok = make_tokenizer(str(tmp_path / "tokenizer.json"))
  assert not tok.has_chat_template
  with pytest.raises(DLMError, match="no chat template"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.fixture(scope="module")
def dream_workdir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("chat") / "dream")
  convert.from_hf(os.path.join(FIXTURES, "dream"), out)
  return out


def _chat_sample(workdir, tmp_path, name, *overrides):
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps({"messages": [{"role": "user", "content": MESSAGES["dream"]}]}) + "\n"
                     + json.dumps({"prompt": "hello"}) + "\n")
  out = str(tmp_path / f"{name}.jsonl")
  r = run_cli("sample", "--workdir", workdir, "--num_samples", "2", "--output", out, "--chat", "--prompt_file",
              str(prompts), "--config.sampler.name=llada", "--config.sampler.temperature=0",
              "--config.sampler.steps=24", "--config.sampler.length=85", "--config.sampler.llada.stop_at_eos=true",
              "--config.sampler.llada.block_length=1", *overrides)
  assert r.returncode == 0, r.stderr
  return [json.loads(line) for line in open(out)]


def test_chat_sample_records_reply_up_to_end_of_turn(dream_workdir, tmp_path):
  tok = make_tokenizer(os.path.join(dream_workdir, "hf", "tokenizer.json"))
  recs = _chat_sample(dream_workdir, tmp_path, "im_end")
  assert len(recs) == 4
  assert recs[0]["prompt"] == _expected("dream")["chat_prompt_text"] and recs[0]["stop_id"] == 302  # <|im_end|>
  # This random checkpoint never says <|im_end|> greedily; to see the stop act, declare as the end of turn a token its
  # greedy reply to the first conversation does contain (data.eot_id is the checkpoint's end-of-turn id).
  reply0 = recs[0]["tokens"][recs[0]["prompt_tokens"]:]
  eot = reply0[3]
  stopped = _chat_sample(dream_workdir, tmp_path, "stopped", f"--config.data.eot_id={eot}")
  for recs_, stop in ((recs, 302), (stopped, eot)):
    for rec in recs_:
      prompt_ids = tok.encode(rec["prompt"]).tolist()
      assert rec["tokens"][:len(prompt_ids)] == prompt_ids and rec["prompt_tokens"] == len(prompt_ids)
      reply = rec["tokens"][len(prompt_ids):]
      ends = [i for i, x in enumerate(reply) if x in (stop, tok.eos_id)]
      assert rec["stop_id"] == stop and rec["stopped"] == bool(ends)
      assert rec["reply_tokens"] == (reply[:ends[0]] if ends else reply)
      assert rec["text"] == tok.decode(np.asarray(rec["reply_tokens"]))
      assert rec["raw_text"] == tok.decode(np.asarray(reply))
  assert stopped[0]["stopped"] and len(stopped[0]["reply_tokens"]) <= 3
  # the sampler got the end of turn as its stop id: a row that committed it with nothing decoded after it is filled
  tails = [rec["tokens"][rec["prompt_tokens"]:] for rec in stopped]
  assert any(t.index(eot) < len(t) - 1 and set(t[t.index(eot):]) == {eot} for t in tails if eot in t), tails


def test_chat_errors(dream_workdir, tmp_path):
  out = str(tmp_path / "s.jsonl")
  r = run_cli("sample", "--workdir", dream_workdir, "--num_samples", "1", "--output", out, "--chat")
  assert r.returncode == 2 and "--chat needs" in r.stderr and "\n" not in r.stderr.strip()
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
  r = run_cli("sample", "--workdir", dream_workdir, "--num_samples", "1", "--output", out, "--chat",
              "--prompt_file", str(bad))
  assert r.returncode == 2 and "messages" in r.stderr and not os.path.exists(out)


def test_harness_chat_template_and_end_of_turn(dream_workdir):
  """lm-eval's --apply_chat_template path: the model renders the conversation with the checkpoint's template, and
  generate_until stops at the end-of-turn id (here a token the greedy reply contains, as above) before `until`."""
  pytest.importorskip("lm_eval")
  from dlm_jax.harness import DLMJaxLM

  class Req:
    def __init__(self, *args):
      self.args = args

  opts = {"sampler.name": "llada", "sampler.steps": 8, "sampler.llada.block_length": 1}
  lm = DLMJaxLM(workdir=dream_workdir, batch_size=2, **opts)
  text = lm.apply_chat_template([{"role": "user", "content": MESSAGES["dream"]}])
  assert text == _expected("dream")["chat_prompt_text"] and lm.chat
  ids = np.asarray(lm.tokenizer.encode(text), np.int32)
  (free,) = lm._generate(lm._run_for({"do_sample": False}), [ids], 8, lm.tokenizer.eot_id)
  eot = int(free[3])
  lm = DLMJaxLM(workdir=dream_workdir, batch_size=2, **opts, **{"data.eot_id": eot})
  lm.apply_chat_template([{"role": "user", "content": MESSAGES["dream"]}])
  (reply,) = lm.generate_until([Req(text, {"until": ["\n\n\n\n"], "max_gen_toks": 8, "do_sample": False})])
  cut = list(free).index(eot)
  assert reply == lm.tokenizer.decode(free[:cut])
