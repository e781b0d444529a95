"""Likelihood-bound evaluation and sample generation, shared by the training loop and the `dlm-eval` / `dlm-sample` CLIs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax import config as config_lib
from dlm_jax import registry
from dlm_jax.data import eval_batches
from dlm_jax.errors import DLMError
from dlm_jax.maths import PAD
from dlm_jax.samplers.common import left_pad


def evaluate_bound(run, params, val: np.ndarray, process_state=None, *, batch_size: int, max_batches: int = 0,
                   seed: int = 0, fields: dict | None = None, apply_fn=None) -> dict:
  """Upper bound on the validation NLL: bits per token and perplexity, deterministic given `seed`.

  Batch i uses the key fold_in(PRNGKey(seed), i), so the number is the same for any device count. `fields`: per-row
  arrays [N, ...] passed to the bound with the tokens (SFT rows: 'target', the response tokens it scores, and their
  'segment_ids'); `apply_fn`: the network (default the run's model).
  """
  if len(val) == 0:
    raise DLMError("the validation split is empty; set data.val_fraction > 0")
  process = run.process
  bsh = run.batch_sharding()
  batch_size = _round_to_batch_shards(run, batch_size)

  fields = fields or {}
  net = apply_fn or run.apply_fn

  def bound(params, tokens, valid, key, pstate, extra):
    nats, ntok = process.bound(net, params, {"tokens": tokens, **extra}, key, pstate)
    return jnp.sum(jnp.where(valid, nats, 0.0)), jnp.sum(jnp.where(valid, ntok, 0.0))

  bound_fn = run.jitted(f"bound:{sorted(fields)}", bound) if apply_fn is None else jax.jit(bound)

  total_nats, total_tokens = 0.0, 0.0
  base = jax.random.PRNGKey(seed)
  with jax.set_mesh(run.mesh):
    for i, (tokens, valid) in enumerate(eval_batches(val, batch_size, max_batches)):
      rows = np.minimum(np.arange(i * batch_size, (i + 1) * batch_size), len(val) - 1)
      rows = np.where(valid, rows, 0)  # (eval_batches pads the last batch with row 0)
      extra = {k: jax.device_put(np.asarray(v)[rows], run.batch_sharding(np.ndim(v))) for k, v in fields.items()}
      tokens = jax.device_put(tokens, bsh)
      valid = jax.device_put(valid, run.batch_sharding(1))
      nats, ntok = bound_fn(params, tokens, valid, jax.random.fold_in(base, i), process_state or {}, extra)
      total_nats += float(nats)
      total_tokens += float(ntok)
  nats_per_token = total_nats / total_tokens
  return {"nelbo_bits_per_token": nats_per_token / math.log(2.0), "nelbo_nats_per_token": nats_per_token,
          "perplexity_bound": math.exp(min(nats_per_token, 700.0)), "num_tokens": int(total_tokens)}


def _round_to_batch_shards(run, batch_size: int) -> int:
  """Batches are split over the mesh's data x fsdp axes: round up (the extra rows are padding)."""
  return -(-batch_size // run.batch_shards) * run.batch_shards


def to_host(x: jax.Array) -> np.ndarray:
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


def make_canvas(run, prompts: list, length: int, prompt_width: int = 0) -> tuple[np.ndarray, int]:
  """Rows for `prompts` (token id arrays, or None for unconditional rows) -> (canvas, gen_start).

  Continuations: each row is [PAD ... | prompt | masks] of `length`, prompts right-aligned (left padding) and the
  generated region starting after the longest prompt, or at `prompt_width` if that is larger (a bucketed width, so
  batches of different prompts share one compiled sampler). Infilling templates (prompts holding mask ids): each row is the
  template itself, left-padded to the longest template (`length` is not used); gen_start is the first mask.
  """
  mask_id, vocab = run.process.mask_id, run.process.vocab_size
  prompts = [np.zeros((0,), np.int32) if p is None else np.asarray(p, np.int32) for p in prompts]
  for p in prompts:
    bad = (p != mask_id) & ((p < 0) | (p >= vocab))
    if bad.any():
      raise DLMError(f"prompt token id {int(p[bad][0])} is outside the model's vocabulary [0, {vocab}); use the "
                     "tokenizer the model was trained with")
  templates = [bool((p == mask_id).any()) for p in prompts]
  if any(templates) and "infilling" not in run.process.capabilities:
    infill = [n for n, c in registry.processes().items()  # (capabilities that depend on the instance: not listed)
              if isinstance(c.capabilities, frozenset) and "infilling" in c.capabilities]
    raise DLMError(f"diffusion.process={run.process.name!r} generates left to right, so <|mask:N|> infilling "
                   f"templates need another diffusion.process ({', '.join(infill)}); give a plain prompt")
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
    return left_pad(prompts, length, mask_id, width=prompt_width)
  except ValueError as err:  # a prompt as long as the canvas
    raise DLMError(f"{err}; for dlm-sample: shorten --prompt or raise sampler.length") from None


def generate(run, params, process_state=None, *, num_samples: int, length: int, seed: int,
             prompts: list | None = None, batch_size: int | None = None, stop_id: int | None = None,
             prompt_width: int = 0) -> tuple[np.ndarray, dict]:
  """Samples with the configured sampler (`sampler.name` and its section `sampler.<name>.*`, through the registry):
  `num_samples` rows for every prompt (or unconditional rows when `prompts` is None). Row n uses the key
  fold_in(PRNGKey(seed), n), so samples do not depend on the batch size or on the number of devices. Returns
  (tokens [len(prompts) * num_samples, width], stats). `stop_id`: the token the samplers' stop options stop at
  (default: the tokenizer's EOS; a chat model's end of turn with `dlm-sample --chat`). `prompt_width`: see
  `make_canvas`."""
  scfg = run.cfg.sampler
  rows = [p for p in (prompts or [None]) for _ in range(num_samples)]
  canvas_all, gen_start = make_canvas(run, rows, length, prompt_width)
  n = len(rows)
  batch_size = _round_to_batch_shards(run, min(batch_size or scfg.batch_size, n))
  sample, x64, setting = sampler_fn(run, gen_start, stop_id=stop_id)
  sample_fn = run.jitted(f"sample:{gen_start}:{canvas_all.shape[1]}:{setting}", sample)  # traced per setting
  spec, opts, _ = config_lib.sampler_options(run.cfg)
  uses_steps = spec.uses_steps(opts) and run.process.decode_block_size(run.cfg) != 1

  out, nfe = [], []
  base = jax.random.PRNGKey(seed)
  with jax.set_mesh(run.mesh), x64:
    for i in range(-(-n // batch_size)):
      idx = np.minimum(np.arange(i * batch_size, (i + 1) * batch_size), n - 1)  # the last batch repeats its last row
      canvas = jax.device_put(canvas_all[idx], run.batch_sharding())
      keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.asarray(idx, jnp.int32))
      try:
        tokens, stats = sample_fn(params, keys, canvas, process_state or {})
      except ValueError as err:  # the sampler's own checks (block / step divisibility, ...) run before compiling
        raise DLMError(f"sampler.name={spec.name!r}: {err} (the generated length is sampler.length minus the prompt; "
                       f"adjust {spec.section()}.*, sampler.steps or sampler.length)") from None
      out.append(to_host(tokens))
      nfe.append(int(stats["nfe"]))
  return np.concatenate(out)[:n], {"nfe_per_batch": float(np.mean(nfe)), "steps": scfg.steps if uses_steps else None,
                                   "nfe_total": int(np.sum(nfe)), "batches": len(nfe), "gen_start": gen_start}


def sampler_fn(run, gen_start: int = 0, stop_id: int | None = None):
  """The configured sampler as a pure function (params, keys, canvas, process_state) -> (tokens, stats) for canvases
  whose generated region starts at gen_start: the family's network (`Process.sampling_net`) and the registry's
  sampler with its options. Returns (fn, the context it must run in (64-bit JAX for float64 samplers), a string that
  identifies the setting). `stop_id`: the id the samplers' stop options stop at (None = the tokenizer's EOS)."""
  scfg = run.cfg.sampler
  spec, opts, family_opts = config_lib.sampler_options(run.cfg)
  shared = registry.Shared(steps=scfg.steps, temperature=scfg.temperature)
  eos_id = getattr(run.tokenizer, "eos_id", None) if stop_id is None else stop_id
  process = run.process

  def sample(params, keys, canvas, pstate):
    net = process.sampling_net(run.apply_fn, params, pstate, canvas, shared.steps)
    return spec.run(net, opts, shared, keys, canvas, gen_start=gen_start, eos_id=eos_id, family_options=family_opts)

  x64 = jax.enable_x64(True) if getattr(opts, "precision", "") == "float64" else contextlib.nullcontext()
  return sample, x64, json.dumps([spec.name, repr(opts), repr(family_opts), repr(shared), eos_id])


def sampler_record(cfg) -> dict:
  """What a samples file records about how it was made: the sampler, the shared keys, every option of the running
  sampler (and of the family's generation), the family."""
  spec, opts, family_opts = config_lib.sampler_options(cfg)
  s = cfg.sampler
  record = {"sampler": spec.name, "seed": s.seed, "temperature": s.temperature, **dataclasses.asdict(opts)}
  if spec.uses_steps(opts) and registry.processes()[cfg.diffusion.process].decode_block_size(cfg) != 1:
    record["steps"] = s.steps
  if family_opts is not None:
    record.update({f"{cfg.diffusion.process}.{k}": v for k, v in dataclasses.asdict(family_opts).items()})
  return record


# --- conditional likelihoods (lm-eval's loglikelihood requests) -----------------------------------------------------


def bucket_length(n: int, limit: int, multiple: int = 1) -> int:
  """The padded length of a row of n tokens: the next power of two >= 16 (a few shapes, each compiled once), rounded
  up to `multiple` (block size), at most `limit` rounded down to it."""
  width = max(16, 1 << max(n - 1, 0).bit_length())
  width = -(-width // multiple) * multiple
  return max(min(width, limit // multiple * multiple), -(-n // multiple) * multiple)


MC_SAMPLING = ("stratified", "antithetic", "iid")


def check_mc_sampling(sampling: str) -> None:
  if sampling not in MC_SAMPLING:
    raise DLMError(f"mc_sampling must be one of {MC_SAMPLING}, got {sampling!r}")


def mask_draws(copies: int, sampling: str, seed: int, request: int) -> np.ndarray:
  """The `copies` draws u in [0, 1) of one request (copy j masks floor(u_j n) + 1 of its n targets): stratified
  ((u + j) / copies, shuffled; LLaDA's), antithetic (pairs u, 1 - u) or iid; a function of (seed, request) only."""
  check_mc_sampling(sampling)
  rng = np.random.default_rng([seed, request])
  if sampling == "stratified":
    u = (rng.random() + np.arange(copies)) / copies
    return rng.permutation(u).astype(np.float32)
  if sampling == "antithetic":
    half = rng.random((copies + 1) // 2)
    return np.concatenate([half, 1.0 - half])[:copies].clip(0.0, np.nextafter(np.float32(1), 0)).astype(np.float32)
  return rng.random(copies).astype(np.float32)  # iid


def conditional_nll(run, params, process_state, requests: list, *, mc_samples: int = 128, batch_size: int = 32,
                    seed: int = 0, sampling: str = "stratified", first_index: int = 0) -> list[tuple[float, float]]:
  """For each (context ids, continuation ids): (estimate of -log p(continuation | context) in nats, its Monte Carlo
  standard error). Nie et al. 2025 (LLaDA), Sec. B.6 / Algorithm 3: the continuation alone is masked, m ~ U{1..n} of
  its n tokens with weight n / m (the process's `bound` with batch['target']), averaged over `mc_samples` copies whose
  m are stratified ((u + j) / mc_samples for copy j; or antithetic / iid: `mask_draws`); the context is never masked. Autoregressive models (process
  capability "exact_nll") give the exact value from one forward (error 0). Block diffusion: the same per block, the
  clean earlier blocks as condition.

  Rows are [context | continuation | padding in its own segment] of a bucketed length (`bucket_length`), so the jitted
  bound compiles once per bucket; rows are sharded over the mesh's batch axes. Requests are processed longest first;
  the estimate for request r depends only on (seed, first_index + r's position in `requests`) and the rows it shares
  a batch with (a caller that splits a long list passes each part's `first_index`)."""
  process = run.process
  caps = process.capabilities
  if "conditional" not in caps:
    raise DLMError(f"diffusion.process={process.name!r} has no conditional likelihood estimate (loglikelihood "
                   "requests); use a masked or block diffusion model, or tasks that only generate (generate_until)")
  limit = run.cfg.model.max_seq_len
  multiple = process.decode_block_size(run.cfg) or 1
  copies = 1 if "exact_nll" in caps else int(mc_samples)
  if copies < 1:
    raise DLMError(f"mc_samples must be >= 1, got {mc_samples}")
  check_mc_sampling(sampling)
  batch_size = _round_to_batch_shards(run, max(1, batch_size))

  def bound(params, tokens, segments, target, strata, key, pstate):
    nats, _ = process.bound(run.apply_fn, params, {"tokens": tokens, "segment_ids": segments, "target": target,
                                                    "strata": strata}, key, pstate)
    return nats

  fn = run.jitted("conditional_nll", bound)
  rows = []  # (bucket, request index, copy, ids, number of context tokens)
  for r, (ctx, cont) in enumerate(requests):
    ctx, cont = np.asarray(ctx, np.int32).reshape(-1), np.asarray(cont, np.int32).reshape(-1)
    if len(cont) == 0:
      raise DLMError(f"loglikelihood request {r} has an empty continuation")
    if len(cont) > limit:
      raise DLMError(f"loglikelihood request {r}: the continuation has {len(cont)} tokens but the model takes at most "
                     f"{limit} (model.max_seq_len)")
    ids = np.concatenate([ctx, cont])[-limit:]  # the context is cut from the left, as lm-eval's models do
    width = bucket_length(len(ids), limit, multiple)
    rows.extend((width, r, j, ids, len(ids) - len(cont)) for j in range(copies))
  rows.sort(key=lambda x: (-x[0], x[1], x[2]))
  strata = {r: mask_draws(copies, sampling, seed, first_index + r) for r in range(len(requests))}
  nats = np.zeros((len(requests), copies), np.float64)
  base = jax.random.fold_in(jax.random.PRNGKey(seed), first_index)
  with jax.set_mesh(run.mesh):
    start, b = 0, 0
    while start < len(rows):
      width = rows[start][0]
      chunk = [x for x in rows[start:start + batch_size] if x[0] == width]
      start += len(chunk)
      tokens = np.zeros((batch_size, width), np.int32)
      segments = np.zeros((batch_size, width), np.int32)
      target = np.zeros((batch_size, width), bool)
      u = np.zeros((batch_size,), np.float32)
      for i, (_, r, j, ids, n_ctx) in enumerate(chunk):
        tokens[i, :len(ids)] = ids
        segments[i, :len(ids)] = 1  # padding: segment 0, never attended by the row's tokens
        target[i, n_ctx:len(ids)] = True
        u[i] = strata[r][j]
      put = lambda a: jax.device_put(a, run.batch_sharding(a.ndim))  # noqa: E731
      out = to_host(fn(params, put(tokens), put(segments), put(target), put(u), jax.random.fold_in(base, b),
                        process_state or {}))
      for i, (_, r, j, _, _) in enumerate(chunk):
        nats[r, j] = out[i]
      b += 1
  err = nats.std(axis=1, ddof=1) / math.sqrt(copies) if copies > 1 else np.zeros(len(requests))
  return [(float(m), float(e)) for m, e in zip(nats.mean(axis=1), err)]


# --- block diffusion: clipped-schedule search and generative perplexity ---------------------------------------------


def clip_intervals(widths, delta: float = 0.05, eps: float = 1e-3) -> list[tuple[float, float]]:
  """BD3-LM's candidate noise intervals: (eps, 1), then for every width w and start i = 0, delta, ... <= 1 - w the
  interval (max(i, eps), max(i + w, eps))."""
  out = [(eps, 1.0)]
  for w in widths:
    if not 0 < w <= 1:
      raise DLMError(f"clip width {w} is outside (0, 1]; give widths like 0.5,0.6,0.7")
    for j in range(int(math.floor((1 - w) / delta + 1e-9)) + 1):
      i = j * delta
      lo, hi = max(i, eps), min(max(i + w, eps), 1.0)
      if lo < hi and (round(lo, 6), round(hi, 6)) not in {(round(a, 6), round(b, 6)) for a, b in out}:
        out.append((round(lo, 6), round(hi, 6)))
  return out


def clip_search(run, params, val: np.ndarray, *, batch_size: int, max_batches: int = 0, seed: int = 0,
                widths=(0.5, 0.6, 0.7, 0.8, 0.9), delta: float = 0.05) -> dict:
  """BD3-LM's clipped-schedule search (Arriola et al. 2025, Sec. 4.2): for every candidate interval (beta, omega),
  the variance of the per-block training estimator (1/t-weighted masked cross entropy per token, t ~ U[beta, omega])
  over the blocks of each validation batch, averaged over batches; the interval with the lowest variance is the one to
  train with (`diffusion.t_min`, `diffusion.t_max`). Every interval sees the same batches and keys."""
  process = run.process
  if "clip_search" not in process.capabilities:
    raise DLMError(f"--clip_search needs a block diffusion model with diffusion.block_size > 1 (the interval does not "
                   f"matter at block size 1, and diffusion.process={process.name!r} has no per-block noise)")
  if len(val) == 0:
    raise DLMError("the validation split is empty; set data.val_fraction > 0")
  batch_size = _round_to_batch_shards(run, batch_size)

  def per_block(params, tokens, key, lo, hi):
    losses, _ = process.per_block_loss(run.apply_fn, params, {"tokens": tokens}, key, lo, hi)
    return losses / process.block_size  # per-token mean within each block

  fn = run.jitted("clip_search", per_block)
  intervals = clip_intervals(widths, delta, eps=1e-3)
  sums = np.zeros(len(intervals))
  batches = 0
  base = jax.random.PRNGKey(seed)
  with jax.set_mesh(run.mesh):
    for b, (tokens, valid) in enumerate(eval_batches(val, batch_size, max_batches)):
      tokens = jax.device_put(tokens, run.batch_sharding())
      keep = np.asarray(valid, bool)
      for j, (lo, hi) in enumerate(intervals):
        losses = to_host(fn(params, tokens, jax.random.fold_in(base, b), jnp.float32(lo), jnp.float32(hi)))
        sums[j] += float(np.var(losses[keep]))
      batches += 1
  var = sums / batches
  best = int(np.argmin(var))
  table = sorted(([lo, hi, float(v)] for (lo, hi), v in zip(intervals, var)), key=lambda r: r[2])
  return {"best_interval": list(intervals[best]), "best_variance": float(var[best]),
          "default_interval_variance": float(var[0]), "num_batches": batches, "intervals": table,
          "use": f"--config.diffusion.t_min={intervals[best][0]} --config.diffusion.t_max={intervals[best][1]}"}


def score_samples(run, params, records: list[dict], *, batch_size: int, source: str = "") -> dict:
  """Generative perplexity of samples under an autoregressive dlm_jax model (block diffusion at block size 1, whose
  NLL is exact), with the samples' mean unigram entropy.

  Protocol (numbers.md): each sample's generated tokens (after its prompt, if it had one, which is the context) up to
  and including its first EOS are scored; samples longer than the scorer's data.seq_len are cut into chunks of that
  length, each scored from its start; PPL = exp(total NLL / total scored tokens) over all samples. The entropy is the
  unigram entropy (nats) of each sample's scored tokens, averaged over samples; low entropy (repetition) makes PPL look
  good, so the two are reported together, with the sampler settings the samples file records.
  """
  process = run.process
  if "exact_nll" not in process.capabilities:
    described = "".join(f" with {k}={v}" for k, v in process.describe().items() if k != "exact_nll")
    raise DLMError(f"the scoring workdir holds a diffusion.process={process.name!r} model{described}; generative "
                   "perplexity needs an autoregressive model (diffusion.process='block', diffusion.block_size=1, e.g. "
                   "configs/ar_quickstart.py)")
  tok = run.tokenizer
  seq_len = run.cfg.data.seq_len
  rows, weights, entropies, n_scored = [], [], [], 0
  for n, rec in enumerate(records, 1):
    if "tokens" in rec:
      if rec.get("tokenizer", tok.fingerprint) != tok.fingerprint:
        raise DLMError(f"sample {n} was generated with tokenizer {rec['tokenizer']!r} but the scoring model uses "
                       f"{tok.fingerprint!r}; score with an AR model trained with the same data.tokenizer")
      ids = np.asarray(rec["tokens"], np.int64)
      if ids.size and (ids.min() < 0 or ids.max() >= tok.vocab_size):
        raise DLMError(f"sample {n} holds token ids outside the scoring model's vocabulary [0, {tok.vocab_size}); "
                       "score with an AR model trained with the same data.tokenizer")
    elif isinstance(rec.get("text"), str):
      ids = np.asarray(tok.encode(rec["text"]), np.int64)
    else:
      raise DLMError(f"sample {n} has neither 'tokens' nor 'text'; give the JSON lines dlm-sample writes")
    start = int(rec.get("prompt_tokens", 0))
    eos = np.flatnonzero(ids[start:] == tok.eos_id)
    end = start + int(eos[0]) + 1 if eos.size else len(ids)
    if end <= start:
      continue
    gen = ids[start:end]
    counts = np.unique(gen, return_counts=True)[1] / len(gen)
    entropies.append(float(-(counts * np.log(counts)).sum()))
    n_scored += len(gen)
    for lo in range(0, end, seq_len):  # chunks of the scorer's length; positions < start are context only
      chunk = ids[lo:min(lo + seq_len, end)]
      w = (np.arange(lo, lo + len(chunk)) >= start).astype(np.float32)
      if w.sum() == 0:
        continue
      rows.append(np.pad(chunk, (0, seq_len - len(chunk))).astype(np.int32))
      weights.append(np.pad(w, (0, seq_len - len(chunk))))
  if not rows:
    raise DLMError("no sample has generated tokens to score")

  def nll(params, tokens, w):
    return jnp.sum(process.causal_nll(run.apply_fn, params, {"tokens": tokens}) * w)

  fn = run.jitted("score_samples", nll)
  batch_size = _round_to_batch_shards(run, batch_size)
  total = 0.0
  with jax.set_mesh(run.mesh):
    for i in range(0, len(rows), batch_size):
      idx = np.arange(i, i + batch_size)
      tokens = np.stack([rows[j] if j < len(rows) else rows[0] for j in idx])
      w = np.stack([weights[j] if j < len(rows) else np.zeros(seq_len, np.float32) for j in idx])
      total += float(fn(params, jax.device_put(tokens, run.batch_sharding()),
                        jax.device_put(w, run.batch_sharding())))
  details = {}
  for key in ("sampler", "steps", "temperature", "precision", "seed", "top_k", "top_p", "process", "block_size"):
    vals = sorted({json.dumps(r[key]) for r in records if key in r})
    if vals:
      details[key] = json.loads(vals[0]) if len(vals) == 1 else [json.loads(v) for v in vals]
  return {"gen_ppl": math.exp(total / n_scored), "nll_nats_per_token": total / n_scored,
          "mean_unigram_entropy": float(np.mean(entropies)), "num_samples": len(entropies),
          "num_tokens": int(n_scored), "samples": source, "scorer_seq_len": seq_len, **details}
