"""The one config system: ml_collections ConfigDicts with a fixed schema.

`default_config()` is the schema: every key that exists, with its type and default. A config file is a Python file with
`get_config()` that starts from `default_config()` and changes values; the returned dict is locked, so a typo in a file or
in a `--config.KEY=VALUE` override is an error, and ml_collections refuses values of the wrong type. `validate()` checks
ranges and cross-field rules. Every check raises `DLMError` with one line that names the key and the fix.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any, Iterable

import ml_collections

from dlm_jax.errors import DLMError

from dlm_jax.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from dlm_jax.processes import PROCESSES as _PROCESSES
from dlm_jax.samplers.common import PRECISIONS
from dlm_jax.samplers.llada import CACHES, CONFIDENCE, NOISE, REMASKING
from dlm_jax.samplers.remdm import STRATEGIES

# Names valid in a config; the process, sampler and attention names come from the modules that implement them.
PROCESSES = tuple(_PROCESSES)
SAMPLERS = tuple(dict.fromkeys(n for cls in _PROCESSES.values() for n in cls.SAMPLERS))
SCHEDULES = ("linear", "cosine", "polynomial", "loglinear")
OBJECTIVES = ("mdlm", "llada")
DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
  """Every config key with its default. Config files override these; they cannot add keys."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.num_layers = 4
  c.model.d_model = 256
  c.model.num_heads = 4
  c.model.num_kv_heads = 0  # 0 = same as num_heads (grouped-query attention when smaller)
  c.model.head_dim = 0  # 0 = d_model // num_heads
  c.model.mlp_dim = 1024  # SwiGLU hidden size
  c.model.max_seq_len = 1024  # RoPE / positional limit; data.seq_len must not exceed it
  c.model.rope_theta = 10000.0
  c.model.norm_eps = 1e-6
  c.model.time_conditioning = False  # adaLN modulation from the noise level
  c.model.init_std = 0.02
  c.model.attention = "xla"  # dlm_jax.attention implementation: "xla" (fast) or "reference" (jax.nn.dot_product_attention)

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # "" = embedded corpus (this interpreter's standard-library .py sources)
  c.data.tokenizer = "bytes"  # "bytes" or a path to a Hugging Face tokenizer.json
  c.data.eos_token = ""  # for tokenizer.json files: the end-of-document token ("" = try the usual names)
  c.data.seq_len = 256
  c.data.val_fraction = 0.01
  c.data.split_seed = 0  # which packed sequences go to validation
  c.data.shuffle_seed = 0
  c.data.segment_attention = False  # True: packed documents do not attend to each other
  c.data.max_documents = 0  # 0 = all documents (useful to cap a huge directory)

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.process = "masked"
  c.diffusion.schedule = "linear"
  c.diffusion.schedule_power = 2.0  # exponent k of the polynomial schedule alpha_t = 1 - t^k
  c.diffusion.schedule_eps = 1e-3  # eps of the log-linear schedule alpha_t = 1 - (1 - eps) t
  c.diffusion.objective = "mdlm"  # "mdlm": weight -alpha'_t/(1-alpha_t); "llada": p_mask = (1-eps) t + eps, weight 1/p_mask
  c.diffusion.t_min = 1e-3  # training draws t in [t_min, t_max] (block: the clipped interval's beta)
  c.diffusion.t_max = 1.0  # block only: the clipped interval's omega (BD3-LM); `dlm-eval --clip_search` picks one
  c.diffusion.antithetic = True
  c.diffusion.block_size = 16  # block only: tokens per block; 1 = autoregressive (exact NLL), data.seq_len = masked
  # continuous families (flow, embedding_flow, bitstream; dlm_jax/processes/<name>.py). Every family has defaults.
  c.diffusion.bound_steps = 64  # Heun steps (2 network calls each) of the ODE likelihood bound (Hutchinson divergence)
  c.diffusion.self_cond_prob = 0.5  # embedding_flow, bitstream: probability of a self-conditioned training example
  c.diffusion.schedule_update_every = 100  # embedding_flow / bitstream: loss calls between schedule refits (0 = fixed)
  c.diffusion.schedule_buffer = 4096  # embedding_flow / bitstream: FIFO of (noise level, error) pairs for the refits
  c.diffusion.flow_embed_state = False  # flow: carry x_g E in the model dimension (noise drawn in R^D, not R^V)
  c.diffusion.gumbel_mu = 4.723  # embedding_flow: initial Gumbel schedule location (LangFlow's OWT fit)
  c.diffusion.gumbel_beta = 0.852  # embedding_flow: initial Gumbel schedule scale
  c.diffusion.bits = 0  # bitstream: bits per token (0 = the smallest width that holds the vocabulary)
  c.diffusion.sigma_min = 0.002  # bitstream: EDM noise range
  c.diffusion.sigma_max = 80.0
  c.diffusion.sigma_data = 0.5  # bitstream: EDM preconditioning / loss weight constant

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 32  # global batch (sequences per optimizer step)
  c.train.grad_accum_steps = 1  # micro-batches per step; batch_size must be divisible by it
  c.train.learning_rate = 3e-4
  c.train.warmup_steps = 100
  c.train.min_lr_ratio = 0.1  # cosine decays to learning_rate * min_lr_ratio at train.steps
  c.train.weight_decay = 0.0
  c.train.grad_clip = 1.0  # global-norm clipping; 0 = off
  c.train.adam_b1 = 0.9
  c.train.adam_b2 = 0.999
  c.train.ema_decay = 0.999  # 0 = no EMA (eval and sampling then use the raw parameters)
  c.train.compute_dtype = "float32"  # "bfloat16": bf16 activations and matmuls, float32 parameters and optimizer
  c.train.seed = 0
  c.train.log_every = 10
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.eval_every = 500  # 0 = no periodic validation
  c.train.eval_samples = 2  # samples written to the log at each validation

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32
  c.eval.max_batches = 0  # 0 = the whole validation split
  c.eval.seed = 0
  c.eval.use_ema = True

  c.sampler = ml_collections.ConfigDict()
  # ancestral (MDLM), first_hitting (one position per call, exact), llada (semi-AR remasking, Fast-dLLM, caches, Prophet),
  # remdm (remasking). All in dlm_jax/samplers/. --prompt may hold <|mask:N|> spans (infilling, see README).
  c.sampler.name = ""  # "" = the process's default (masked: ancestral; block: first_hitting inside each block)
  c.sampler.steps = 128  # block diffusion: steps per block (llada uses at most one per token of the block)
  c.sampler.temperature = 1.0
  c.sampler.length = 0  # 0 = data.seq_len
  c.sampler.batch_size = 16
  c.sampler.seed = 0
  c.sampler.precision = ""  # "" = family default (embedding_flow: float64, else float32); "float64": Gumbel draws /
  # continuous state updates in float64 (64-bit JAX is turned on for the sampler)
  c.sampler.logit_shift = False  # models that predict token i at position i - 1 (Dream)
  c.sampler.stop_at_eos = False  # llada: a row that committed EOS fills the rest with EOS; block: the row ends there
  c.sampler.top_k = 0  # 0 = off; else sample only among the k most likely tokens
  c.sampler.top_p = 1.0  # nucleus sampling (1 = off): the smallest set of tokens holding probability top_p
  # llada only (dlm_jax/samplers/llada.py): semi-autoregressive blocks and remasking, Fast-dLLM parallel decoding
  c.sampler.block_length = 0  # 0 = the whole generated region is one block
  c.sampler.remasking = "low_confidence"  # or "random"
  c.sampler.confidence = "max_prob"  # or "margin", "neg_entropy"
  c.sampler.threshold = 0.0  # 0 = off; in (0, 1]: commit every position at least this confident (always >= 1)
  c.sampler.factor = 0.0  # 0 = off; > 0: Fast-dLLM factor rule
  c.sampler.cfg_scale = 0.0  # classifier-free guidance (prompt masked for the unconditional call)
  c.sampler.position_temperature = 0.0  # > 0: sample the committed positions from softmax(confidence / this)
  c.sampler.cache = ""  # "" = process default (masked: "none"; block: "prefix" = K/V of the clean blocks).
  # masked + llada: "prefix" / "dual" Fast-dLLM K/V caches, rebuilt at every block start; block: "none" or "prefix"
  c.sampler.cache_refresh = 0  # also rebuild the cache every k steps within a block (0 = only at block starts)
  c.sampler.prophet = False  # Prophet early commit: decode everything once the top-1/top-2 logit gap is large
  c.sampler.noise = "step"  # or "position": one Gumbel draw per position for the whole decode (see llada.py)
  # block only (dlm_jax/samplers/block.py): stop a row whose last entropy_window tokens have a unigram entropy
  # (nats) below entropy_stop, dropping that window (BD3-LM's variable-length rule: 4.0 over 256 tokens)
  c.sampler.entropy_stop = 0.0  # 0 = off
  c.sampler.entropy_window = 256
  # bitstream only: edm_churn's EDM churn gamma, applied where the grid's entropy-CDF fraction lies in the band
  c.sampler.churn = 0.2  # CoBit: 0.2 (LM1B), 0.13 (OWT); at most sqrt(2) - 1 (EDM's cap)
  c.sampler.churn_band_lo = 0.1  # CoBit's default entropy quantiles of the churn window
  c.sampler.churn_band_hi = 0.9
  # remdm only (dlm_jax/samplers/remdm.py)
  c.sampler.remdm_strategy = "cap"  # or "rescale", "conf"
  c.sampler.eta = 0.02  # remasking strength
  c.sampler.t_on = 1.0  # remask only for t <= t_on

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 = all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.lock()
  return c


