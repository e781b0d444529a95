"""Supervised fine-tuning on conversations (train.objective='sft').

Data: `data.path` is a .jsonl file (or a directory of them) with one conversation per line, {"messages": [{"role",
"content"}, ...]} whose last message is the assistant's reply. The prompt is every earlier message rendered with the
tokenizer's chat template and its generation prompt; the response is the reply's tokens and the end-of-turn token
(the tokenizer's EOT, else EOS). Each row is [prompt | response | EOS padding] of data.seq_len, one conversation per
row (LLaDA, Nie et al. 2025, "Large Language Diffusion Models", SFT recipe): conversations that do not fit are left
out (counted in a note; all of them left out is an error).

Loss: the family's conditional bound of the response given the clean prompt (`Process.bound` over batch['target'],
the capability 'conditional'), so one objective serves every family:
  - masked diffusion: the prompt is never masked; response tokens are masked and scored. The draw is the masked-count
    form (m ~ U{1..n} of the n response tokens, weight n / m), which is LLaDA's t ~ U, p_mask = t, weight 1 / p_mask
    recipe with the integral over t taken exactly (the same expected loss, lower variance); time-conditioned networks
    use the 1/t form restricted to the response.
  - block diffusion: the same inside each block, the earlier blocks clean (BD3-LM's [x_t | x_0] attention).
  - block size 1 (the AR baseline): the exact causal NLL of the response tokens, ordinary SFT.
sft.train_on_padding=True (LLaDA): the EOS padding belongs to the response; it is masked and trained like any token,
so the model learns where the reply stops, and the answer length used for normalisation counts it. False: the padding
is neither masked nor scored and sits in its own attention segment, so it never reaches the conversation (a row's
loss does not depend on how far it is padded). sft.normalize: 'answer' = each row's loss / its answer length, averaged
over rows (LLaDA); 'tokens' = the batch's loss / its number of response tokens (d1, dllm).
"""

from __future__ import annotations

import json
import math
import sys

import jax.numpy as jnp
import numpy as np

from dlm_jax import data as data_lib
from dlm_jax import storage
from dlm_jax.errors import DLMError
from dlm_jax.posttrain import PostTraining


def read_conversations(path: str) -> list[list[dict]]:
  """The conversations of a .jsonl file or a directory of them; a malformed line is a one-line error naming it."""
  if not path:
    raise DLMError("train.objective='sft' reads conversations: set data.path to a .jsonl file with one "
                   '{"messages": [{"role": ..., "content": ...}, ...]} per line')
  files = data_lib.corpus_files(path) if storage.isdir(path) else [path]
  out = []
  for f in files:
    if not f.endswith(".jsonl"):
      raise DLMError(f"{f}: train.objective='sft' reads .jsonl files of conversations; convert it to one "
                     '{"messages": [...]} per line')
    for n, line in enumerate(storage.read_text(f).splitlines(), 1):
      if not line.strip():
        continue
      try:
        messages = json.loads(line)["messages"]
        ok = isinstance(messages, list) and len(messages) >= 2 and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages) and messages[-1]["role"] == "assistant"
      except (ValueError, KeyError, TypeError):
        ok = False
      if not ok:
        raise DLMError(f"{f}:{n} is not a conversation: write {{\"messages\": [{{\"role\": ..., \"content\": ...}}, "
                       "...]} with at least one prompt message and the assistant's reply last")
      out.append(messages)
  if not out:
    raise DLMError(f"data.path '{path}' holds no conversations")
  return out


def encode_conversations(conversations: list[list[dict]], tokenizer, seq_len: int, train_on_padding: bool
                         ) -> tuple[np.ndarray, dict, int]:
  """(tokens [N, seq_len] int32, fields {'target' [N, L] bool, 'segment_ids' [N, L] int32 when the padding is not
  trained}, number left out for being too long)."""
  stop = tokenizer.eot_id if getattr(tokenizer, "eot_id", None) is not None else tokenizer.eos_id
  prompts = tokenizer.encode_many([tokenizer.apply_chat_template(c[:-1], add_generation_prompt=True)
                                   for c in conversations])
  replies = tokenizer.encode_many([c[-1]["content"] for c in conversations])
  rows, targets, segments, dropped = [], [], [], 0
  for p, r in zip(prompts, replies):
    n = len(p) + len(r) + 1
    if n > seq_len or len(p) == 0:
      dropped += 1
      continue
    row = np.full(seq_len, tokenizer.eos_id, np.int32)
    row[:len(p)] = p
    row[len(p):n - 1] = r
    row[n - 1] = stop
    target = np.zeros(seq_len, bool)
    target[len(p):] = True
    if not train_on_padding:
      target[n:] = False
      seg = np.zeros(seq_len, np.int32)
      seg[n:] = 1
      segments.append(seg)
    rows.append(row)
    targets.append(target)
  if not rows:
    raise DLMError(f"no conversation fits data.seq_len={seq_len} tokens (prompt + reply + end token); raise "
                   "data.seq_len")
  fields = {"target": np.stack(targets)}
  if segments:
    fields["segment_ids"] = np.stack(segments)
  return np.stack(rows), fields, dropped


