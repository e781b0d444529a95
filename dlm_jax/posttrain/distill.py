"""Few-step distillation (`train.objective='distill'`): a student that samples in `distill.student_steps` steps with the
family's own sampler learns, one student step at a time, what the frozen teacher (`distill.teacher`, a workdir) does
in k = distill.teacher_steps / distill.student_steps steps of its own sampler over the same interval.

Both methods are fixed-grid: the student is trained only at the start points of its sampler's step grid, so the step
size is a function of the start time and no second time input is needed; the student starts from the teacher's
parameters (train.init_from overrides the start) and has the teacher's model shape.

Masked diffusion (SDTT, Deschenaux & Gulcehre 2024, "Beyond Autoregression: Fast LLMs via Self-Distillation Through
Time", arXiv 2410.21035). Student step i goes from s = 1 - i / N to t = 1 - (i + 1) / N (the ancestral sampler's grid,
N = student_steps). From z_s ~ q(z_s | x) the teacher takes k ancestral steps s = u_0 > ... > u_k = t, revealing each
masked position with probability (alpha(u_{j+1}) - alpha(u_j)) / (1 - alpha(u_j)) and drawing it from its
prediction; a position's target is the teacher's log-probabilities at the sub-step that revealed it (those still
masked at t: the last sub-step's). The student predicts once at z_s; the loss is the divergence (distill.divergence:
"reverse_kl", SDTT's default, KL(student || target), or "forward_kl") averaged over the masked positions. SDTT's
rounds (the student becomes the next teacher, halving the steps each time) are successive runs: distill the student
workdir again. What it cannot do: the student's per-position predictions stay factorised, so two positions revealed
in one step are still drawn independently; reverse KL sharpens each position's prediction (a geometric mean of the
targets, mode seeking) rather than restoring that correlation.

One-hot flow (FLM's flow-map distillation, FMLM; Lee et al. 2026, arXiv 2602.16813, and progressive distillation,
Salimans & Ho 2022). The Euler step of FLM's sampler from level g to g' is the interpolation
z' = c z + (1 - c) xhat, c = (1 - g') / (1 - g), between the state and the network's prediction xhat (a point of the
simplex). So k teacher Euler steps on the sub-grid t_j = (i k + j) / (N k) compose to
    z_k = C z_0 + sum_j (1 - c_j) prod_{m > j} c_m a_j,   C = prod_j c_j,
with a_j the teacher's prediction at the sub-step state z_j, and the one student step that lands on z_k has the
prediction xhat* = sum_j (1 - c_j) prod_{m > j} c_m a_j / (1 - C): a convex combination of the a_j, inside the simplex.
This is FMLM's flow map X_{s,t}(x) = x + D v_s(x) + D^2 g / 2 on the student's grid, with the correction term D^2 g / 2 =
D (xhat_student - xhat_teacher) / (1 - g) carried by the student's prediction, trained so that one jump equals the
teacher's k sub-jumps (stop-gradient target, the teacher frozen), so the student needs no second time embedder or
output: FLM's Euler sampler runs it unchanged at sampler.steps = student_steps. The loss is "forward_kl"
KL(xhat* || student) (default) or "mse" (FMLM's V * mean squared error, here between the predictions). The state is
drawn in R^V (z = (1 - g) eps + g e_x) whatever diffusion.flow_embed_state says: the teacher and the student each
project it with their own input table.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from dlm_jax.data import load_corpus
from dlm_jax.errors import DLMError
from dlm_jax.posttrain import PostTraining
from dlm_jax.processes.base import network_layout
from dlm_jax.processes.flow import OneHotFlow
from dlm_jax.processes.masked import MaskedDiffusion

# the families with a distillation method: their divergences (the first is the default)
DIVERGENCES = {MaskedDiffusion: ("reverse_kl", "forward_kl"), OneHotFlow: ("forward_kl", "mse")}


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static settings of one distillation objective."""
  student_steps: int
  sub_steps: int  # teacher steps per student step (k)
  divergence: str