# Keys that define the network's shape: a checkpoint can only be restored into the same values.
SHAPE_KEYS = ("model.num_layers", "model.d_model", "model.num_heads", "model.num_kv_heads", "model.head_dim",
              "model.mlp_dim", "model.time_conditioning", "data.tokenizer", "diffusion.process", "diffusion.block_size",
              "diffusion.bits")


def _flat(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def flat_items(cfg) -> dict[str, Any]:
  return _flat(cfg)


def _check_schema(cfg: ml_collections.ConfigDict, where: str) -> None:
  schema = _flat(default_config())
  got = _flat(cfg)
  for key in got:
    if key not in schema:
      raise DLMError(f"{where}: unknown config key '{key}'; valid keys are listed in dlm_jax/config.py:default_config")
  for key in schema:
    if key not in got:
      raise DLMError(f"{where}: config key '{key}' is missing; start the config from dlm_jax.config.default_config()")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a config .py file and checks it against the schema."""
  if not path:
    raise DLMError("no config given; pass --config configs/NAME.py (see configs/)")
  if not os.path.isfile(path):
    raise DLMError(f"config file '{path}' does not exist; pass --config configs/NAME.py (see configs/)")
  spec = importlib.util.spec_from_file_location("dlm_user_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except (AttributeError, KeyError) as e:  # locked ConfigDict: a key that does not exist
    raise DLMError(f"config file '{path}': {_key_error_text(e)}") from None
  except TypeError as e:
    raise DLMError(f"config file '{path}': wrong value type ({e}); use the type of the default in dlm_jax/config.py") from None
  if not hasattr(module, "get_config"):
    raise DLMError(f"config file '{path}' has no get_config() function; see configs/quickstart.py for the form")
  try:
    cfg = module.get_config()
  except (AttributeError, KeyError) as e:
    raise DLMError(f"config file '{path}': {_key_error_text(e)}") from None
  except TypeError as e:
    raise DLMError(f"config file '{path}': wrong value type ({e}); use the type of the default in dlm_jax/config.py") from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise DLMError(f"config file '{path}': get_config() must return an ml_collections.ConfigDict")
  _check_schema(cfg, f"config file '{path}'")
  cfg.lock()
  return cfg


def _key_error_text(e: Exception) -> str:
  """ml_collections' locked-dict error lists every field; keep only the offending key."""
  import re
  msg = str(e).strip("'\"").splitlines()[0]
  m = re.search(r"[Kk]ey ['\"]?([A-Za-z0-9_]+)['\"]? does not exist", msg) or re.search(r"'([A-Za-z0-9_]+)'", msg)
  key = m.group(1) if m else msg[:80]
  return f"unknown config key '{key}'; valid keys are listed in dlm_jax/config.py:default_config"


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
  """Rebuilds a config from its JSON form (as saved in checkpoints), checking it against the schema."""
  cfg = default_config()
  flat = {}

  def walk(x, prefix=""):
    for k, v in x.items():
      if isinstance(v, dict):
        walk(v, f"{prefix}{k}.")
      else:
        flat[f"{prefix}{k}"] = v

  walk(d)
  apply_overrides(cfg, flat.items(), origin="saved config")
  return cfg


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json())


