"""The one config system: ml_collections ConfigDicts with a fixed schema.

`default_config()` is the schema: every key that exists, with its type and default. A config file is a Python file with
`get_config()` that starts from `default_config()` and changes values; the returned dict is locked, so a typo in a file or
in a `--config.KEY=VALUE` override is an error, and ml_collections refuses values of the wrong type. `validate()` checks
ranges and cross-field rules. Every check raises `DLMError` with one line that names the key and the fix.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any, Iterable

import ml_collections

from dlm_jax import registry
from dlm_jax.errors import DLMError

OBJECTIVES = ("mdlm", "llada")
DTYPES = ("float32", "bfloat16")
# sampler.* keys every sampler shares; everything else lives in a sampler's own section sampler.<name>.*
SHARED_SAMPLER_KEYS = ("name", "steps", "temperature", "length", "batch_size", "seed")
# keys of the flat sampler section before per-sampler sections (saved configs are migrated; overrides get an error)
RENAMED = {"remdm_strategy": "strategy", "churn_band_lo": "band_lo", "churn_band_hi": "band_hi"}
FLAT_SAMPLER_KEYS = ("precision", "logit_shift", "stop_at_eos", "top_k", "top_p", "block_length", "remasking",
                     "confidence", "threshold", "factor", "cfg_scale", "position_temperature", "cache", "cache_refresh",
                     "prophet", "noise", "entropy_stop", "entropy_window", "churn", "churn_band_lo", "churn_band_hi",
                     "remdm_strategy", "eta", "t_on")


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
  # dlm_jax.attention implementation: "auto" (splash on TPU, pallas_gpu on GPU, xla on CPU), "xla", "reference"
  # (jax.nn.dot_product_attention), "splash" (TPU Pallas), "pallas_gpu" (GPU Pallas-Triton block-sparse flash)
  c.model.attention = "auto"
  # Pallas kernels' query tile (0 = the kernel's default: 128 splash, 64 pallas_gpu; splash takes the largest multiple
  # of 128 up to this that divides the length)
  c.model.attention_block_q = 0
  c.model.attention_block_kv = 0  # Pallas kernels' key tile (0 = the kernel's default)
  c.model.attention_interpret = False  # run the Pallas kernels in interpret mode (any platform; slow: for testing)
  # Options of converted checkpoints (dlm-convert sets them; each adds parameters only when on):
  c.model.vocab_size = 0  # input = output classes of the model; 0 = the family's convention (tokenizer + its mask id)
  c.model.qkv_bias = False  # biases on the q / k / v projections (Qwen2: Dream, Fast-dLLM v2)
  c.model.qk_norm = False  # per-head RMSNorm of q and k before RoPE (Qwen3: SDAR)
  c.model.tie_embeddings = False  # output head = input table transposed (needs model.vocab_size, or the same sizes)
  c.model.logit_shift = False  # the network predicts token i at position i - 1 (Dream, Fast-dLLM v2)
  # the blocks as one stacked module under jax.lax.scan (parameters get a leading "layers" axis, replicated): compile
  # time independent of depth; presets >= 350M turn it on. Checkpoints restore in either layout (converted on restore).
  c.model.scan_layers = False
  # per-block rematerialisation of the backward pass: "none" (keep every activation), "full" (recompute the block),
  # "dots_saveable" (keep matmul outputs without batch dims), "save_attention" (keep only each block's attention
  # output), "offload" (move that attention output to pinned host memory and back; needs a backend with a pinned_host
  # memory space: TPU, GPU, and XLA:CPU, where it is a copy)
  c.model.remat = "none"

  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # "" = embedded corpus (this interpreter's standard-library .py sources)
  c.data.tokenizer = "bytes"  # "bytes", a path to a Hugging Face tokenizer.json, or "none" (token ids only: a
  # converted checkpoint without tokenizer files; dlm-sample / dlm-eval / dlm-train need text and say so)
  c.data.eos_token = ""  # for tokenizer.json files: the end-of-document token ("" = try the usual names)
  c.data.eos_id = -1  # end-of-document id (-1 = the tokenizer's: data.eos_token or the usual names); a checkpoint's
  c.data.eot_id = -1  # end-of-turn id of chat models (-1 = none; LLaDA <|eot_id|>, Qwen <|im_end|>): run.tokenizer.eot_id
  c.data.pad_id = -1  # the checkpoint's padding id (-1 = the EOS id): run.tokenizer.pad_id (samplers' finished rows)
  c.data.seq_len = 256
  c.data.val_fraction = 0.01
  c.data.split_seed = 0  # which packed sequences go to validation
  c.data.shuffle_seed = 0
  c.data.segment_attention = False  # True: packed documents do not attend to each other
  c.data.max_documents = 0  # 0 = all documents (useful to cap a huge directory; a mixture caps each component)
  # Several corpora in fixed proportions instead of data.path (which must then be ""): "PATH:WEIGHT,PATH:WEIGHT,...",
  # each PATH a dlm-tokenize directory (or any data.path form), WEIGHT > 0 (relative; normalised). Draws follow a
  # deterministic even schedule (every batch has the mixture's composition), each component reshuffled per epoch from
  # data.shuffle_seed. Validation: each component's own data.val_fraction split, concatenated (unweighted).
  c.data.mixture = ""
  # The training input pipeline (grain): batches are read by data.read_threads threads, data.prefetch batches ahead;
  # data.workers > 0 reads them in that many worker processes (mp_prefetch; slower to start, for heavy batch_fn work)
  c.data.read_threads = 2
  c.data.prefetch = 4
  c.data.workers = 0

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
  c.diffusion.mask_id = -1  # masked / block: the mask id (-1 = the family's convention, the id after the tokenizer's);
  # a checkpoint's own id may lie inside model.vocab_size (LLaDA 126336 of 126464, Dream 151666 of 152064)
  c.diffusion.suppress_mask_logit = True  # masked / block: the mask class gets probability 0 when it is an output
  # class; False keeps it in the softmax as the reference code of LLaDA / Dream / Fast-dLLM v2 / SDAR does
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
  c.train.compute_dtype = "float32"  # "bfloat16": bf16 activations and matmuls (logits and loss stay float32)
  # master weights (and the EMA) in this dtype: "bfloat16" halves parameter memory; gradients are taken in it, then
  # cast to float32 for clipping, accumulation and the optimizer; the update is added in float32 and stochastically
  # rounded to bf16 (unbiased, noise from the step's key: resume = uninterrupted), as is the EMA's
  c.train.param_dtype = "float32"
  # Adam's first and second moments (mu, nu) stored in this dtype; "bfloat16": the moment update is computed in float32
  # and stochastically rounded to bf16 (nu with adam_b2 = 0.999 would otherwise never move: its step is below bf16's
  # half-ulp), reproducibly (the rounding noise comes from the optimizer's step count, so resume = uninterrupted)
  c.train.moments_dtype = "float32"
  c.train.seed = 0
  c.train.log_every = 10
  c.train.checkpoint_every = 500  # steps between saves (saves are asynchronous; the last step is always saved)
  c.train.checkpoint_minutes = 0.0  # also save when this many minutes passed since the last save (0 = off)
  c.train.keep_checkpoints = 3  # complete checkpoints kept; an older one is deleted only once a newer one is complete
  c.train.eval_every = 500  # 0 = no periodic validation
  c.train.eval_samples = 2  # samples written to the log at each validation

  # Post-training (dlm_jax/posttrain/): the objective the loop optimises. "pretrain" = the family's own loss over the
  # corpus; "sft" = supervised fine-tuning on conversations (data.path: .jsonl with "messages"), prompt clean, response
  # trained; "grpo" (diffu-GRPO, d1) / "wd1" (weighted policy optimisation): RL with verifiable rewards on prompts
  # (data.path: .jsonl with "prompt" and "answer"); "distill": a few-step student of the teacher distill.teacher
  c.train.objective = "pretrain"
  # a workdir whose newest parameters start this run (fine-tuning; its EMA weights when it has them and eval.use_ema):
  # SFT / RL start from it, RL's reference policy is it, a LoRA run keeps it frozen as the base. "" = random init.
  # Ignored once --workdir holds a checkpoint of its own (the run resumes).
  c.train.init_from = ""

  # LoRA adapters (Hu et al. 2021) on the attention / MLP projections: rank 0 = off (all parameters train). The base
  # (train.init_from) stays frozen; checkpoints hold only the adapters; `dlm-convert --merge_lora` writes merged weights.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0
  c.lora.alpha = 16.0  # the update is (alpha / rank) A B
  c.lora.targets = "q,k,v,o"  # comma list of q, k, v, o, gate, up, down

  c.sft = ml_collections.ConfigDict()
  # loss normalisation: "answer" (LLaDA: each sample's masked-token loss / its response length, EOS padding included,
  # averaged over samples), "tokens" (d1 / dllm: / the number of response tokens in the batch)
  c.sft.normalize = "answer"
  c.sft.train_on_padding = True  # the EOS padding after the response is masked and trained (LLaDA: the model learns
  # to stop); False: padding positions are neither masked nor scored (then it still never leaks into attention)

  c.rl = ml_collections.ConfigDict()
  c.rl.group_size = 6  # completions per prompt (train.batch_size = prompts x group_size)
  c.rl.iterations = 1  # mu: gradient steps on each batch of rollouts (old log-probs from the rollout policy)
  c.rl.clip = 0.5  # grpo: eps of the clipped ratio clip(rho, 1 - eps, 1 + eps)
  c.rl.beta = 0.04  # weight of the k3 KL to the reference policy (train.init_from); 0 = no reference forward
  c.rl.prompt_mask = 0.15  # d1's per-token log-probability estimate: prompt tokens masked with this probability
  c.rl.reward = "exact_match"  # a name in dlm_jax/posttrain/rewards.py, or "module:function" (a Python callable)
  c.rl.completion_length = 64  # generated tokens per completion (the sampler's canvas = prompt width + this)
  c.rl.prompt_length = 64  # prompts are left-padded to this many tokens (longer prompts are an error)

  c.distill = ml_collections.ConfigDict()
  c.distill.teacher = ""  # the teacher's workdir (its newest parameters; EMA when eval.use_ema)
  # (dlm_jax/posttrain/distill.py) the student samples in student_steps steps (its sampler.steps); each student step
  # learns what the teacher does in teacher_steps / student_steps steps of its sampler (0 = twice as many: SDTT /
  # progressive distillation's two steps per step). Families: masked (SDTT) and flow (FLM's flow map on a fixed grid).
  c.distill.student_steps = 4
  c.distill.teacher_steps = 0
  c.distill.divergence = ""  # "" = the family's default: masked "reverse_kl" (or "forward_kl"), flow "forward_kl" (or
  # "mse")

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32
  c.eval.max_batches = 0  # 0 = the whole validation split
  c.eval.seed = 0
  c.eval.use_ema = True

  c.sampler = ml_collections.ConfigDict()
  # Shared by every sampler (dlm_jax/samplers/); each sampler's own options are the section sampler.<name>.* built from
  # its Options dataclass (dlm_jax/registry.py). --prompt may hold <|mask:N|> spans (infilling, see README).
  c.sampler.name = ""  # "" = the process's default (masked: ancestral; block: first_hitting inside each block; ...)
  c.sampler.steps = 128  # block diffusion: steps per block; not read by first_hitting / threshold decoding / block size 1
  c.sampler.temperature = 1.0
  c.sampler.length = 0  # 0 = data.seq_len
  c.sampler.batch_size = 16
  c.sampler.seed = 0
  for name, spec in registry.samplers().items():
    c.sampler[name] = ml_collections.ConfigDict(spec.options.fields())
  for family, options in registry.family_options().items():
    c.sampler[family] = ml_collections.ConfigDict(options.fields())

  c.mesh = ml_collections.ConfigDict()
  # sizes within one slice (-1 = all remaining devices); see dlm_jax/sharding.py
  c.mesh.data = -1  # data parallel (the batch is split)
  c.mesh.fsdp = 1  # fully sharded data parallel (the batch and the parameters / optimizer state are split)
  c.mesh.sequence = 1  # context parallel (activations split along their length; attention gathers keys / values)
  c.mesh.tensor = 1  # tensor parallel (heads, MLP hidden units, vocabulary)
  c.mesh.dcn_data = 1  # slices, data parallel across them over DCN (multi-slice; the data axis is dcn_data x data)

  c.lock()
  return c


# Keys that define the network's shape: a checkpoint can only be restored into the same values.
SHAPE_KEYS = ("model.num_layers", "model.d_model", "model.num_heads", "model.num_kv_heads", "model.head_dim",
              "model.mlp_dim", "model.time_conditioning", "model.vocab_size", "model.qkv_bias", "model.qk_norm",
              "model.tie_embeddings", "model.logit_shift", "data.tokenizer", "diffusion.process",
              "diffusion.block_size", "diffusion.bits", "diffusion.mask_id")


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


def _sections_with(option: str) -> list[str]:
  """The sampler sections (sampler names, or a family's generation options) that have `option`."""
  sections = {**{n: s.options for n, s in registry.samplers().items()}, **registry.family_options()}
  return [n for n, cls in sections.items() if option in cls.fields()]


def unknown_key_message(key: str) -> str:
  """The error for a key that is not in the schema: a flat sampler key of earlier versions names its new key; an
  option given to a sampler that does not have it names the samplers that do."""
  parts = key.split(".")
  if len(parts) == 2 and parts[0] == "sampler" and parts[1] in FLAT_SAMPLER_KEYS:
    option = RENAMED.get(parts[1], parts[1])
    where = _sections_with(option)
    if not where:
      return f"sampler.{parts[1]} is no longer a key (no sampler has the option '{option}')"
    if len(where) == 1:
      return f"sampler.{parts[1]} is now sampler.{where[0]}.{option}"
    return (f"sampler.{parts[1]} is now an option of each sampler that has it: use sampler.NAME.{option} for the "
            f"running sampler NAME (one of {', '.join(where)})")
  if len(parts) == 3 and parts[0] == "sampler":
    where = _sections_with(parts[2])
    if where:
      return (f"sampler.{parts[1]} has no option '{parts[2]}'; it is an option of "
              + ", ".join(f"sampler.{w}" for w in where) + f" (run that sampler with sampler.name=NAME)")
  return f"unknown config key '{key}'; valid keys are listed in dlm_jax/config.py:default_config"


def _check_schema(cfg: ml_collections.ConfigDict, where: str) -> None:
  schema = _flat(default_config())
  got = _flat(cfg)
  for key in got:
    if key not in schema:
      raise DLMError(f"{where}: {unknown_key_message(key)}")
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
  return unknown_key_message(f"sampler.{key}" if key in FLAT_SAMPLER_KEYS else key)


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
  _migrate_flat_sampler_keys(flat)
  apply_overrides(cfg, flat.items(), origin="saved config")
  return cfg


def _migrate_flat_sampler_keys(flat: dict) -> None:
  """Saved configs of earlier versions have one flat sampler section: each non-default flat option moves to the
  section of the sampler (or of block diffusion's generation) that reads it; an option the saved sampler did not have
  had no effect and is dropped."""
  old = [k for k in flat if k.startswith("sampler.") and k.count(".") == 1 and k[8:] in FLAT_SAMPLER_KEYS]
  if not old:
    return
  family = flat.get("diffusion.process", "masked")
  name = flat.get("sampler.name") or registry.processes()[family].DEFAULT_SAMPLER
  schema = _flat(default_config())
  for key in old:
    value = flat.pop(key)
    option = RENAMED.get(key[8:], key[8:])
    for section in (family, name):
      target = f"sampler.{section}.{option}"
      if target in schema and value != schema[target] and value != "":
        flat[target] = value
        break


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
      raise DLMError(f"{origin}: {unknown_key_message(key)}")
    *path, name = key.split(".")
    section = cfg
    for part in path:
      section = section[part]
    section[name] = _coerce(key, raw, section[name], origin)


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
  """Checks ranges and cross-field rules; returns the config unchanged or raises DLMError. The family's own keys are
  checked by its process class (`check_config`), the sampler's by its Options class (`sampler_options`)."""
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
  remats = ("none", "full", "dots_saveable", "save_attention", "offload")  # = model.REMAT_POLICIES
  need(m.remat in remats, f"model.remat must be one of {remats}, got {m.remat!r}")
  need(m.vocab_size >= 0, f"model.vocab_size must be >= 0 (0 = the family's convention), got {m.vocab_size}")
  for key in ("eos_id", "eot_id", "pad_id"):
    need(d[key] >= -1, f"data.{key} must be >= 0, or -1 (see dlm_jax/config.py), got {d[key]}")
  need(df.mask_id >= -1, f"diffusion.mask_id must be >= 0, or -1 (the family's convention), got {df.mask_id}")
  need(d.tokenizer != "none" or m.vocab_size > 0,
       "data.tokenizer='none' (token ids only) needs model.vocab_size > 0 (the number of ids the model takes)")
  impls = registry.attention_implementations()
  need(m.attention in impls, f"model.attention must be one of {impls}, got {m.attention!r}")
  for key in ("attention_block_q", "attention_block_kv"):
    need(m[key] == 0 or (m[key] >= 8 and m[key] & (m[key] - 1) == 0),
         f"model.{key} must be 0 (the kernel's default) or a power of two >= 8, got {m[key]}")
  need(d.seq_len >= 2, f"data.seq_len must be >= 2, got {d.seq_len}")
  need(d.seq_len <= m.max_seq_len,
       f"data.seq_len ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}); lower data.seq_len or raise model.max_seq_len")
  need(0.0 <= d.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
  need(d.max_documents >= 0, f"data.max_documents must be >= 0 (0 = all), got {d.max_documents}")
  if d.mixture:
    need(d.path == "", f"data.mixture and data.path are both set (data.path={d.path!r}); a mixture names its corpora "
         "itself: set data.path=''")
    parse_mixture(d.mixture)
  need(d.read_threads >= 0, f"data.read_threads must be >= 0 (0 = read in the training thread), got {d.read_threads}")
  need(d.prefetch >= 1, f"data.prefetch must be >= 1 batch, got {d.prefetch}")
  need(d.workers >= 0, f"data.workers must be >= 0 (0 = no worker processes), got {d.workers}")
  need(bool(d.tokenizer), "data.tokenizer is empty; use 'bytes' or a path to a tokenizer.json file")
  families = registry.processes()
  need(df.process in families, f"diffusion.process must be one of {tuple(families)}, got {df.process!r}")
  family = families[df.process]
  need(m.vocab_size == 0 or "mask_id" in family.CONFIG_KEYS,
       f"model.vocab_size={m.vocab_size} sets the vocabulary of a checkpoint's own mask-token model; "
       f"diffusion.process={df.process!r} builds its own vocabulary: set model.vocab_size=0")
  defaults = default_config().diffusion
  for key in defaults:
    if key != "process" and key not in family.CONFIG_KEYS and df[key] != defaults[key]:
      users = [n for n, c in families.items() if key in c.CONFIG_KEYS]
      need(False, f"diffusion.{key}={df[key]!r} has no effect on diffusion.process={df.process!r} (a key of "
           f"{', '.join(users)}); drop it")
  family.check_config(cfg)
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
  need(t.param_dtype in DTYPES, f"train.param_dtype must be one of {DTYPES}, got {t.param_dtype!r}")
  need(t.moments_dtype in DTYPES, f"train.moments_dtype must be one of {DTYPES}, got {t.moments_dtype!r}")
  need(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
  need(t.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {t.checkpoint_every}")
  need(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
  need(t.checkpoint_minutes >= 0, f"train.checkpoint_minutes must be >= 0 (0 = no time-based saves), got "
       f"{t.checkpoint_minutes}")
  need(t.eval_every >= 0, f"train.eval_every must be >= 0 (0 = off), got {t.eval_every}")
  need(t.eval_samples >= 0, f"train.eval_samples must be >= 0, got {t.eval_samples}")
  lo, lora_targets = cfg.lora, ("q", "k", "v", "o", "gate", "up", "down")  # = lora.TARGETS
  need(lo.rank >= 0, f"lora.rank must be >= 0 (0 = off), got {lo.rank}")
  if lo.rank == 0:
    for key, value in default_config().lora.items():
      need(lo[key] == value, f"lora.{key}={lo[key]!r} has no effect with lora.rank=0 (LoRA off); set lora.rank > 0 "
           "or drop it")
  need(lo.alpha > 0, f"lora.alpha must be > 0 (the update is alpha / rank * A B), got {lo.alpha}")
  names = [x.strip() for x in lo.targets.split(",")]
  need(bool(names) and all(x in lora_targets for x in names) and len(set(names)) == len(names),
       f"lora.targets={lo.targets!r} must be a comma list of distinct names among {', '.join(lora_targets)}")
  need(lo.rank == 0 or t.objective != "pretrain", "lora.rank > 0 needs a post-training objective (train.objective="
       "sft, grpo, wd1 or distill) and train.init_from (the base); set lora.rank=0 to pretrain")
  need(lo.rank == 0 or t.init_from != "", "lora.rank > 0 adapts a trained base: set train.init_from to its workdir")
  need(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")
  need(e.max_batches >= 0, f"eval.max_batches must be >= 0 (0 = all), got {e.max_batches}")
  need(s.steps >= 1, f"sampler.steps must be >= 1, got {s.steps}")
  need(s.temperature >= 0, f"sampler.temperature must be >= 0 (0 = greedy where the sampler allows it), got "
       f"{s.temperature}")
  need(s.length >= 0, f"sampler.length must be >= 0 (0 = data.seq_len), got {s.length}")
  need(s.length <= m.max_seq_len,
       f"sampler.length ({s.length}) exceeds model.max_seq_len ({m.max_seq_len}); lower sampler.length")
  need(s.batch_size >= 1, f"sampler.batch_size must be >= 1, got {s.batch_size}")
  sampler_options(cfg)
  check_posttrain(cfg)
  for key in ("data", "fsdp", "sequence", "tensor"):
    need(me[key] == -1 or me[key] >= 1, f"mesh.{key} must be -1 (fill) or >= 1, got {me[key]}")
  need(me.dcn_data >= 1, f"mesh.dcn_data must be >= 1 (the number of slices), got {me.dcn_data}")
  need(me.sequence <= 1 or d.seq_len % me.sequence == 0,
       f"data.seq_len ({d.seq_len}) must be divisible by mesh.sequence ({me.sequence}) to split it; change either")
  return cfg


POST_OBJECTIVES = ("pretrain", "sft", "grpo", "wd1", "distill")  # = dlm_jax.posttrain.OBJECTIVES
# the post-training section each objective reads; the others must stay at their defaults
POST_SECTIONS = {"sft": ("sft",), "grpo": ("rl",), "wd1": ("rl",), "distill": ("distill",)}


def check_posttrain(cfg) -> None:
  """train.objective and the post-training sections (sft.*, rl.*, distill.*): a section the objective does not read
  must keep its defaults (an option that would be ignored is an error)."""
  t = cfg.train
  if t.objective not in POST_OBJECTIVES:
    raise DLMError(f"train.objective must be one of {POST_OBJECTIVES}, got {t.objective!r}")
  defaults = default_config()
  used = POST_SECTIONS.get(t.objective, ())
  for section in ("sft", "rl", "distill"):
    if section in used:
      continue
    for key, value in cfg[section].items():
      if value != defaults[section][key]:
        readers = [o for o, secs in POST_SECTIONS.items() if section in secs]
        raise DLMError(f"{section}.{key}={value!r} has no effect with train.objective={t.objective!r} (read by "
                       f"train.objective={' / '.join(readers)}); drop it")
  if t.objective == "pretrain" and t.init_from:
    raise DLMError("train.init_from starts a post-training run (train.objective=sft, grpo, wd1 or distill); to "
                   "continue pretraining a workdir, train in it (dlm-train --workdir W resumes)")
  r = cfg.rl
  if t.objective in ("grpo", "wd1"):
    if r.group_size < 2:
      raise DLMError(f"rl.group_size must be >= 2 (advantages are relative to the group), got {r.group_size}")
    if t.batch_size % r.group_size:
      raise DLMError(f"train.batch_size ({t.batch_size}) must be a multiple of rl.group_size ({r.group_size}): "
                     "it is prompts x completions per prompt")
    if r.iterations < 1:
      raise DLMError(f"rl.iterations must be >= 1, got {r.iterations}")
    if not 0 < r.clip < 1:
      raise DLMError(f"rl.clip must be in (0, 1), got {r.clip}")
    if r.beta < 0:
      raise DLMError(f"rl.beta must be >= 0 (0 = no KL term), got {r.beta}")
    if not 0 <= r.prompt_mask < 1:
      raise DLMError(f"rl.prompt_mask must be in [0, 1), got {r.prompt_mask}")
    if r.completion_length < 1 or r.prompt_length < 1:
      raise DLMError("rl.completion_length and rl.prompt_length must be >= 1")
    if r.prompt_length + r.completion_length > cfg.model.max_seq_len:
      raise DLMError(f"rl.prompt_length + rl.completion_length ({r.prompt_length + r.completion_length}) exceeds "
                     f"model.max_seq_len ({cfg.model.max_seq_len}); shorten them")
    if t.objective == "wd1" and r.clip != defaults.rl.clip:
      raise DLMError("rl.clip has no effect with train.objective='wd1' (it has no ratio to clip); drop it")
  ds = cfg.distill
  if t.objective == "distill":
    if ds.student_steps < 1:
      raise DLMError(f"distill.student_steps must be >= 1, got {ds.student_steps}")
    if ds.teacher_steps and (ds.teacher_steps < 2 * ds.student_steps or ds.teacher_steps % ds.student_steps):
      raise DLMError(f"distill.teacher_steps ({ds.teacher_steps}) must be a multiple of distill.student_steps "
                     f"({ds.student_steps}) and at least twice it (0 = twice it)")


def sampler_name(cfg) -> str:
  """The sampler a config selects: sampler.name, or the family's default when it is ''."""
  return cfg.sampler.name or registry.processes()[cfg.diffusion.process].DEFAULT_SAMPLER


def sampler_options(cfg):
  """(SamplerSpec, its Options, the family's generation Options or None) for the config, validated: the running
  sampler must serve the family; every option of another sampler (or of another family's generation) must be at its
  default; temperature 0 needs a sampler that decodes greedily. The Options classes check their own ranges. The shared
  sampler.steps is a budget some samplers do not read (`SamplerSpec.uses_steps`: first_hitting, threshold / factor
  decoding, autoregressive decoding); their sample records leave it out."""
  s, family = cfg.sampler, cfg.diffusion.process
  process = registry.processes()[family]
  specs = registry.samplers()
  name = sampler_name(cfg)
  served = registry.samplers_of(family)
  if name not in served:
    raise DLMError(f"sampler.name={name!r} is not a sampler of diffusion.process={family!r}; use one of {served} "
                   f"('' = {process.DEFAULT_SAMPLER!r})")
  for other, spec in specs.items():
    if other != name:
      for key, value in spec.options.fields().items():
        if s[other][key] != value:
          raise DLMError(f"{spec.key(key)} is an option of sampler.name={other!r}, but {name!r} runs; set "
                         f"sampler.name={other} or drop it")
  for fam, options in registry.family_options().items():
    if fam != family:
      for key, value in options.fields().items():
        if s[fam][key] != value:
          raise DLMError(f"sampler.{fam}.{key} is an option of diffusion.process={fam!r}'s generation, not of "
                         f"{family!r}; drop it")
  spec = specs[name]
  block_size = process.decode_block_size(cfg)
  opts = spec.options(**s[name].to_dict())
  opts.check(spec.key, family, block_size)
  fam_cls = registry.family_options().get(family)
  fam_opts = None if fam_cls is None else fam_cls(**s[family].to_dict())
  if fam_opts is not None:
    fam_opts.check(lambda k: f"sampler.{family}.{k}", family, block_size)
  if block_size == 1:  # every token is one direct draw: only the draw's options mean anything
    for key in opts.changed():
      if key not in registry.DRAW_FIELDS:
        raise DLMError(f"{spec.key(key)} has no effect at diffusion.block_size=1 (autoregressive decoding draws each "
                       "token directly); drop it")
  if s.temperature == 0 and not (spec.greedy or block_size == 1):
    raise DLMError(f"sampler.temperature=0 (greedy) is not available with sampler.name={name!r}; use a temperature "
                   "> 0 or sampler.name=llada")
  return spec, opts, fam_opts


def load(path: str, overrides: Iterable[tuple[str, Any]] = ()) -> ml_collections.ConfigDict:
  """Config file + `--config.KEY=VALUE` overrides, validated."""
  cfg = load_config_file(path)
  apply_overrides(cfg, overrides)
  return validate(cfg)


def parse_mixture(text: str) -> list[tuple[str, float]]:
  """`data.mixture` -> [(path, weight)]: comma-separated PATH:WEIGHT entries (the weight follows the last ':', so
  gs:// paths need no quoting); weights > 0, paths distinct."""
  out = []
  for entry in text.split(","):
    entry = entry.strip()
    path, sep, weight = entry.rpartition(":")
    try:
      w = float(weight) if sep and path else None
    except ValueError:
      w = None
    if w is None or not path.strip():
      raise DLMError(f"data.mixture entry {entry!r} is not PATH:WEIGHT; write e.g. "
                     "data.mixture='/data/web:0.7,gs://bucket/code:0.3'")
    if not (w > 0 and w < float("inf")):
      raise DLMError(f"data.mixture entry {entry!r}: the weight must be a positive number, got {weight}")
    out.append((path.strip(), w))
  paths = [p for p, _ in out]
  dup = next((p for p in paths if paths.count(p) > 1), None)
  if dup is not None:
    raise DLMError(f"data.mixture names {dup!r} twice; give each corpus once with its total weight")
  return out
