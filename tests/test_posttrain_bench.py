"""benchmarks/posttrain.py stays runnable (its figures are not checked here)."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_posttrain_benchmark_quick_runs():
  r = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "posttrain.py"), "--quick"],
                     capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
  assert len(rows) == 1, r.stdout
  out = rows[0]
  assert {"machine", "model", "train_steps", "step_vs_pretrain", "rollout_tokens_per_s", "rollout_speedup",
          "rollout_tokens_per_forward"} <= set(out)
  assert set(out["train_steps"]) == set(out["step_vs_pretrain"]) == {"pretrain", "sft", "grpo", "wd1"}
  assert out["step_vs_pretrain"]["pretrain"] == 1.0 and all(v > 0 for v in out["train_steps"].values())
  assert {"none", "prefix", "dual"} <= set(out["rollout_tokens_per_s"]) == set(out["rollout_speedup"])
  assert out["rollout_speedup"]["none"] == 1.0 and all(v > 0 for v in out["rollout_tokens_per_s"].values())