def _coerce(key: str, raw: Any, current: Any, origin: str) -> Any:
  """Converts an override to the type of the key's current value, or raises a one-line error."""
  if isinstance(current, bool):
    if isinstance(raw, bool):
      return raw
    if isinstance(raw, str) and raw.lower() in ("true", "1", "yes"):
      return True
    if isinstance(raw, str) and raw.lower() in ("false", "0", "no"):
      return False
    raise DLMError(f"{origin}: {key} must be true or false, got {raw!r}")
  if isinstance(current, int):
    if isinstance(raw, bool):
      raise DLMError(f"{origin}: {key} must be an integer, got {raw!r}")
    if isinstance(raw, int):
      return raw
    try:
      text = str(raw).strip()
      return int(text, 0) if text.lower().startswith(("0x", "0o", "0b")) else int(text)
    except ValueError:
      raise DLMError(f"{origin}: {key} must be an integer, got {raw!r}") from None
  if isinstance(current, float):
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
      return float(raw)
    try:
      return float(str(raw))
    except ValueError:
      raise DLMError(f"{origin}: {key} must be a number, got {raw!r}") from None
  if isinstance(current, str):
    return str(raw)
  raise DLMError(f"{origin}: {key} cannot be overridden")


def apply_overrides(cfg: ml_collections.ConfigDict, items: Iterable[tuple[str, Any]], origin: str = "--config") -> None:
  """Sets dotted keys (`train.steps`, ...) on a locked config, converting strings to the key's type."""
  schema = _flat(default_config())
  for key, raw in items:
    if key not in schema:
      raise DLMError(f"{origin}: unknown config key '{key}'; valid keys are listed in dlm_jax/config.py:default_config")
    section, name = key.split(".", 1)
    current = cfg[section][name]
    cfg[section][name] = _coerce(key, raw, current, origin)


