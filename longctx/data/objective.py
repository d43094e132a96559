"""Loss weights and the two objectives of DESIGN.md contract 2 (METHODS.md §1, LongAlign).

Design choice: numerator / denominator pairs that add.
  loss_weights are set per example, before packing, from that example alone:
    token mode:    w_t = 1 on target tokens;
    sequence mode: w_t = 1/N_i on the N_i target tokens of sequence i.
  For any slice of the global batch (a data-parallel shard, a micro-batch, a device)
    numerator   = Σ_t w_t ℓ_t
    denominator = #target tokens (token mode) | #sequences with a target token (sequence mode)
  and the objective of the optimizer step is Σ numerator / Σ denominator over all slices.
  Sequence mode then equals (1/M) Σ_i (1/N_i) Σ_{t∈i} ℓ_t exactly, because a sequence is never
  split across rows (packing places whole documents), so each term lives in exactly one slice.
  Nothing depends on the device count, the number of hosts, micro-batches or how documents
  were packed: that is the invariance contract 2 asks for, unlike LongAlign's K/(N_i·M).

  Why not precompute 1/(N_i·M)? M is a property of the global batch of one step; knowing it
  at data time would force every host to see every other host's examples. The denominator is
  a count, so the trainer sums it (psum / accumulation) along with the numerator; the gradient is
  grad(Σ numerator) / Σ denominator since the denominator does not depend on the parameters.
  Equivalently, since the denominator depends on the data only, a trainer can first sum
  `denominator(batch)` over every micro-batch and shard of the step, then accumulate
  numerator_k / D micro-batch by micro-batch: a plain weighted sum that splits additively.

Counting sequences: a sequence is counted at its first weighted token, i.e. a token with w_t > 0
whose previous weighted token in the row belongs to another segment (segments are contiguous in a
row, contract 1). Works on numpy or jax arrays, under jit.
"""
from __future__ import annotations


from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from longctx.names import Name


class ObjectiveMode(Name):
  TOKEN = "token"        # mean over target tokens
  SEQUENCE = "sequence"  # LongAlign loss weighting: mean over sequences of per-sequence means


def example_loss_weights(target_mask: np.ndarray, mode: ObjectiveMode) -> np.ndarray:
  """float32 per-token weights of one example from its boolean target mask [n]."""
  mask = np.asarray(target_mask, dtype=bool)
  if mode is ObjectiveMode.TOKEN:
    return mask.astype(np.float32)
  n_targets = int(mask.sum())
  if n_targets == 0:
    return np.zeros(mask.shape, np.float32)
  return np.where(mask, np.float32(1.0) / np.float32(n_targets), np.float32(0)).astype(np.float32)


class LossTerms(NamedTuple):
  """Additive parts of the objective: objective = numerator / denominator after summing."""
  numerator: Any    # float scalar: Σ w_t ℓ_t
  denominator: Any  # int32 scalar: number of target tokens or of sequences


def _xp(x):
  """numpy for host arrays (the trainer counts on the host), jax.numpy otherwise."""
  return np if isinstance(x, np.ndarray) else jnp


def sequences_per_row(loss_weights_BL: Any, segment_ids_BL: Any):
  """[B] int32: (row, segment) pairs holding at least one token with positive weight.

  Numpy in, numpy out (no device round trip); jax arrays (also under jit) otherwise."""
  xp = _xp(loss_weights_BL)
  has_BL = xp.asarray(loss_weights_BL) > 0
  seg_BL = xp.asarray(segment_ids_BL)
  idx_BL = xp.broadcast_to(xp.arange(has_BL.shape[1], dtype=xp.int32), has_BL.shape)
  marked_BL = xp.where(has_BL, idx_BL, -1)
  last_BL = (np.maximum.accumulate(marked_BL, axis=1) if xp is np
             else jax.lax.cummax(marked_BL, axis=1))  # last weighted index <= t
  prev_BL = xp.concatenate([xp.full_like(last_BL[:, :1], -1), last_BL[:, :-1]], axis=1)
  prev_seg_BL = xp.take_along_axis(seg_BL, xp.maximum(prev_BL, 0), axis=1)
  prev_seg_BL = xp.where(prev_BL >= 0, prev_seg_BL, -1)
  return xp.sum(has_BL & (prev_seg_BL != seg_BL), axis=1, dtype=xp.int32)


