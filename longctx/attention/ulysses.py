"""Ulysses (DeepSpeed-Ulysses, arXiv 2309.14509) and hybrid Ulysses × ring (USP, arXiv
2405.07719) context parallelism inside `jax.shard_map` (DESIGN.md contract 3).

Legend: B batch, C local chunk, L = P·C sequence, H query heads, K kv heads, D head dim,
P devices on the Ulysses axis, n = H / P query heads per device, m kv heads per device.

Ulysses trades the sequence split for a head split: one `lax.all_to_all` turns each device's
[B, C, H, D] chunk into [B, L, n, D] (the whole sequence, in layout order, for n heads), the
segment ids and original indices are all-gathered to [B, L], attention runs locally on full
rows, and a second all_to_all turns the output back into [B, C, H, D]. Masks use the gathered
original indices, so any layout is exact (striped rows tile poorly, though: a tile of strided
tokens spans the whole sequence, so causal tiles are never skipped; contiguous and zigzag keep
the skipping).

GQA / MQA: query head h uses kv head h // G, G = H / K (the dense oracle's grouping). Device p
holds query heads [p·n, (p+1)·n); their kv heads are those of `kv_head_plan`. When P divides K
that is K / P heads per device and nothing is repeated; otherwise (K < P, MQA) a kv head is sent
to every device whose query heads use it, m = n / gcd(n, G) heads each: repeated only as far as
needed, never to H.

Hybrid: Ulysses over one mesh axis, the ring (ring.py) over another. After the all_to_all over
the Ulysses axis, a device holds the U·C tokens of its ring chunk (the layout balances the ring
devices; see strategies.py for the sharding that makes it so) with n = H / U heads, and runs
`ring_attention` over the ring axis on them.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from longctx.attention.local import attend_tiles
from longctx.attention.reference import MaskSpec, check_inputs
from longctx.attention.ring import chunk_config, chunk_meta, ring_attention
from longctx.attention.tiles import TokenMeta


def check_heads(num_heads: int, size: int, axis) -> None:
  """Raises ValueError unless the `num_heads` query heads split evenly over `size` devices."""
  if num_heads % size:
    raise ValueError(f"Ulysses over mesh axis {axis!r} of size {size} splits the query heads "
                     f"over its devices: num_heads={num_heads} is not divisible by {size}")


def kv_head_plan(num_heads: int, kv_heads: int, size: int) -> np.ndarray:
  """[P, m] int32: the global kv head of each of device p's m local kv heads.

  Device p holds query heads [p·n, (p+1)·n), n = H / P; its local query head j uses local kv
  head j // g with g = gcd(n, G), G = H / K, which is global kv head (p·n + j) // G. So m = n / g
  and the plan is the identity split (m = K / P) whenever P divides K.
  """
  n, group = num_heads // size, num_heads // kv_heads
  g = math.gcd(n, group)
  p, i = np.meshgrid(np.arange(size), np.arange(n // g), indexing="ij")
  return ((p * n + i * g) // group).astype(np.int32)


def _to_heads(axis, size, q_BCHD, k_BCKD, v_BCKD, meta: TokenMeta):
  """Sequence-sharded chunks -> head-sharded full rows: q [B, L, n, D], k, v [B, L, m, D],
  metadata [B, L] (all in device order, i.e. the layout's)."""
  plan = kv_head_plan(q_BCHD.shape[2], k_BCKD.shape[2], size).reshape(-1)
  if not np.array_equal(plan, np.arange(k_BCKD.shape[2])):  # replicate only where needed
    k_BCKD, v_BCKD = (jnp.take(x, plan, axis=2) for x in (k_BCKD, v_BCKD))
  a2a = lambda x: jax.lax.all_to_all(x, axis, 2, 1, tiled=True)
  gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
  return a2a(q_BCHD), a2a(k_BCKD), a2a(v_BCKD), TokenMeta(*(gather(x) for x in meta))


def _to_sequence(axis, o_BLnD):
  """Inverse of `_to_heads` for the output: [B, L, n, D] -> [B, C, H, D]."""
  return jax.lax.all_to_all(o_BLnD, axis, 1, 2, tiled=True)


def _check_local(q_BCHD, k_BCKD, v_BCKD, segment_ids_BC, index_BC, axis):
  check_inputs(q_BCHD, k_BCKD, v_BCKD, segment_ids_BC)
  if index_BC.shape != q_BCHD.shape[:2]:
    raise ValueError(f"index must be [B, C] = {q_BCHD.shape[:2]}; got {index_BC.shape}")
  size = jax.lax.axis_size(axis)
  check_heads(q_BCHD.shape[2], size, axis)
  return size


def ulysses_attention(q_BCHD, k_BCKD, v_BCKD, segment_ids_BC, index_BC, *, axis="seq",
                      causal=True, scale=None, block_q=None, block_k=None, block_q_bwd=None,
                      block_k_bwd=None, mask_spec: MaskSpec | None = None, kernel=None):
  """Ulysses attention on already-permuted local chunks; call inside `jax.shard_map` over
  `axis` (P devices).

  Same contract as `ring.ring_attention`: q [B, C, Hq, D]; k, v [B, C, Hkv, D]; segment_ids
  [B, C] int (0 = padding) or None; index [B, C] int original indices. Returns out
  [B, C, Hq, D] in q.dtype, equal to the dense reference. Tiles are fitted to C (capped at C/2)
  so that they follow the layout's chunks. Raises ValueError when Hq is not divisible by P
  (naming num_heads and P), or on bad shapes or dtypes. Gradients by autodiff: the all_to_alls
  transpose to all_to_alls, the kv-head replication to a sum over its copies.
  """
  size = _check_local(q_BCHD, k_BCKD, v_BCKD, segment_ids_BC, index_BC, axis)
  mask_spec = MaskSpec(causal=causal) if mask_spec is None else mask_spec
  q_BLnD, k_BLmD, v_BLmD, meta_L = _to_heads(axis, size, q_BCHD, k_BCKD, v_BCKD,
                                             chunk_meta(segment_ids_BC, index_BC))
  b, c, _, d = q_BCHD.shape
  shape = lambda x: jax.ShapeDtypeStruct((b, c, x.shape[2], d), x.dtype)  # tiles fit C, not L
  cfg = chunk_config(shape(q_BLnD), shape(k_BLmD), mask_spec, scale,
                     (block_q, block_k, block_q_bwd, block_k_bwd), kernel,
                     what="Ulysses attention, the chunk on each device")
  o_BLnD = attend_tiles(cfg, q_BLnD, k_BLmD, v_BLmD, meta_L)[0]
  return _to_sequence(axis, o_BLnD)


def hybrid_attention(q_BCHD, k_BCKD, v_BCKD, segment_ids_BC, index_BC, *, ulysses_axis,
                     ring_axis, causal=True, scale=None, mask_spec: MaskSpec | None = None,
                     **blocks):
  """Ulysses over `ulysses_axis` (U devices) around the ring over `ring_axis`; call inside
  `jax.shard_map` over both.

  The chunks must be sharded so that the U chunks of one ring device, concatenated in
  `ulysses_axis` order, form its ring chunk (`strategies` shards the sequence over
  (ring_axis, ulysses_axis)). Contract otherwise as `ulysses_attention`; blocks: the ring's
  block_* and kernel. Raises ValueError when Hq is not divisible by U.
  """
  size = _check_local(q_BCHD, k_BCKD, v_BCKD, segment_ids_BC, index_BC, ulysses_axis)
  q_BSnD, k_BSmD, v_BSmD, meta_S = _to_heads(ulysses_axis, size, q_BCHD, k_BCKD, v_BCKD,
                                             chunk_meta(segment_ids_BC, index_BC))
  o_BSnD = ring_attention(q_BSnD, k_BSmD, v_BSmD, meta_S.segment, meta_S.index, axis=ring_axis,
                          causal=causal, scale=scale, mask_spec=mask_spec, **blocks)
  return _to_sequence(ulysses_axis, o_BSnD)
