"""Task evaluation speed through lm-evaluation-harness: items/s of loglikelihood (multiple choice) and generate_until,
and the share of wall time spent outside our model calls (harness overhead: task building, request bookkeeping,
metrics; goal < 10%).

  python benchmarks/eval.py [--workdir DIR] [--docs 40] [--gen_docs 16] [--mc_samples 8] [--gen 32]
                            [--batch_size 64] [--sampler llada --steps 32]

Without --workdir it trains a small masked diffusion model (4 layers, d_model 256, L = 256, byte tokenizer, 30 steps:
speed does not depend on what it learned) in a temporary directory. It writes two local tasks over generated JSONL
files (a 4-way multiple-choice task with contexts of ~150 tokens and continuations of ~20, a generation task with
prompts of ~100 tokens and --gen new tokens), runs each through `lm_eval.simple_evaluate` with the dlm_jax model, and
prints a table and one JSON line: items/s, requests/s, forwards (rows) per second, generated tokens/s, tokens per
forward, and overhead = (wall - time inside conditional_nll / the sampler) / wall, with and without the harness's task
building. The first call of each shape compiles (inside the model time); a second pass (--repeat 2) shows the
steady state.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _text(rng, n: int) -> str:
  words = ["the", "model", "of", "a", "diffusion", "language", "token", "mask", "block", "step", "data", "and", "is"]
  return " ".join(rng.choice(words, n))


def _train(directory: str) -> str:
  from dlm_jax import config as config_lib
  from dlm_jax.train import train
  rng = np.random.default_rng(0)
  corpus = os.path.join(directory, "corpus.txt")
  with open(corpus, "w") as f:
    f.write("\n\n".join(_text(rng, 200) for _ in range(300)))
  cfg = config_lib.default_config()
  overrides = {"data.path": corpus, "data.tokenizer": "bytes", "data.seq_len": 256, "model.max_seq_len": 256,
               "model.num_layers": 4, "model.d_model": 256, "model.num_heads": 4, "model.mlp_dim": 1024,
               "train.steps": 30, "train.batch_size": 8, "train.checkpoint_every": 30, "train.log_every": 30,
               "train.eval_every": 0, "train.warmup_steps": 5}
  config_lib.apply_overrides(cfg, list(overrides.items()))
  config_lib.validate(cfg)
  workdir = os.path.join(directory, "run")
  train(cfg, workdir, progress=False)
  return workdir


def _tasks(directory: str, docs: int, gen_docs: int, gen: int) -> None:
  rng = np.random.default_rng(1)
  with open(os.path.join(directory, "mc.jsonl"), "w") as f:
    for _ in range(docs):
      f.write(json.dumps({"q": _text(rng, 30), "choices": [_text(rng, 4) for _ in range(4)], "label": 0}) + "\n")
  with open(os.path.join(directory, "gen.jsonl"), "w") as f:
    for _ in range(gen_docs):
      f.write(json.dumps({"q": _text(rng, 20), "a": "x"}) + "\n")
  common = "dataset_path: json\ntest_split: test\n"
  with open(os.path.join(directory, "bench_mc.yaml"), "w") as f:
    f.write(f"task: bench_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {directory}/mc.jsonl\n"
            "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
            "metric_list:\n  - metric: acc\n")
  with open(os.path.join(directory, "bench_gen.yaml"), "w") as f:
    f.write(f"task: bench_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {directory}/gen.jsonl\n"
            "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
            f"generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: {gen}\n"
            "metric_list:\n  - metric: exact_match\n")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default=None, help="a trained or converted workdir (default: train a small model)")
  p.add_argument("--docs", type=int, default=40, help="multiple-choice documents (4 loglikelihood requests each)")
  p.add_argument("--gen_docs", type=int, default=16, help="generation documents")
  p.add_argument("--gen", type=int, default=32, help="max_gen_toks of the generation task")
  p.add_argument("--mc_samples", type=int, default=8)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--sampler", default="llada")
  p.add_argument("--steps", type=int, default=32)
  p.add_argument("--repeat", type=int, default=2, help="passes over each task (the first includes compilation)")
  a = p.parse_args(argv)
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  import jax
  import lm_eval
  from lm_eval.tasks import TaskManager
  from dlm_jax.harness import DLMJaxLM

  with tempfile.TemporaryDirectory() as tmp:
    workdir = a.workdir or _train(tmp)
    _tasks(tmp, a.docs, a.gen_docs, a.gen)
    t = time.perf_counter()
    manager = TaskManager(include_path=tmp, include_defaults=False)
    manager_s = time.perf_counter() - t
    lm = DLMJaxLM(workdir=workdir, batch_size=a.batch_size, mc_samples=a.mc_samples,
                  **{"sampler.name": a.sampler, "sampler.steps": a.steps})
    rows = []
    for task, items in (("bench_mc", a.docs), ("bench_gen", a.gen_docs)):
      for rep in range(a.repeat):
        before = dict(lm.timing)
        t = time.perf_counter()
        lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0)
        wall = time.perf_counter() - t
        d = {k: lm.timing[k] - before[k] for k in lm.timing}
        model_s = d["model_s"]
        row = {"task": task, "pass": rep + 1, "items": items, "wall_s": round(wall, 2), "model_s": round(model_s, 2),
               "items_per_s": round(items / wall, 2), "overhead": round((wall - model_s) / wall, 4)}
        if task == "bench_mc":
          row["requests_per_s"] = round(4 * items / wall, 2)
          row["rows_per_s"] = round(4 * items * (1 if lm.protocol()["loglikelihood"]["estimator"] == "exact"
                                                 else a.mc_samples) / model_s, 1)
        else:
          row["generated_tokens_per_s"] = round(d["generated_tokens"] / d["generate_s"], 1) if d["generate_s"] else None
          row["tokens_per_forward"] = round(d["canvas_tokens"] / d["nfe"], 3) if d["nfe"] else None
        rows.append(row)
    proto = lm.protocol()
  print(f"{'task':10} {'pass':>4} {'items':>6} {'wall s':>8} {'model s':>8} {'items/s':>8} {'overhead':>9}  other")
  for r in rows:
    other = {k: v for k, v in r.items() if k not in ("task", "pass", "items", "wall_s", "model_s", "items_per_s",
                                                      "overhead")}
    print(f"{r['task']:10} {r['pass']:>4} {r['items']:>6} {r['wall_s']:>8} {r['model_s']:>8} {r['items_per_s']:>8} "
          f"{r['overhead']:>9.1%}  {other}")
  print(json.dumps({"rows": rows, "task_manager_s": round(manager_s, 2), "devices": jax.device_count(),
                    "platform": jax.devices()[0].platform, "model": proto["model"], "sampler": proto["sampler"],
                    "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
  main()
