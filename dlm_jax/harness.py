"""EleutherAI's lm-evaluation-harness over dlm_jax workdirs (`pip install -e '.[eval]'`).

    dlm-lm-eval --model dlm_jax --model_args workdir=DIR,mc_samples=128,sampler.name=llada --tasks gsm8k --batch_size 32
    dlm-eval --workdir DIR --tasks gsm8k,hellaswag [--include_path DIR] [--limit N] [--config.KEY=V ...]
    lm_eval.simple_evaluate(model=DLMJaxLM(workdir=DIR), tasks=[...])  # or model="dlm_jax" after importing this module

`dlm-lm-eval` (`cli.lm_eval_main`) is the harness's own command line with this model registered: lm-eval 0.4.13 finds models only in its
own table (no plugin discovery), so a plain `lm_eval --model dlm_jax` cannot see a model defined outside the harness.

The three request types (Nie et al. 2025, LLaDA, Appendix B.6 for the likelihood; the harness's HF model for the
tokenisation and rolling windows):
- loglikelihood(context, continuation): -`evaluate.conditional_nll`, the Monte Carlo estimate of log p(continuation |
  context) with only the continuation masked (`mc_samples` stratified copies), exact for autoregressive models.
  is_greedy: with `greedy_check=True` the configured sampler decodes the continuation's length at temperature 0 and
  the result is compared with the continuation (LLaDA's check; off by default, as LLaDA's authors advise; then False).
- loglikelihood_rolling(text): the bound over disjoint windows of model.max_seq_len - 1 tokens, each conditioned on the
  token before it (EOS before the first), as the harness's HF model does; exact NLL for AR models.
- generate_until(context, gen_kwargs): the configured sampler (`sampler.*`, overridable in model_args) on left-padded,
  length-bucketed batches of prompts with `max_gen_toks` masks after them; the text is cut at the first EOS (end of
  turn for chat templates) and at the first of the `until` strings. do_sample=False / temperature set the sampler's
  temperature.

Model args: workdir (required), batch_size (rows per forward; the harness's --batch_size), mc_samples (128),
mc_sampling (stratified (LLaDA's) / antithetic / iid draws of the masked count), max_gen_toks (256, when the task does not set it), seed (0), greedy_check (False), and any config key with a dot
(sampler.name=llada, sampler.steps=256, sampler.llada.block_length=32, mesh.data=8, ...). All devices are used: the
rows of every batch are sharded over the mesh's batch axes. The model runs as one process (world_size 1: JAX
shards inside it; lm-eval's multi-rank path is torch's).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time

import numpy as np

from dlm_jax.errors import DLMError

try:
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
except ImportError:  # pragma: no cover - the extra is not installed
  raise DLMError("the lm-evaluation-harness integration needs the eval extra: pip install -e '.[eval]'") from None

OWN_ARGS = ("workdir", "batch_size", "mc_samples", "mc_sampling", "max_gen_toks", "seed", "greedy_check")
IGNORED_ARGS = ("device", "max_batch_size")  # the harness passes these to every model; JAX places the arrays itself


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[np.ndarray, np.ndarray]:
  """(context ids, continuation ids) as the harness's HF model makes them: trailing spaces of the context move to the
  continuation, the pair is encoded whole and split after the context's own encoding."""
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole = np.asarray(tokenizer.encode(context + continuation), np.int32)
  ctx = np.asarray(tokenizer.encode(context), np.int32) if context else np.zeros((0,), np.int32)
  return whole[:len(ctx)], whole[len(ctx):]


