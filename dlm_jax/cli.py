"""Command-line entry points: dlm-train, dlm-eval, dlm-sample, dlm-convert, dlm-compile, dlm-tokenize, dlm-lm-eval.

  dlm-train  --config configs/NAME.py --workdir DIR [--config.KEY=VALUE ...]
             (without --config: the config saved in DIR's checkpoint, e.g. a converted checkpoint trained further)
  dlm-eval   --workdir DIR [--config.KEY=VALUE ...]          prints one JSON line with the validation bound
             [--tasks T1,T2 [--include_path DIR] [--output DIR]]   lm-evaluation-harness tasks + protocol record
             [--score_samples FILE.jsonl]   generative perplexity of samples under the AR model in DIR
             [--clip_search [--clip_widths 0.5,0.6]]   BD3-LM clipped-interval search for a block diffusion model
  dlm-sample --workdir DIR --num_samples N --output FILE.jsonl [--prompt TEXT | --prompt_file FILE]
             [--config.KEY=VALUE ...]
  dlm-convert --from_hf HF_DIR --workdir OUT [--dtype float32|bfloat16]   a Hugging Face LLaDA / Dream / Fast-dLLM v2 /
             SDAR checkpoint -> a workdir;  dlm-convert --workdir DIR --to_hf OUT   the reverse (dlm_jax/convert.py)
  dlm-compile --config C --topology v5e:4x4 [--sampler] [--find_batch] [--num_slices N] [--config.KEY=VALUE ...]
             will it fit, how fast: the train step AOT-compiled for a TPU slice on this host (dlm_jax/aot.py)
  dlm-tokenize --input PATH_OR_GLOB [--input ...] --tokenizer T --output DIR [--shards N] [--field text] [--workers N]
             text / .jsonl / .parquet files -> a pre-tokenized dataset (ArrayRecord shards) for data.path
             (dlm_jax/pretokenize.py)
  dlm-lm-eval --model dlm_jax --model_args workdir=DIR[,KEY=V ...] --tasks T ...   lm-evaluation-harness's own command
             line with the dlm_jax model registered (dlm_jax/harness.py)

User errors print one line `dlm-<cmd>: error: ...` and exit with status 2; SIGTERM during training saves a checkpoint and
exits with 143. Multi-host runs call jax.distributed.initialize when JAX_COORDINATOR_ADDRESS is set (with
JAX_NUM_PROCESSES and JAX_PROCESS_ID), or with auto-detection when DLM_DISTRIBUTED=auto; see launch/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dlm_jax import config as config_lib
from dlm_jax import storage
from dlm_jax.errors import DLMError


def _finite(obj):
  """`obj` with every non-finite float (NaN, +-inf) replaced by None: JSON has no NaN."""
  if isinstance(obj, float):
    return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  return obj


def json_line(obj) -> str:
  """One valid JSON line (strict: no bare NaN / Infinity) for what the commands print and write."""
  return json.dumps(_finite(obj), allow_nan=False)


def check_bound(res: dict, workdir: str) -> dict:
  """dlm-eval's result, or a DLMError when the likelihood bound is not a finite number."""
  bad = [k for k in ("nelbo_bits_per_token", "nelbo_nats_per_token") if k in res and not
         (isinstance(res[k], float) and abs(res[k]) < float("inf"))]
  if bad:
    raise DLMError(f"the likelihood bound of {workdir} is {res[bad[0]]} ({bad[0]}): the checkpoint's parameters or the "
                   "validation data give non-finite losses; evaluate an earlier checkpoint or check the data")
  return res


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise DLMError(f"{message}; see --help")


def _maybe_distributed():
  """Multi-host start: explicit JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (SLURM, local rehearsal),
  or DLM_DISTRIBUTED=auto to let JAX detect the cluster (Cloud TPU pods, GKE). jax.distributed.initialize also starts
  the coordination service's preemption sync manager (jax_enable_preemption_service, on by default), which takes over
  SIGTERM: the trainer's save-on-SIGTERM relies on it when there are several processes (train._Preemption)."""
  import jax
  if os.environ.get("DLM_DISTRIBUTED") == "auto":
    jax.distributed.initialize(initialization_timeout=int(os.environ.get("JAX_INIT_TIMEOUT", "1800")))
  elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"]),
        initialization_timeout=int(os.environ.get("JAX_INIT_TIMEOUT", "1800")))


