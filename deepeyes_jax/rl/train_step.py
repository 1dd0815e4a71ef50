"""The jitted GRPO update: log-probs of action tokens of packed multimodal rows, clipped loss, Optax AdamW.

    learner = Learner(model, LearnerConfig(...), mesh=mesh)
    metrics = learner.update(micro_batches)          # one optimizer step over all micro-batches
    sampler.state = learner.state                     # laid out for sampling (sampler.sampling_layout)

Gradient accumulation: every micro-batch's loss is normalised by the token count of the whole mini-batch, so
the summed gradient is exactly the token mean over the mini-batch. A non-finite loss or gradient leaves the
parameters and optimizer state unchanged (`skipped` = 1 in the metrics) and the run continues.

`learner_fns(graphdef, state, cfg)` builds the optimizer and the jitted functions without concrete arrays: the
`Learner` runs them, and `python -m deepeyes_jax.aot` compiles the very same functions for a TPU slice.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepeyes_jax.config_check import Problems
from deepeyes_jax.kernels import platform
from deepeyes_jax.models.qwen2_5_vl.model import Qwen25VL
from deepeyes_jax.parallel import sharding as shd
from deepeyes_jax.rl import grpo
from deepeyes_jax.rl.packing import PackedBatch

log = logging.getLogger(__name__)


AGGREGATIONS = ("token_mean", "seq_mean")  # grpo.aggregate's modes

# The domain of each numeric LearnerConfig field (config_check.Problems.number's keywords).
LEARNER_DOMAINS: dict[str, dict] = {
  "learning_rate": dict(gt=0),
  "warmup_steps": dict(ge=0, integer=True),
  "decay_steps": dict(ge=0, integer=True),
  "weight_decay": dict(ge=0),
  "b1": dict(ge=0, lt=1),
  "b2": dict(ge=0, lt=1),
  "eps": dict(gt=0),
  # optax.clip_by_global_norm(-1) scales the gradient by -1 / norm: gradient ascent.
  "grad_clip": dict(gt=0, also=(0, None), note="no clipping"),
  "clip_low": dict(ge=0, lt=1),  # the ratio's lower bound 1 - clip_low stays > 0
  "clip_high": dict(ge=0),
  "dual_clip": dict(gt=1, also=(None,), note="off"),
  "kl_coef": dict(ge=0),
  "entropy_coef": dict(),
  "logits_chunk": dict(ge=1, integer=True),
  "rollout_correction_threshold": dict(gt=1),  # C: ratios are truncated at C (TIS) or kept inside [1/C, C] (MIS)
}


def check_learner(p: Problems, values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> None:
  """Adds to ``p`` a problem for each LearnerConfig value (field -> value, only those given) outside its domain
  (``LEARNER_DOMAINS``, the policy-loss registry, ``AGGREGATIONS``); ``names`` maps a field to the config key to
  name in the message (default: the field)."""
  names = names or {}
  for field, value in values.items():
    name = names.get(field, field)
    if field in LEARNER_DOMAINS:
      p.number(name, value, **LEARNER_DOMAINS[field])
    elif field == "policy_loss":
      p.name(name, value, grpo.get_policy_loss)
    elif field == "rollout_correction":
      p.name(name, value, grpo.get_rollout_correction)
    elif field == "aggregation":
      p.choice(name, value, AGGREGATIONS)


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  learning_rate: float = 1e-6
  warmup_steps: int = 0
  decay_steps: int = 0  # > 0: cosine decay to 10% of learning_rate over this many steps (after the warmup)
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float | None = 1.0  # global gradient-norm clip; 0 or None = off
  policy_loss: str = "ppo_clip"
  clip_low: float = 0.2
  clip_high: float = 0.2
  dual_clip: float | None = 3.0
  aggregation: str = "token_mean"
  kl_coef: float = 0.0  # KL to a frozen reference policy (k3 estimator); 0 = off, as in DeepEyes
  entropy_coef: float = 0.0  # entropy bonus; 0 = off, as in DeepEyes
  train_vision: bool = True
  logits_chunk: int = 512  # tokens per chunk of the vocabulary projection (bounds logits memory)
  rollout_correction: str = "none"  # grpo.ROLLOUT_CORRECTIONS: "none" | "token_tis" | "seq_tis" | "token_mis" | ...
  rollout_correction_threshold: float = 2.0

  def __post_init__(self):
    """Every field within its domain (``check_learner``), or a ValueError listing each one that is not."""
    p = Problems(prefix="LearnerConfig.")
    check_learner(p, dataclasses.asdict(self))
    p.raise_if_any("LearnerConfig")


def make_optimizer(cfg: LearnerConfig, labels=None) -> optax.GradientTransformation:
  """Grad-norm clip (none when `grad_clip` is 0 or None) + AdamW with linear warmup then constant lr (or cosine
  decay with `decay_steps`); frozen parameters get zero updates."""
  if cfg.decay_steps > 0:
    lr = optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, cfg.warmup_steps, cfg.warmup_steps + cfg.decay_steps, end_value=0.1 * cfg.learning_rate
    )
  elif cfg.warmup_steps > 0:
    lr = optax.join_schedules(
      [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps), optax.constant_schedule(cfg.learning_rate)],
      [cfg.warmup_steps],
    )
  else:
    lr = optax.constant_schedule(cfg.learning_rate)
  tx = optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity(),
    optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
  )
  if labels is not None:
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx, lr


def hidden_states(model: Qwen25VL, batch: PackedBatch, *, train_vision: bool = True) -> jax.Array:
  """The decoder's final hidden states (R, L, D) of a packed batch, image features merged in."""
  feats = None
  if batch.pixel_values is not None:
    feats = model.image_features(batch.pixel_values, batch.plan)
    if not train_vision:
      feats = jax.lax.stop_gradient(feats)
  x = model.embed(batch.tokens, feats)
  cos, sin = model.rope(batch.position_ids)
  return model.language_model(x, cos, sin, batch.segment_ids, batch.positions)