def count_sequences_with_targets(loss_weights_BL: Any, segment_ids_BL: Any) -> jax.Array:
  """Number of (row, segment) pairs holding at least one token with positive weight."""
  return jnp.sum(sequences_per_row(jnp.asarray(loss_weights_BL), jnp.asarray(segment_ids_BL)),
                 dtype=jnp.int32)


def _as_batch(batch_or_weights: Mapping[str, Any] | Any, mode: ObjectiveMode) -> Mapping[str, Any]:
  if isinstance(batch_or_weights, Mapping):
    return batch_or_weights
  if mode is ObjectiveMode.TOKEN:
    return {"loss_weights": batch_or_weights}
  raise TypeError("objective: sequence mode counts sequences, so it expects the batch dict "
                  "(loss_weights and segment_ids), found a bare array")


def row_denominators(batch_or_weights: Mapping[str, Any] | Any, mode: ObjectiveMode):
  """[B] int32: each row's share of the denominator (see `denominator`). Numpy batches are
  counted with numpy, so a trainer can count on the host, in natural order (segments are
  contiguous there), before any permutation of the tokens."""
  batch = _as_batch(batch_or_weights, mode)
  w_BL = batch["loss_weights"]
  xp = _xp(w_BL)
  if mode is ObjectiveMode.TOKEN:
    return xp.sum(xp.asarray(w_BL) > 0, axis=1, dtype=xp.int32)
  if mode is ObjectiveMode.SEQUENCE:
    return sequences_per_row(w_BL, batch["segment_ids"])
  raise TypeError(f"objective: expected an ObjectiveMode, found {mode!r}")


def denominator(batch_or_weights: Mapping[str, Any] | Any, mode: ObjectiveMode) -> jax.Array:
  """int32 count normalising one slice: target tokens (token) or sequences with targets
  (sequence). It depends on the data only, so a trainer may sum it over the whole step first
  and then accumulate micro-batch numerators divided by that global count."""
  return jnp.sum(jnp.asarray(row_denominators(batch_or_weights, mode)), dtype=jnp.int32)


def weighted_numerator(per_token_loss_BL: Any, loss_weights_BL: Any) -> jax.Array:
  """Σ_t w_t ℓ_t. where() rather than w·ℓ, so a nan/inf loss on a zero-weight (padding)
  token cannot leak in."""
  return jnp.sum(jnp.where(loss_weights_BL > 0, loss_weights_BL * per_token_loss_BL, 0))


def objective_terms(per_token_loss_BL: Any, batch_or_weights: Mapping[str, Any] | Any,
                    mode: ObjectiveMode) -> LossTerms:
  """Numerator and denominator of one slice (shard / micro-batch) of a global batch.

  Args:
    per_token_loss_BL: [B, L] float, ℓ_t (e.g. cross-entropy of targets); any value where w_t = 0.
    batch_or_weights: contract-1 batch with `loss_weights` [B, L] float32 and `segment_ids`
      [B, L] int32, its loss_weights built for `mode` (see example_loss_weights); in token mode
      the loss_weights array alone is enough.
    mode: ObjectiveMode.
  Raises:
    ValueError on a shape mismatch; TypeError for sequence mode without segment_ids.
  """
  batch = _as_batch(batch_or_weights, mode)
  w_BL = jnp.asarray(batch["loss_weights"])
  loss_BL = jnp.asarray(per_token_loss_BL)
  if loss_BL.shape != w_BL.shape:
    raise ValueError(f"objective: expected per_token_loss of shape {w_BL.shape} (loss_weights), "
                     f"found {loss_BL.shape}")
  return LossTerms(weighted_numerator(loss_BL, w_BL), denominator(batch, mode))


def combine_terms(terms: Sequence[LossTerms]) -> LossTerms:
  """Sum the terms of several slices (micro-batches, shards)."""
  return LossTerms(sum(t.numerator for t in terms), sum(t.denominator for t in terms))


def finalize(terms: LossTerms) -> jax.Array:
  """The objective from summed terms; 0 when the batch holds no target token."""
  return terms.numerator / jnp.maximum(terms.denominator, 1).astype(jnp.result_type(
      terms.numerator))


def objective(per_token_loss_BL: Any, batch_or_weights: Mapping[str, Any] | Any,
              mode: ObjectiveMode) -> jax.Array:
  """The contract-2 objective of a whole global batch (all shards, one micro-batch).

  Under jit with globally sharded arrays the sums are global, so this is exact as is. With
  gradient accumulation call objective_terms per micro-batch, combine_terms, then finalize.
  """
  return finalize(objective_terms(per_token_loss_BL, batch_or_weights, mode))
