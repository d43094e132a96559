"""Contract 2's numerator Σ_t w_t ℓ_t from the decoder, with the output head fused into the loss.

Two paths, chosen by `train.loss_chunk`:

  0      the reference: the model's logits [B, L, V] (float32), then `token_nll` and the
         objective's weighted numerator, differentiated by autodiff;
  C > 0  `chunked_numerator`: from the final hidden states [B, L, E] and the head's weight, over
         chunks of C tokens per device and row (model.chunking). Each chunk's logits [B, P, C, V]
         are computed, reduced to a log-sum-exp and the target's logit, and dropped; a
         `custom_vjp` backward recomputes them chunk by chunk and accumulates dW in float32. So
         no [tokens, vocab] array is ever materialised, and none is gathered across `seq`.

Both give the same value and gradients (float32: within 1e-6 relative; tests/test_loss.py).
The head's matmul runs in the hidden states' dtype (bfloat16 compute over float32 parameters)
with float32 accumulation and float32 logits; the backward casts dlogits to that dtype for its
two matmuls, as autodiff of the reference does.

Legend: B rows, L tokens, E hidden, V vocab, N chunks, P token shards (the mesh's `seq`), C
tokens per chunk and shard.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longctx.data.objective import weighted_numerator
from longctx.model.chunking import check_chunk, constrain_chunk, from_chunks, to_chunks
from longctx.parallel.mesh import constrain

# Logical axes of the head's weight while a loss uses it: the vocabulary as the parameter has it
# (over `tensor`), the hidden dimension whole, so the weight is gathered once, not per chunk.
_HEAD_IN_USE = {True: ("vocab", None), False: (None, "vocab")}
_HEAD_PARAM = {True: ("vocab", "embed"), False: ("embed", "vocab")}


def token_nll(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """Per-token cross-entropy ℓ_t = logsumexp(logits) − logits[target], in float32."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  lse_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  picked_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return lse_BL - picked_BL


def reference_numerator(logits_BLV: jax.Array, targets_BL: jax.Array,
                        weights_BL: jax.Array) -> jax.Array:
  """Σ w_t ℓ_t from full logits: the unchunked path (train.loss_chunk = 0)."""
  return weighted_numerator(token_nll(logits_BLV, targets_BL), weights_BL)


def chunked_numerator(hidden_BLE: jax.Array, head: jax.Array, targets_BL: jax.Array,
                      weights_BL: jax.Array, *, chunk: int, token_shards: int = 1,
                      vocab_first: bool) -> jax.Array:
  """Σ_t w_t ℓ_t with ℓ_t the cross-entropy of logits = hidden · head, over token chunks.

  Args:
    hidden_BLE: [B, L, E] final normed hidden states, in the compute dtype.
    head: the output head's float32 weight, [V, E] when `vocab_first` (a tied embedding), else
      [E, V] (lm_head's kernel); see model.llama.head_weight.
    targets_BL: int32 next-token ids; weights_BL: float32 loss weights (contract 1).
    chunk: C, tokens per chunk of each row on each device; must divide L / token_shards.
    token_shards: P, the devices splitting each row's tokens (the mesh's `seq` size).
  Returns a float32 scalar; differentiable in hidden and head.
  Raises ValueError when the chunk does not tile the tokens per device.
  """
  check_chunk(hidden_BLE.shape[1], token_shards, chunk, "train.loss_chunk")
  if targets_BL.shape != hidden_BLE.shape[:2] or weights_BL.shape != targets_BL.shape:
    raise ValueError(f"chunked_numerator: expected targets and weights of shape "
                     f"{hidden_BLE.shape[:2]}, found {targets_BL.shape} and {weights_BL.shape}")
  return _numerator(hidden_BLE, head, targets_BL, weights_BL.astype(jnp.float32), chunk,
                    token_shards, vocab_first)


def _logits(x_BPCE, w, vocab_first: bool) -> jax.Array:
  spec = "bpce,ve->bpcv" if vocab_first else "bpce,ev->bpcv"
  logits = jnp.einsum(spec, x_BPCE, w, preferred_element_type=jnp.float32)
  return constrain_chunk(logits)


