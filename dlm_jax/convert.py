"""Hugging Face checkpoints in and out of dlm_jax: `dlm-convert --from_hf DIR --workdir OUT` and
`dlm-convert --workdir W --to_hf OUT`; and a LoRA run's adapters merged into its base as a workdir of its own,
`dlm-convert --merge_lora --workdir W --out OUT` (`merge_lora`, through the same parameters-only writer).

Architectures (detected from config.json's `model_type` / `architectures`):

  llada         LLaDA-8B Base / Instruct, LLaDA-1.5   model.transformer.{wte, blocks.i.*, ln_f, ff_out}   masked
  dream         Dream-v0 7B, Dream-Coder (Qwen2)      model.{embed_tokens, layers.i.*, norm}, lm_head       masked, logit shift
  fast_dllm_v2  Fast-dLLM v2 (Qwen2.5, `bd_size`)     the Qwen2 names                                       block, logit shift
  sdar          SDAR (Qwen3, `block_size`)            the Qwen2 names without biases + self_attn.q_norm / k_norm   block

Facts used (from the public modeling files, not copied): LLaDA's llama block is attn_norm -> q/k/v_proj -> RoPE
(rotate-half, float32) -> attn_out, ff_norm -> silu(ff_proj) * up_proj -> ff_out, then ln_f and the untied ff_out head
(NVlabs/Fast-dLLM llada/model/modeling_llada.py); Dream is transformers' Qwen2 (q/k/v biases, GQA, head_dim =
hidden / heads) with the logit shift applied outside the model (dream/model/generation_utils.py); Fast-dLLM v2 is
Qwen2.5 with block-causal attention of `bd_size` and the same shift; SDAR is Qwen3 (per-head RMSNorm of q and k
before RoPE, explicit head_dim; JetAstra/SDAR training/model/SDAR-*/modeling_sdar.py), no shift, `block_size`.
PyTorch linear weights are [out, in]; ours are [in, ...out] (wq [d, H, hd], wo [H, hd, d], w_gate [d, f], head [d, V]).

The workdir it writes is an ordinary one: `config.json`, an Orbax checkpoint at step 0 holding only the parameters
(dlm-train initialises the optimizer fresh and continues from it; evaluation and sampling read the parameters), and
`hf/`: every non-weight file of the source directory verbatim (config.json, tokenizer files, generation config, chat
template, modeling code) plus `hf/layout.json` (each tensor's shard, dtype and shape), so `--to_hf` writes the source
architecture's own files back: the same shards, tensor order, dtypes and index. HF -> dlm_jax -> HF is bit-identical
per tensor when the workdir stores the source dtype (`--dtype` omitted or equal to it); `--dtype bfloat16` casts every
tensor (round to nearest even) and `--to_hf` then casts back to each tensor's source dtype. Parameters a later
`dlm-train` changed are written in the source dtype as well.

Memory: safetensors files are read tensor by tensor through memory maps (our own reader of the documented format:
an 8-byte little-endian header length, a JSON header of dtype / shape / data_offsets, raw little-endian data; the
`safetensors` package cannot hand bfloat16 to numpy). Each tensor is copied (transposed, cast) from its source map
into a scratch file in our layout, and both maps are dropped; the Orbax checkpoint is then written from read-only maps
of that file one tensor at a time (`checkpoint.save_host_params`), so the host holds about one source tensor and one
converted tensor at a time (`benchmarks/convert.py` measures the peak). The scratch file is deleted before the
workdir is published. Loading a converted workdir (`train.load_for_inference`) restores every tensor straight into its
sharding on the mesh. `--to_hf` reads the checkpoint one parameter at a time and writes the shards tensor by tensor.

Bad input is one `dlm-convert: error: ...` line and nothing in OUT: everything is written into a temporary directory
next to OUT that is renamed at the end.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import tempfile
from typing import Any, Callable

import numpy as np

from dlm_jax import storage
from dlm_jax.errors import DLMError

ARCHITECTURES = ("llada", "dream", "fast_dllm_v2", "sdar")
INDEX = "model.safetensors.index.json"
LAYOUT = "layout.json"
HF_DIR = "hf"
CONVERTED_STEP = 0

# --- safetensors (the documented format), streaming ------------------------------------------------------------------

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _np_dtype(code: str):
  if code == "BF16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  if code not in _DTYPES:
    raise DLMError(f"safetensors dtype {code} is not supported")
  return np.dtype(_DTYPES[code])


def _dtype_code(dtype) -> str:
  dtype = np.dtype(dtype)
  if dtype.name == "bfloat16":
    return "BF16"
  for code, t in _DTYPES.items():
    if np.dtype(t) == dtype:
      return code
  raise DLMError(f"cannot write dtype {dtype} to safetensors")


def read_header(path: str) -> tuple[dict, int]:
  """({name: {dtype, shape, data_offsets}}, byte offset of the data) of one .safetensors file; a truncated or
  malformed file is a DLMError."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise DLMError(f"{path} is truncated (no safetensors header)")
    n = int.from_bytes(head, "little")
    if n > size - 8:
      raise DLMError(f"{path} is truncated (header of {n} bytes, file of {size})")
    try:
      header = json.loads(f.read(n))
    except ValueError:
      raise DLMError(f"{path} is not a safetensors file (unreadable header)") from None
  header.pop("__metadata__", None)
  for name, info in header.items():
    begin, end = info["data_offsets"]
    want = int(np.prod(info["shape"], dtype=np.int64)) * _np_dtype(info["dtype"]).itemsize
    if end - begin != want:
      raise DLMError(f"{path}: tensor {name} has {end - begin} bytes for shape {info['shape']} {info['dtype']}")
    if 8 + n + end > size:
      raise DLMError(f"{path} is truncated: tensor {name} ends at byte {8 + n + end}, the file has {size}")
  return header, 8 + n


