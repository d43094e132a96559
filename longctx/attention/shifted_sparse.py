"""S²-Attn, shifted sparse attention (LongLoRA, arXiv 2309.12307; METHODS.md §2), without leak.

Legend: B batch, L sequence, C local chunk, H query heads, K kv heads, D head dim, G group size.

The plain heads attend (causally) within groups [0, G), [G, 2G), …; the shifted heads within
groups shifted by G/2: [0, G/2), [G/2, 3G/2), …, [L − G/2, L). There is no wrap-around
(LongLoRA issues #15, #90): the first and last shifted groups are half-length. Groups are defined
on each token's original index, so they may straddle ring chunks.

The split follows the kv groups, so no kv head is computed twice (`s2_head_split`): of K kv
heads the last ⌊K/2⌋ and their query heads are shifted. With K even that is LongLoRA's half of
the heads; with K odd (SmolLM2: 9 / 3 heads) one kv group fewer is shifted than kept (3 of 9
query heads); with K = 1 (MQA) the query heads split in halves that share the kv head.
Attention work is ≈ 1/4 of full causal at G = L/4: the tile skipping drops the empty tiles.
"""
from __future__ import annotations

import math
from typing import Tuple

import jax.numpy as jnp

from longctx.attention.local import tiled_attention
from longctx.attention.reference import MaskSpec, dense_attention


def s2_specs(group_size: int, causal: bool = True) -> Tuple[MaskSpec, MaskSpec]:
  """Mask specs of the plain and the shifted head halves."""
  return (MaskSpec(causal, group_size, 0), MaskSpec(causal, group_size, group_size // 2))


def s2_head_split(q_heads: int, kv_heads: int) -> Tuple[int, int]:
  """(plain query heads, plain kv heads); the rest are shifted. With one kv head it is shared
  (plain kv heads = 1). ValueError when the heads cannot be split."""
  if kv_heads < 1 or q_heads % kv_heads:
    raise ValueError(f"S²-Attn: the kv heads must divide the query heads; got Hq={q_heads}, "
                     f"Hkv={kv_heads}")
  if kv_heads == 1:
    if q_heads % 2:
      raise ValueError(f"S²-Attn with one kv head splits the query heads in halves: needs an "
                       f"even number of them; got Hq={q_heads}, Hkv=1")
    return q_heads // 2, 1
  plain = kv_heads - kv_heads // 2
  return plain * (q_heads // kv_heads), plain


def s2_ulysses_heads(q_heads: int, kv_heads: int) -> int:
  """A head count whose divisors split both S² parts over Ulysses: gcd(plain, shifted)."""
  plain = s2_head_split(q_heads, kv_heads)[0]
  return math.gcd(plain, q_heads - plain)


def check_s2(length: int, q_heads: int, kv_heads: int, group_size: int) -> None:
  """Raises ValueError when S²-Attn cannot split these heads or this length into groups."""
  if group_size <= 0 or group_size % 2 or length % group_size:
    raise ValueError(f"S²-Attn group size must be even and divide the sequence length {length}; "
                     f"got {group_size}")
  s2_head_split(q_heads, kv_heads)


def _halves(q_BLHD, k_BLKD, v_BLKD):
  """[(q, k, v) of the plain heads, (q, k, v) of the shifted heads] (`s2_head_split`)."""
  hq, kh = s2_head_split(q_BLHD.shape[2], k_BLKD.shape[2])
  qs = (q_BLHD[:, :, :hq], q_BLHD[:, :, hq:])
  if k_BLKD.shape[2] == 1:
    return [(qs[0], k_BLKD, v_BLKD), (qs[1], k_BLKD, v_BLKD)]
  return [(qs[0], k_BLKD[:, :, :kh], v_BLKD[:, :, :kh]),
          (qs[1], k_BLKD[:, :, kh:], v_BLKD[:, :, kh:])]


def apply_s2(attn_fn, q_BLHD, k_BLKD, v_BLKD, *, group_size, causal=True, length=None):
  """Runs attn_fn(q, k, v, mask_spec) on each head half with its S² mask; concatenates the heads.

  `length` is the full sequence length (defaults to q's axis 1; pass it inside shard_map).
  """
  length = q_BLHD.shape[1] if length is None else length
  check_s2(length, q_BLHD.shape[2], k_BLKD.shape[2], group_size)
  outs = [attn_fn(q, k, v, mask_spec)
          for (q, k, v), mask_spec in zip(_halves(q_BLHD, k_BLKD, v_BLKD),
                                          s2_specs(group_size, causal))]
  return jnp.concatenate(outs, axis=2)


def s2_dense_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL=None, *, group_size, causal=True,
                       scale=None):
  """The S² oracle: dense attention under the S² mask."""
  return apply_s2(lambda q, k, v, mask_spec: dense_attention(q, k, v, segment_ids_BL, scale=scale,
                                                        mask_spec=mask_spec),
                  q_BLHD, k_BLKD, v_BLKD, group_size=group_size, causal=causal)


def shifted_sparse_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL=None, *, group_size,
                             causal=True, scale=None, **blocks):
  """S²-Attn on one device (tiled, tiles outside the groups skipped); contract of
  `dense_attention` plus group_size (even, divides L). Training only: inference uses full
  attention. blocks: the tile sizes and kernel of `tiled_attention` (block_q, block_k,
  block_q_bwd, block_k_bwd, kernel)."""
  return apply_s2(lambda q, k, v, mask_spec: tiled_attention(
      q, k, v, segment_ids_BL, scale=scale, mask_spec=mask_spec, **blocks),
                  q_BLHD, k_BLKD, v_BLKD, group_size=group_size, causal=causal)


def shifted_sparse_ring_attention(q_BCHD, k_BCKD, v_BCKD, segment_ids_BC, index_BC, *, length,
                                  group_size, axis="seq", causal=True, scale=None, **blocks):
  """S²-Attn inside `jax.shard_map` on permuted chunks (see `ring.ring_attention`); groups are
  taken on the original index, so they may straddle device chunks. `length` = global L;
  blocks: the tile sizes and kernel of `ring_attention`."""
  from longctx.attention.ring import ring_attention
  return apply_s2(lambda q, k, v, mask_spec: ring_attention(
      q, k, v, segment_ids_BC, index_BC, axis=axis, scale=scale, mask_spec=mask_spec, **blocks),
                  q_BCHD, k_BCKD, v_BCKD, group_size=group_size, causal=causal, length=length)


def context_parallel_shifted_sparse_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL=None, *,
                                              mesh, group_size, axis="seq", causal=True,
                                              layout="zigzag", scale=None, **blocks):
  """S²-Attn over the ring on natural-order global arrays (like `context_parallel_attention`)."""
  from longctx.attention.kernels import check_vma
  from longctx.attention.layouts import run_context_parallel
  length = q_BLHD.shape[1]
  check_s2(length, q_BLHD.shape[2], k_BLKD.shape[2], group_size)

  def local(q_BCHD, k_BCKD, v_BCKD, seg_BC, idx_BC):
    return shifted_sparse_ring_attention(q_BCHD, k_BCKD, v_BCKD, seg_BC, idx_BC, length=length,
                                         group_size=group_size, axis=axis, causal=causal,
                                         scale=scale, **blocks)

  return run_context_parallel(local, q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, mesh=mesh,
                              axis=axis, layout=layout, check_vma=check_vma(blocks.get("kernel")))