def token_logprobs(
  model: Qwen25VL, batch: PackedBatch, *, train_vision: bool = True, chunk: int = 512, with_entropy: bool = False
):
  """Log-prob (and entropy) of every token given its prefix in its segment: (R, L) fp32, 0 at t = 0.

  The vocabulary projection runs in chunks of `chunk` positions under `jax.checkpoint`, so the (R, L, V) logits
  never exist at once (V = 152k for the real models).
  """
  h = hidden_states(model, batch, train_vision=train_vision)
  r, length, d = h.shape
  h_prev, targets = h[:, :-1], batch.tokens[:, 1:]
  n = length - 1
  c = min(chunk, n)
  pad = (-n) % c
  h_prev = jnp.pad(h_prev, ((0, 0), (0, pad), (0, 0))).reshape(r, -1, c, d).transpose(1, 0, 2, 3)
  h_prev = shd.constrain(h_prev, (None, "batch", None, "act_embed"))  # (chunks, R, c, D): rows stay on their chips
  targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(r, -1, c).transpose(1, 0, 2)

  @jax.checkpoint
  def one(args):
    hc, tc = args
    # (R, c, V) fp32, rows over data x fsdp and the vocabulary over tensor as the lm_head's: unconstrained, XLA
    # contracted over the FSDP-sharded hidden size and materialised every row's partial logits on every chip.
    logits = shd.constrain(model.logits(shd.constrain(hc, ("batch", None, "act_embed"))), ("batch", None, "act_vocab"))
    logp_all = jax.nn.log_softmax(logits, -1)
    lp = jnp.take_along_axis(logp_all, tc[..., None], -1)[..., 0]
    ent = -(jnp.exp(logp_all) * logp_all).sum(-1) if with_entropy else jnp.zeros_like(lp)
    return lp, ent

  lp, ent = jax.lax.map(one, (h_prev, targets))
  lp = lp.transpose(1, 0, 2).reshape(r, -1)[:, :n]
  ent = ent.transpose(1, 0, 2).reshape(r, -1)[:, :n]
  zero = jnp.zeros((r, 1), jnp.float32)
  return jnp.concatenate([zero, lp], 1), jnp.concatenate([zero, ent], 1)


