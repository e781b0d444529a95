"""Post-training objectives on the one training loop (`train.objective`): SFT, RL with verifiable rewards, few-step
distillation. Each module builds a `PostTraining` from the config; `train.setup` plugs it in (its corpus, objective,
frozen pytrees, rollout step) and the loop, optimizer, checkpoints and hooks stay the pretraining ones.

  sft.py      conversations -> [prompt | response | EOS padding] rows; the response-only masked loss (LLaDA's SFT),
              block diffusion's per-block form, the AR baseline's causal loss
  rl.py       rollouts with any configured sampler, rewards, group advantages; diffu-GRPO (d1) and wd1 losses
  rewards.py  reward functions (plain Python callables on completion text): exact-match answers, code tests run in
              the sandbox
  distill.py  few-step students: masked diffusion (the teacher's two steps -> the student's one) and the one-hot
              flow's flow map (FMLM)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

OBJECTIVES = ("pretrain", "sft", "grpo", "wd1", "distill")


@dataclasses.dataclass
class PostTraining:
  """What an objective adds to the loop.

  objective      (apply_fn, params, batch, key, process_state, frozen) -> (loss, metrics, process_state), in the step
  corpus         the rows the data iterator draws (a `data.Corpus`, whose `fields` travel with the tokens)
  batch_size     rows per iterator batch (0 = train.batch_size; RL draws train.batch_size / rl.group_size prompts)
  init_params    the starting parameters (train.init_from), None = random init
  frozen         device pytrees the step takes and never updates (a distillation teacher); `train.setup` adds
                 'reference' (when needs_reference) and LoRA's 'lora_base'
  needs_reference  the objective reads frozen['reference'] (= the initial parameters)
  prepare        (trainer, host batch, step) -> device batch, instead of the loop's sharding of the iterator's batch;
                 the iterator then gives every host the whole batch (RL: prompts -> rollouts, rewards, advantages)
  evaluate       (trainer, step, params) -> metrics for the 'eval' row at train.eval_every (None = the family bound)
  """
  objective: Callable[..., Any]
  corpus: Any
  batch_size: int = 0
  init_params: Any = None
  frozen: dict = dataclasses.field(default_factory=dict)
  needs_reference: bool = False
  prepare: Callable | None = None
  evaluate: Callable | None = None


def make(cfg, run, load: Callable[[str, str], Any]) -> PostTraining:
  """The PostTraining of cfg.train.objective. `load(workdir, key)` restores another run's parameters (train.init_from,
  distill.teacher) onto this run's mesh."""
  name = cfg.train.objective
  if name == "sft":
    from dlm_jax.posttrain import sft
    return sft.make(cfg, run, load)
  if name in ("grpo", "wd1"):
    from dlm_jax.posttrain import rl
    return rl.make(cfg, run, load)
  if name == "distill":
    from dlm_jax.posttrain import distill
    return distill.make(cfg, run, load)
  raise ValueError(name)
