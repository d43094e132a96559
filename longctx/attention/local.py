"""Attention on one device with any inner kernel: `tiled_attention` (the user-facing form)
and `attend_tiles` (a tiled self-attention with a recomputing custom_vjp), dispatching each
chunk pair to the kernel its `TileConfig` names (`kernels.pair_forward`: the pure-JAX
kernel of online_softmax.py, or a Pallas kernel). Here, not in online_softmax.py, so that the
kernels sit below the dispatch and nothing imports in a circle.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longctx.attention import kernels
from longctx.attention.online_softmax import output_delta, tie_inputs
from longctx.attention.reference import MaskSpec, check_inputs, default_scale
from longctx.attention.tiles import TileConfig, TokenMeta, natural_meta, tile_config, tiled_length


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attend_tiles(cfg: TileConfig, q_BLHD, k_BLKD, v_BLKD, meta: TokenMeta):
  """(out_BLHD like q, lse_BLH float32) of self-attention over one sequence, tiled by `cfg`,
  masked by `meta` (its index need not be 0..L−1: the S² attention fn passes positions);
  L must be a multiple of cfg's tiles (`tile_config` fits them). The lse carries no gradient.
  `tiled_attention` is the user-facing form."""
  return _tiled_attention_fwd(cfg, q_BLHD, k_BLKD, v_BLKD, meta)[0]


def _tiled_attention_fwd(cfg, q_BLHD, k_BLKD, v_BLKD, meta):
  q_t, k_t, v_t, meta_t = tie_inputs((q_BLHD, k_BLKD, v_BLKD, meta))
  o_BLHD, lse_BLH = kernels.pair_forward(cfg, q_t, k_t, v_t, meta_t, meta_t)
  out = (o_BLHD.astype(q_BLHD.dtype), lse_BLH)
  # the untied inputs: a scan forwards residuals that are its own inputs instead of stacking them
  return out, (q_BLHD, k_BLKD, v_BLKD, meta, out[0], lse_BLH)


def _tiled_attention_bwd(cfg, res, cts):
  q_BLHD, k_BLKD, v_BLKD, meta, o_BLHD, lse_BLH = res
  do_BLHD = cts[0]  # the lse output is for merging only; its cotangent is not propagated
  delta_BLH = output_delta(do_BLHD, o_BLHD)
  dq, dk, dv = kernels.pair_backward(cfg.backward(), q_BLHD, k_BLKD, v_BLKD, do_BLHD, lse_BLH,
                                     delta_BLH, meta, meta)
  return dq.astype(q_BLHD.dtype), dk.astype(k_BLKD.dtype), dv.astype(v_BLKD.dtype), None


attend_tiles.defvjp(_tiled_attention_fwd, _tiled_attention_bwd)


def tiled_attention_with_lse(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL=None, *, causal=True,
                                 scale=None, block_q=None, block_k=None, block_q_bwd=None,
                                 block_k_bwd=None, mask_spec=None, kernel=None):
  """Like `tiled_attention` but returns (out_BLHD, lse_BLH); lse carries no gradient.

  A length without a good tile size (`tiled_length`) is padded with segment-0 tokens, which
  attend nothing and are attended by nothing, and the result cut back to L."""
  check_inputs(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
  b, l, _, d = q_BLHD.shape
  mask_spec = MaskSpec(causal=causal) if mask_spec is None else mask_spec
  tiles = functools.partial(tile_config, mask_spec, default_scale(d, scale), block_q=block_q,
                            block_k=block_k, block_q_bwd=block_q_bwd, block_k_bwd=block_k_bwd,
                            kernel=kernel, group=q_BLHD.shape[2] // k_BLKD.shape[2])
  lp = tiled_length(l, tiles)
  if lp == l:
    return attend_tiles(tiles(l, l), q_BLHD, k_BLKD, v_BLKD,
                           natural_meta(segment_ids_BL, b, l))
  seg = jnp.ones((b, l), jnp.int32) if segment_ids_BL is None else segment_ids_BL
  pad = lambda x: jnp.pad(x, [(0, 0), (0, lp - l)] + [(0, 0)] * (x.ndim - 2))
  o, lse = attend_tiles(tiles(lp, lp), pad(q_BLHD), pad(k_BLKD), pad(v_BLKD),
                           natural_meta(pad(seg.astype(jnp.int32)), b, lp))
  return o[:, :l], lse[:, :l]


def tiled_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL=None, *, causal=True, scale=None,
                        block_q=None, block_k=None, block_q_bwd=None, block_k_bwd=None,
                        mask_spec=None, kernel=None):
  """Memory-efficient attention on one device; same contract as `dense_attention`.

  block_q × block_k: the forward's tiles, block_q_bwd × block_k_bwd the backward's (each
  reduced to the largest divisor of L; None = defaults, see `tile_config`). Tiles the mask
  empties are skipped. Gradients recompute tiles: memory O(L·block), not O(L²).
  kernel: the inner kernel (`kernels.KERNELS`; None = "xla", pure JAX).
  """
  return tiled_attention_with_lse(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal=causal,
                                      scale=scale, block_q=block_q, block_k=block_k,
                                      block_q_bwd=block_q_bwd, block_k_bwd=block_k_bwd,
                                      mask_spec=mask_spec, kernel=kernel)[0]