def _head_in_use(head, dtype, vocab_first: bool):
  return constrain(head.astype(dtype), _HEAD_IN_USE[vocab_first])


def _chunks(x_BL, chunk: int, token_shards: int):
  return to_chunks(x_BL, token_shards, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _numerator(hidden_BLE, head, targets_BL, weights_BL, chunk, token_shards, vocab_first):
  return _forward(hidden_BLE, head, targets_BL, weights_BL, chunk, token_shards,
                  vocab_first)[0]


def _forward(hidden_BLE, head, targets_BL, weights_BL, chunk, token_shards, vocab_first):
  """(numerator, lse [N, B, P, C]) over the chunks."""
  w = _head_in_use(head, hidden_BLE.dtype, vocab_first)

  def body(total, inputs):
    x_BPCE, t_BPC, w_BPC = inputs
    logits_BPCV = _logits(x_BPCE, w, vocab_first)
    lse_BPC = jax.nn.logsumexp(logits_BPCV, axis=-1)
    picked_BPC = jnp.take_along_axis(logits_BPCV, t_BPC[..., None], axis=-1)[..., 0]
    return total + weighted_numerator(lse_BPC - picked_BPC, w_BPC), lse_BPC

  chunks = tuple(_chunks(a, chunk, token_shards) for a in (hidden_BLE, targets_BL, weights_BL))
  return jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)


def _numerator_fwd(hidden_BLE, head, targets_BL, weights_BL, chunk, token_shards, vocab_first):
  total, lse_NBPC = _forward(hidden_BLE, head, targets_BL, weights_BL, chunk, token_shards,
                             vocab_first)
  return total, (hidden_BLE, head, targets_BL, weights_BL, lse_NBPC)


def _numerator_bwd(chunk, token_shards, vocab_first, residuals, g):
  hidden_BLE, head, targets_BL, weights_BL, lse_NBPC = residuals
  dtype = hidden_BLE.dtype
  w = _head_in_use(head, dtype, vocab_first)
  dx_spec, dw_spec = (("bpcv,ve->bpce", "bpcv,bpce->ve") if vocab_first
                      else ("bpcv,ev->bpce", "bpce,bpcv->ev"))

  def body(dw, inputs):
    x_BPCE, t_BPC, w_BPC, lse_BPC = inputs
    logits_BPCV = _logits(x_BPCE, w, vocab_first)
    vocab_BPCV = jax.lax.broadcasted_iota(t_BPC.dtype, logits_BPCV.shape, 3)
    softmax_BPCV = jnp.exp(logits_BPCV - lse_BPC[..., None])
    onehot_BPCV = (vocab_BPCV == t_BPC[..., None]).astype(jnp.float32)
    # d(w·ℓ)/dlogits = w·(softmax − onehot); exactly 0 where w = 0 (as where() in the
    # reference)
    dlogits_BPCV = jnp.where(w_BPC[..., None] > 0,
                             (softmax_BPCV - onehot_BPCV) * (w_BPC * g)[..., None], 0.0)
    dlogits_BPCV = constrain_chunk(dlogits_BPCV.astype(dtype))
    dx_BPCE = constrain_chunk(jnp.einsum(dx_spec, dlogits_BPCV, w))
    operands = (dlogits_BPCV, x_BPCE) if vocab_first else (x_BPCE, dlogits_BPCV)
    dw = dw + jnp.einsum(dw_spec, *operands, preferred_element_type=jnp.float32)
    return constrain(dw, _HEAD_PARAM[vocab_first]), dx_BPCE

  chunks = tuple(_chunks(a, chunk, token_shards) for a in (hidden_BLE, targets_BL, weights_BL))
  dw0 = constrain(jnp.zeros(head.shape, jnp.float32), _HEAD_PARAM[vocab_first])
  dw, dx_NBPCE = jax.lax.scan(body, dw0, (*chunks, lse_NBPC))
  return from_chunks(dx_NBPCE), dw.astype(head.dtype), None, None


_numerator.defvjp(_numerator_fwd, _numerator_bwd)