def rolling_windows(ids: np.ndarray, limit: int, prefix: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Disjoint windows of limit - 1 tokens covering `ids`, each with the one token before it as context (`prefix`
  before the first)."""
  out, step = [], max(1, limit - 1)
  for start in range(0, len(ids), step):
    ctx = np.asarray([prefix], np.int32) if start == 0 else ids[start - 1:start]
    out.append((ctx, ids[start:start + step]))
  return out


@register_model("dlm_jax")
class DLMJaxLM(LM):
  """An lm-eval model over a dlm_jax workdir (module docstring)."""

  def __init__(self, workdir: str = "", batch_size=32, mc_samples: int = 128, max_gen_toks: int = 256, seed: int = 0,
               greedy_check: bool = False, mc_sampling: str = "stratified", **kwargs):
    super().__init__()
    from dlm_jax.train import load_for_inference
    if not workdir:
      raise DLMError("the dlm_jax model needs its workdir: --model_args workdir=DIR")
    overrides = []
    for key, value in kwargs.items():
      if key in IGNORED_ARGS:
        continue
      if "." not in key:
        raise DLMError(f"unknown dlm_jax model arg {key!r}; the args are {', '.join(OWN_ARGS)} and config keys with a "
                       "dot (sampler.name=llada, sampler.steps=64, ...)")
      overrides.append((key, str(value)))
    self.workdir = workdir
    self.batch_size = 32 if str(batch_size).startswith("auto") else int(batch_size)
    self.mc_samples, self.max_gen_toks, self.seed = int(mc_samples), int(max_gen_toks), int(seed)
    self.greedy_check = greedy_check if isinstance(greedy_check, bool) else str(greedy_check).lower() == "true"
    from dlm_jax.evaluate import check_mc_sampling
    check_mc_sampling(mc_sampling)
    self.mc_sampling = mc_sampling
    self.details = {}
    self.cfg, self.run, self.params, self.pstate = load_for_inference(workdir, overrides, need_tokenizer="lm-eval",
                                                                      details=self.details)
    self.overrides = dict(overrides)
    self.tokenizer = self.run.tokenizer
    self.chat = False
    self._batches = 0  # generation batches so far (their seeds)
    self.timing = {"model_s": 0.0, "loglikelihood_requests": 0, "rolling_requests": 0, "generate_requests": 0,
                   "generated_tokens": 0, "generate_s": 0.0, "canvas_tokens": 0, "nfe": 0}

  # --- chat templates (the harness's --apply_chat_template) ----------------------------------------------------------

  @property
  def tokenizer_name(self) -> str:
    return str(getattr(self.tokenizer, "fingerprint", self.cfg.data.tokenizer))

  def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
    if not getattr(self.tokenizer, "has_chat_template", False):
      raise DLMError(f"--apply_chat_template: the workdir's tokenizer ({self.cfg.data.tokenizer}) has no chat template "
                     "(tokenizer_config.json with chat_template beside tokenizer.json); drop --apply_chat_template")
    self.chat = True
    return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

  def chat_template(self, chat_template=False) -> str:
    return getattr(self.tokenizer, "_chat", {}).get("chat_template", "") if chat_template is not False else ""

  # --- requests ------------------------------------------------------------------------------------------------------

  CHUNK = 2048  # requests per conditional_nll call (bounds the host memory of their Monte Carlo rows)

  def _nll(self, pairs: list) -> list[tuple[float, float]]:
    from dlm_jax.evaluate import conditional_nll
    t = time.perf_counter()
    out = []
    for lo in range(0, len(pairs), self.CHUNK):
      out += conditional_nll(self.run, self.params, self.pstate, pairs[lo:lo + self.CHUNK], mc_samples=self.mc_samples,
                             batch_size=self.batch_size, seed=self.seed, sampling=self.mc_sampling, first_index=lo)
    self.timing["model_s"] += time.perf_counter() - t
    return out

  def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    pairs = [encode_pair(self.tokenizer, *r.args) for r in requests]
    for (_, cont), r in zip(pairs, requests):
      if len(cont) == 0:
        raise DLMError(f"loglikelihood request with an empty continuation after tokenisation: {r.args!r}")
    nll = self._nll(pairs)
    greedy = self._greedy(pairs) if self.greedy_check else [False] * len(pairs)
    out = []
    for r, (nats, _), g in zip(requests, nll, greedy):
      ans = (-nats, bool(g))
      self.cache_hook.add_partial("loglikelihood", r.args, ans)
      out.append(ans)
    self.timing["loglikelihood_requests"] += len(requests)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    limit = self.cfg.model.max_seq_len
    prefix = int(self.tokenizer.eos_id)
    windows, owner = [], []
    for i, r in enumerate(requests):
      ids = np.asarray(self.tokenizer.encode(r.args[0]), np.int32)
      for w in rolling_windows(ids, limit, prefix):
        windows.append(w)
        owner.append(i)
    nll = self._nll(windows) if windows else []
    totals = np.zeros(len(requests))
    for i, (nats, _) in zip(owner, nll):
      totals[i] += nats
    out = []
    for r, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", r.args, -float(total))
      out.append(-float(total))
    self.timing["rolling_requests"] += len(requests)
    return out

  def _run_for(self, gen_kwargs: dict):
    """The run with the task's sampling temperature (do_sample=False: 0)."""
    temperature = gen_kwargs.get("temperature")
    if gen_kwargs.get("do_sample") is False and temperature is None:
      temperature = 0.0
    if temperature is None or float(temperature) == float(self.cfg.sampler.temperature):
      return self.run
    from dlm_jax import config as config_lib
    cfg = config_lib.config_from_dict(self.cfg.to_dict())
    config_lib.apply_overrides(cfg, [("sampler.temperature", str(float(temperature)))], origin="gen_kwargs")
    try:
      config_lib.sampler_options(cfg)
    except DLMError as e:
      raise DLMError(f"the task asks for temperature {float(temperature)} (generation_kwargs {gen_kwargs}): {e}") from None
    return dataclasses.replace(self.run, cfg=cfg)

  def _generate(self, run, prompts: list, gen: int, stop: int) -> list[np.ndarray]:
    """Token ids generated after each prompt (up to `gen`), batched by prompt length with bucketed widths."""
    from dlm_jax.evaluate import bucket_length, generate
    limit = run.cfg.model.max_seq_len
    multiple = run.process.decode_block_size(run.cfg) or 1
    if gen + 1 > limit:
      raise DLMError(f"max_gen_toks={gen} leaves no room for a prompt in model.max_seq_len={limit}; lower max_gen_toks")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    for lo in range(0, len(order), self.batch_size):
      idx = order[lo:lo + self.batch_size]
      room = (limit - gen) // multiple * multiple if multiple > 1 else limit - gen
      chunk = [prompts[i][-room:] if room > 0 else prompts[i][:0] for i in idx]
      width = min(bucket_length(max(len(p) for p in chunk), limit - gen), room)
      length = -(-(width + gen) // multiple) * multiple
      t = time.perf_counter()
      self._batches += 1  # each batch draws from its own seed: rows of different batches get independent noise
      seed = (self.seed * 1_000_003 + self._batches) % (2 ** 31)
      tokens, stats = generate(run, self.params, self.pstate, num_samples=1, length=length, seed=seed,
                               prompts=chunk, batch_size=self.batch_size, stop_id=stop, prompt_width=width)
      self.timing["model_s"] += time.perf_counter() - t
      self.timing["generate_s"] += time.perf_counter() - t
      g0 = stats["gen_start"]
      self.timing["nfe"] += stats["nfe_total"]
      self.timing["canvas_tokens"] += (length - g0) * stats["batches"]  # positions decoded per row
      for i, row in zip(idx, tokens):
        out[i] = np.asarray(row[g0:g0 + gen])
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    tok = self.tokenizer
    stop = tok.eot_id if (self.chat and tok.eot_id is not None) else tok.eos_id
    groups = {}
    for i, r in enumerate(requests):
      context, gen_kwargs = r.args
      groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
    results = [""] * len(requests)
    for key, idx in groups.items():
      kwargs = json.loads(key)
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
      unknown = set(kwargs) - {"do_sample", "temperature"}
      if unknown:
        raise DLMError(f"generation_kwargs {sorted(unknown)} are not supported by the dlm_jax model; its sampler is "
                       "configured with sampler.* model args (sampler.name, sampler.steps, sampler.<name>.*)")
      run = self._run_for(kwargs)
      prompts = [np.asarray(tok.encode(requests[i].args[0]), np.int32) for i in idx]
      generated = self._generate(run, prompts, gen, stop)
      for i, ids in zip(idx, generated):
        ends = np.flatnonzero((ids == stop) | (ids == tok.eos_id))
        ids = ids[:ends[0]] if ends.size else ids
        self.timing["generated_tokens"] += len(ids)
        text = tok.decode(ids)
        for s in until:
          if s and s in text:
            text = text[:text.index(s)]
        results[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    self.timing["generate_requests"] += len(requests)
    return results

  def _greedy(self, pairs: list) -> list[bool]:
    """LLaDA's greedy check: the configured sampler at temperature 0 decodes len(continuation) tokens after the
    context; True where it reproduces the continuation."""
    run = self._run_for({"temperature": 0.0})
    by_len = {}
    for i, (_, cont) in enumerate(pairs):
      by_len.setdefault(len(cont), []).append(i)
    res = [False] * len(pairs)
    for n, idx in by_len.items():
      for i, ids in zip(idx, self._generate(run, [pairs[i][0] for i in idx], n, -1)):
        res[i] = bool(np.array_equal(ids[:n], pairs[i][1]))
    return res

  # --- what a published number needs --------------------------------------------------------------------------------

  def protocol(self) -> dict:
    """The settings a result depends on and the speed it was obtained at (`dlm-eval --tasks` writes it beside the
    results)."""
    import jax
    from dlm_jax.evaluate import sampler_record
    t = self.timing
    devices = jax.devices()
    return {
        "model": {"workdir": self.workdir, "process": self.cfg.diffusion.process, **self.run.process.describe(),
                  "checkpoint_step": self.details.get("step"), "weights": self.details.get("weights"),
                  "num_params": int(sum(x.size for x in jax.tree.leaves(self.params))),
                  "tokenizer": self.tokenizer_name, "overrides": self.overrides},
        "loglikelihood": {"estimator": "exact" if "exact_nll" in self.run.process.capabilities else
                          "monte_carlo_masked_count", "mc_samples": self.mc_samples, "mc_sampling": self.mc_sampling,
                          "greedy_check": self.greedy_check, "seed": self.seed},
        "sampler": {**sampler_record(self.cfg), "max_gen_toks_default": self.max_gen_toks, "chat_template": self.chat},
        "speed": {"tokens_per_forward": (t["canvas_tokens"] / t["nfe"]) if t["nfe"] else None,
                  "generated_tokens": t["generated_tokens"],
                  "generated_tokens_per_s": t["generated_tokens"] / t["generate_s"] if t["generate_s"] else None,
                  "model_seconds": round(t["model_s"], 3), "batch_size": self.batch_size,
                  "requests": {k: t[k] for k in ("loglikelihood_requests", "rolling_requests", "generate_requests")}},
        "hardware": {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
                     "devices": len(devices), "processes": jax.process_count(), "host": platform.node()},
        "software": {"jax": jax.__version__, "python": sys.version.split()[0], **_versions()},
    }


def _versions() -> dict:
  from importlib import metadata
  out = {}
  for name in ("lm_eval", "flax", "dlm_jax"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out



def evaluate_tasks(workdir: str, tasks: list[str], overrides=(), *, output: str | None = None,
                   include_path: str | None = None, num_fewshot: int | None = None, limit: float | None = None,
                   batch_size: int = 32, mc_samples: int = 128, mc_sampling: str = "stratified",
                   max_gen_toks: int = 256, seed: int = 0, greedy_check: bool = False, apply_chat_template: bool = False, log_samples: bool = False) -> dict:
  """`dlm-eval --tasks`: runs the harness on `tasks` with the dlm_jax model of `workdir` and writes results.json,
  protocol.json (and samples_TASK.jsonl with `log_samples`) to `output` (default WORKDIR/lm_eval/step_N). Returns a
  summary (output paths and each task's metrics). Local task files need no network: datasets are read offline."""
  import os
  import lm_eval
  from lm_eval.tasks import TaskManager
  from lm_eval.utils import handle_non_serializable
  from dlm_jax import storage
  if not tasks:
    raise DLMError("--tasks is empty; name one or more tasks (comma-separated)")
  for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # local json / parquet tasks never reach the hub; hub
    os.environ.setdefault(var, "0" if os.environ.get("DLM_EVAL_ONLINE") else "1")  # tasks need DLM_EVAL_ONLINE=1
  if include_path is not None and not os.path.isdir(include_path):
    raise DLMError(f"--include_path {include_path!r} is not a directory of task YAMLs")
  manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
  if manager is None or not all(t in manager.all_tasks for t in tasks):
    manager = TaskManager(include_path=include_path)
  missing = [t for t in tasks if t not in manager.all_tasks and not os.path.isfile(t)]
  if missing:
    raise DLMError(f"unknown task(s) {missing}; see `dlm-lm-eval ls tasks`, or give --include_path DIR with their YAMLs")
  lm = DLMJaxLM(workdir=workdir, batch_size=batch_size, mc_samples=mc_samples, mc_sampling=mc_sampling,
                max_gen_toks=max_gen_toks, seed=seed, greedy_check=greedy_check, **dict(overrides))
  start = time.perf_counter()
  results = lm_eval.simple_evaluate(
      model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=log_samples,
      apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
      fewshot_random_seed=seed)
  wall = time.perf_counter() - start
  if results is None:
    raise DLMError("the harness returned no results")
  protocol = lm.protocol()
  protocol["harness"] = {"lm_eval": lm_eval.__version__, "tasks": tasks, "task_versions": results.get("versions", {}),
                         "n_shot": results.get("n-shot", {}), "num_fewshot": num_fewshot, "limit": limit,
                         "apply_chat_template": apply_chat_template, "seeds": seed,
                         "include_path": include_path}
  protocol["speed"]["wall_seconds"] = round(wall, 3)
  protocol["speed"]["harness_overhead"] = round(max(0.0, wall - lm.timing["model_s"]) / wall, 4) if wall else None
  out = output or storage.join(workdir, "lm_eval", f"step_{lm.details.get('step')}")
  samples = results.pop("samples", None)
  metrics = {t: {k: v for k, v in r.items() if k not in ("name", "alias")} for t, r in results["results"].items()}
  summary = {"output": out, "results": metrics, "checkpoint_step": lm.details.get("step"),
             "harness_overhead": protocol["speed"]["harness_overhead"]}
  import jax
  if jax.process_index() != 0:  # multi-host: every process runs the same program; the first one writes
    return summary
  storage.makedirs(out)
  storage.write_text(storage.join(out, "results.json"),
                     json.dumps(results, indent=1, default=handle_non_serializable, ensure_ascii=False) + "\n")
  storage.write_text(storage.join(out, "protocol.json"), json.dumps(protocol, indent=1, default=str) + "\n")
  if samples:
    for task, docs in samples.items():
      storage.write_text(storage.join(out, f"samples_{task}.jsonl"), "".join(
          json.dumps(d, default=handle_non_serializable, ensure_ascii=False) + "\n" for d in docs))
  return summary