def _loss(params, graphdef, batch: PackedBatch, denominator, cfg: LearnerConfig, ref_logprobs=None):
  model = nnx.merge(graphdef, params)
  logp, ent = token_logprobs(model, batch, train_vision=cfg.train_vision, chunk=cfg.logits_chunk, with_entropy=True)
  mask = batch.loss_mask
  seq_ids = grpo.sequence_ids(batch.segment_ids)
  agg = lambda v: grpo.aggregate(v, mask, cfg.aggregation, denominator, seq_ids)  # noqa: E731
  # Rollout correction: importance weights pi_old / mu (the learner's old policy over the sampler's), no gradient.
  weights, corr = grpo.get_rollout_correction(cfg.rollout_correction)(
    batch.old_logprobs, batch.sampler_logprobs, mask, seq_ids, cfg.rollout_correction_threshold
  )
  loss_fn = grpo.get_policy_loss(cfg.policy_loss)
  loss, aux = loss_fn(
    logp,
    batch.old_logprobs,
    batch.advantages,
    mask,
    clip_low=cfg.clip_low,
    clip_high=cfg.clip_high,
    dual_clip=cfg.dual_clip,
    aggregation=cfg.aggregation,
    denominator=denominator,
    weights=None if cfg.rollout_correction == "none" else weights,
    seq_ids=seq_ids,
  )
  if cfg.rollout_correction != "none":
    aux["correction/weight_mean"] = agg(weights)
    aux.update({f"correction/{k}": agg(v) for k, v in corr.items()})
  # The sampler / learner mismatch of the current parameters: before the step's first update they are pi_old.
  mm = grpo.mismatch_metrics(logp, batch.sampler_logprobs, mask, cfg.aggregation, denominator, seq_ids)
  aux.update({f"mismatch/{k}": v for k, v in mm.items()})
  ent = jax.lax.stop_gradient(ent) if cfg.entropy_coef == 0 else ent
  aux["entropy"] = agg(ent)
  aux["pg_loss"] = loss
  if cfg.entropy_coef:
    loss = loss - cfg.entropy_coef * aux["entropy"]
  if cfg.kl_coef and ref_logprobs is not None:
    aux["kl"] = agg(grpo.kl_k3(logp, ref_logprobs))
    loss = loss + cfg.kl_coef * aux["kl"]
  aux["loss"] = loss
  return loss, aux


@dataclasses.dataclass(frozen=True)
class LearnerFns:
  """The optimizer and the jitted functions of one update, built from a graphdef and a config (no arrays needed):
  what `Learner` runs, and what `python -m deepeyes_jax.aot` compiles for a TPU slice from abstract shapes.

  init: state -> opt_state. grad: (state, batch, denominator) -> (grads, aux) for one micro-batch. apply: (state,
  opt_state, summed grads, summed loss) -> (state, opt_state, grad_norm, ok), donating state and opt_state.
  """

  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init: Callable
  grad: Callable
  apply: Callable


def learner_fns(graphdef, state, cfg: LearnerConfig) -> LearnerFns:
  """`LearnerFns` for a model split into (graphdef, state). `state` may be abstract (ShapeDtypeStruct leaves): only
  its tree structure is read (which parameters are frozen when `cfg.train_vision` is False)."""
  labels = None
  if not cfg.train_vision:
    labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "freeze" if getattr(path[0], "key", None) == "visual" else "train", state
    )
  tx, schedule = make_optimizer(cfg, labels)
  return LearnerFns(
    tx=tx,
    schedule=schedule,
    init=jax.jit(tx.init, out_shardings=opt_state_shardings(tx, state)),
    grad=jax.jit(functools.partial(_grad_impl, graphdef=graphdef, cfg=cfg, shardings=_shardings(state))),
    apply=jax.jit(functools.partial(_apply_impl, tx=tx), donate_argnums=(0, 1)),
  )


