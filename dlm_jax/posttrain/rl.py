"""RL with verifiable rewards for masked diffusion LMs (train.objective='grpo' or 'wd1').

Data: `data.path` is a .jsonl file (or a directory of them): {"prompt": "..." or "messages": [...], "answer": "..."}
per line. Chat messages are rendered with the tokenizer's chat template (generation prompt added); a plain prompt is
used as written. Prompts are left-padded to rl.prompt_length.

Each optimizer step (the loop's `prepare` stage, then the compiled step):
  1. rollouts: every prompt of the batch gets rl.group_size completions of rl.completion_length tokens from the
     configured sampler (sampler.name and its section; any sampler, caches included) run on the current policy,
     jit-compiled once; row r of step s uses the key fold_in(fold_in(PRNGKey(train.seed), s), r);
  2. rewards: rl.reward(completion text, answer) on the host, the completion cut at the end of turn / EOS;
  3. advantages: A = r - mean of the group (d1 computes the group's std but does not divide by it);
  4. the loss below, averaged over the completion tokens up to and including the first end token.
With rl.iterations = mu > 1, one rollout serves mu consecutive steps (the iterator's prompt batches in between are
skipped); each of the mu steps draws its own prompt mask, shared by the old, reference and current policies.

Per-token log-probability (d1's one-step estimate, Zhao et al. 2025, "d1: Scaling Reasoning in Diffusion Large
Language Models via Reinforcement Learning"): one forward with the whole completion masked and each prompt token
masked with probability rl.prompt_mask; log p(o_k) read at completion position k.

grpo (diffu-GRPO, d1): per token -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta KL, rho = exp(logp - logp_old),
KL = exp(ref - logp) - (ref - logp) - 1 (k3) against the reference policy (train.init_from; the adapters switched off
under LoRA). logp_old is the rollout policy's (computed once per rollout for each of the mu masks), or logp itself
without gradient when mu = 1 (rho = 1, the on-policy gradient).

wd1 (Tang et al. 2025, "wd1: Weighted Policy Optimization for Reasoning in Diffusion Language Models"): ratio-free,
-sum_i (w+_i - w-_i) logp(o_i) over each group, w+ = softmax(A), w- = softmax(-A) within the group, logp(o_i) the
completion's mean per-token log-probability, plus the same beta KL. Why this one as diffu-GRPO's lower-variance
successor: diffu-GRPO's ratio divides two independently noisy one-step likelihood estimates (the old one from another
network state), and clipping then acts on that noise; wd1 needs only the current policy's estimate (no old policy, no
ratio), its group-softmax weights are bounded, and with mu > 1 it skips the rollout policy's forwards. It reports
large gains over d1 with LLaDA-8B-Instruct (GSM8K, MATH500, Countdown, Sudoku).

Resume: the rollout of the current cycle is regenerated from the restored parameters, so with rl.iterations = 1 a
resumed run repeats the uninterrupted one; with mu > 1 a resume in mid-cycle starts a new cycle.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from dlm_jax import data as data_lib
from dlm_jax import storage
from dlm_jax.errors import DLMError
from dlm_jax.evaluate import to_host
from dlm_jax.maths import PAD
from dlm_jax.posttrain import PostTraining, rewards

_ROLLOUT_KEY = 0x726f6c  # rollout keys: fold_in(PRNGKey(train.seed) ^ this, step)


# --- data ---------------------------------------------------------------------------------------------------------


def read_examples(path: str) -> list[dict]:
  if not path:
    raise DLMError("RL reads prompts: set data.path to a .jsonl file with one {\"prompt\": ..., \"answer\": ...} "
                   "(or {\"messages\": [...], \"answer\": ...}) per line")
  out = []
  for f in data_lib.corpus_files(path) if storage.isdir(path) else [path]:
    if not f.endswith(".jsonl"):
      raise DLMError(f"{f}: RL reads .jsonl files of prompts and answers; convert it to one JSON object per line")
    for n, line in enumerate(storage.read_text(f).splitlines(), 1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
        prompt = obj["messages"] if "messages" in obj else obj["prompt"]
        answer = obj["answer"]
        ok = isinstance(answer, str) and (isinstance(prompt, str) and prompt or isinstance(prompt, list) and prompt)
      except (ValueError, KeyError, TypeError):
        ok = False
      if not ok:
        raise DLMError(f"{f}:{n} is not an RL example: write {{\"prompt\": \"...\", \"answer\": \"...\"}} (or "
                       "\"messages\" instead of \"prompt\")")
      out.append({"prompt": prompt, "answer": answer})
  if not out:
    raise DLMError(f"data.path '{path}' holds no examples")
  return out


def encode_prompts(examples: list[dict], tokenizer, width: int) -> np.ndarray:
  """[N, width] int32: each prompt right-aligned, PAD (-1) before it."""
  texts = []
  for ex in examples:
    p = ex["prompt"]
    if isinstance(p, list):
      if not getattr(tokenizer, "has_chat_template", False):
        raise DLMError("an RL example gives chat messages but the tokenizer has no chat template; give \"prompt\" "
                       "text instead, or a tokenizer with a chat_template")
      p = tokenizer.apply_chat_template(p, add_generation_prompt=True)
    texts.append(p)
  ids = tokenizer.encode_many(texts)
  longest = max(len(i) for i in ids)
  if longest > width:
    raise DLMError(f"a prompt is {longest} tokens, longer than rl.prompt_length={width}; raise rl.prompt_length")
  rows = np.full((len(ids), width), PAD, np.int32)
  for r, i in enumerate(ids):
    rows[r, width - len(i):] = i
  return rows


# --- the pure parts: log-probabilities, advantages, losses ------------------------------------------------------


def prompt_masks(key, tokens: jax.Array, gen_start: int, prompt_mask: float, count: int) -> jax.Array:
  """[count, B, L] bool: which positions the log-probability forward masks, one draw per inner iteration: the whole
  completion (positions >= gen_start), and each real prompt token with probability prompt_mask."""
  pos = jnp.arange(tokens.shape[1])
  completion = pos[None, :] >= gen_start
  real = tokens != PAD

  def one(k):
    return completion | (real & (jax.random.uniform(k, tokens.shape) < prompt_mask) & ~completion)

  return jax.vmap(one)(jax.random.split(key, count))


def token_logp(process, net, params, tokens: jax.Array, masked: jax.Array) -> jax.Array:
  """[B, L] float32: log p(tokens[k]) of the forward on `tokens` with `masked` positions replaced by the mask id
  (d1's one-step estimate at the masked positions; PAD left padding kept out of attention)."""
  z = jnp.where(masked & (tokens != PAD), process.mask_id, tokens)
  fn = net.logits_fn(params, time_conditioned=process.time_conditioned)
  logits = process.predictions(net, fn(z, jnp.ones((tokens.shape[0],), jnp.float32)))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, jnp.maximum(tokens, 0)[..., None], axis=-1)[..., 0]


