"""Folded into `dlm-compile` (dlm_jax/aot.py): this file only forwards to it, with the same arguments.

  dlm-compile --config configs/bench_25m.py --topology v5e:2x2 [--sampler] [--find_batch] [--config.KEY=VALUE ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dlm_jax.aot import _figures, _inference_programs, lower_train_step, main  # noqa: E402,F401  (old importers)

if __name__ == "__main__":
  sys.exit(main(prog="aot_compile_tpu.py"))