def _main(prog: str, body, argv):
  argv = sys.argv[1:] if argv is None else argv
  try:
    overrides = config_lib.parse_override_args(argv)
    rest = config_lib.strip_override_args(argv)
    body(rest, overrides)
    return 0
  except DLMError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130


def _train(rest, overrides):
  p = _Parser(prog="dlm-train", description="Train a diffusion language model (resumes if --workdir has a checkpoint).")
  p.add_argument("--config", default=None, help="config file, e.g. configs/quickstart.py; omitted: the config saved "
                 "in --workdir's checkpoint (continue a run, or train a dlm-convert workdir further)")
  p.add_argument("--workdir", required=True, help="where checkpoints, metrics.jsonl and TensorBoard files go")
  p.add_argument("--no_progress", action="store_true", help="no progress bar")
  a = p.parse_args(rest)
  if a.config is None:
    from dlm_jax.train import workdir_config
    cfg = workdir_config(a.workdir, overrides)
  else:
    cfg = config_lib.load(a.config, overrides)
  _maybe_distributed()
  from dlm_jax.train import train
  try:
    train(cfg, a.workdir, progress=not a.no_progress)
  except (DLMError, KeyboardInterrupt, SystemExit):
    raise
  except Exception:
    _exit_failed_process()
    raise