def plan(cfg, process) -> Plan:
  """The checked distillation settings for `process` (DLMError for a family without a method or a divergence it
  does not take)."""
  family = next((cls for cls in DIVERGENCES if isinstance(process, cls)), None)
  if family is None:
    names = ", ".join(repr(cls.__dataclass_fields__["name"].default) for cls in DIVERGENCES)
    raise DLMError(f"train.objective='distill' has a method for diffusion.process {names}, not "
                   f"{process.name!r}; distill a run of one of those families")
  d = cfg.distill
  divergence = d.divergence or DIVERGENCES[family][0]
  if divergence not in DIVERGENCES[family]:
    raise DLMError(f"distill.divergence must be one of {DIVERGENCES[family]} for diffusion.process="
                   f"{process.name!r}, got {divergence!r}")
  teacher_steps = d.teacher_steps or 2 * d.student_steps
  return Plan(d.student_steps, teacher_steps // d.student_steps, divergence)


def make(cfg, run, load) -> PostTraining:
  """The distillation objective of cfg (module docstring): the teacher frozen, the student started from it."""
  p = plan(cfg, run.process)
  teacher = load(cfg.distill.teacher, "distill.teacher")
  init = load(cfg.train.init_from, "train.init_from") if cfg.train.init_from else teacher
  method = masked_objective if isinstance(run.process, MaskedDiffusion) else flow_objective
  objective = functools.partial(method, run.process, p, run.apply_fn)
  return PostTraining(objective=objective, corpus=load_corpus(cfg, run.tokenizer), init_params=init,
                      frozen={"teacher": teacher})


def _divergence(kind: str, log_q: jax.Array, log_p: jax.Array) -> jax.Array:
  """Per-position divergence [...] between the student's log-probabilities log_q and the target's log_p (classes
  that are -inf in both, a suppressed mask class, contribute nothing)."""
  q, p = jnp.exp(log_q), jnp.exp(log_p)
  if kind == "reverse_kl":
    terms = jnp.where(q > 0, q * (log_q - log_p), 0.0)
  elif kind == "forward_kl":
    terms = jnp.where(p > 0, p * (log_p - log_q), 0.0)
  else:  # mse: V * mean squared error of the probabilities (FMLM's scale) = their squared distance
    terms = jnp.square(q - p)
  return jnp.sum(terms, axis=-1)


def masked_objective(process: MaskedDiffusion, p: Plan, teacher_fn, apply_fn, params, batch, key, state, frozen):
  """SDTT on the ancestral sampler's grid (module docstring): (loss, metrics, state)."""
  x = batch["tokens"]
  b = x.shape[0]
  n, k = p.student_steps, p.sub_steps
  layout = network_layout(batch)
  k_i, k_z, k_teacher = jax.random.split(key, 3)
  i = jax.random.randint(k_i, (b,), 0, n)
  s = 1.0 - i.astype(jnp.float32) / n
  z, _ = process.corrupt(k_z, x, 1.0 - process.schedule.alpha(s))
  z = jnp.where(s[:, None] >= 1.0, process.mask_id, z)  # the sampler's first step starts from an all-mask canvas
  masked = z == process.mask_id

  def log_probs(fn, prm, tokens, t):
    kwargs = dict(layout, t=t) if process.time_conditioning else layout
    return jax.nn.log_softmax(process.predictions(fn, fn(prm, tokens, **kwargs)).astype(jnp.float32), axis=-1)

  teacher, zt, target = frozen["teacher"], z, None
  for j in range(k):  # the teacher's k ancestral steps from s to t (static unroll)
    u = 1.0 - (i * k + j).astype(jnp.float32) / (n * k)
    u_next = 1.0 - (i * k + j + 1).astype(jnp.float32) / (n * k)
    log_p = jax.lax.stop_gradient(log_probs(teacher_fn, teacher, zt, u))
    a_u, a_next = process.schedule.alpha(u), process.schedule.alpha(u_next)
    reveal_p = jnp.where(u_next <= 0.0, 1.0, (a_next - a_u) / (1.0 - a_u))
    k_draw, k_rev = jax.random.split(jax.random.fold_in(k_teacher, j))
    still = zt == process.mask_id
    reveal = still & (jax.random.uniform(k_rev, zt.shape) < reveal_p[:, None])
    take = still if j == k - 1 else reveal  # never revealed: the last sub-step's prediction
    target = log_p if target is None else jnp.where(take[..., None], log_p, target)
    draw = jax.random.categorical(k_draw, log_p).astype(zt.dtype)
    zt = jnp.where(reveal, draw, zt)

  log_q = log_probs(apply_fn, params, z, s)
  per_pos = _divergence(p.divergence, log_q, target)
  count = jnp.maximum(jnp.sum(masked), 1)
  loss = jnp.sum(jnp.where(masked, per_pos, 0.0)) / count
  return loss, {"loss": loss, "masked_fraction": jnp.mean(masked)}, state


def flow_objective(process: OneHotFlow, p: Plan, teacher_fn, apply_fn, params, batch, key, state, frozen):
  """The fixed-grid flow map of the one-hot flow (module docstring): (loss, metrics, state)."""
  x = batch["tokens"]
  b = x.shape[0]
  n, k = p.student_steps, p.sub_steps
  layout = network_layout(batch)
  k_i, k_eps = jax.random.split(key)
  i = jax.random.randint(k_i, (b,), 0, n)
  t_sub = [(i * k + j).astype(jnp.float32) / (n * k) for j in range(k + 1)]
  g_sub = [process.g_of_t(t) for t in t_sub]
  eps = jax.random.normal(k_eps, x.shape + (process.vocab_size,), jnp.float32)
  one_hot = jax.nn.one_hot(x, process.vocab_size, dtype=jnp.float32)
  z0 = (1.0 - g_sub[0])[:, None, None] * eps + g_sub[0][:, None, None] * one_hot

  def logits(fn, prm, z, t):
    return fn(prm, None, embeddings=z @ fn.input_table(prm), t=t, **layout).astype(jnp.float32)

  teacher, z, acc = frozen["teacher"], z0, jnp.zeros_like(z0)
  for j in range(k):  # the teacher's k Euler steps: z <- c z + (1 - c) a, acc = sum_j (1 - c_j) prod_{m>j} c_m a_j
    a = jax.lax.stop_gradient(jax.nn.softmax(logits(teacher_fn, teacher, z, t_sub[j]), axis=-1))
    c = ((1.0 - g_sub[j + 1]) / (1.0 - g_sub[j]))[:, None, None]
    z = c * z + (1.0 - c) * a
    acc = c * acc + (1.0 - c) * a
  big_c = ((1.0 - g_sub[k]) / (1.0 - g_sub[0]))[:, None, None]
  target = jnp.clip(acc / (1.0 - big_c), 0.0, 1.0)

  log_q = jax.nn.log_softmax(logits(apply_fn, params, z0, t_sub[0]), axis=-1)
  per_pos = _divergence(p.divergence, log_q, jnp.log(target))
  loss = jnp.mean(per_pos)
  return loss, {"loss": loss}, state
