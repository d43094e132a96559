"""Attention functions the model plugs in (DESIGN.md contract 3, seen from the model).

The model calls `attention_fn(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL)`, with the
rows in whatever order the batch arrived. Each factory below returns such a function:

  dense()                      the O(L²) reference; natural order
  blockwise(...)               online-softmax blocks on one device; natural order
  context_parallel(mesh, ...)  ring attention over a mesh axis. With `permuted=False` it takes
                               natural-order rows and permutes them into the layout per call (what
                               casual users and tests do). With `permuted=True` the batch was put in
                               the layout once, at the data → model boundary (layouts.permute_batch),
                               and `positions` serve as the ring's mask index: within a document
                               they increase with the original index, and segment ids keep
                               documents apart, so causal masking stays exact.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax

from longctx.attention.kernels import check_vma

AttentionFn = Callable[..., jax.Array]


def dense(causal: bool = True) -> AttentionFn:
  from longctx.attention import dense_attention

  def fn(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL):
    del positions_BL
    return dense_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal=causal)
  return fn


def blockwise(causal: bool = True, **blocks) -> AttentionFn:
  """Blockwise attention on one device; blocks: its tile sizes (block_q, block_k, block_q_bwd,
  block_k_bwd; missing or None = defaults, see `tiles.tile_config`), as in every factory
  here."""
  from longctx.attention import blockwise_attention

  def fn(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL):
    del positions_BL
    return blockwise_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal=causal, **blocks)
  return fn


def context_parallel(mesh: jax.sharding.Mesh, axis: str = "seq", layout: str = "zigzag", *,
                     permuted: bool = False, causal: bool = True, batch_axes=None,
                     head_axis=None, **blocks) -> AttentionFn:
  """Ring attention over `axis` of `mesh`; see the module docstring for `permuted`.

  batch_axes / head_axis: with `permuted=True`, the mesh axes that split the rows and the heads
  (data and tensor parallelism), so the ring runs where the activations already are instead of
  gathering them. head_axis must divide both the query and the kv heads.
  """
  from jax.sharding import PartitionSpec as P

  from longctx.attention import context_parallel_attention, ring_attention

  if not permuted:
    def natural(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL):
      del positions_BL
      return context_parallel_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, mesh=mesh,
                                        axis=axis, causal=causal, layout=layout, **blocks)
    return natural
  if not causal:
    raise ValueError("context_parallel(permuted=True) needs causal attention: positions stand in "
                     "for the original token index only under a causal mask")
  local = functools.partial(ring_attention, axis=axis, causal=True, **blocks)
  act, tok = P(batch_axes, axis, head_axis, None), P(batch_axes, axis)

  def in_layout(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL):
    return jax.shard_map(lambda q, k, v, s, i: local(q, k, v, s, i), mesh=mesh,
                         in_specs=(act, act, act, tok, tok), out_specs=act,
                         check_vma=check_vma(blocks.get("kernel")))(
                             q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL)
  return in_layout


# ---- S²-Attn (LongLoRA shifted sparse attention; training only) --------------------------------
#
# Both factories take the S² groups on `positions`: group(t) = (positions[t] + shift) // G, so a
# packed document is split into groups from its own start, exactly as if it were alone in its
# row (the natural-order index would cut it at row offsets). For an unpacked row positions are
# 0..L−1 and this is `s2_dense_attention`'s mask. Causal only: within a document positions
# increase with the token index and segment ids keep documents apart, so positions serve as the
# mask index in any order.

def shifted_sparse(group_size: int, causal: bool = True, **blocks) -> AttentionFn:
  """S²-Attn on one device, rows in natural order (blockwise; tiles outside the groups skipped).

  group_size: G, even, dividing L; defined on positions (document-relative), see above.
  """
  if not causal:
    raise ValueError("shifted_sparse needs causal attention: its groups are taken on positions")
  import jax.numpy as jnp

  from longctx.attention.local import tiled_attention
  from longctx.attention.reference import check_inputs, default_scale
  from longctx.attention.shifted_sparse import apply_s2
  from longctx.attention.tiles import TokenMeta, fitted_tiles, tile_config

  def fn(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL):
    check_inputs(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
    if positions_BL.shape != q_BLHD.shape[:2]:
      raise ValueError(f"positions must be [B, L] = {q_BLHD.shape[:2]}; got {positions_BL.shape}")
    l, d = q_BLHD.shape[1], q_BLHD.shape[3]
    # The blockwise kernel with positions as its mask index (blockwise_attention takes 0..L−1).
    meta = TokenMeta(positions_BL.astype(jnp.int32), segment_ids_BL.astype(jnp.int32))

    def half(q, k, v, spec):
      tiles = functools.partial(tile_config, spec, default_scale(d, None), **blocks,
                                group=q.shape[2] // k.shape[2])
      return tiled_attention(fitted_tiles(l, tiles, "shifted_sparse"), q, k, v, meta)[0]
    return apply_s2(half, q_BLHD, k_BLKD, v_BLKD, group_size=group_size, causal=True)
  return fn


def context_parallel_shifted_sparse(mesh: jax.sharding.Mesh, axis: str = "seq",
                                    layout: str = "zigzag", *, group_size: int, batch_axes=None,
                                    head_axis=None, permuted: bool = True,
                                    **blocks) -> AttentionFn:
  """S²-Attn over the ring on `axis` of `mesh` (groups may straddle device chunks).

  permuted=True: the batch was put in `layout` once (layouts.permute_batch) and `positions`
  serve as the mask index (then `layout` is not used here). permuted=False: natural-order rows,
  permuted into `layout` and back on every call. group_size: G, even, dividing L; defined on
  positions (document-relative), see above. batch_axes / head_axis: the mesh axes that split
  the rows and the heads, as in `context_parallel`. With T > 1 devices on head_axis, T must be
  even (then every device holds heads of one S² half only: the first T/2 the plain half, the
  others the shifted one, whose shift is added to the mask index — groups and causal order
  depend only on index differences and index + shift) and divide both head counts.
  """
  from jax.sharding import PartitionSpec as P

  from longctx.attention.layouts import permute, unpermute
  from longctx.attention.reference import MaskSpec
  from longctx.attention.ring import ring_attention
  from longctx.attention.shifted_sparse import check_s2, shifted_sparse_ring_attention

  heads = 1 if head_axis is None else mesh.shape[head_axis]
  if heads > 1 and heads % 2:
    raise ValueError(f"S²-Attn with heads split over {head_axis!r} needs an even number of "
                     f"devices on it (each holding one half's heads); found {heads}")
  act, tok = P(batch_axes, axis, head_axis, None), P(batch_axes, axis)

  def local(q_BCHD, k_BCKD, v_BCKD, seg_BC, pos_BC, *, length):
    if heads == 1:
      return shifted_sparse_ring_attention(q_BCHD, k_BCKD, v_BCKD, seg_BC, pos_BC, length=length,
                                           group_size=group_size, axis=axis, causal=True,
                                           **blocks)
    shift = jax.lax.select(jax.lax.axis_index(head_axis) >= heads // 2, group_size // 2, 0)
    index_BC = pos_BC + shift.astype(pos_BC.dtype)
    return ring_attention(q_BCHD, k_BCKD, v_BCKD, seg_BC, index_BC, axis=axis,
                          spec=MaskSpec(True, group_size, 0), **blocks)

  def in_layout(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL):
    check_s2(q_BLHD.shape[1], q_BLHD.shape[2], k_BLKD.shape[2], group_size)
    if heads > 1 and (q_BLHD.shape[2] % heads or k_BLKD.shape[2] % heads):
      raise ValueError(f"{head_axis!r} ({heads} devices) must divide the query heads "
                       f"({q_BLHD.shape[2]}) and the kv heads ({k_BLKD.shape[2]})")
    fn = functools.partial(local, length=q_BLHD.shape[1])
    return jax.shard_map(lambda q, k, v, s, i: fn(q, k, v, s, i), mesh=mesh,
                         in_specs=(act, act, act, tok, tok), out_specs=act,
                         check_vma=check_vma(blocks.get("kernel")))(
                             q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL)
  if permuted:
    return in_layout

  def natural(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL):
    size = mesh.shape[axis]
    out = in_layout(*(permute(x, layout, size) for x in (q_BLHD, k_BLKD, v_BLKD, segment_ids_BL,
                                                         positions_BL)))
    return unpermute(out, layout, size)
  return natural