def _exit_failed_process():
  """In a multi-process run, a process whose training failed with a runtime error (typically a collective whose peer
  died: a crashed host) prints the traceback and exits at once with status 1. Exiting normally would run
  jax.distributed.shutdown, which waits at a barrier for every process (up to its 5-minute shutdown timeout) that a
  dead peer never reaches. Nothing is lost: train() has already closed the checkpointer (pending saves finished) and
  the metric writer. One process: returns (the error propagates as usual)."""
  import traceback

  import jax
  if jax.process_count() == 1:
    return
  traceback.print_exc()
  print(f"dlm-train: error: process {jax.process_index()} failed; exiting without waiting for the other processes",
        file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(1)


def _eval(rest, overrides):
  p = _Parser(prog="dlm-eval", description="Likelihood bound on the validation split of a trained workdir (exact NLL "
              "for an autoregressive model), generative perplexity of a samples file, or the clipped-schedule search.")
  p.add_argument("--workdir", required=True)
  p.add_argument("--score_samples", default=None, metavar="FILE.jsonl",
                 help="score the samples dlm-sample wrote with the autoregressive model in --workdir: generative "
                 "perplexity and mean unigram entropy")
  p.add_argument("--clip_search", action="store_true",
                 help="block diffusion: the noise interval (t_min, t_max) with the lowest variance of the per-block "
                 "loss on validation batches (BD3-LM)")
  p.add_argument("--clip_widths", default="0.5,0.6,0.7,0.8,0.9", help="interval widths for --clip_search")
  p.add_argument("--tasks", default=None, metavar="T1,T2",
                 help="lm-evaluation-harness tasks (needs the eval extra): writes results.json and protocol.json "
                 "(model, checkpoint step, sampler and every key, speed, hardware, versions, seed) to --output")
  p.add_argument("--include_path", default=None, help="--tasks: a directory of task YAMLs (local tasks)")
  p.add_argument("--output", default=None, help="--tasks: output directory (default WORKDIR/lm_eval/step_N)")
  p.add_argument("--num_fewshot", type=int, default=None, help="--tasks: few-shot examples (default: the task's)")
  p.add_argument("--limit", type=float, default=None, help="--tasks: first N documents per task (or a fraction)")
  p.add_argument("--batch_size", type=int, default=32, help="--tasks: rows per forward (data parallel over devices)")
  p.add_argument("--mc_samples", type=int, default=128,
                 help="--tasks: Monte Carlo copies per loglikelihood request (LLaDA: 128; exact for AR models)")
  p.add_argument("--mc_sampling", default="stratified", choices=("stratified", "antithetic", "iid"),
                 help="--tasks: how the copies' masked counts are drawn")
  p.add_argument("--max_gen_toks", type=int, default=256, help="--tasks: generation length when a task sets none")
  p.add_argument("--seed", type=int, default=0, help="--tasks: seed of the estimates, samplers and few-shot draws")
  p.add_argument("--greedy_check", action="store_true", help="--tasks: LLaDA's is_greedy check (one decode each)")
  p.add_argument("--apply_chat_template", action="store_true", help="--tasks: render prompts with the chat template")
  p.add_argument("--log_samples", action="store_true", help="--tasks: also write each document's requests and outputs")
  a = p.parse_args(rest)
  if a.tasks is not None:
    if a.score_samples or a.clip_search:
      raise DLMError("--tasks runs the evaluation harness; give it without --score_samples / --clip_search")
    _maybe_distributed()
    from dlm_jax.harness import evaluate_tasks
    summary = evaluate_tasks(a.workdir, [t for t in a.tasks.split(",") if t.strip()], overrides, output=a.output,
                             include_path=a.include_path, num_fewshot=a.num_fewshot, limit=a.limit,
                             batch_size=a.batch_size, mc_samples=a.mc_samples, mc_sampling=a.mc_sampling,
                             max_gen_toks=a.max_gen_toks,
                             seed=a.seed, greedy_check=a.greedy_check, apply_chat_template=a.apply_chat_template,
                             log_samples=a.log_samples)
    print(json_line(summary))
    return
  if a.score_samples and a.clip_search:
    raise DLMError("give --score_samples or --clip_search, not both")
  records = _read_samples(a.score_samples) if a.score_samples else None
  try:
    widths = [float(w) for w in a.clip_widths.split(",") if w.strip()]
  except ValueError:
    raise DLMError(f"--clip_widths {a.clip_widths!r} is not a comma-separated list of numbers") from None
  _maybe_distributed()
  from dlm_jax.data import load_corpus
  from dlm_jax import evaluate
  from dlm_jax.train import load_for_inference
  cfg, run, params, pstate = load_for_inference(a.workdir, overrides, need_tokenizer="dlm-eval")
  if records is not None:
    res = evaluate.score_samples(run, params, records, batch_size=cfg.eval.batch_size, source=a.score_samples)
    res["scorer"] = a.workdir
    print(json_line(res))
    return
  corpus = load_corpus(cfg, run.tokenizer)
  if a.clip_search:
    res = evaluate.clip_search(run, params, corpus.val, batch_size=cfg.eval.batch_size,
                               max_batches=cfg.eval.max_batches, seed=cfg.eval.seed, widths=widths)
    print(json_line(res))
    return
  res = evaluate.evaluate_bound(run, params, corpus.val, pstate, batch_size=cfg.eval.batch_size,
                                max_batches=cfg.eval.max_batches, seed=cfg.eval.seed)
  res.update(process=cfg.diffusion.process, seed=cfg.eval.seed,
             num_sequences=int(min(len(corpus.val), (cfg.eval.max_batches or 10**12) * cfg.eval.batch_size)),
             **run.process.describe())
  print(json_line(check_bound(res, a.workdir)))


def _read_samples(path: str) -> list[dict]:
  if not storage.isfile(path):
    raise DLMError(f"--score_samples {path} does not exist")
  out = []
  with storage.open_file(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except ValueError:
        rec = None
      if not isinstance(rec, dict):
        raise DLMError(f"{path}:{n} is not a JSON object; give the JSON lines dlm-sample writes")
      out.append(rec)
  if not out:
    raise DLMError(f"--score_samples {path} holds no samples")
  return out


def _sample(rest, overrides):
  p = _Parser(prog="dlm-sample", description="Write samples of a trained workdir as JSON lines.")
  p.add_argument("--workdir", required=True)
  p.add_argument("--num_samples", type=int, required=True)
  p.add_argument("--output", required=True, help="FILE.jsonl; one {'tokens': [...], 'text': ...} per sample")
  p.add_argument("--prompt", default=None,
                 help="text every sample starts with; spans <|mask:N|> make it an infilling template (only the N "
                 "masks of each span are generated, the rest stays fixed)")
  p.add_argument("--prompt_file", default=None,
                 help="one prompt per line (.txt) or per {'prompt': ...} object (.jsonl); --num_samples samples each; "
                 "prompts of different lengths are batched with left padding")
  p.add_argument("--chat", action="store_true",
                 help="chat models: each prompt is a user message (or, in a .jsonl --prompt_file, {'messages': [...]}) "
                 "rendered with the checkpoint's chat template; generation stops at the end-of-turn token and 'text' "
                 "holds the reply up to it ('raw_text': everything generated)")
  p.add_argument("--show", action="store_true", help="also print every sample's text to stdout")
  a = p.parse_args(rest)
  if a.num_samples < 1:
    raise DLMError(f"--num_samples must be >= 1, got {a.num_samples}")
  out_dir = storage.parent(a.output)
  if not storage.isdir(out_dir) and not storage.is_remote(out_dir):  # (an object store has no directories)
    raise DLMError(f"the directory of --output ({out_dir}) does not exist; create it or choose another path")
  _maybe_distributed()
  import numpy as np
  from dlm_jax.evaluate import generate
  from dlm_jax.train import load_for_inference
  if a.prompt is not None and a.prompt_file is not None:
    raise DLMError("give --prompt or --prompt_file, not both")
  texts = [a.prompt] if a.prompt else None
  if a.prompt_file is not None:
    texts = _read_prompts(a.prompt_file, chat=a.chat)
  if a.chat and texts is None:
    raise DLMError("--chat needs the user's message: give --prompt or --prompt_file")
  cfg, run, params, pstate = load_for_inference(a.workdir, overrides, need_tokenizer="dlm-sample")
  from dlm_jax.evaluate import encode_prompt
  from dlm_jax.maths import PAD
  length = cfg.sampler.length or cfg.data.seq_len
  stop = None
  if a.chat:
    tok = run.tokenizer
    if not getattr(tok, "has_chat_template", False):
      raise DLMError(f"--chat: the workdir's tokenizer ({cfg.data.tokenizer}) has no chat template (tokenizer_config.json "
                     "with chat_template beside tokenizer.json); drop --chat and give the prompt text itself")
    conversations = [t if isinstance(t, list) else [{"role": "user", "content": t}] for t in texts]
    texts = [tok.apply_chat_template(c) for c in conversations]
    stop = tok.eot_id if tok.eot_id is not None else tok.eos_id
  prompts = None if texts is None else [encode_prompt(run.tokenizer, t, run.process.mask_id) for t in texts]
  tokens, stats = generate(run, params, pstate, num_samples=a.num_samples, length=length, seed=cfg.sampler.seed,
                           prompts=prompts, stop_id=stop)
  from dlm_jax.evaluate import sampler_record
  details = {**sampler_record(cfg), "process": cfg.diffusion.process, **run.process.describe(),
             "tokenizer": run.tokenizer.fingerprint}
  decoded, lines = [], []
  for i, row in enumerate(tokens):
    row = [int(x) for x in row if x != PAD]
    rec = {"tokens": row}
    if a.chat:  # the reply: the generated tokens up to the end of turn (or EOS)
      reply = row[int(len(prompts[i // a.num_samples])):]
      ends = [j for j, x in enumerate(reply) if x in (stop, run.tokenizer.eos_id)]
      rec["raw_text"] = run.tokenizer.decode(np.asarray(reply, np.int32))
      rec["reply_tokens"] = reply[:ends[0]] if ends else reply
      rec["stopped"] = bool(ends)
      decoded.append(run.tokenizer.decode(np.asarray(rec["reply_tokens"], np.int32)))
    else:
      decoded.append(run.tokenizer.decode(np.asarray(row, np.int32)))
    rec.update({"text": decoded[-1], **details})
    if texts is not None:
      rec["prompt"] = texts[i // a.num_samples]
      rec["prompt_tokens"] = int(len(prompts[i // a.num_samples]))
    if a.chat:
      rec["stop_id"] = stop
    lines.append(json_line(rec) + "\n")
  storage.write_text(a.output, "".join(lines))
  if a.show:
    for i, text in enumerate(decoded):
      print(f"--- sample {i} ---\n{text}")
  print(json_line({"output": a.output, "num_samples": int(len(tokens)), "length": length, **stats}), file=sys.stderr)


def _read_prompts(path: str, chat: bool = False) -> list:
  if not storage.isfile(path):
    raise DLMError(f"--prompt_file {path} does not exist")
  lines = [line for line in storage.read_text(path).splitlines() if line.strip()]
  if not path.endswith(".jsonl"):
    prompts = lines
  else:
    prompts = []
    for n, line in enumerate(lines, 1):
      try:
        obj = json.loads(line)
        if chat and "messages" in obj:
          messages = obj["messages"]
          if not (isinstance(messages, list) and messages and all(
              isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
              for m in messages)):
            raise TypeError
          prompts.append(messages)
        else:
          prompts.append(obj["prompt"])
      except (ValueError, KeyError, TypeError):
        what = "a 'prompt' string or a 'messages' list of {role, content}" if chat else "a 'prompt' string"
        raise DLMError(f"{path}:{n} is not a JSON object with {what}; write one such object per line") from None
  if not prompts or not all(isinstance(p, (str, list)) and p for p in prompts):
    raise DLMError(f"--prompt_file {path} holds no prompts (or an empty one); write one non-empty prompt per line")
  return prompts


def _convert(rest, overrides):
  p = _Parser(prog="dlm-convert", description="Hugging Face checkpoints (LLaDA, Dream, Fast-dLLM v2, SDAR) to a dlm_jax "
              "workdir (--from_hf DIR --workdir OUT) and back (--workdir DIR --to_hf OUT); a LoRA run's adapters "
              "merged into its base as a new workdir (--merge_lora --workdir DIR --out OUT).")
  p.add_argument("--from_hf", default=None, metavar="HF_DIR", help="a local Hugging Face model directory")
  p.add_argument("--workdir", required=True, help="the workdir to write (--from_hf) or to read (--to_hf, --merge_lora)")
  p.add_argument("--to_hf", default=None, metavar="OUT", help="write the workdir as a Hugging Face directory")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="--from_hf: parameter dtype stored in the workdir (default: each tensor's own; bfloat16 casts)")
  p.add_argument("--merge_lora", action="store_true", help="write the LoRA run --workdir (lora.rank > 0) merged into "
                 "its base (train.init_from) as the new workdir --out, with LoRA and post-training keys off")
  p.add_argument("--out", default=None, metavar="OUT", help="--merge_lora: the workdir to write")
  p.add_argument("--mask_id", type=int, default=None,
                 help="--from_hf: the checkpoint's mask id when neither config.json (mask_token_id) nor the tokenizer "
                 "names it (default: the family's published id: LLaDA 126336, Dream 151666, Fast-dLLM v2 151665)")
  a = p.parse_args(rest)
  if overrides:
    raise DLMError("dlm-convert takes no --config.KEY overrides (the checkpoint fixes the config)")
  if (a.from_hf is not None) + (a.to_hf is not None) + a.merge_lora != 1:
    raise DLMError("give one of --from_hf HF_DIR (to make --workdir), --to_hf OUT (to export --workdir) or "
                   "--merge_lora --out OUT (to merge --workdir's LoRA adapters), not several or none")
  if a.from_hf is None and (a.dtype is not None or a.mask_id is not None):
    raise DLMError("--dtype and --mask_id apply to --from_hf; --to_hf and --merge_lora keep each tensor's dtype")
  if a.merge_lora != (a.out is not None):
    raise DLMError("--merge_lora writes the merged workdir to --out OUT: give both, or neither")
  from dlm_jax import convert
  if a.merge_lora:
    res = convert.merge_lora(a.workdir, a.out)
  else:
    res = convert.from_hf(a.from_hf, a.workdir, a.dtype, a.mask_id) if a.from_hf else convert.to_hf(a.workdir, a.to_hf)
  print(json_line(res))


def _tokenize(rest, overrides):
  p = _Parser(prog="dlm-tokenize", description="Tokenize text, .jsonl and .parquet files into a pre-tokenized dataset "
              "(ArrayRecord shards of token ids, an index and manifest.json) that data.path reads without "
              "re-tokenizing: dlm-train --config.data.path=DIR.")
  p.add_argument("--input", action="append", required=True, metavar="PATH_OR_GLOB",
                 help="a text file (one document), a .jsonl file (one document per line), a .parquet file (one per "
                 "row), a directory of them or a glob pattern (quoted); repeat for more, in order")
  p.add_argument("--tokenizer", required=True, help="'bytes' or the path of a Hugging Face tokenizer.json: the "
                 "data.tokenizer of the runs that will read the dataset")
  p.add_argument("--output", required=True, help="the dataset directory to create (local or gs://); must not exist "
                 "or be empty")
  p.add_argument("--shards", type=int, default=0, help="number of shards (default: one per GiB of input, at least "
                 "one per worker)")
  p.add_argument("--field", default="text", help="the .jsonl field / .parquet column holding the text (default text)")
  p.add_argument("--workers", type=int, default=0, help="tokenizing processes (default: one per CPU)")
  p.add_argument("--eos_token", default="", help="tokenizer.json only: its end-of-document token (default: the "
                 "usual names); recorded in the manifest, the training run's EOS is what packing inserts")
  a = p.parse_args(rest)
  if overrides:
    raise DLMError("dlm-tokenize takes no --config.KEY overrides")
  from dlm_jax import pretokenize
  print(json_line(pretokenize.tokenize(a.input, a.tokenizer, a.output, num_shards=a.shards, field=a.field,
                                       workers=a.workers, eos_token=a.eos_token)))


def train_main(argv=None) -> int:
  return _main("dlm-train", _train, argv)


def eval_main(argv=None) -> int:
  return _main("dlm-eval", _eval, argv)


def sample_main(argv=None) -> int:
  return _main("dlm-sample", _sample, argv)


def convert_main(argv=None) -> int:
  return _main("dlm-convert", _convert, argv)


def tokenize_main(argv=None) -> int:
  return _main("dlm-tokenize", _tokenize, argv)


def lm_eval_main(argv=None) -> int:
  """dlm-lm-eval: lm-evaluation-harness's own command line (`lm-eval run ...` / legacy flags) with the dlm_jax model
  registered (lm-eval 0.4.13 has no plugin discovery for models defined outside it)."""
  try:
    from dlm_jax import harness  # noqa: F401  (registers --model dlm_jax)
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["dlm-lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0
  except DLMError as e:
    print(f"dlm-lm-eval: error: {e}", file=sys.stderr)
    return 2


def compile_main(argv=None) -> int:
  """dlm-compile: AOT-compile the train step (or the sampler) for a TPU topology on this host (dlm_jax/aot.py)."""
  from dlm_jax import aot
  try:
    return aot.main(argv)
  except KeyboardInterrupt:
    print("dlm-compile: interrupted", file=sys.stderr)
    return 130


def _exit(fn):
  def wrapped():
    sys.exit(fn())
  return wrapped


train_entry = _exit(train_main)
eval_entry = _exit(eval_main)
sample_entry = _exit(sample_main)
convert_entry = _exit(convert_main)
compile_entry = _exit(compile_main)
tokenize_entry = _exit(tokenize_main)
lm_eval_entry = _exit(lm_eval_main)
