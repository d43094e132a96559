"""All-gather K/V context parallelism inside `jax.shard_map` (DESIGN.md contract 3).

Legend: B batch, C local chunk, L = P·C gathered sequence, H query heads, K kv heads,
D head dim, P devices on `axis`.

Each device keeps its chunk of queries (in any layout, see layouts.py) and gathers every
device's K and V (at K heads, never repeated to H) with their segment ids and original indices
by one `lax.all_gather` along the sequence, then attends its C queries to all L keys with the
pure-JAX kernel, masking on the gathered indices, so every layout and packed documents match
the dense reference. The backward gathers K and V again instead of keeping them (a custom_vjp:
the residuals are the local chunk, O(C) per device, not O(L)) and returns each device's dK, dV
by `lax.psum_scatter` (a reduce-scatter), the transpose of the gather.

Compared with the ring (ring.py): one collective instead of P − 1 steps, so nothing has to hide
behind per-step compute, but every device holds the full K/V of one layer, O(L·K·D), while it
attends (Llama-3's context parallelism does this: K/V are small under GQA).
"""
from __future__ import annotations

import functools

import jax

from longctx.attention import kernels
from longctx.attention.online_softmax import output_delta, tie_inputs
from longctx.attention.reference import MaskSpec, check_inputs
from longctx.attention.ring import chunk_config, chunk_meta
from longctx.attention.tiles import TokenMeta


def _gather(axis, k_BCKD, v_BCKD, meta: TokenMeta):
  """K, V [B, L, K, D] and their metadata [B, L], every device's chunk in device order."""
  gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
  return gather(k_BCKD), gather(v_BCKD), TokenMeta(*(gather(x) for x in meta))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _all_gather(cfg, axis, q_BCHD, k_BCKD, v_BCKD, meta):
  return _all_gather_fwd(cfg, axis, q_BCHD, k_BCKD, v_BCKD, meta)[0]


def _all_gather_fwd(cfg, axis, q_BCHD, k_BCKD, v_BCKD, meta):
  # see online_softmax.tie_inputs
  q_t, k_t, v_t, meta_t = tie_inputs((q_BCHD, k_BCKD, v_BCKD, meta))
  k_BLKD, v_BLKD, meta_L = _gather(axis, k_t, v_t, meta_t)
  o_BCHD, lse_BCH = kernels.pair_forward(cfg, q_t, k_BLKD, v_BLKD, meta_t, meta_L)
  o_BCHD = o_BCHD.astype(q_BCHD.dtype)
  return o_BCHD, (q_BCHD, k_BCKD, v_BCKD, meta, o_BCHD, lse_BCH)


def _all_gather_bwd(cfg, axis, res, do_BCHD):
  q_BCHD, k_BCKD, v_BCKD, meta, o_BCHD, lse_BCH = res
  # gathered again, not kept from the forward; tied to the cotangent so that XLA cannot merge
  # this gather with the forward's (CSE) and keep [B, L, K, D] alive in between
  _, k_t, v_t, meta_t = jax.lax.optimization_barrier((do_BCHD, k_BCKD, v_BCKD, meta))
  k_BLKD, v_BLKD, meta_L = _gather(axis, k_t, v_t, meta_t)
  dq, dk_BLKD, dv_BLKD = kernels.pair_backward(cfg.backward(), q_BCHD, k_BLKD, v_BLKD, do_BCHD,
                                               lse_BCH, output_delta(do_BCHD, o_BCHD), meta,
                                               meta_L)
  scatter = lambda x: jax.lax.psum_scatter(x, axis, scatter_dimension=1, tiled=True)
  return (dq.astype(q_BCHD.dtype), scatter(dk_BLKD).astype(k_BCKD.dtype),
          scatter(dv_BLKD).astype(v_BCKD.dtype), None)


_all_gather.defvjp(_all_gather_fwd, _all_gather_bwd)


def all_gather_attention(q_BCHD, k_BCKD, v_BCKD, segment_ids_BC, index_BC, *, axis="seq",
                         causal=True, scale=None, block_q=None, block_k=None, block_q_bwd=None,
                         block_k_bwd=None, mask_spec: MaskSpec | None = None, kernel=None):
  """All-gather K/V attention on already-permuted local chunks; call inside `jax.shard_map`
  over `axis`.

  Same contract as `ring.ring_attention`: q [B, C, Hq, D]; k, v [B, C, Hkv, D];
  segment_ids [B, C] int (0 = padding) or None; index [B, C] int, each token's original index.
  Returns out [B, C, Hq, D] in q.dtype, equal to the dense reference at those tokens. Tiles are
  fitted to the chunk C (as the ring's), so zigzag half-chunks never share a tile.
  Raises ValueError on bad shapes or dtypes.
  """
  check_inputs(q_BCHD, k_BCKD, v_BCKD, segment_ids_BC)
  if index_BC.shape != q_BCHD.shape[:2]:
    raise ValueError(f"index must be [B, C] = {q_BCHD.shape[:2]}; got {index_BC.shape}")
  mask_spec = MaskSpec(causal=causal) if mask_spec is None else mask_spec
  blocks = (block_q, block_k, block_q_bwd, block_k_bwd)
  cfg = chunk_config(q_BCHD, k_BCKD, mask_spec, scale, blocks, kernel,
                     what="all-gather attention, the chunk on each device")
  return _all_gather(cfg, axis, q_BCHD, k_BCKD, v_BCKD, chunk_meta(segment_ids_BC, index_BC))