def load(cfg, tokenizer) -> data_lib.Corpus:
  """The SFT rows of data.path, split into train / validation by data.val_fraction and data.split_seed."""
  if not getattr(tokenizer, "has_chat_template", False):
    raise DLMError(f"train.objective='sft' renders prompts with the tokenizer's chat template, and "
                   f"{cfg.data.tokenizer} has none; use a tokenizer.json with a chat_template in its "
                   "tokenizer_config.json (or data.tokenizer='bytes', whose plain template is 'role: content' lines)")
  d = cfg.data
  convs = read_conversations(d.path)
  if d.max_documents:
    convs = convs[:d.max_documents]
  tokens, fields, dropped = encode_conversations(convs, tokenizer, d.seq_len, cfg.sft.train_on_padding)
  if dropped:
    print(f"dlm_jax sft: {dropped} of {len(convs)} conversations are longer than data.seq_len={d.seq_len} and are "
          "left out", file=sys.stderr)
  train_idx, val_idx = data_lib.split_indices(len(tokens), d.val_fraction, d.split_seed)
  if len(train_idx) == 0:
    raise DLMError(f"{len(tokens)} conversation(s) leave no training rows after data.val_fraction={d.val_fraction}")
  return data_lib.Corpus(tokens, train_idx, val_idx, tokenizer.eos_id, len(tokens), fields)


def objective_fn(process, normalize: str):
  """(apply_fn, params, batch, key, pstate, frozen=None) -> (loss, metrics, pstate): the response's conditional
  bound normalised per answer ('answer') or per response token of the batch ('tokens')."""

  def objective(apply_fn, params, batch, key, pstate, frozen=None):
    del frozen
    inner = {k: batch[k] for k in ("tokens", "target", "segment_ids") if k in batch}
    nll, n = process.bound(apply_fn, params, inner, key, pstate)
    if normalize == "answer":
      loss = jnp.mean(nll / jnp.maximum(n, 1.0))
    else:
      loss = jnp.sum(nll) / jnp.maximum(jnp.sum(n), 1.0)
    per_token = jnp.sum(nll) / jnp.maximum(jnp.sum(n), 1.0)
    return loss, {"response_bits_per_token": per_token / math.log(2.0), "response_tokens": jnp.mean(n)}, pstate

  return objective


def check(cfg, run) -> None:
  if "conditional" not in run.process.capabilities:
    raise DLMError(f"train.objective='sft' needs a family with a conditional likelihood (prompt clean, response "
                   f"trained); diffusion.process={run.process.name!r} has none: use masked or block")
  if cfg.data.segment_attention:
    raise DLMError("train.objective='sft' lays out its own rows (one conversation each); set "
                   "data.segment_attention=False")
  if cfg.data.mixture:
    raise DLMError("train.objective='sft' reads one conversation file or directory: set data.path and data.mixture=''")
  if cfg.sft.normalize not in ("answer", "tokens"):
    raise DLMError(f"sft.normalize must be 'answer' or 'tokens', got {cfg.sft.normalize!r}")


def make(cfg, run, load_params) -> PostTraining:
  check(cfg, run)
  corpus = load(cfg, run.tokenizer)
  init = load_params(cfg.train.init_from, "train.init_from") if cfg.train.init_from else None

  def evaluate(trainer, step, params):
    """The validation bound of the responses given their prompts (bits per response token)."""
    from dlm_jax.evaluate import evaluate_bound
    c = trainer.cfg
    val = corpus.sequences[corpus.val_index]
    fields = {k: v[corpus.val_index] for k, v in corpus.fields.items()}
    ev = evaluate_bound(trainer.run, params, val, trainer.state["process_state"], batch_size=c.eval.batch_size,
                        max_batches=c.eval.max_batches, seed=c.eval.seed, fields=fields)
    out = {f"response_{k}": v for k, v in ev.items()}
    if c.train.eval_samples:  # replies to the first validation prompts (the configured sampler, sampler.seed + step)
      from dlm_jax.evaluate import generate
      rows = val[:c.train.eval_samples]
      prompts = [row[:int(np.argmax(t))] for row, t in zip(rows, fields["target"][:len(rows)])]
      toks, stats = generate(trainer.run, params, trainer.state["process_state"], num_samples=1,
                             length=c.sampler.length or c.data.seq_len, seed=c.sampler.seed + step, prompts=prompts)
      tok = trainer.run.tokenizer
      out["samples"] = [tok.decode(r[stats["gen_start"]:][r[stats["gen_start"]:] != tok.eos_id]) for r in toks]
    return out

  return PostTraining(objective=objective_fn(run.process, cfg.sft.normalize), corpus=corpus, init_params=init,
                      evaluate=evaluate if len(corpus.val_index) else None)
