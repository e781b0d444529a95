"""Likelihood-bound evaluation and sample generation, shared by the training loop and the `dlm-eval` / `dlm-sample` CLIs."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax.data import eval_batches
from dlm_jax.errors import DLMError
from dlm_jax.samplers.common import PAD, left_pad


def evaluate_bound(run, params, val: np.ndarray, process_state=None, *, batch_size: int, max_batches: int = 0,
                   seed: int = 0) -> dict:
  """Upper bound on the validation NLL: bits per token and perplexity, deterministic given `seed`.

  Batch i uses the key fold_in(PRNGKey(seed), i), so the number is the same for any device count.
  """
  if len(val) == 0:
    raise DLMError("the validation split is empty; set data.val_fraction > 0")
  process = run.process
  bsh = run.batch_sharding()
  batch_size = _round_to_batch_shards(run, batch_size)

  def bound(params, tokens, valid, key, pstate):
    nats, ntok = process.bound(run.apply_fn, params, {"tokens": tokens}, key, pstate)
    return jnp.sum(jnp.where(valid, nats, 0.0)), jnp.sum(jnp.where(valid, ntok, 0.0))

  bound_fn = run.jitted("bound", bound)

  total_nats, total_tokens = 0.0, 0.0
  base = jax.random.PRNGKey(seed)
  with jax.set_mesh(run.mesh):
    for i, (tokens, valid) in enumerate(eval_batches(val, batch_size, max_batches)):
      tokens = jax.device_put(tokens, bsh)
      valid = jax.device_put(valid, run.batch_sharding(1))
      nats, ntok = bound_fn(params, tokens, valid, jax.random.fold_in(base, i), process_state or {})
      total_nats += float(nats)
      total_tokens += float(ntok)
  nats_per_token = total_nats / total_tokens
  return {"nelbo_bits_per_token": nats_per_token / math.log(2.0), "nelbo_nats_per_token": nats_per_token,
          "perplexity_bound": math.exp(nats_per_token), "num_tokens": int(total_tokens)}


def _round_to_batch_shards(run, batch_size: int) -> int:
  """Batches are split over the mesh's data x fsdp axes: round up (the extra rows are padding)."""
  return -(-batch_size // run.batch_shards) * run.batch_shards


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole array on every host (samples span all processes' devices in multi-host runs)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


MASK_SPAN = re.compile(r"<\|mask:(\d+)\|>")


def encode_prompt(tokenizer, text: str, mask_id: int) -> np.ndarray:
  """Token ids of a prompt. A span `<|mask:N|>` (N >= 1) becomes N mask ids: such a prompt is an infilling template
  whose masks are generated while every other token stays fixed."""
  ids, pos = [], 0
  for m in MASK_SPAN.finditer(text):
    n = int(m.group(1))
    if n < 1:
      raise DLMError(f"'{m.group(0)}' in the prompt asks for {n} masks; a mask span needs N >= 1")
    ids.extend(tokenizer.encode(text[pos:m.start()]) if m.start() > pos else [])
    ids.extend([mask_id] * n)
    pos = m.end()
  ids.extend(tokenizer.encode(text[pos:]) if pos < len(text) else [])
  return np.asarray(ids, np.int32)


def make_canvas(run, prompts: list, length: int) -> tuple[np.ndarray, int]:
  """Rows for `prompts` (token id arrays, or None for unconditional rows) -> (canvas, gen_start).

  Continuations: each row is [PAD ... | prompt | masks] of `length`, prompts right-aligned (left padding) and the
  generated region starting after the longest prompt. Infilling templates (prompts holding mask ids): each row is the
  template itself, left-padded to the longest template (`length` is not used); gen_start is the first mask.
  """
  mask_id, vocab = run.process.mask_id, run.process.vocab_out
  prompts = [np.zeros((0,), np.int32) if p is None else np.asarray(p, np.int32) for p in prompts]
  for p in prompts:
    bad = (p != mask_id) & ((p < 0) | (p >= vocab))
    if bad.any():
      raise DLMError(f"prompt token id {int(p[bad][0])} is outside the model's vocabulary [0, {vocab}); use the "
                     "tokenizer the model was trained with")
  templates = [bool((p == mask_id).any()) for p in prompts]
  if any(templates):
    if not all(templates):
      raise DLMError("mix of infilling templates (with <|mask:N|>) and plain prompts; give one kind per run")
    width = max(len(p) for p in prompts)
    max_len = run.cfg.model.max_seq_len
    if width > max_len:
      raise DLMError(f"the infilling template is {width} tokens but the model takes at most {max_len} "
                     "(model.max_seq_len); shorten --prompt")
    canvas = np.full((len(prompts), width), PAD, np.int32)
    for r, p in enumerate(prompts):
      canvas[r, width - len(p):] = p
    return canvas, int(min(np.argmax(row == mask_id) for row in canvas))
  try:
    return left_pad(prompts, length, mask_id)
  except ValueError as err:  # a prompt as long as the canvas
    raise DLMError(f"{err}; for dlm-sample: shorten --prompt or raise sampler.length") from None


def generate(run, params, process_state=None, *, num_samples: int, length: int, seed: int,
             prompts: list | None = None, batch_size: int | None = None) -> tuple[np.ndarray, dict]:
  """Samples with the configured sampler (sampler.* keys): `num_samples` rows for every prompt (or unconditional
  rows when `prompts` is None). Row n uses the key fold_in(PRNGKey(seed), n), so samples do not depend on the batch
  size or on the number of devices. Returns (tokens [len(prompts) * num_samples, width], stats)."""
  scfg = run.cfg.sampler
  rows = [p for p in (prompts or [None]) for _ in range(num_samples)]
  canvas_all, gen_start = make_canvas(run, rows, length)
  n = len(rows)
  batch_size = _round_to_batch_shards(run, min(batch_size or scfg.batch_size, n))
  process = run.process
  eos_id = getattr(run.tokenizer, "eos_id", None)

  def sample(params, keys, canvas, pstate):
    return process.sample(run.apply_fn, params, keys, canvas, scfg, pstate, gen_start=gen_start, eos_id=eos_id)

  sample_fn = run.jitted(f"sample:{gen_start}:{canvas_all.shape[1]}:{scfg.to_json()}", sample)  # traced per setting

  out, nfe = [], []
  base = jax.random.PRNGKey(seed)
  with jax.set_mesh(run.mesh):
    for i in range(-(-n // batch_size)):
      idx = np.minimum(np.arange(i * batch_size, (i + 1) * batch_size), n - 1)  # the last batch repeats its last row
      canvas = jax.device_put(canvas_all[idx], run.batch_sharding())
      keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(idx, jnp.int32))
      try:
        tokens, stats = sample_fn(params, keys, canvas, process_state or {})
      except ValueError as err:  # the sampler's own checks (block / step divisibility, ...) run before compiling
        raise DLMError(f"sampler.name={scfg.name!r}: {err} (the generated length is sampler.length minus the prompt; "
                       "adjust sampler.block_length, sampler.steps or sampler.length)") from None
      out.append(_to_host(tokens))
      nfe.append(int(stats["nfe"]))
  return np.concatenate(out)[:n], {"nfe_per_batch": float(np.mean(nfe)), "steps": scfg.steps}