def opt_state_shardings(tx: optax.GradientTransformation, state):
  """Shardings of `tx.init(state)`: each moment as its parameter, counters replicated; None when `state`'s leaves
  carry no sharding.

  Why explicit: `tx.init` only reads the parameters' shapes, so a plain `jax.jit(tx.init)` has no sharded input
  left to follow and XLA puts the whole optimizer state on one device (2x the parameters on chip 0 for AdamW, until
  the first update moves it).
  """
  shardings = _shardings(state)
  if shardings is None:
    return None
  first = jax.tree.leaves(shardings)[0]
  replicated = NamedSharding(first.mesh, P()) if isinstance(first, NamedSharding) else first
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731 -- frozen parameters' empty moments
  return optax.tree_map_params(
    tx,
    lambda x, s: x if masked(x) else s,
    jax.eval_shape(tx.init, state),
    shardings,
    transform_non_params=lambda _: replicated,
    is_leaf=masked,
  )


def _shardings(state):
  """The parameters' shardings (a tree like `state`), or None when its leaves carry none."""
  leaves = jax.tree.leaves(state)
  if not leaves or any(getattr(x, "sharding", None) is None for x in leaves):
    return None
  return jax.tree.map(lambda x: x.sharding, state)


def _grad_impl(state, batch, denominator, *, graphdef, cfg, shardings=None):
  (_, aux), grads = jax.value_and_grad(_loss, has_aux=True)(state, graphdef, batch, denominator, cfg)
  if shardings is not None:
    # Each gradient sharded as its parameter: XLA otherwise may return some (e.g. those of scanned layers, which
    # flow back through the stacking) replicated, a full fp32 copy of the model on every chip.
    grads = jax.lax.with_sharding_constraint(grads, shardings)
  return grads, aux


def _apply_impl(state, opt_state, grads, loss, *, tx):
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
  # Zero non-finite gradients before the update so the skipped branch never produces NaNs anywhere.
  safe = jax.tree.map(lambda g: jnp.where(ok, g, jnp.zeros_like(g)), grads)
  updates, new_opt = tx.update(safe, opt_state, state)
  new_state = optax.apply_updates(state, updates)
  keep = lambda new, old: jnp.where(ok, new, old)
  return jax.tree.map(keep, new_state, state), jax.tree.map(keep, new_opt, opt_state), grad_norm, ok


def batch_shardings(batch: PackedBatch, mesh: Mesh) -> PackedBatch:
  """NamedShardings of a micro-batch (arrays or ShapeDtypeStructs) on the mesh: rows over (data, fsdp), each row's
  images (the row layout, (R, ...) arrays) with their row: a chip runs the vision tower on its rows' images only."""
  rows = NamedSharding(mesh, shd.logical_to_spec(("batch", None), batch.tokens.shape, mesh))
  row_axes = rows.spec[0]

  def sharding(path, _):
    if path[0].name == "position_ids":
      return NamedSharding(mesh, P(None, row_axes))
    return NamedSharding(mesh, P(row_axes))  # (R, ...): tokens, masks, pixel values, plan arrays

  return jax.tree_util.tree_map_with_path(sharding, batch)