def group_advantages(rewards_: np.ndarray, group: int) -> np.ndarray:
  """r - the mean of its group (rows [g * group, (g + 1) * group) are one prompt's completions)."""
  r = rewards_.reshape(-1, group)
  return (r - r.mean(axis=1, keepdims=True)).reshape(-1)


def wd1_weights(advantages: np.ndarray, group: int) -> np.ndarray:
  """w+ - w- per completion: softmax(A) - softmax(-A) within each group."""
  a = advantages.reshape(-1, group)

  def softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)

  return (softmax(a) - softmax(-a)).reshape(-1)


def k3(logp, ref):
  """The k3 estimate of KL(policy || reference) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
  d = ref - logp
  return jnp.exp(d) - d - 1.0


def grpo_token_loss(logp, old_logp, ref_logp, advantage, clip: float, beta: float):
  """diffu-GRPO's per-token loss: -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta k3(logp, ref)."""
  rho = jnp.exp(logp - old_logp)
  a = advantage[:, None]
  loss = -jnp.minimum(rho * a, jnp.clip(rho, 1.0 - clip, 1.0 + clip) * a)
  if beta:
    loss = loss + beta * k3(logp, ref_logp)
  return loss


def objective_fn(process, method: str, clip: float, beta: float, group: int):
  """(apply_fn, params, batch, key, pstate, frozen) -> (loss, metrics, pstate) over a rollout batch: 'tokens' [B, L],
  'logp_mask' (the positions the estimate masks), 'scored' (completion tokens up to the first end token),
  'advantage' [B] (grpo) or 'weight' [B] (wd1: w+ - w-), 'reward' [B], 'old_logp' [B, L] when rl.iterations > 1."""

  def objective(apply_fn, params, batch, key, pstate, frozen=None):  # (frozen: None without reference and LoRA)
    del key
    tokens, scored = batch["tokens"], batch["scored"].astype(jnp.float32)
    logp = token_logp(process, apply_fn, params, tokens, batch["logp_mask"])
    n = jnp.maximum(jnp.sum(scored, axis=1), 1.0)
    mean_over_tokens = lambda x: jnp.sum(x * scored, axis=1) / n  # [B]
    ref = None
    if beta:
      ref = jax.lax.stop_gradient(token_logp(process, apply_fn, frozen["reference"], tokens, batch["logp_mask"]))
    metrics = {"reward": jnp.mean(batch["reward"]), "completion_tokens": jnp.mean(n)}
    if method == "grpo":
      old = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
      per_token = grpo_token_loss(logp, old, ref, batch["advantage"], clip, beta)
      loss = jnp.mean(mean_over_tokens(per_token))
      rho = jnp.exp(logp - old)
      clipped = (jnp.abs(rho - 1.0) > clip).astype(jnp.float32)
      metrics["clip_fraction"] = jnp.sum(clipped * scored) / jnp.sum(scored)
    else:
      seq_logp = mean_over_tokens(logp)
      loss = -jnp.sum(batch["weight"] * seq_logp) / (tokens.shape[0] / group)
      if beta:
        loss = loss + beta * jnp.mean(mean_over_tokens(k3(logp, ref)))
    if beta:
      metrics["kl"] = jnp.mean(mean_over_tokens(k3(logp, ref)))
    metrics["logp"] = jnp.mean(mean_over_tokens(logp))
    return loss, metrics, pstate

  return objective