def read_tensor(path: str, info: dict, base: int) -> np.ndarray:
  """One tensor as a read-only memory map of the file (nothing is read until used)."""
  begin, _ = info["data_offsets"]
  shape = tuple(info["shape"])
  return np.memmap(path, dtype=_np_dtype(info["dtype"]), mode="r", offset=base + begin, shape=shape)


def write_safetensors(path: str, tensors: list[tuple[str, tuple, Any, Callable[[], np.ndarray]]]) -> None:
  """Writes [(name, shape, dtype, make_array)] in order, calling make_array() for one tensor at a time."""
  header, offset = {}, 0
  for name, shape, dtype, _ in tensors:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _dtype_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for name, shape, dtype, make in tensors:
      a = np.ascontiguousarray(make(), dtype=dtype)
      if a.shape != tuple(shape):
        raise ValueError(f"{name}: shape {a.shape} != {shape}")
      f.write(a.reshape(-1).view(np.uint8).data)  # no bytes copy
      del a


# --- architectures ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One HF tensor and its place in our parameters: ours = hf.T.reshape(shape) when `transpose` (PyTorch [out, in]
  linear weights), else hf.reshape(shape); back: ours.reshape(hf_shape[::-1]).T, or ours.reshape(hf_shape)."""
  hf: str
  path: tuple[str, ...]
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]
  transpose: bool

  def view_ours(self, a: np.ndarray) -> np.ndarray:
    """Our layout of `a`, as a view where numpy can (a transposed [out, in] matrix reshaped on its out axis is one)."""
    return (a.T if self.transpose else a).reshape(self.shape)

  def to_ours(self, a: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(self.view_ours(a), dtype=dtype)

  def to_hf(self, a: np.ndarray, dtype) -> np.ndarray:
    a = np.asarray(a)
    a = a.reshape(self.hf_shape[::-1]).T if self.transpose else a.reshape(self.hf_shape)
    return np.ascontiguousarray(a, dtype=dtype)


def detect(hf_cfg: dict) -> str:
  """The architecture of an HF config.json, or a DLMError naming its model_type and the supported ones."""
  mt = str(hf_cfg.get("model_type", ""))
  archs = " ".join(hf_cfg.get("architectures") or [])
  low = mt.lower()
  if low == "llada" or "LLaDA" in archs:
    return "llada"
  if low == "dream" or "Dream" in archs:
    return "dream"
  if low == "sdar" or "SDAR" in archs:
    return "sdar"
  if "fast_dllm" in low or "Fast_dLLM" in archs or "FastDLLM" in archs or (low == "qwen2" and "bd_size" in hf_cfg):
    return "fast_dllm_v2"
  raise DLMError(f"config.json has model_type {mt!r} (architectures {hf_cfg.get('architectures')}); dlm-convert "
                 f"supports LLaDA (model_type 'llada'), Dream ('Dream'), Fast-dLLM v2 (Qwen2 with 'bd_size') and "
                 f"SDAR ('sdar')")


@dataclasses.dataclass(frozen=True)
class Shape:
  layers: int
  d: int
  heads: int
  kv_heads: int
  head_dim: int
  mlp: int
  vocab: int
  theta: float
  eps: float
  max_len: int
  tied: bool
  qkv_bias: bool
  qk_norm: bool


def _need(ok: bool, msg: str) -> None:
  if not ok:
    raise DLMError(msg)


def model_shape(arch: str, c: dict) -> Shape:
  """The network an HF config describes; options our Transformer does not have are one-line errors."""
  try:
    if arch == "llada":
      for key, ok in (("include_bias", False), ("include_qkv_bias", False), ("alibi", False),
                      ("attention_layer_norm", False), ("scale_logits", False), ("input_emb_norm", False),
                      ("rope", True)):
        _need(bool(c.get(key, ok)) == ok, f"LLaDA config has {key}={c.get(key)!r}; dlm-convert supports {ok}")
      _need(c.get("block_type", "llama") == "llama" and c.get("layer_norm_type", "rms") == "rms"
            and c.get("activation_type", "silu") == "silu",
            f"LLaDA config: block_type {c.get('block_type')!r} / layer_norm_type {c.get('layer_norm_type')!r} / "
            f"activation_type {c.get('activation_type')!r}; dlm-convert supports llama / rms / silu")
      _need(c.get("clip_qkv") is None, "LLaDA config sets clip_qkv; dlm-convert does not support it")
      heads = c["n_heads"]
      return Shape(c["n_layers"], c["d_model"], heads, c.get("n_kv_heads") or heads, c["d_model"] // heads,
                   c.get("mlp_hidden_size") or c["mlp_ratio"] * c["d_model"], c.get("embedding_size") or c["vocab_size"],
                   float(c["rope_theta"]), float(c["rms_norm_eps"]), int(c["max_sequence_length"]),
                   bool(c.get("weight_tying", False)), False, False)
    _need(not c.get("rope_scaling"), f"{arch} config sets rope_scaling {c.get('rope_scaling')!r}; dlm-convert "
          "supports plain RoPE only")
    _need(not c.get("use_sliding_window", False), f"{arch} config turns on use_sliding_window; not supported")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    bias = True if arch in ("dream", "fast_dllm_v2") else bool(c.get("attention_bias", False))
    return Shape(c["num_hidden_layers"], c["hidden_size"], heads, c.get("num_key_value_heads") or heads, head_dim,
                 c["intermediate_size"], c["vocab_size"], float(c.get("rope_theta", 10000.0)),
                 float(c.get("rms_norm_eps", 1e-6)), int(c.get("max_position_embeddings", 4096)),
                 bool(c.get("tie_word_embeddings", False)), bias, arch == "sdar")
  except KeyError as e:
    raise DLMError(f"{arch} config.json has no {e.args[0]!r}; is it the model's own config.json?") from None


def tensors(arch: str, s: Shape) -> list[Tensor]:
  """Every HF tensor of the architecture with its place in our parameters."""
  d, h, k, hd, f, v = s.d, s.heads, s.kv_heads, s.head_dim, s.mlp, s.vocab
  out = []

  def add(hf, path, hf_shape, shape, transpose):
    out.append(Tensor(hf, tuple(path), tuple(hf_shape), tuple(shape), transpose))

  if arch == "llada":
    p = "model.transformer."
    add(p + "wte.weight", ["embed"], (v, d), (v, d), False)
    names = {"attn_norm": "attn_norm", "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out",
             "mlp_norm": "ff_norm", "gate": "ff_proj", "up": "up_proj", "down": "ff_out"}
    block = lambda i, n: f"{p}blocks.{i}.{names[n]}.weight"
    final, head = p + "ln_f.weight", p + "ff_out.weight"
  else:
    add("model.embed_tokens.weight", ["embed"], (v, d), (v, d), False)
    names = {"attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
             "v": "self_attn.v_proj", "o": "self_attn.o_proj", "mlp_norm": "post_attention_layernorm",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    block = lambda i, n: f"model.layers.{i}.{names[n]}.weight"
    final, head = "model.norm.weight", "lm_head.weight"
  for i in range(s.layers):
    layer = f"layer_{i}"
    add(block(i, "attn_norm"), [layer, "attn_norm"], (d,), (d,), False)
    add(block(i, "q"), [layer, "wq"], (h * hd, d), (d, h, hd), True)
    add(block(i, "k"), [layer, "wk"], (k * hd, d), (d, k, hd), True)
    add(block(i, "v"), [layer, "wv"], (k * hd, d), (d, k, hd), True)
    if s.qkv_bias:
      for n, w, heads in (("q", "bq", h), ("k", "bk", k), ("v", "bv", k)):
        add(block(i, n)[:-len("weight")] + "bias", [layer, w], (heads * hd,), (heads, hd), False)
    if s.qk_norm:
      add(f"model.layers.{i}.self_attn.q_norm.weight", [layer, "q_norm"], (hd,), (hd,), False)
      add(f"model.layers.{i}.self_attn.k_norm.weight", [layer, "k_norm"], (hd,), (hd,), False)
    add(block(i, "o"), [layer, "wo"], (d, h * hd), (h, hd, d), True)
    add(block(i, "mlp_norm"), [layer, "mlp_norm"], (d,), (d,), False)
    add(block(i, "gate"), [layer, "w_gate"], (f, d), (d, f), True)
    add(block(i, "up"), [layer, "w_up"], (f, d), (d, f), True)
    add(block(i, "down"), [layer, "w_down"], (d, f), (f, d), True)
  add(final, ["final_norm"], (d,), (d,), False)
  if not s.tied:
    add(head, ["head"], (v, d), (d, v), True)
  return out


# --- the dlm_jax config of a checkpoint --------------------------------------------------------------------------------


def _first(x):
  if isinstance(x, (list, tuple)):
    return int(x[0]) if x else -1
  return -1 if x is None else int(x)


def _token_id(tokenizer_json: str | None, names) -> int:
  if tokenizer_json is None:
    return -1
  with open(tokenizer_json, encoding="utf-8") as f:
    tok = json.load(f)
  for name in names:
    for t in tok.get("added_tokens", []):
      if t.get("content") == name:
        return int(t["id"])
  return -1


MASK_DEFAULTS = {"llada": 126336, "dream": 151666, "fast_dllm_v2": 151665}  # when config.json does not say


def build_config(arch: str, hf_cfg: dict, s: Shape, tokenizer_json: str | None, generation: dict,
                 mask_id: int | None = None):
  """The dlm_jax config of a converted checkpoint (validated). The mask id: `mask_id`, else config.json's
  mask_token_id, else the tokenizer's mask token, else the family's published id (MASK_DEFAULTS)."""
  from dlm_jax import config as config_lib
  cfg = config_lib.default_config()
  m = cfg.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = s.layers, s.d, s.heads, s.kv_heads
  m.head_dim, m.mlp_dim, m.max_seq_len, m.rope_theta, m.norm_eps = s.head_dim, s.mlp, s.max_len, s.theta, s.eps
  m.vocab_size, m.qkv_bias, m.qk_norm, m.tie_embeddings = s.vocab, s.qkv_bias, s.qk_norm, s.tied
  m.logit_shift = arch in ("dream", "fast_dllm_v2")
  mask = mask_id if mask_id is not None else hf_cfg.get("mask_token_id")
  if mask is None:
    mask = _token_id(tokenizer_json, ("<|mdm_mask|>", "|<MASK>|", "<|MASK|>", "<MASK>", "<|mask|>"))
    mask = MASK_DEFAULTS.get(arch, -1) if mask < 0 else mask
  mask = int(mask)
  if not 0 <= mask < s.vocab:
    raise DLMError(f"{arch}: the mask id {mask} is outside the model's vocabulary of {s.vocab} ids; pass the "
                   "checkpoint's mask id with --mask_id")
  df = cfg.diffusion
  df.mask_id, df.suppress_mask_logit = mask, False
  if arch in ("fast_dllm_v2", "sdar"):
    df.process = "block"
    df.block_size = int(hf_cfg.get("bd_size") or hf_cfg.get("block_size") or (32 if arch == "fast_dllm_v2" else 4))
  else:
    df.objective = "llada"
  seq = min(256, s.max_len)
  cfg.data.seq_len = seq - seq % (df.block_size if df.process == "block" else 1)
  d = cfg.data
  d.tokenizer = tokenizer_json or "none"
  eos = _first(hf_cfg.get("eos_token_id"))
  if eos < 0:
    eos = _first(generation.get("eos_token_id"))
  d.eos_id = eos
  d.pad_id = _first(hf_cfg.get("pad_token_id"))
  eot = _token_id(tokenizer_json, ("<|eot_id|>", "<|im_end|>"))
  if eot < 0:
    stops = generation.get("eos_token_id")
    stops = [int(x) for x in stops] if isinstance(stops, list) else []
    eot = next((x for x in stops if x != eos), -1)
  d.eot_id = eot
  cfg.train.ema_decay = 0.0  # the checkpoint's own parameters are what evaluation and sampling use
  config_lib.validate(cfg)
  return cfg


# --- HF -> dlm_jax ---------------------------------------------------------------------------------------------------


def _load_json(path: str, what: str) -> dict:
  try:
    return json.loads(storage.read_text(path))
  except FileNotFoundError:
    raise DLMError(f"{what} {path} does not exist") from None
  except ValueError as e:
    raise DLMError(f"{what} {path} is not valid JSON ({e})") from None


def source_files(hf_dir: str) -> dict[str, str]:
  """{tensor name: shard file name}: from model.safetensors.index.json when present, else every *.safetensors."""
  index = os.path.join(hf_dir, INDEX)
  if os.path.isfile(index):
    wm = _load_json(index, "the index").get("weight_map")
    _need(isinstance(wm, dict) and wm, f"{index} has no weight_map")
    for shard in sorted(set(wm.values())):
      _need(os.path.isfile(os.path.join(hf_dir, shard)), f"{index} names the shard {shard}, which is not in {hf_dir}")
    return dict(wm)
  shards = sorted(os.path.basename(p) for p in glob.glob(os.path.join(hf_dir, "*.safetensors")))
  _need(bool(shards), f"{hf_dir} holds no *.safetensors files (dlm-convert reads safetensors, not .bin)")
  out = {}
  for shard in shards:
    header, _ = read_header(os.path.join(hf_dir, shard))
    for name in header:
      out[name] = shard
  return out


def _check_out(out: str, flag: str) -> None:
  if storage.exists(out) and (not storage.isdir(out) or storage.listdir(out)):
    raise DLMError(f"{flag} {out} already exists and is not empty; choose a new directory")


def _staging(out: str) -> str:
  """A temporary directory the output is built in: beside a local output (published by a rename), in the system's
  temporary directory for a remote one (published by an upload)."""
  if storage.is_remote(out):
    return tempfile.mkdtemp(prefix="dlm-convert-")
  parent = os.path.dirname(os.path.abspath(out)) or "."
  _need(os.path.isdir(parent), f"the parent directory of {out} does not exist")
  return tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(out)) + ".converting-", dir=parent)


def _publish(tmp: str, out: str) -> None:
  if storage.is_remote(out):  # uploaded, then the local copy goes; checkpoint records were made before the upload
    storage.copy_tree(tmp, out)
    shutil.rmtree(tmp, ignore_errors=True)
    return
  if os.path.isdir(out):
    os.rmdir(out)  # empty (checked before)
  os.replace(tmp, out)


def from_hf(hf_dir: str, workdir: str, dtype: str | None = None, mask_id: int | None = None) -> dict:
  """Converts the HF model directory `hf_dir` into the new workdir `workdir` (`mask_id`: the checkpoint's mask id
  when neither config.json nor the tokenizer names it). Returns a summary dict."""
  _need(os.path.isdir(hf_dir), f"--from_hf {hf_dir} is not a directory")
  _need(dtype in (None, "float32", "bfloat16"), f"--dtype must be float32 or bfloat16, got {dtype!r}")
  _check_out(workdir, "--workdir")
  hf_cfg = _load_json(os.path.join(hf_dir, "config.json"), "config file")
  arch = detect(hf_cfg)
  shape = model_shape(arch, hf_cfg)
  specs = tensors(arch, shape)
  where = source_files(hf_dir)
  expected = {t.hf for t in specs}
  missing = sorted(expected - set(where))
  if missing:
    raise DLMError(f"{hf_dir} has no tensor {missing[0]} (of {len(missing)} missing) that a {arch} model with this "
                   "config.json needs")
  extra = sorted(set(where) - expected)
  if extra:
    raise DLMError(f"{hf_dir} holds tensor {extra[0]} that a {arch} model with this config.json does not have")
  headers = {}
  for shard in sorted(set(where.values())):
    headers[shard] = read_header(os.path.join(hf_dir, shard))
  for t in specs:
    header, _ = headers[where[t.hf]]
    _need(t.hf in header, f"the index puts {t.hf} in {where[t.hf]}, but that file does not hold it")
    got = tuple(header[t.hf]["shape"])
    _need(got == t.hf_shape, f"{where[t.hf]}: tensor {t.hf} has shape {list(got)} but config.json implies "
          f"{list(t.hf_shape)}")
  tok = os.path.join(hf_dir, "tokenizer.json")
  tmp = _staging(workdir)
  try:
    hf_out = os.path.join(tmp, HF_DIR)
    os.makedirs(hf_out)
    for name in sorted(os.listdir(hf_dir)):
      src = os.path.join(hf_dir, name)
      if os.path.isfile(src) and not name.endswith(".safetensors") and name != INDEX:
        shutil.copy2(src, os.path.join(hf_out, name))
    final_dir = storage.resolve(workdir)
    tok_path = storage.join(final_dir, HF_DIR, "tokenizer.json") if os.path.isfile(tok) else None
    generation = {}
    if os.path.isfile(os.path.join(hf_dir, "generation_config.json")):
      generation = _load_json(os.path.join(hf_dir, "generation_config.json"), "generation config")
    cfg = build_config(arch, hf_cfg, shape, tok if tok_path else None, generation, mask_id)
    if tok_path:
      cfg.data.tokenizer = tok_path
    params: dict = {}
    layout = {"architecture": arch, "tensors": []}
    for shard, (header, _) in headers.items():  # file order, then the order inside each file
      for name in sorted(header, key=lambda n: header[n]["data_offsets"][0]):
        layout["tensors"].append({"name": name, "shard": shard, "dtype": header[name]["dtype"],
                                  "shape": header[name]["shape"]})
    spec_by_name = {t.hf: t for t in specs}
    largest = 0
    scratch = os.path.join(tmp, "scratch.bin")  # our layout, tensor after tensor; Orbax reads it back one at a time
    places, offset = [], 0
    for entry in layout["tensors"]:
      t = spec_by_name[entry["name"]]
      source = _np_dtype(entry["dtype"])
      target = source if dtype is None else _np_dtype({"float32": "F32", "bfloat16": "BF16"}[dtype])
      places.append((t, entry, target, offset))
      offset += -(-int(np.prod(t.shape, dtype=np.int64)) * target.itemsize // 64) * 64
    with open(scratch, "wb") as f:
      f.truncate(max(offset, 1))
    for t, entry, target, at in places:
      header, base = headers[entry["shard"]]
      src = read_tensor(os.path.join(hf_dir, entry["shard"]), header[t.hf], base)
      largest = max(largest, src.nbytes)
      dst = np.memmap(scratch, dtype=target, mode="r+", offset=at, shape=t.shape)
      dst[...] = t.view_ours(src)  # one strided copy (and cast) from the source map into the scratch map
      dst.flush()
      del src, dst
    for t, entry, target, at in places:
      node = params
      for key in t.path[:-1]:
        node = node.setdefault(key, {})
      node[t.path[-1]] = np.memmap(scratch, dtype=target, mode="r", offset=at, shape=t.shape)
    index_meta = {}
    if os.path.isfile(os.path.join(hf_dir, INDEX)):
      index_meta = _load_json(os.path.join(hf_dir, INDEX), "the index").get("metadata", {})
    layout["index"] = os.path.isfile(os.path.join(hf_dir, INDEX))
    layout["index_metadata"] = index_meta
    with open(os.path.join(hf_out, LAYOUT), "w") as f:
      json.dump(layout, f, indent=1)
    _save(tmp, cfg, params)
    del params
    os.remove(scratch)
    _publish(tmp, workdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"architecture": arch, "workdir": workdir, "tensors": len(specs), "process": cfg.diffusion.process,
          "tokenizer": cfg.data.tokenizer, "mask_id": cfg.diffusion.mask_id, "largest_tensor_bytes": int(largest)}


def _save(workdir: str, cfg, params: dict) -> None:
  """The parameters-only Orbax checkpoint at CONVERTED_STEP and config.json."""
  from dlm_jax import config as config_lib
  from dlm_jax.checkpoint import save_host_params
  cfg_dict = config_lib.to_dict(cfg)
  save_host_params(workdir, CONVERTED_STEP, params, cfg_dict)
  storage.write_text(storage.join(workdir, "config.json"), json.dumps(cfg_dict, indent=2))


def _param_reader(workdir: str):
  """path -> that one parameter of the workdir's latest checkpoint as a host array (read alone, so --to_hf holds one
  tensor at a time)."""
  import jax
  from dlm_jax import config as config_lib
  from dlm_jax.build import build
  from dlm_jax.checkpoint import Checkpointer
  ckpt = Checkpointer(workdir, read_only=True)
  step = ckpt.latest_step()
  _need(step is not None, f"workdir {workdir} holds no checkpoint")
  cfg = config_lib.config_from_dict(ckpt.restore_config(step))
  run = build(cfg)
  which = "ema" if cfg.eval.use_ema and cfg.train.ema_decay > 0 else "params"
  device = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])

  stacked = bool(cfg.model.get("scan_layers", False))
  last = {}  # a scanned checkpoint's stacked parameter, read once for all its layers

  def read(path):
    if stacked and path[0].startswith("layer_"):  # a scanned checkpoint: layer i of the stacked parameter
      key = ("layers",) + tuple(path[1:])
      if last.get("key") != key:
        last.clear()
        last.update(key=key, value=read(key))
      return last["value"][int(path[0][len("layer_"):])]
    leaf = run.abstract_params
    for key in path:
      leaf = leaf[key]
    tree = want = {}
    for key in path[:-1]:
      want = want.setdefault(key, {})
    want[path[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
    got = ckpt.restore_subset(step, {which: tree})[which]
    for key in path:
      got = got[key]
    return np.asarray(got)

  return read


# --- dlm_jax -> HF ---------------------------------------------------------------------------------------------------


def to_hf(workdir: str, out: str) -> dict:
  """Writes the workdir's parameters in the architecture it was converted from (`hf/layout.json`)."""
  layout_path = storage.join(workdir, HF_DIR, LAYOUT)
  _need(storage.isdir(workdir), f"--workdir {workdir} does not exist")
  _need(storage.isfile(layout_path), f"workdir {workdir} was not made by dlm-convert --from_hf (no {HF_DIR}/{LAYOUT}); "
        "--to_hf writes the Hugging Face architecture a workdir was converted from")
  _check_out(out, "--to_hf")
  layout = _load_json(layout_path, "the layout")
  hf_cfg = _load_json(storage.join(workdir, HF_DIR, "config.json"), "config file")
  arch = layout["architecture"]
  spec_by_name = {t.hf: t for t in tensors(arch, model_shape(arch, hf_cfg))}
  read = _param_reader(workdir)
  tmp = _staging(out)
  try:
    for name in storage.listdir(storage.join(workdir, HF_DIR)):
      if name != LAYOUT:
        with open(os.path.join(tmp, name), "wb") as f:
          f.write(storage.read_bytes(storage.join(workdir, HF_DIR, name)))
    shards: dict[str, list] = {}
    for entry in layout["tensors"]:
      shards.setdefault(entry["shard"], []).append(entry)
    weight_map = {}
    for shard, entries in shards.items():
      items = []
      for e in entries:
        t = spec_by_name[e["name"]]
        items.append((t.hf, tuple(e["shape"]), _np_dtype(e["dtype"]),
                      lambda t=t, e=e: t.to_hf(read(t.path), _np_dtype(e["dtype"]))))
        weight_map[t.hf] = shard
      write_safetensors(os.path.join(tmp, shard), items)
    if layout.get("index"):
      meta = dict(layout.get("index_metadata") or {})
      meta["total_size"] = sum(int(np.prod(e["shape"], dtype=np.int64)) * _np_dtype(e["dtype"]).itemsize
                               for e in layout["tensors"])
      with open(os.path.join(tmp, INDEX), "w") as f:
        json.dump({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    _publish(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"architecture": arch, "output": out, "tensors": len(weight_map), "shards": len(shards)}


# --- LoRA adapters merged into their base ----------------------------------------------------------------------------


def merge_lora(workdir: str, out: str) -> dict:
  """`dlm-convert --merge_lora --workdir W --out OUT`: the LoRA run W's adapters (its EMA when it evaluates with one)
  merged into its base (train.init_from), written as the new workdir OUT: a parameters-only checkpoint at step 0 and a
  config with LoRA and post-training off (lora.*, sft.*, rl.*, distill.* at their defaults,
  train.objective='pretrain', train.init_from=''), so OUT trains, samples, evaluates and fine-tunes like any workdir
  and no longer needs the base."""
  import jax
  from dlm_jax import config as config_lib
  from dlm_jax.checkpoint import Checkpointer
  from dlm_jax.train import load_for_inference
  _need(storage.isdir(workdir), f"--workdir {workdir} does not exist")
  ckpt = Checkpointer(workdir, read_only=True)
  step = ckpt.latest_step()
  saved = None if step is None else config_lib.config_from_dict(ckpt.restore_config(step))
  ckpt.close()
  _need(step is not None, f"workdir {workdir} holds no checkpoint; --merge_lora reads a trained LoRA run")
  _need(saved.lora.rank > 0, f"workdir {workdir} is not a LoRA run (lora.rank=0: its checkpoint holds whole "
        "parameters already); --merge_lora takes the workdir of a run trained with lora.rank > 0")
  _check_out(out, "--out")
  details: dict = {}
  cfg, _, params, _ = load_for_inference(workdir, details=details)
  base = cfg.train.init_from
  defaults = config_lib.default_config()
  for section in ("lora", "sft", "rl", "distill"):
    for key, value in defaults[section].items():
      cfg[section][key] = value
  cfg.train.objective, cfg.train.init_from = "pretrain", ""
  config_lib.validate(cfg)
  host = jax.tree.map(np.asarray, jax.device_get(params))
  del params
  tmp = _staging(out)
  try:
    _save(tmp, cfg, host)
    _publish(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"workdir": workdir, "output": out, "base": base, "step": details["step"], "weights": details["weights"],
          "rank": int(saved.lora.rank), "targets": saved.lora.targets}