def parse_override_args(argv: list[str]) -> list[tuple[str, str]]:
  """Extracts `--config.KEY=VALUE` (or `--config.KEY VALUE`) pairs from argv; other arguments are returned untouched."""
  items = []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      body = a[len("--config."):]
      if "=" in body:
        k, v = body.split("=", 1)
      else:
        if i + 1 >= len(argv):
          raise DLMError(f"{a} has no value; write --config.KEY=VALUE")
        k, v = body, argv[i + 1]
        i += 1
      items.append((k, v))
    i += 1
  return items


def strip_override_args(argv: list[str]) -> list[str]:
  out, i = [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      if "=" not in a:
        i += 1
      i += 1
      continue
    out.append(a)
    i += 1
  return out


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks ranges and cross-field rules; returns the config unchanged or raises DLMError."""
  m, d, df, t, e, s, me = cfg.model, cfg.data, cfg.diffusion, cfg.train, cfg.eval, cfg.sampler, cfg.mesh

  def need(ok: bool, msg: str):
    if not ok:
      raise DLMError(msg)

  for key in ("num_layers", "d_model", "num_heads", "mlp_dim", "max_seq_len"):
    need(m[key] >= 1, f"model.{key} must be >= 1, got {m[key]}")
  need(m.num_kv_heads >= 0, f"model.num_kv_heads must be >= 0 (0 = num_heads), got {m.num_kv_heads}")
  kv = m.num_kv_heads or m.num_heads
  need(m.num_heads % kv == 0, f"model.num_heads ({m.num_heads}) must be a multiple of model.num_kv_heads ({kv})")
  need(m.head_dim > 0 or m.d_model % m.num_heads == 0,
       f"model.d_model ({m.d_model}) must be divisible by model.num_heads ({m.num_heads}), or set model.head_dim")
  hd = m.head_dim or m.d_model // m.num_heads
  need(hd % 2 == 0, f"the attention head dimension ({hd}) must be even for RoPE; change model.d_model or model.head_dim")
  need(m.rope_theta > 0, f"model.rope_theta must be > 0, got {m.rope_theta}")
  need(m.attention in ATTENTION_IMPLEMENTATIONS,
       f"model.attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {m.attention!r}")
  need(d.seq_len >= 2, f"data.seq_len must be >= 2, got {d.seq_len}")
  need(d.seq_len <= m.max_seq_len,
       f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}); lower data.seq_len or raise model.max_seq_len")
  need(0.0 <= d.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
  need(d.max_documents >= 0, f"data.max_documents must be >= 0 (0 = all), got {d.max_documents}")
  need(bool(d.tokenizer), "data.tokenizer is empty; use 'bytes' or a path to a tokenizer.json file")
  need(df.process in PROCESSES, f"diffusion.process must be one of {PROCESSES}, got {df.process!r}")
  need(df.schedule in SCHEDULES, f"diffusion.schedule must be one of {SCHEDULES}, got {df.schedule!r}")
  need(df.objective in OBJECTIVES, f"diffusion.objective must be one of {OBJECTIVES}, got {df.objective!r}")
  need(df.objective != "llada" or df.schedule == "linear",
       f"diffusion.objective='llada' is the linear schedule with p_mask = (1 - t_min) t + t_min; set "
       f"diffusion.schedule='linear' (got {df.schedule!r})")
  need(df.schedule_power > 0, f"diffusion.schedule_power must be > 0, got {df.schedule_power}")
  need(0 < df.schedule_eps < 1, f"diffusion.schedule_eps must be in (0, 1), got {df.schedule_eps}")
  need(0 < df.t_min < 1, f"diffusion.t_min must be in (0, 1), got {df.t_min}")
  need(0 < df.t_max <= 1 and df.t_min < df.t_max,
       f"the clipped noise interval (diffusion.t_min, diffusion.t_max) = ({df.t_min}, {df.t_max}) must lie in (0, 1] "
       "and be non-empty (t_min < t_max)")
  need(df.process == "block" or df.t_max == 1.0,
       f"diffusion.t_max={df.t_max} clips the noise interval, which only diffusion.process='block' does; set it to 1.0")
  need(df.block_size >= 1, f"diffusion.block_size must be >= 1, got {df.block_size}")
  if df.process == "block":
    need(d.seq_len % df.block_size == 0,
         f"diffusion.block_size ({df.block_size}) must divide data.seq_len ({d.seq_len}); change one of them")
    need((s.length or d.seq_len) % df.block_size == 0,
         f"sampler.length ({s.length or d.seq_len}) must be a multiple of diffusion.block_size ({df.block_size})")
    need(not m.time_conditioning, "diffusion.process='block' trains one sequence with a noise level per block, so the "
         "network cannot take a single t; set model.time_conditioning=False")
    need(df.objective == "mdlm" and df.schedule == "linear",
         "diffusion.process='block' uses the linear schedule with the 1/t weight (BD3-LM); leave diffusion.schedule="
         "'linear' and diffusion.objective='mdlm'")
  need(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
  need(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
  need(t.grad_accum_steps >= 1 and t.batch_size % t.grad_accum_steps == 0,
       f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum_steps ({t.grad_accum_steps})")
  need(t.learning_rate > 0, f"train.learning_rate must be > 0, got {t.learning_rate}")
  need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
  need(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
  need(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
  need(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {t.grad_clip}")
  need(0 <= t.adam_b1 < 1 and 0 <= t.adam_b2 < 1, "train.adam_b1 and train.adam_b2 must be in [0, 1)")
  need(0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
  need(t.compute_dtype in DTYPES, f"train.compute_dtype must be one of {DTYPES}, got {t.compute_dtype!r}")
  need(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
  need(t.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {t.checkpoint_every}")
  need(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
  need(t.eval_every >= 0, f"train.eval_every must be >= 0 (0 = off), got {t.eval_every}")
  need(t.eval_samples >= 0, f"train.eval_samples must be >= 0, got {t.eval_samples}")
  need(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")
  need(e.max_batches >= 0, f"eval.max_batches must be >= 0 (0 = all), got {e.max_batches}")
  family = _PROCESSES[df.process]
  need(not s.name or s.name in family.SAMPLERS, f"sampler.name={s.name!r} is not a sampler of diffusion.process="
       f"{df.process!r}; use one of {family.SAMPLERS} ('' = {family.DEFAULT_SAMPLER!r})")
  need(s.steps >= 1, f"sampler.steps must be >= 1, got {s.steps}")
  need(s.precision in ("",) + PRECISIONS, f"sampler.precision must be one of {PRECISIONS} ('' = the family's default), "
       f"got {s.precision!r}")
  need(s.noise in NOISE, f"sampler.noise must be one of {NOISE}, got {s.noise!r}")
  need(not s.cache or s.cache in CACHES, f"sampler.cache must be one of {CACHES} ('' = the process's default), got {s.cache!r}")
  need(s.cache_refresh >= 0, f"sampler.cache_refresh must be >= 0 (0 = once per block), got {s.cache_refresh}")
  need(s.position_temperature >= 0, f"sampler.position_temperature must be >= 0, got {s.position_temperature}")
  need(s.remdm_strategy in STRATEGIES, f"sampler.remdm_strategy must be one of {STRATEGIES}, got {s.remdm_strategy!r}")
  need(0 <= s.eta <= 1, f"sampler.eta must be in [0, 1], got {s.eta}")
  need(0 <= s.t_on <= 1, f"sampler.t_on must be in [0, 1], got {s.t_on}")
  need(s.top_k >= 0, f"sampler.top_k must be >= 0 (0 = off), got {s.top_k}")
  need(0 < s.top_p <= 1, f"sampler.top_p must be in (0, 1] (1 = off), got {s.top_p}")
  need(s.entropy_stop >= 0, f"sampler.entropy_stop must be >= 0 (0 = off), got {s.entropy_stop}")
  need(s.entropy_window >= 2, f"sampler.entropy_window must be >= 2, got {s.entropy_window}")
  _validate_continuous(cfg, need)
  block = df.process == "block"
  name = s.name or family.DEFAULT_SAMPLER
  if block:
    need(s.cache in ("", "none", "prefix"),
         f"sampler.cache={s.cache!r}: block diffusion caches the K/V of its clean blocks; use 'prefix' or 'none'")
    for key, off in (("cfg_scale", 0.0), ("noise", "step")):
      need(s[key] == off, f"sampler.{key} is not available inside block diffusion's blocks; drop it")
  else:
    need(s.entropy_stop == 0, "sampler.entropy_stop is a diffusion.process='block' option (variable-length "
         "generation); drop it")
  if name != "llada":
    llada_only = (("prophet", False), ("noise", "step"), ("threshold", 0.0), ("factor", 0.0), ("cfg_scale", 0.0))
    if not block:  # block diffusion's cache is its own (checked above)
      llada_only += (("cache", "none"),)
    for key, off in llada_only:
      need(s[key] in (off, ""), f"sampler.{key} is a sampler.name='llada' option; set sampler.name=llada or drop it")
    need(block or not s.stop_at_eos, "sampler.stop_at_eos needs sampler.name=llada or diffusion.process='block'")
  if name == "llada" or (block and df.block_size == 1):
    need(s.temperature >= 0, f"sampler.temperature must be >= 0 (0 = greedy), got {s.temperature}")
  else:
    need(s.temperature > 0, f"sampler.temperature must be > 0 for sampler.name={name!r}, got {s.temperature}")
  need(s.block_length >= 0, f"sampler.block_length must be >= 0 (0 = one block), got {s.block_length}")
  need(s.remasking in REMASKING, f"sampler.remasking must be one of {REMASKING}, got {s.remasking!r}")
  need(s.confidence in CONFIDENCE, f"sampler.confidence must be one of {CONFIDENCE}, got {s.confidence!r}")
  need(0 <= s.threshold <= 1, f"sampler.threshold must be in (0, 1] (0 = off), got {s.threshold}")
  need(s.factor >= 0, f"sampler.factor must be >= 0 (0 = off), got {s.factor}")
  need(not (s.threshold and s.factor), "set at most one of sampler.threshold and sampler.factor")
  need(s.cfg_scale >= 0, f"sampler.cfg_scale must be >= 0, got {s.cfg_scale}")
  need(s.length >= 0, f"sampler.length must be >= 0 (0 = data.seq_len), got {s.length}")
  need(s.length <= m.max_seq_len,
       f"sampler.length ({s.length}) exceeds model.max_seq_len ({m.max_seq_len}); lower sampler.length")
  need(s.batch_size >= 1, f"sampler.batch_size must be >= 1, got {s.batch_size}")
  for key in ("data", "fsdp", "tensor"):
    need(me[key] == -1 or me[key] >= 1, f"mesh.{key} must be -1 (fill) or >= 1, got {me[key]}")
  return cfg


def _validate_continuous(cfg, need) -> None:
  """The continuous families' keys (all have defaults, whatever the family, so they are always checked)."""
  df, s = cfg.diffusion, cfg.sampler
  for key in ("sigma_min", "sigma_max", "sigma_data", "gumbel_mu", "gumbel_beta", "self_cond_prob"):
    need(math.isfinite(df[key]), f"diffusion.{key} must be a finite number, got {df[key]}")
  need(0 < df.sigma_min < df.sigma_max, f"the bitstream noise range needs 0 < diffusion.sigma_min < diffusion.sigma_max, "
       f"got ({df.sigma_min}, {df.sigma_max})")
  need(df.sigma_data > 0, f"diffusion.sigma_data must be > 0, got {df.sigma_data}")
  need(df.gumbel_beta > 0, f"diffusion.gumbel_beta (the Gumbel schedule's scale) must be > 0, got {df.gumbel_beta}")
  need(0 <= df.self_cond_prob <= 1, f"diffusion.self_cond_prob is a probability; it must be in [0, 1], got "
       f"{df.self_cond_prob}")
  need(0 <= df.bits <= 30, f"diffusion.bits must be in [0, 30] (0 = the smallest width for the vocabulary), got {df.bits}")
  need(df.bound_steps >= 1, f"diffusion.bound_steps must be >= 1, got {df.bound_steps}")
  need(df.schedule_update_every >= 0, f"diffusion.schedule_update_every must be >= 0 (0 = fixed schedule), got "
       f"{df.schedule_update_every}")
  need(df.schedule_buffer >= 16, f"diffusion.schedule_buffer must be >= 16, got {df.schedule_buffer}")
  need(0 <= s.churn <= math.sqrt(2) - 1,
       f"sampler.churn must be in [0, sqrt(2) - 1] (EDM's cap on gamma), got {s.churn}")
  need(0 <= s.churn_band_lo <= s.churn_band_hi <= 1, f"the churn band (sampler.churn_band_lo, sampler.churn_band_hi) = "
       f"({s.churn_band_lo}, {s.churn_band_hi}) must satisfy 0 <= lo <= hi <= 1")


def load(path: str, overrides: Iterable[tuple[str, Any]] = ()) -> ml_collections.ConfigDict:
  """Config file + `--config.KEY=VALUE` overrides, validated."""
  cfg = load_config_file(path)
  apply_overrides(cfg, overrides)
  return validate(cfg)