# --- rollouts ------------------------------------------------------------------------------------------------------


class Rollouts:
  """The loop's prepare stage: prompt batch -> rollout batch (module docstring, steps 1-3)."""

  def __init__(self, cfg, run, examples: list[dict], reward_fn):
    self.cfg, self.run, self.examples, self.reward_fn = cfg, run, examples, reward_fn
    r = cfg.rl
    self.group, self.mu, self.width = r.group_size, r.iterations, r.prompt_length
    tok = run.tokenizer
    self.stop = tok.eot_id if getattr(tok, "eot_id", None) is not None else tok.eos_id
    self.cache = None
    self._fns = {}

  def _sampler(self):
    if "sample" not in self._fns:
      from dlm_jax.evaluate import sampler_fn
      sample, x64, _ = sampler_fn(self.run, gen_start=self.width, stop_id=self.stop)
      self._fns["sample"] = (jax.jit(sample), x64)
    return self._fns["sample"]

  def complete(self, params, pstate, prompts: np.ndarray, copies: int, key) -> np.ndarray:
    """[len(prompts) * copies, width + completion_length] sampled rows (prompt rows repeated `copies` times)."""
    run = self.run
    rows = np.repeat(prompts, copies, axis=0)
    canvas = np.concatenate([rows, np.full((len(rows), self.cfg.rl.completion_length), run.process.mask_id,
                                           np.int32)], axis=1)
    sample, x64 = self._sampler()
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(len(rows)))
    with x64:
      tokens, _ = sample(params, keys, jax.device_put(canvas, run.batch_sharding()), pstate)
    return to_host(tokens)

  def score(self, tokens: np.ndarray, examples: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(rewards [B], scored [B, L] bool: completion positions up to and including the first end token, texts)."""
    comp = tokens[:, self.width:]
    end = np.where((comp == self.stop) | (comp == self.run.tokenizer.eos_id), 1, 0)
    first = np.where(end.any(axis=1), end.argmax(axis=1), comp.shape[1] - 1)
    scored = np.zeros(tokens.shape, bool)
    texts, out = [], np.zeros(len(tokens), np.float32)
    for i in range(len(tokens)):
      scored[i, self.width:self.width + first[i] + 1] = True
      ids = comp[i, :first[i] + 1]
      ids = ids[(ids != self.stop) & (ids != self.run.tokenizer.eos_id)]
      texts.append(self.run.tokenizer.decode(ids))
      out[i] = float(self.reward_fn(texts[-1], self.examples[int(examples[i])]["answer"]))
    return out, scored, texts

  def __call__(self, trainer, batch: dict, step: int) -> dict:
    it = (step - 1) % self.mu
    if it == 0 or self.cache is None:
      self.cache = self.rollout(trainer, batch, step)
    out = {k: v for k, v in self.cache.items() if k not in ("masks", "old")}
    out["logp_mask"] = self.cache["masks"][it]
    if "old" in self.cache:
      out["old_logp"] = self.cache["old"][it]
    return out

  def rollout(self, trainer, batch: dict, step: int) -> dict:
    cfg, run, g = self.cfg, self.run, self.group
    params = trainer.policy_params(trainer.state)
    pstate = trainer.state["process_state"]
    prompts, examples = np.asarray(batch["tokens"]), np.asarray(batch["example"])  # (the whole batch, every host)
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed ^ _ROLLOUT_KEY), step)
    tokens = self.complete(params, pstate, prompts, g, jax.random.fold_in(key, 0))
    reward, scored, _ = self.score(tokens, np.repeat(examples, g))
    adv = group_advantages(reward, g)
    host = {"tokens": tokens, "scored": scored, "reward": reward, "advantage": adv.astype(np.float32)}
    if cfg.train.objective == "wd1":
      host["weight"] = wd1_weights(adv, g).astype(np.float32)
    out = _global(run, host)
    if "masks" not in self._fns:
      self._fns["masks"] = jax.jit(lambda k, t: prompt_masks(k, t, self.width, cfg.rl.prompt_mask, self.mu))
    out["masks"] = self._fns["masks"](jax.random.fold_in(key, 1), out["tokens"])
    if cfg.train.objective == "grpo" and self.mu > 1:
      if "old" not in self._fns:  # the rollout policy's log-probabilities under each of the mu masks

        def old(p, t, masks):
          return jax.vmap(lambda m: token_logp(run.process, run.apply_fn, p, t, m))(masks)

        self._fns["old"] = jax.jit(old)
      out["old"] = self._fns["old"](params, out["tokens"], out["masks"])
    return out


def _global(run, host: dict) -> dict:
  """Arrays every host holds whole -> global arrays sharded along the batch."""
  return {k: jax.make_array_from_callback(np.shape(v), run.batch_sharding(np.ndim(v)), lambda idx, v=v: v[idx])
          for k, v in host.items()}


def check(cfg, run) -> None:
  p = run.process
  if not (hasattr(p, "mask_id") and hasattr(p, "predictions")) or p.decode_block_size(cfg) is not None:
    raise DLMError(f"train.objective={cfg.train.objective!r} uses d1's one-step log-probability estimate of masked "
                   f"diffusion; diffusion.process={p.name!r} is not supported: use diffusion.process='masked'")
  if cfg.data.mixture:
    raise DLMError("RL reads one prompt file or directory: set data.path and data.mixture=''")


def make(cfg, run, load_params) -> PostTraining:
  check(cfg, run)
  examples = read_examples(cfg.data.path)
  if cfg.data.max_documents:
    examples = examples[:cfg.data.max_documents]
  reward_fn = rewards.resolve(cfg.rl.reward)
  tokens = encode_prompts(examples, run.tokenizer, cfg.rl.prompt_length)
  d = cfg.data
  train_idx, val_idx = data_lib.split_indices(len(tokens), d.val_fraction, d.split_seed)
  group = cfg.rl.group_size
  if len(train_idx) < cfg.train.batch_size // group:
    raise DLMError(f"{len(train_idx)} training prompts are fewer than a batch needs (train.batch_size / "
                   f"rl.group_size = {cfg.train.batch_size // group}); add prompts or lower train.batch_size")
  corpus = data_lib.Corpus(tokens, train_idx, val_idx, run.tokenizer.eos_id, len(tokens),
                           {"example": np.arange(len(tokens), dtype=np.int32)})
  rollouts = Rollouts(cfg, run, examples, reward_fn)
  init = load_params(cfg.train.init_from, "train.init_from") if cfg.train.init_from else None

  def evaluate(trainer, step, params):
    """Mean reward of one completion per validation prompt (the configured sampler, eval.seed), with the EMA / merged
    parameters evaluation uses; a few decoded completions."""
    c = trainer.cfg
    idx = val_idx[:c.eval.batch_size * c.eval.max_batches] if c.eval.max_batches else val_idx
    key = jax.random.PRNGKey(c.eval.seed)
    r, texts = [], []
    shards = run.batch_shards
    for lo in range(0, len(idx), c.eval.batch_size):
      part = idx[lo:lo + c.eval.batch_size]
      pad = (-len(part)) % shards
      rows = np.concatenate([part, np.repeat(part[-1:], pad)])
      toks = rollouts.complete(params, trainer.state["process_state"], tokens[rows], 1, jax.random.fold_in(key, lo))
      rew, _, t = rollouts.score(toks, rows)
      r.extend(rew[:len(part)].tolist())
      texts.extend(t[:len(part)])
    out = {"reward": float(np.mean(r)), "num_prompts": len(r)}
    if c.train.eval_samples:
      out["samples"] = texts[:c.train.eval_samples]
    return out

  return PostTraining(objective=objective_fn(run.process, cfg.train.objective, cfg.rl.clip, cfg.rl.beta, group),
                      corpus=corpus, batch_size=cfg.train.batch_size // group, init_params=init,
                      needs_reference=cfg.rl.beta > 0, prepare=rollouts,
                      evaluate=evaluate if len(val_idx) else None)

