"""Masked (absorbing-state) diffusion: MDLM / MD4 objective, the LLaDA form, and its likelihood bound.

Sahoo et al. 2024 (MDLM), Shi et al. 2024 (MD4), Nie et al. 2025 (LLaDA).

Forward: every token is independently replaced by the mask id with probability 1 - alpha_t.
Network: SUBS parameterisation - the output head has no class for the mask token (its logit is -inf) and clean input
positions are carried over, so they contribute no loss.
Continuous-time NELBO per sequence:  int_0^1 -alpha'_t / (1 - alpha_t) E_q[ sum_{masked i} -log p(x_i | z_t) ] dt.
Training estimates it with t ~ U[t_min, 1] (antithetic over the batch, Kingma et al. 2021) and divides by the number of
tokens (never by the number of masked tokens). The "llada" objective draws p_mask = (1 - t_min) u + t_min and weights
1 / p_mask (this is the linear schedule on [t_min, 1]).

A converted checkpoint whose network predicts token i at position i - 1 (Dream: `Network.logit_shift`) has its logits
shifted before the cross entropy, and one whose reference code keeps the mask class in the softmax (LLaDA, Dream:
`suppress_mask` False) keeps it (`AbsorbingVocab.predictions`).

`bound()` is a proper upper bound on -log p(x). For a network without time input and alpha_1 = 0 it is evaluated
exactly over t in [0, 1] in the masked-count form (see `_bound_masked_count`). Otherwise: the integral over [t_min, 1]
(stratified), plus the reconstruction term -log p(x | z_{t_min}) (a second forward at t_min: only masked positions
cost anything under SUBS), plus, for schedules with alpha_1 > 0 (loglinear), the prior term L * alpha_1 * log V of a
prior that keeps each token masked with probability 1 - alpha_1 and otherwise draws it uniformly.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dlm_jax import registry
from dlm_jax.errors import DLMError
from dlm_jax.maths import SCHEDULES, Schedule, sample_times, token_nll
from dlm_jax.processes.base import AbsorbingVocab, bound_targets, choose_masked, network_layout

OBJECTIVES = ("mdlm", "llada")


@registry.register_process
@dataclasses.dataclass(frozen=True)
class MaskedDiffusion(AbsorbingVocab):
  vocab_size: int  # tokenizer vocabulary
  schedule: Schedule = Schedule("linear")
  objective: str = "mdlm"
  t_min: float = 1e-3
  antithetic: bool = True
  time_conditioning: bool = False
  name: str = "masked"

  DEFAULT_SAMPLER = "ancestral"
  CONFIG_KEYS = ("schedule", "schedule_power", "schedule_eps", "objective", "t_min", "antithetic", "mask_id",
                 "suppress_mask_logit")

  @classmethod
  def from_config(cls, cfg, vocab_size: int, **vocab) -> "MaskedDiffusion":
    d = cfg.diffusion
    return cls(vocab_size=vocab_size, schedule=Schedule(d.schedule, d.schedule_power, d.schedule_eps),
               objective=d.objective, t_min=d.t_min, antithetic=d.antithetic,
               time_conditioning=cfg.model.time_conditioning, suppress_mask=d.suppress_mask_logit, **vocab)

  @classmethod
  def check_config(cls, cfg) -> None:
    check_schedule_keys(cfg.diffusion)

  capabilities = frozenset({"infilling", "conditional"})

  @property
  def time_conditioned(self) -> bool:
    return self.time_conditioning

  def describe(self) -> dict:
    return {"schedule": self.schedule.name, "objective": self.objective}

  # --- corruption and per-sequence terms --------------------------------------------------------------------------

  def mask_prob_and_weight(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    if self.objective == "llada":
      return t, 1.0 / t  # t already lies in [t_min, 1]: p_mask = (1 - eps) u + eps
    return 1.0 - self.schedule.alpha(t), self.schedule.weight(t)

  def corrupt(self, key: jax.Array, tokens: jax.Array, p_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """z_t: tokens masked independently with probability p_mask [B]; returns (z, masked)."""
    masked = jax.random.uniform(key, tokens.shape) < p_mask[:, None]
    return jnp.where(masked, self.mask_id, tokens), masked

  def _masked_nll(self, apply_fn, params, batch, z, masked, t):
    kwargs = network_layout(batch)
    if self.time_conditioning:
      kwargs["t"] = t
    logits = self.predictions(apply_fn, apply_fn(params, z, **kwargs))
    return jnp.sum(jnp.where(masked, token_nll(logits, batch["tokens"]), 0.0), axis=-1)  # [B]

  # --- process interface -------------------------------------------------------------------------------------------

  def loss(self, apply_fn, params, batch, key, state):
    x = batch["tokens"]
    b, l = x.shape
    k_t, k_m = jax.random.split(key)
    t = sample_times(k_t, b, self.t_min, self.antithetic)
    p_mask, weight = self.mask_prob_and_weight(t)
    z, masked = self.corrupt(k_m, x, p_mask)
    nll = self._masked_nll(apply_fn, params, batch, z, masked, t)
    per_seq = weight * nll
    loss = jnp.sum(per_seq) / (b * l)
    metrics = {"loss": loss, "bits_per_token": loss / math.log(2.0), "masked_fraction": jnp.mean(masked)}
    return loss, metrics, state

  def bound(self, apply_fn, params, batch, key, state):
    """Per-sequence NELBO of the 'target' tokens (all by default) given the others held clean (module docstring)."""
    x = batch["tokens"]
    b, l = x.shape
    if not self.time_conditioning and self.schedule.alpha_one == 0.0:
      return self._bound_masked_count(apply_fn, params, batch, key)
    target, n = bound_targets(batch)
    k_t, k_perm, k_m, k_r = jax.random.split(key, 4)
    if "strata" in batch:
      t = self.t_min + (1.0 - self.t_min) * batch["strata"].astype(jnp.float32)
    else:
      t = jax.random.permutation(k_perm, sample_times(k_t, b, self.t_min, True))  # every row: t ~ U[t_min, 1]
    p_mask = 1.0 - self.schedule.alpha(t)
    _, masked = self.corrupt(k_m, x, p_mask)
    masked = masked & target
    z = jnp.where(masked, self.mask_id, x)
    integral = (1.0 - self.t_min) * self.schedule.weight(t) * self._masked_nll(apply_fn, params, batch, z, masked, t)
    t0 = jnp.full((b,), self.t_min, jnp.float32)
    _, masked0 = self.corrupt(k_r, x, 1.0 - self.schedule.alpha(t0))
    masked0 = masked0 & target
    recon = self._masked_nll(apply_fn, params, batch, jnp.where(masked0, self.mask_id, x), masked0, t0)
    prior = n * self.schedule.alpha_one * math.log(self.vocab_size)
    return integral + recon + prior, n

  def _bound_masked_count(self, apply_fn, params, batch, key):
    """The same NELBO, integrated over t exactly, for a network that does not see t.

    With alpha_0 = 1 and alpha_1 = 0 the bound does not depend on the schedule (substitute alpha for t), and
    int_0^1 C(L, m) a^m (1 - a)^(L - m) / a da = 1 / m turns it into
        NELBO = E_{m ~ U{1..L}} E_{|S| = m} [ (L / m) sum_{i in S} -log p(x_i | x with S masked) ]
    (the estimator LLaDA uses for likelihoods). It needs no t_min clipping and no reconstruction term, and its
    variance is far lower than that of the 1/t-weighted form. m is stratified over the batch and shuffled across rows
    (or given by batch['strata']). With batch['target'], L is the row's number of target tokens and S is drawn among
    them: the bound on -log p(targets | the other tokens), LLaDA's conditional likelihood estimate.
    """
    x = batch["tokens"]
    b, l = x.shape
    target, n = bound_targets(batch)
    k_u, k_perm, k_set = jax.random.split(key, 3)
    u = batch.get("strata")
    if u is None:
      u = jax.random.permutation(k_perm, (jax.random.uniform(k_u, ()) + jnp.arange(b, dtype=jnp.float32)) / b)
    masked = choose_masked(k_set, target, n, u)
    z = jnp.where(masked, self.mask_id, x)
    nll = self._masked_nll(apply_fn, params, batch, z, masked, None)
    m = jnp.maximum(jnp.sum(masked, axis=-1), 1).astype(jnp.float32)
    return (n / m) * nll, n

  def sampling_net(self, net, params, state, canvas, steps):
    """The padding-aware forward (and its K/V-cached form) over mask-token canvases; the masking schedule for the
    ancestral and ReMDM samplers; the network's logit shift and whether the mask class is suppressed."""
    del state, canvas, steps
    tc = self.time_conditioning
    return registry.SamplingNet(
        mask_id=self.mask_id, logits_fn=net.logits_fn(params, time_conditioned=tc),
        cached_logits_fn=net.cached_logits_fn(params, time_conditioned=tc),
        arguments={"schedule": self.schedule, "time_conditioned": tc},
        logit_shift=bool(getattr(net, "logit_shift", False)), suppress_mask=self.suppress_mask)


def check_schedule_keys(d) -> None:
  """The masking schedule's keys."""
  def need(ok, msg):
    if not ok:
      raise DLMError(msg)
  need(d.schedule in SCHEDULES, f"diffusion.schedule must be one of {SCHEDULES}, got {d.schedule!r}")
  need(d.objective in OBJECTIVES, f"diffusion.objective must be one of {OBJECTIVES}, got {d.objective!r}")
  need(d.objective != "llada" or d.schedule == "linear",
       f"diffusion.objective='llada' is the linear schedule with p_mask = (1 - t_min) t + t_min; set "
       f"diffusion.schedule='linear' (got {d.schedule!r})")
  need(d.schedule_power > 0, f"diffusion.schedule_power must be > 0, got {d.schedule_power}")
  need(0 < d.schedule_eps < 1, f"diffusion.schedule_eps must be in (0, 1), got {d.schedule_eps}")
  need(0 < d.t_min < 1, f"diffusion.t_min must be in (0, 1), got {d.t_min}")
