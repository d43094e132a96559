"""The train state and the pure train_step (contract 2's objective, accumulated exactly).

A step receives K micro-batches stacked as [K, B, L] (contract-1 keys, already in the ring
layout) plus `denominator` [K, B]: each row's share of contract 2's denominator (target tokens
or sequences with a target), counted on the host before the layout permutation. The step sums
the denominator over the whole global batch first, then accumulates Σ_k ∇ numerator_k / D, so the
loss and gradient do not depend on how rows are split over devices, hosts or micro-batches.

Parameters are float32 masters; the model computes in its config dtype. Only the `trainable`
part of the parameters (all of them, or LongLoRA's LoRA + embedding + norms) is differentiated
and has optimizer state. A non-finite loss or gradient leaves the state unchanged and is
reported in the metrics (`finite` = 0), so the loop can stop with the last good state.

The step also takes `ok`, the previous step's `applied` metric, still on the device: once a
step is not applied, no later one is either. The loop reads metrics one step late (the next
step is already queued when it sees a non-finite loss), and this latch keeps the state at the
last good step until then.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from longctx.data.objective import LossTerms, finalize
from longctx.train.config import Schedule, TrainConfig

Params = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # int32 scalar: optimizer steps taken in this stage
  trainable: Params          # nested dict: the parameters that train (float32)
  frozen: Params             # nested dict: the rest (empty unless LoRA)
  opt_state: Any

  @property
  def params(self) -> Params:
    return join_params(self.trainable, self.frozen)


def split_params(params: Params, mask: Params | None) -> tuple[Params, Params]:
  """(trainable, frozen) nested dicts by a bool tree of the same structure (None: all train)."""
  if mask is None:
    return params, {}
  flat = traverse_util.flatten_dict(params)
  flat_mask = traverse_util.flatten_dict(mask)
  trainable = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def join_params(trainable: Params, frozen: Params) -> Params:
  if not frozen:
    return trainable
  return traverse_util.unflatten_dict({**traverse_util.flatten_dict(trainable),
                                       **traverse_util.flatten_dict(frozen)})


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
  warmup = max(cfg.warmup_steps, 0)
  if cfg.schedule is Schedule.CONSTANT:
    if not warmup:
      return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup),
                                 optax.constant_schedule(cfg.learning_rate)], [warmup])
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.learning_rate, warmup, max(cfg.steps, warmup + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """AdamW (weight decay on matrices only, not on norms and biases), global-norm clipping."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
  adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
  return adamw


def init_state(params: Params, mask: Params | None, optimizer: optax.GradientTransformation
               ) -> TrainState:
  trainable, frozen = split_params(params, mask)
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                    opt_state=optimizer.init(trainable))


# Σ_t w_t ℓ_t of one micro-batch [B, L] (contract 2's numerator; longctx.train.loss).
NumeratorFn = Callable[[Params, dict], jax.Array]


def make_loss_and_grads(numerator_fn: NumeratorFn, grad_shardings=None):
  """loss_and_grads(trainable, frozen, batches [K, B, L], denominator [K, B]) -> (loss, grads):
  contract 2's objective of the whole step and its gradient wrt `trainable`.

  The denominator is summed over the whole step first; each micro-batch then adds
  finalize(numerator_k, D) and its gradient (data.objective). grad_shardings: where each
  micro-batch's gradient lives (the parameters' shardings), so it is reduce-scattered there
  instead of materialised whole on every device.
  """

  def loss_and_grads(trainable, frozen, batches: dict, denominator_KB: jax.Array):
    total = jnp.sum(denominator_KB, dtype=jnp.int32)

    def share(params, batch):
      return finalize(LossTerms(numerator_fn(join_params(params, frozen), batch), total))

    def micro(carry, batch):
      loss, grads = carry
      value, g = jax.value_and_grad(share)(trainable, batch)
      if grad_shardings is not None:
        g = jax.lax.with_sharding_constraint(g, grad_shardings)
      return (loss + value, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    if grad_shardings is not None:
      zeros = jax.lax.with_sharding_constraint(zeros, grad_shardings)
    (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros), batches)
    return loss, grads

  return loss_and_grads


def make_train_step(numerator_fn: NumeratorFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_shardings=None):
  """train_step(state, batches, denominator, ok) -> (state, metrics); pure, jit it with
  shardings. ok: int32 scalar, the previous step's metrics["applied"] (1 for the first)."""
  loss_and_grads = make_loss_and_grads(numerator_fn, grad_shardings)

  def train_step(state: TrainState, batches: dict, denominator_KB: jax.Array, ok: jax.Array):
    loss, grads = loss_and_grads(state.trainable, state.frozen, batches, denominator_KB)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    applied = finite & (ok > 0)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    keep = lambda new, old: jax.tree.map(  # noqa: E731
        lambda n, o: jnp.where(applied, n, o), new, old)
    new_state = state.replace(step=state.step + applied.astype(jnp.int32),
                              trainable=keep(trainable, state.trainable),
                              opt_state=keep(opt_state, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "finite": finite.astype(jnp.int32), "applied": applied.astype(jnp.int32)}
    return new_state, metrics

  return train_step