class Learner:
  """Holds the trainable state (parameters, optimizer state) and applies GRPO updates.

  The parameters are the model's own arrays (sharded as the model was loaded); `state` is what a `Sampler`
  needs to generate with the current policy.
  """

  def __init__(self, model: Qwen25VL, cfg: LearnerConfig, *, mesh: Mesh | None = None):
    self.cfg = cfg
    self.mesh = mesh
    self.graphdef, self.state = nnx.split(model)
    fns = learner_fns(self.graphdef, self.state, cfg)
    self.tx, self.schedule = fns.tx, fns.schedule
    self.opt_state = fns.init(self.state)
    self.step = 0
    self._grad, self._apply = fns.grad, fns.apply

  # --- host API -------------------------------------------------------------------------------------------
  def place(self, batch: PackedBatch) -> PackedBatch:
    """Puts a micro-batch on the mesh: rows over (data, fsdp), images replicated (`batch_shardings`). Every process
    builds the same micro-batches from the same rollouts; `put_host` skips device_put's cross-process check of that
    (a collective over every device, which a rollout thread's programs would interleave with)."""
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, batch)
    return jax.tree.map(shd.put_host, batch, batch_shardings(batch, self.mesh))

  def logprobs(self, batch: PackedBatch) -> np.ndarray:
    """Current-policy log-probs (R, L) of a packed batch (no gradient): the 'recompute' old log-probs."""
    rep = None if self.mesh is None else NamedSharding(self.mesh, P())  # every host reads it
    with platform.scope(self.mesh):
      return np.asarray(_logprobs_jit(self.graphdef, self.cfg.logits_chunk, rep, self.state, self.place(batch)))

  def predict(self, batch: PackedBatch) -> np.ndarray:
    """Teacher-forced greedy predictions (R, L) int32: the argmax next token after each position (a probe of what
    the current policy has learned; see `warmstart.skill_accuracy`)."""
    rep = None if self.mesh is None else NamedSharding(self.mesh, P())
    with platform.scope(self.mesh):
      return np.asarray(_predict_jit(self.graphdef, rep, self.state, self.place(batch)))

  def update(self, micro_batches: Sequence[PackedBatch]) -> dict[str, float]:
    """One optimizer step over all micro-batches (gradient accumulation). Returns host metrics."""
    denominator = self._denominator(micro_batches)
    grads, aux_sum = None, None
    for mb in micro_batches:
      with platform.scope(self.mesh):
        g, aux = self._grad(self.state, self.place(mb), denominator)
      if grads is None:
        grads, aux_sum = g, aux
      else:
        with platform.scope(self.mesh):
          grads, aux_sum = _accumulate(grads, aux_sum, g, aux)
    self.state, self.opt_state, grad_norm, ok = self._apply(self.state, self.opt_state, grads, aux_sum["loss"])
    metrics = {k: float(v) for k, v in aux_sum.items()}
    metrics["grad_norm"] = float(grad_norm)
    metrics["skipped"] = float(not bool(ok))
    metrics["learning_rate"] = float(self.schedule(self.step))
    if not bool(ok):
      log.warning(
        "step %d: non-finite loss (%s) or gradient norm (%s): update skipped",
        self.step,
        metrics["loss"],
        metrics["grad_norm"],
      )
    else:
      self.step += 1
    return metrics

  def _denominator(self, micro_batches) -> jax.Array:
    """The mini-batch's action tokens (token_mean) or trajectories holding action tokens (seq_mean)."""
    if self.cfg.aggregation == "token_mean":
      return jnp.float32(max(1.0, float(sum(mb.loss_mask.sum() for mb in micro_batches))))
    return jnp.float32(max(1.0, float(sum(num_sequences(mb) for mb in micro_batches))))


def num_sequences(batch: PackedBatch) -> int:
  """Trajectories (segments of packed rows) with at least one action token."""
  ids = np.asarray(batch.segment_ids) + (batch.tokens.shape[1] + 1) * np.arange(batch.num_rows)[:, None]
  return len(np.unique(ids[np.asarray(batch.loss_mask) > 0]))


def _combine(key: str, a, b):
  """Accumulates a metric over micro-batches: maxima (`*_max`) by max, the rest (shared denominators) by sum."""
  return jnp.maximum(a, b) if key.endswith("_max") else a + b


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _accumulate(grads, aux_sum, g, aux):
  """Adds a micro-batch's gradients and metrics to the running sums, in place (donated): one program per
  micro-batch rather than one eager add per parameter, and no second copy of the gradients."""
  return jax.tree.map(jnp.add, grads, g), {k: _combine(k, aux_sum[k], v) for k, v in aux.items()}


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _logprobs_jit(graphdef, chunk, replicated, state, batch):
  lp = token_logprobs(nnx.merge(graphdef, state), batch, chunk=chunk)[0]
  return lp if replicated is None else jax.lax.with_sharding_constraint(lp, replicated)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _predict_jit(graphdef, replicated, state, batch):
  model = nnx.merge(graphdef, state)
  # (R, L, V) logits at once: a probe on small batches only
  pred = jnp.argmax(model.logits(hidden_states(model, batch)), -1).astype(jnp.int32)
  return pred if replicated is None else jax.lax.with_sharding_constraint(pred, replicated)
