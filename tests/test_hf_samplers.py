"""The generation procedures of public checkpoints as samplers (issue 14): Dream's diffusion_generate (`dream`),
Fast-dLLM v2's block decoding (`fastdllm_v2`) and SDAR's (`sdar`), on hand-made logits functions whose correct output
is known exactly (per-step transfer counts and order, quotas, the first-token and threshold rules, NFE), plus the
mask-class and logit-shift switches every masked sampler now takes from the checkpoint (`SamplingNet`)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm_jax.samplers import ancestral, dream, fastdllm_v2, llada, maskgit, sdar
from dlm_jax.samplers.dream import torch_linspace, transfer_counts
from dlm_jax.samplers.sdar import quota

V = 12
M = 11  # mask id inside the vocabulary (the logits functions below give it a class of its own)
PAD = -1


def cached_from(logits_fn):
  """An exact K/V cache for any block-causal logits function: the 'cache' holds the tokens whose K/V it stands for
  (stale entries included, as in a real dual cache); a window call writes its tokens there and reads its logits."""
  def fn(window, t, start, cache):
    if cache is None or window.shape[1] == cache.shape[1]:
      return logits_fn(window, t), window
    cache = jax.lax.dynamic_update_slice_in_dim(cache, window, start, 1)
    return jax.lax.dynamic_slice_in_dim(logits_fn(cache, t), start, window.shape[1], 1), cache
  return fn


def counting_model(block_size=None, base=1.0, slope=0.25):
  """Position p predicts the token n mod 10, n = the masked positions in p's block (the whole row without blocks), with
  confidence rising with p (logit base + slope p): the committed token tells at which step (after how many commits) a
  position was decoded."""
  def fn(tokens, t):
    del t
    b, length = tokens.shape
    masked = (tokens == M).astype(jnp.int32)
    if block_size is None:
      n = jnp.broadcast_to(jnp.sum(masked, axis=1, keepdims=True), (b, length))
    else:
      n = jnp.repeat(jnp.sum(masked.reshape(b, length // block_size, block_size), axis=2), block_size, axis=1)
    peak = base + slope * jnp.arange(length, dtype=jnp.float32)[None, :, None]
    return peak * jax.nn.one_hot(n % 10, V)
  return fn


def ar_model(tokens, t):
  """Causal (hence block-causal): position i predicts token i + 1 = tokens[i] + 1 (mod 10) with probability
  e^4 / (e^4 + 11) ~ 0.83; unsure (uniform) after a mask or PAD."""
  del t
  known = (tokens >= 0) & (tokens < 10)
  return jnp.where(known[..., None], 4.0 * jax.nn.one_hot((tokens + 1) % 10, V), 0.0)


def run(sampler, fn, canvas, **kw):
  out, stats = jax.jit(lambda k, c: sampler(fn, k, c, **kw))(jax.random.PRNGKey(0), jnp.asarray(canvas, jnp.int32))
  return np.asarray(out), jax.tree.map(np.asarray, stats)


# --- Dream ---------------------------------------------------------------------------------------------------------


def test_dream_time_grid_is_torch_linspace():
  np.testing.assert_array_equal(torch_linspace(1.0, 1e-3, 5), np.array([1.0, 0.75025, 0.5005, 0.25075, 0.001],
                                                                        np.float32))
  assert torch_linspace(1.0, 1e-3, 5).dtype == np.float32
  # int(n (1 - s / t)) of the masks left, all of them on the last step
  assert transfer_counts(16, 4, 1e-3) == [3, 4, 4, 5]
  assert transfer_counts(10, 3, 1e-3) == [3, 3, 4]
  assert transfer_counts(5, 8, 1e-3) == [0, 0, 0, 0, 1, 1, 1, 2]  # 5 (1 - 0.5005 / 0.625375) = 0.998


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_dream_confidence_algorithms_commit_counts_and_order(alg):
  """Greedy: step i commits transfer_counts[i] positions, the most confident (rightmost) first."""
  n, steps = 16, 4
  canvas = np.array([[1, 2] + [M] * n])
  out, stats = run(dream, counting_model(), canvas, mask_id=M, steps=steps, alg=alg, temperature=0.0)
  counts = transfer_counts(n, steps, 1e-3)
  np.testing.assert_array_equal(stats["committed"][0], counts)
  assert int(stats["nfe"]) == steps
  expected, left, end = [], n, 2 + n
  for k in counts:  # the k rightmost still-masked positions get the number of masks at that step
    expected = [left % 10] * k + expected
    left -= k
  np.testing.assert_array_equal(out[0], [1, 2] + expected)


def test_dream_origin_and_alg_temp():
  canvas = np.full((3, 12), M).astype(np.int32)
  canvas[:, 0] = 1
  out, stats = run(dream, counting_model(), canvas, mask_id=M, steps=5, alg="origin", temperature=1.0)
  assert np.all(out != M) and np.all(stats["committed"].sum(1) == 11) and int(stats["nfe"]) == 5
  out, stats = run(dream, counting_model(), canvas, mask_id=M, steps=5, alg="maskgit_plus", alg_temp=0.5,
                   temperature=0.0)
  assert np.all(out != M)
  for row in stats["committed"]:  # the counts are Dream's; only the positions are drawn
    np.testing.assert_array_equal(row, transfer_counts(11, 5, 1e-3))


def test_dream_logit_shift_and_mask_class():
  """With the shift, position i reads the logits of i - 1; with the mask class kept (suppress_mask=False, Dream's
  reference), a predicted mask leaves the position masked."""
  def fn(tokens, t):  # position i predicts i + 1 (mod 10); the last position predicts the mask id
    del t
    b, length = tokens.shape
    target = jnp.where(jnp.arange(length) == length - 1, M, (jnp.arange(length) + 1) % 10)
    return jnp.broadcast_to(5.0 * jax.nn.one_hot(target, V), (b, length, V))

  canvas = np.array([[0] + [M] * 5])
  out, _ = run(dream, fn, canvas, mask_id=M, steps=5, alg="maskgit_plus", temperature=0.0, logit_shift=True)
  np.testing.assert_array_equal(out[0], [0, 1, 2, 3, 4, 5])  # token i from position i - 1
  out, _ = run(dream, fn, canvas, mask_id=M, steps=5, alg="maskgit_plus", temperature=0.0, suppress_mask=False)
  np.testing.assert_array_equal(out[0], [0, 2, 3, 4, 5, M])
  out, _ = run(dream, fn, canvas, mask_id=M, steps=5, alg="maskgit_plus", temperature=0.0)
  assert out[0, -1] != M


def test_dream_program_does_not_grow_with_steps():
  canvas = jnp.full((2, 16), M, jnp.int32)

  def lines(steps):
    f = jax.jit(lambda k, c: dream(counting_model(), k, c, mask_id=M, steps=steps, alg="entropy"))
    return len(f.lower(jax.random.PRNGKey(0), canvas).as_text().splitlines())

  assert lines(4) == lines(64)


# --- the mask class and the logit shift in the other masked samplers ------------------------------------------------


def test_suppress_mask_is_threaded_through_the_masked_samplers():
  """A model whose best class everywhere is the mask id: with suppress_mask (the default) it is never drawn; with it
  off the reference behaviour (the draw is the mask, the position stays masked) shows."""
  def fn(tokens, t):
    del t
    return jnp.broadcast_to(30.0 * jax.nn.one_hot(M, V) + 25.0 * jax.nn.one_hot(3, V), tokens.shape + (V,))

  canvas = np.array([[1] + [M] * 6])
  for sampler, kw in ((ancestral, {"steps": 4}), (maskgit, {"steps": 4}),
                      (llada, {"steps": 6, "gen_start": 1, "temperature": 0.0})):
    kw = {"temperature": 1.0, **kw}
    out, _ = run(sampler, fn, canvas, mask_id=M, **kw)
    np.testing.assert_array_equal(out[0], [1] + [3] * 6)
    out, _ = run(sampler, fn, canvas, mask_id=M, suppress_mask=False, **kw)
    assert np.all(out[0, 1:] == M), sampler


# --- SDAR --------------------------------------------------------------------------------------------------------------


def test_sdar_quota():
  assert quota(4, 4) == [1, 1, 1, 1] and quota(8, 3) == [3, 3, 2] and quota(4, 3) == [2, 1, 1]


@pytest.mark.parametrize("strategy,temperature,expected_block", [
    # block of 4 masks, steps 3 -> quotas 2, 1, 1; the token is the block's mask count when committed
    ("sequential", 1.0, [4, 4, 2, 1]),  # left to right
    ("low_confidence_static", 1.0, [1, 2, 4, 4]),  # most confident (rightmost) first
    ("low_confidence_static", 0.0, [4, 4, 2, 1]),  # greedy: every confidence is 1, ties go left to right
])
def test_sdar_strategies_order_and_nfe(strategy, temperature, expected_block):
  bs = 4
  canvas = np.array([[5, 6, 7, 8] + [M] * 8])  # one prompt block, two generated blocks
  fn = counting_model(bs, base=8.0, slope=0.5)  # p(x0) between 1 - 5e-4 and 1 - 2e-5, rising to the right
  out, stats = run(sdar, fn, canvas, mask_id=M, block_size=bs, steps=3, strategy=strategy, temperature=temperature,
                   cached_fn=cached_from(fn))
  np.testing.assert_array_equal(out[0], [5, 6, 7, 8] + expected_block * 2)
  # prefill + per block (3 denoising steps + the store forward)
  assert int(stats["nfe"]) == 1 + 2 * (3 + 1) and int(stats["steps"]) == 6


def test_sdar_dynamic_threshold():
  """Greedy: every confidence is 1 (the T -> 0 limit, as the reference's top_k=1), so a threshold < 1 commits the whole
  block in one step; at threshold 1 nothing qualifies and the quota applies (as static)."""
  bs = 4
  canvas = np.array([[5, 6, 7, 8] + [M] * 8])
  fn = counting_model(bs)
  out, stats = run(sdar, fn, canvas, mask_id=M, block_size=bs, steps=4, temperature=0.0, threshold=0.85,
                   cached_fn=cached_from(fn))
  np.testing.assert_array_equal(out[0], [5, 6, 7, 8] + [4] * 8)
  assert int(stats["nfe"]) == 1 + 2 * 2
  out, _ = run(sdar, fn, canvas, mask_id=M, block_size=bs, steps=4, temperature=0.0, threshold=1.0,
               cached_fn=cached_from(fn))
  np.testing.assert_array_equal(out[0], [5, 6, 7, 8] + [4, 3, 2, 1] * 2)  # one per step, ties left to right
  # temperature 1 with top_k = 1 (the reference's greedy setting) gives the greedy tokens
  out_k1, _ = run(sdar, fn, canvas, mask_id=M, block_size=bs, steps=4, temperature=1.0, top_k=1, threshold=0.85,
                  cached_fn=cached_from(fn))
  np.testing.assert_array_equal(out_k1[0], [5, 6, 7, 8] + [4] * 8)


def test_sdar_prompt_tail_block_keeps_the_prompt():
  """Prompt of 3 in blocks of 4 with steps 2: the quota 2 exceeds the one mask of the prompt-tail block; the reference
  would overwrite a prompt token there, we commit the mask only. No complete prompt block: no prefill."""
  bs = 4
  canvas = np.array([[1, 2, 3, M, M, M, M, M]])
  fn = counting_model(bs)
  out, stats = run(sdar, fn, canvas, mask_id=M, block_size=bs, steps=2, strategy="low_confidence_static",
                   temperature=0.0, cached_fn=cached_from(fn))
  np.testing.assert_array_equal(out[0], [1, 2, 3, 1, 4, 4, 2, 2])  # greedy: ties left to right
  assert int(stats["nfe"]) == (1 + 1) + (2 + 1)


def test_sdar_cached_equals_uncached_and_stops():
  bs = 4
  canvas = np.array([[1, 2, 3, 4, 5] + [M] * 11, [7, 8] + [M] * 14])
  kw = dict(mask_id=M, block_size=bs, steps=4, temperature=0.0, strategy="sequential")  # one token per step
  a, sa = run(sdar, ar_model_noshift, canvas, cached_fn=cached_from(ar_model_noshift), **kw)
  b, sb = run(sdar, ar_model_noshift, canvas, **kw)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6])
  # stop id 0: a row stops after the block holding its first 0 (cut after it: PAD)
  c, sc = run(sdar, ar_model_noshift, canvas, cached_fn=cached_from(ar_model_noshift), stop_ids=(0,), **kw)
  np.testing.assert_array_equal(c[0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 0] + [PAD] * 6)
  np.testing.assert_array_equal(c[1], [7, 8, 9, 0] + [PAD] * 12)
  assert int(sc["nfe"]) < int(sa["nfe"])


def ar_model_noshift(tokens, t):
  """Position i predicts tokens[i - 1] + 1 (the README's toy): no logit shift needed; unsure after a mask."""
  left = jnp.concatenate([jnp.full_like(tokens[:, :1], M), tokens[:, :-1]], axis=1)
  return ar_model(left, t)


# --- Fast-dLLM v2 ------------------------------------------------------------------------------------------------------


def test_fastdllm_v2_threshold_rule_and_nfe():
  """ar_model's predictions have p ~ 0.83 once the token on the left is known: threshold 0.9 commits one position
  per step (the most confident), 0.5 every position whose left neighbour is known."""
  bs, sb = 4, 2
  canvas = np.array([[1, 2, 3] + [M] * 14])  # prompt tail of 3 in block 0; the canvas ends on the carried token
  kw = dict(mask_id=M, block_size=bs, small_block_size=sb, temperature=0.0, cached_fn=cached_from(ar_model))
  out, stats = run(fastdllm_v2, ar_model, canvas, threshold=0.9, **kw)
  np.testing.assert_array_equal(out[0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7])
  # block 0: 1 step; blocks 1-3: first token carried, 3 masks -> 3 steps; a finishing forward after blocks 0-3
  assert int(stats["steps"]) == 1 + 3 * 3 and int(stats["nfe"]) == 10 + 4
  out2, stats2 = run(fastdllm_v2, ar_model, canvas, threshold=0.5, **kw)
  np.testing.assert_array_equal(out2, out)
  # a sub-block [x, M] or [M, M] after a known token: the left-known mask clears 0.5, then the next one
  assert int(stats2["steps"]) <= int(stats["steps"])


def test_fastdllm_v2_first_token_from_the_clean_block():
  """A prompt that ends on a block boundary: the prefill's last logit gives the first generated token (greedy even at
  temperature > 0), then each block's last logit gives the next block's first token."""
  bs, sb = 4, 4
  canvas = np.array([[1, 2, 3, 4, 5, 6, 7, 8] + [M] * 5])
  kw = dict(mask_id=M, block_size=bs, small_block_size=sb, threshold=1.0, cached_fn=cached_from(ar_model))
  out, stats = run(fastdllm_v2, ar_model, canvas, temperature=0.0, **kw)
  np.testing.assert_array_equal(out[0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3])
  # prefill (gives 9) + 3 steps in block 2 + its finishing forward (gives 3)
  assert int(stats["nfe"]) == 1 + 3 + 1
  hot, _ = run(fastdllm_v2, ar_model, canvas, temperature=3.0, **kw)
  assert hot[0, 8] == 9 and hot[0, 12] == (hot[0, 11] + 1) % 10


def test_fastdllm_v2_caches_agree_and_stop():
  bs, sb = 4, 2
  canvas = np.array([[1, 2, 3, 4, 5] + [M] * 12, [6] + [M] * 16])
  kw = dict(mask_id=M, block_size=bs, small_block_size=sb, temperature=0.0, threshold=0.9)
  ref, sref = run(fastdllm_v2, ar_model, canvas, **kw)
  for extra in ({"cached_fn": cached_from(ar_model)},
                {"cached_fn": cached_from(ar_model), "use_block_cache": True}):
    out, st = run(fastdllm_v2, ar_model, canvas, **kw, **extra)
    np.testing.assert_array_equal(out, ref)
  np.testing.assert_array_equal(ref[1], [6, 7, 8, 9, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2])
  # stop id 0, nothing masked before it: the row ends there, PAD after
  out, st = run(fastdllm_v2, ar_model, canvas, stop_ids=(0,), cached_fn=cached_from(ar_model), **kw)
  np.testing.assert_array_equal(out[0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 0] + [PAD] * 7)
  np.testing.assert_array_equal(out[1], [6, 7, 8, 9, 0] + [PAD] * 12)
  assert int(st["nfe"]) < int(sref["nfe"])


def test_block_samplers_program_does_not_grow_with_blocks():
  bs = 4

  def lines(sampler, length, **kw):
    canvas = jnp.full((1, length), M, jnp.int32).at[:, 0].set(1)
    f = jax.jit(lambda k, c: sampler(ar_model, k, c, mask_id=M, block_size=bs, cached_fn=cached_from(ar_model),
                                     temperature=0.0, **kw))
    return len(f.lower(jax.random.PRNGKey(0), canvas).as_text().splitlines())

  assert lines(sdar, 8, steps=2) == lines(sdar, 64, steps=2)
  assert lines(fastdllm_v2, 8, small_block_size=2, use_block_cache=True) == lines(
      fastdllm_v2, 64, small_block_size=2, use_block_cache=True)


def test_new_samplers_are_registered():
  from dlm_jax import registry
  specs = registry.samplers()
  assert specs["dream"].families == ("masked",) and specs["dream"].greedy
  assert specs["sdar"].families == ("block",) and specs["fastdllm_v2"].families == ("block",)
  assert set(specs["dream"].options.fields()) >= {"alg", "eps", "alg_temp", "top_p", "top_k"}
  functools.partial(registry.samplers_of, "block")()  # importable and listed


# --- parity with the reference code on the tiny HF fixtures (tests/fixtures/hf, made by make_hf_fixtures.py) ----------

import json  # noqa: E402
import os  # noqa: E402

from conftest import REPO  # noqa: E402

FIXTURES = os.path.join(REPO, "tests", "fixtures", "hf")
MASK_FLAG = {"fast_dllm_v2": 305}  # its config.json does not name the mask id


def _records(arch):
  path = os.path.join(FIXTURES, arch, "expected.json")
  if not os.path.isfile(path):
    return []
  return [(arch, g) for g in json.load(open(path))["generations"] if g["deterministic"]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """{arch: (network, params, block size)} of every fixture converted with dlm-convert's from_hf (float32)."""
  from dlm_jax import convert
  from dlm_jax.train import load_for_inference
  out = {}

  def get(arch):
    if arch not in out:
      if not os.path.isfile(os.path.join(FIXTURES, arch, "config.json")):
        pytest.skip(f"fixture {arch} not present")
      workdir = str(tmp_path_factory.mktemp("converted") / arch)
      convert.from_hf(os.path.join(FIXTURES, arch), workdir, mask_id=MASK_FLAG.get(arch))
      cfg, run, params, _ = load_for_inference(workdir)
      out[arch] = (run.apply_fn, params, cfg.diffusion.block_size if cfg.diffusion.process == "block" else None)
    return out[arch]

  return get


def _expected(arch, g):
  z = np.load(os.path.join(FIXTURES, arch, "expected.npz"))
  return z[g["prompt_key"]], z[g["output_key"]]


def _llada_parity(net, params, g, prompt, expected):
  kw = g["kwargs"]
  name = g["name"]
  cache = "prefix" if "prefix_cache" in name else "dual" if "dual_cache" in name else None
  p = prompt.shape[1]
  canvas = np.concatenate([prompt, np.full((prompt.shape[0], kw["gen_length"]), kw["mask_id"])], axis=1)
  fn = net.cached_logits_fn(params) if cache else net.logits_fn(params)
  adaptive = "threshold" in kw or "factor" in kw
  out, stats = run(llada, fn, canvas, mask_id=kw["mask_id"], gen_start=p, block_length=kw["block_length"],
                   steps=None if adaptive else kw["steps"], threshold=kw.get("threshold"), factor=kw.get("factor"),
                   cfg_scale=kw.get("cfg_scale", 0.0), temperature=0.0, cache=cache, suppress_mask=False)
  # CFG: the reference runs the conditional and unconditional rows as one batch of 2 (one counted call per step)
  calls = 2 if kw.get("cfg_scale", 0.0) > 0 else 1
  return out, int(stats["nfe"]) // calls


def _dream_parity(net, params, g, prompt, expected):
  kw = g["kwargs"]
  pad = np.zeros(prompt.shape, bool)
  if prompt.shape[0] > 1:  # left-padded batch: row 0 starts with 13 pad ids (attention mask 0)
    pad[0, :13] = True
  canvas = np.concatenate([np.where(pad, PAD, prompt), np.full((prompt.shape[0], kw["max_new_tokens"]), 304)], 1)
  out, stats = run(dream, net.logits_fn(params), canvas, mask_id=304, steps=kw["steps"], alg=kw["alg"],
                   eps=kw["eps"], temperature=kw["temperature"], logit_shift=True, suppress_mask=False)
  full_pad = np.concatenate([pad, np.zeros((prompt.shape[0], kw["max_new_tokens"]), bool)], 1)
  return np.where(full_pad, expected, out), int(stats["nfe"])


def _fdv2_parity(net, params, g, prompt, expected):
  kw = g["kwargs"]
  bs, p = kw["block_size"], prompt.shape[1]
  batch = g["function"].endswith("batch_sample")
  if batch:  # prompts right-padded with the mask id; max_new_tokens // bs blocks after the longest prompt's block
    length = (kw["max_new_tokens"] // bs + p // bs) * bs + 1
  else:
    length = p + (kw["max_new_tokens"] // bs) * bs - p % bs + 1  # the reference's output before its stop truncation
  canvas = np.concatenate([prompt, np.full((prompt.shape[0], length - p), kw["mask_id"])], axis=1)
  out, stats = run(fastdllm_v2, net.logits_fn(params, block_size=bs), canvas, mask_id=kw["mask_id"], block_size=bs,
                   small_block_size=kw["small_block_size"], threshold=float(kw["threshold"]),
                   cached_fn=net.cached_logits_fn(params, block_size=bs), use_block_cache=kw["use_block_cache"],
                   temperature=0.0, stop_ids=(kw["stop_token"],), logit_shift=True, suppress_mask=False,
                   procedure="batch_sample" if batch else "generate")
  if batch:  # the reference sets what follows a stop to the tokenizer's pad id
    out = np.where(out == PAD, kw["tokenizer.pad_token_id"], out)
  return out[:, :expected.shape[1]], int(stats["nfe"])


def _sdar_parity(net, params, g, prompt, expected):
  kw = g["kwargs"]
  bs, p = kw["block_length"], prompt.shape[1]
  canvas = np.concatenate([prompt, np.full((1, g["total_length"] - p), kw["mask_id"])], axis=1)
  out, stats = run(sdar, net.logits_fn(params, block_size=bs), canvas, mask_id=kw["mask_id"], block_size=bs,
                   steps=kw["denoising_steps"], cached_fn=net.cached_logits_fn(params, block_size=bs),
                   strategy=kw["remasking_strategy"], threshold=kw["confidence_threshold"],
                   temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"],
                   stop_ids=tuple(kw["stopping_criteria_idx"]), suppress_mask=False)
  # the reference returns the whole canvas; we cut a stopped row after its first stop id (PAD follows)
  cut = out[0] == PAD
  return np.where(cut[None], expected, out), int(stats["nfe"])


PARITY = {"llada": _llada_parity, "dream": _dream_parity, "fast_dllm_v2": _fdv2_parity, "sdar": _sdar_parity}
# Recorded generations we deliberately do not reproduce token for token:
#  * SDAR low_confidence_static with top_k = 1: every confidence is 1, and which of the tied positions torch.topk
#    returns is its CPU kernel's implementation detail (we take the leftmost: see test_sdar_strategies_order_and_nfe);
#  * SDAR with an 11-token prompt and 2 steps: the quota 2 exceeds the single mask of the prompt-tail block and the
#    reference overwrites a prompt token there (test_sdar_reference_overwrites_the_prompt checks it; we keep it).
NOT_REPRODUCED = ("sdar_P10_steps4_low_confidence_static", "sdar_P10_steps2_low_confidence_static",
                  "sdar_P11_steps2_low_confidence")
RECORDS = [r for arch in PARITY for r in _records(arch) if not r[1]["name"].startswith(NOT_REPRODUCED)]


@pytest.mark.parametrize("arch,record", RECORDS, ids=[f"{a}-{g['name']}" for a, g in RECORDS])
def test_reference_generation_reproduced(arch, record, models):
  """Every deterministic recorded generation of the reference code, token for token with the same NFE."""
  net, params, _ = models(arch)
  prompt, expected = _expected(arch, record)
  out, nfe = PARITY[arch](net, params, record, prompt, expected)
  np.testing.assert_array_equal(out, expected, err_msg=record["name"])
  assert nfe == record["nfe"], (record["name"], nfe, record["nfe"])


def test_sdar_reference_overwrites_the_prompt(models):
  """The SDAR records with an 11-token prompt and 2 steps hold the reference's prompt-overwrite bug; ours keep the
  prompt and agree with the reference on the first block after the prompt-tail block (same tokens, both strategies
  read from the same greedy logits)."""
  for arch, g in _records("sdar"):
    if not g["name"].startswith("sdar_P11_steps2_low_confidence"):
      continue
    net, params, _ = models(arch)
    prompt, expected = _expected(arch, g)
    p = prompt.shape[1]
    assert not np.array_equal(expected[0, :p], prompt[0])  # the reference overwrote a prompt token
    out, _ = _sdar_parity(net, params, g, prompt, expected)
    np.testing.assert_array_equal(out[0, :p], prompt[0])


def test_fdv2_batch_sample_stop(models):
  """batch_sample's stop on the recorded threshold-0.9 trajectory, with 131 as the stop id: both rows commit it in the
  block at 12..15 (row 1 at 15 while 14 is still masked); each decodes the rest of the block, is cut after its first
  stop id, and no block-finishing forward follows."""
  g = next(g for _, g in _records("fast_dllm_v2") if g["name"] == "fdv2_batch_sample_thr0.9_cache0")
  net, params, _ = models("fast_dllm_v2")
  prompt, expected = _expected("fast_dllm_v2", g)
  g = {**g, "kwargs": {**g["kwargs"], "stop_token": 131}}
  out, nfe = _fdv2_parity(net, params, g, prompt, expected)
  pad = g["kwargs"]["tokenizer.pad_token_id"]
  for row, cut in ((0, 14), (1, 16)):
    np.testing.assert_array_equal(out[row, :cut], expected[row, :cut])
    assert (out[row, cut:] == pad).all()
  assert nfe < g["nfe"]