# ---- S²-Attn on positions: what the attention spec (spec.py) runs --------------------------------
#
# Groups are taken on `positions`: group(t) = (positions[t] + shift) // G, so a packed document is
# split into groups from its own start, exactly as if it were alone in its row (the natural-order
# index would cut it at row offsets). For an unpacked row positions are 0..L−1 and this is
# `s2_dense_attention`'s mask. Causal only: within a document positions increase with the token
# index and segment ids keep documents apart, so positions serve as the mask index in any order.

def at_positions(spec):
  """S²-Attn on one device for an `AttentionSpec` with s2_group > 0, rows in natural order:
  fn(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL), tiled with the tiles outside
  the groups skipped."""
  import functools

  from longctx.attention.local import attend_tiles
  from longctx.attention.reference import check_inputs, default_scale
  from longctx.attention.tiles import TokenMeta, fitted_tiles, tile_config

  def fn(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, positions_BL):
    check_inputs(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
    if positions_BL.shape != q_BLHD.shape[:2]:
      raise ValueError(f"positions must be [B, L] = {q_BLHD.shape[:2]}; got {positions_BL.shape}")
    l, d = q_BLHD.shape[1], q_BLHD.shape[3]
    seg = jnp.ones(q_BLHD.shape[:2], jnp.int32) if segment_ids_BL is None else segment_ids_BL
    meta = TokenMeta(positions_BL.astype(jnp.int32), seg.astype(jnp.int32))

    def half(q, k, v, mask):
      tiles = functools.partial(tile_config, mask, default_scale(d, None), **spec.local_kwargs(),
                                group=q.shape[2] // k.shape[2])
      return attend_tiles(fitted_tiles(l, tiles, "S²-Attn"), q, k, v, meta)[0]
    return apply_s2(half, q_BLHD, k_BLKD, v_BLKD, group_size=spec.s2_group, causal=True)
  return fn


def s2_local(attend, q_BCHD, k_BCKD, v_BCKD, seg_BC, pos_BC, *, length, group_size,
             head_axis=None, heads=1):
  """S²-Attn on local chunks inside `jax.shard_map`, over any strategy's per-device function
  attend(mask_spec, q, k, v, segment_ids, index); groups on positions (may straddle chunks).

  heads: devices on `head_axis` (tensor parallelism). With 1, each device splits its heads in
  the plain and the shifted part. With T > 1 (even, so K is even and the parts are halves),
  every device holds heads of one half only: the first
  T/2 the plain half, the others the shifted one, whose shift is added to the mask index —
  groups and causal order depend only on index differences and index + shift.
  """
  import jax

  if heads == 1:
    return apply_s2(lambda q, k, v, mask: attend(mask, q, k, v, seg_BC, pos_BC),
                    q_BCHD, k_BCKD, v_BCKD, group_size=group_size, causal=True, length=length)
  shift = jax.lax.select(jax.lax.axis_index(head_axis) >= heads // 2, group_size // 2, 0)
  index_BC = pos_BC + shift.astype(pos_BC.dtype)
  return attend(MaskSpec(True, group_size, 0), q_BCHD, k_BCKD, v_BCKD, seg_BC, index_BC)
