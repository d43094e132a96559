"""Pallas (Mosaic) flash-attention kernels for TPUs, in the chunk contract of the ring.

Legend: B batch, C query chunk, S key chunk, H query heads, K kv heads, G = H / K, D head dim,
nq = C / bq, nk = S / bk.

The same contract as `pallas_gpu`: `chunk_forward` returns the normalised output and the lse
(float32) of a query chunk against a key chunk, so ring steps merge; `chunk_backward` takes the
final lse and delta = Σ_d do·o. Masks come from segment ids, original indices (causal, any ring
layout and step) and S² groups (`kernels.block_mask`). Unlike splash attention, whose masks are
static, the mask of a ring step depends on the device and the step, so block skipping works
from per-block ranges of the metadata passed by scalar prefetch (SMEM) and classified on the
scalar core by `tiles.tile_full_empty`, the pure-JAX kernel's own test: an empty block costs
no DMA-bound compute, only its classification.

TPU layout, as in JAX's own flash / splash kernels: grids of (B, heads, q blocks, k blocks)
with the reduction axis last ("arbitrary") and the accumulators in VMEM scratch; per-query
statistics (m, l, lse, delta) as [bq, 128] lane-replicated tiles, query metadata as
[B, C, 128] and key metadata as [B, 8, S] replicated along lanes / sublanes. Blocks must be
multiples of 128. The dk/dv kernel runs per kv head with the G query heads of its group and
the query blocks as one sequential axis, so K/V are never repeated. float32 dots run at
`Precision.HIGHEST` (no bf16 passes), bfloat16 ones accumulate in float32.

Off a TPU it runs in Pallas' interpreter (tests); its lowering to Mosaic for a TPU target is
tested on CPU; it has not yet run on a TPU.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from longctx.attention.kernels.base import block_mask, out_struct as _out
from longctx.attention.reference import MaskSpec
from longctx.attention.tiles import TileStats, tile_full_empty

LANES, SUBLANES = 128, 8
_NEG = -1e30  # finite "minus infinity" for masked scores: exp underflows to 0, no inf − inf


def _dot(a, b, trans_a=False, trans_b=False):
  """a·b (a, b 2-D) with float32 accumulation; float32 inputs at full precision."""
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _run(mask_spec, sq_ref, sk_ref, b, i, j):
  """False when query block i and key block j of batch row b are certainly empty, from the
  prefetched per-block ranges [4, B, n] (index lo, hi, segment lo, hi) on the scalar core
  (`tiles.tile_full_empty`)."""
  sq = TileStats(*(sq_ref[r, b, i] for r in range(4)))
  sk = TileStats(*(sk_ref[r, b, j] for r in range(4)))
  return jnp.logical_not(tile_full_empty(mask_spec, sq, sk)[1])


def _mask(mask_spec, iq_ref, gq_ref, ik_ref, gk_ref):
  """[bq, bk] mask from lane-replicated query and sublane-replicated key metadata."""
  return block_mask(mask_spec, iq_ref[:, 0:1], gq_ref[:, 0:1], ik_ref[0:1, :], gk_ref[0:1, :])


def _forward_kernel(sq_ref, sk_ref, q_ref, k_ref, v_ref, iq_ref, gq_ref, ik_ref, gk_ref,
                    o_ref, lse_ref, m_scr, l_scr, acc_scr, *, mask_spec, scale):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    m_scr[...] = jnp.full(m_scr.shape, _NEG, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(_run(mask_spec, sq_ref, sk_ref, b, i, j))
  def _():
    mask = _mask(mask_spec, iq_ref, gq_ref, ik_ref, gk_ref)
    s = jnp.where(mask, _dot(q_ref[...], k_ref[...], trans_b=True) * scale, _NEG)
    m_prev = m_scr[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 128]
    p = jnp.where(mask, jnp.exp(s - m_next[:, 0:1]), 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_scr[...] = acc_scr[...] * alpha[:, 0:1] + _dot(p.astype(v.dtype), v)
    m_scr[...] = m_next

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l = l_scr[...]
    seen = l > 0
    l1 = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, 0:1], acc_scr[...] / l1[:, 0:1], 0.0)
    lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(l1), -jnp.inf)


def _dq_kernel(sq_ref, sk_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, iq_ref, gq_ref,
               ik_ref, gk_ref, dq_ref, dq_scr, *, mask_spec, scale):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when(_run(mask_spec, sq_ref, sk_ref, b, i, j))
  def _():
    mask = _mask(mask_spec, iq_ref, gq_ref, ik_ref, gk_ref)
    k = k_ref[...]
    s = _dot(q_ref[...], k, trans_b=True) * scale
    p = jnp.where(mask, jnp.exp(s - lse_ref[...][:, 0:1]), 0.0)
    ds = p * (_dot(do_ref[...], v_ref[...], trans_b=True) - delta_ref[...][:, 0:1])
    dq_scr[...] += _dot(ds.astype(k.dtype), k) * scale

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq_ref[...] = dq_scr[...]


def _dkv_kernel(sq_ref, sk_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, iq_ref, gq_ref,
                ik_ref, gk_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, mask_spec, scale, nq):
  b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)  # t = head in group · nq + i

  @pl.when(t == 0)
  def _():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(_run(mask_spec, sq_ref, sk_ref, b, lax.rem(t, nq), j))
  def _():
    mask = _mask(mask_spec, iq_ref, gq_ref, ik_ref, gk_ref)
    q, do = q_ref[...], do_ref[...]
    p = jnp.where(mask, jnp.exp(_dot(q, k_ref[...], trans_b=True) * scale
                                - lse_ref[...][:, 0:1]), 0.0)
    dv_scr[...] += _dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (_dot(do, v_ref[...], trans_b=True) - delta_ref[...][:, 0:1])
    dk_scr[...] += _dot(ds.astype(q.dtype), q, trans_a=True) * scale

  @pl.when(t == pl.num_programs(3) - 1)
  def _():
    dk_ref[...] = dk_scr[...]
    dv_ref[...] = dv_scr[...]


def check_blocks(c: int, s: int, block_q: int, block_k: int):
  """Raises ValueError unless the blocks divide the chunks and are multiples of 128."""
  for name, n, blk in (("block_q", c, block_q), ("block_k", s, block_k)):
    if n % blk or blk % LANES:
      raise ValueError(f"pallas_tpu kernel: {name}={blk} must be a multiple of {LANES} dividing "
                       f"the chunk length {n}")


def _block_stats(meta, block):
  """[4, B, n] int32: per block of `block` tokens, index lo, hi, segment lo, hi."""
  b, c = meta.index.shape
  idx, seg = (x.reshape(b, c // block, block) for x in meta)
  return jnp.stack([idx.min(-1), idx.max(-1), seg.min(-1), seg.max(-1)]).astype(jnp.int32)


def _lanes(x_BC):
  return jnp.broadcast_to(x_BC[:, :, None], x_BC.shape + (LANES,)).astype(jnp.int32)


def _sublanes(x_BS):
  b, s = x_BS.shape
  return jnp.broadcast_to(x_BS[:, None, :], (b, SUBLANES, s)).astype(jnp.int32)


def _rows(x_BCH):
  """[B, C, H] per-query statistics -> [B, H, C, 128] lane-replicated float32."""
  x = jnp.swapaxes(x_BCH.astype(jnp.float32), 1, 2)
  return jnp.broadcast_to(x[..., None], x.shape + (LANES,))


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, interpret, name):
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret, name=name)


def forward_for(q_BCHD, mq, *, mask_spec: MaskSpec, scale: float, block_q: int, block_k: int,
                interpret: bool = False):
  """attend(k_BSKD, v_BSKD, mk) -> (out_BCHD, lse_BCH), float32, of this query chunk (mq, mk:
  TokenMeta) against a key chunk. The query side (head-major q, lane-replicated metadata,
  block ranges) is laid out once, here."""
  b, c, h, d = q_BCHD.shape
  bq, bk = block_q, block_k
  q, sq, iq, gq = (jnp.swapaxes(q_BCHD, 1, 2), _block_stats(mq, bq), _lanes(mq.index),
                   _lanes(mq.segment))
  mqspec = pl.BlockSpec((None, bq, LANES), lambda bi, hi, i, j, *_: (bi, i, 0))
  mkspec = pl.BlockSpec((None, SUBLANES, bk), lambda bi, hi, i, j, *_: (bi, 0, j))
  qspec = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
  rowspec = pl.BlockSpec((None, None, bq, LANES), lambda bi, hi, i, j, *_: (bi, hi, i, 0))

  def attend(k_BSKD, v_BSKD, mk):
    s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
    g = h // kh
    kvspec = pl.BlockSpec((None, None, bk, d), lambda bi, hi, i, j, *_: (bi, hi // g, j, 0))
    o, lse = _call(
        functools.partial(_forward_kernel, mask_spec=mask_spec, scale=scale),
        (b, h, c // bq, s // bk),
        [qspec, kvspec, kvspec, mqspec, mqspec, mkspec, mkspec], [qspec, rowspec],
        [_out((b, h, c, d), q_BCHD), _out((b, h, c, LANES), q_BCHD)],
        [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
         pltpu.VMEM((bq, d), jnp.float32)], interpret, "longctx_tpu_flash_forward",
    )(sq, _block_stats(mk, bk), q, jnp.swapaxes(k_BSKD, 1, 2), jnp.swapaxes(v_BSKD, 1, 2), iq,
      gq, _sublanes(mk.index), _sublanes(mk.segment))
    return jnp.swapaxes(o, 1, 2), jnp.swapaxes(lse[..., 0], 1, 2)
  return attend


def backward_for(q_BCHD, do_BCHD, lse_BCH, delta_BCH, mq, *, mask_spec: MaskSpec, scale: float,
                 block_q: int, block_k: int, interpret: bool = False):
  """grads(k_BSKD, v_BSKD, mk) -> (dq_BCHD, dk_BSKD, dv_BSKD), float32, of this query chunk
  against a key chunk; lse_BCH is the final lse (−inf rows allowed). The query side (head-major
  q and do, lane-replicated lse, delta and metadata, block ranges) is laid out once, here."""
  b, c, h, d = q_BCHD.shape
  bq, bk = block_q, block_k
  nq = c // bq
  q, do = (jnp.swapaxes(x, 1, 2) for x in (q_BCHD, do_BCHD.astype(q_BCHD.dtype)))
  lse = _rows(jnp.where(jnp.isneginf(lse_BCH), 0.0, lse_BCH))
  delta = _rows(delta_BCH)
  sq, iq, gq = _block_stats(mq, bq), _lanes(mq.index), _lanes(mq.segment)

  def grads(k_BSKD, v_BSKD, mk):
    s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
    g, nk = h // kh, s // bk
    k, v = (jnp.swapaxes(x, 1, 2) for x in (k_BSKD, v_BSKD))
    args = (sq, _block_stats(mk, bk), q, k, v, do, lse, delta, iq, gq, _sublanes(mk.index),
            _sublanes(mk.segment))
    qspec = pl.BlockSpec((None, None, bq, d), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
    kvspec = pl.BlockSpec((None, None, bk, d), lambda bi, hi, i, j, *_: (bi, hi // g, j, 0))
    rowspec = pl.BlockSpec((None, None, bq, LANES), lambda bi, hi, i, j, *_: (bi, hi, i, 0))
    mqspec = pl.BlockSpec((None, bq, LANES), lambda bi, hi, i, j, *_: (bi, i, 0))
    mkspec = pl.BlockSpec((None, SUBLANES, bk), lambda bi, hi, i, j, *_: (bi, 0, j))
    dq = _call(
        functools.partial(_dq_kernel, mask_spec=mask_spec, scale=scale), (b, h, nq, nk),
        [qspec, kvspec, kvspec, qspec, rowspec, rowspec, mqspec, mqspec, mkspec, mkspec], qspec,
        _out((b, h, c, d), q_BCHD), [pltpu.VMEM((bq, d), jnp.float32)], interpret,
        "longctx_tpu_flash_dq",
    )(*args)

    # dk/dv: grid (B, K, key blocks, G·nq); t walks the group's query heads and their blocks
    qh = lambda ki, t: ki * g + lax.div(t, nq)  # t ≥ 0: no floor/sign ops for Mosaic
    qspec_t = pl.BlockSpec((None, None, bq, d),
                           lambda bi, ki, j, t, *_: (bi, qh(ki, t), lax.rem(t, nq), 0))
    kspec_t = pl.BlockSpec((None, None, bk, d), lambda bi, ki, j, t, *_: (bi, ki, j, 0))
    rowspec_t = pl.BlockSpec((None, None, bq, LANES),
                             lambda bi, ki, j, t, *_: (bi, qh(ki, t), lax.rem(t, nq), 0))
    mqspec_t = pl.BlockSpec((None, bq, LANES), lambda bi, ki, j, t, *_: (bi, lax.rem(t, nq), 0))
    mkspec_t = pl.BlockSpec((None, SUBLANES, bk), lambda bi, ki, j, t, *_: (bi, 0, j))
    dk, dv = _call(
        functools.partial(_dkv_kernel, mask_spec=mask_spec, scale=scale, nq=nq),
        (b, kh, nk, g * nq),
        [qspec_t, kspec_t, kspec_t, qspec_t, rowspec_t, rowspec_t, mqspec_t, mqspec_t, mkspec_t,
         mkspec_t], [kspec_t, kspec_t], [_out((b, kh, s, d), q_BCHD)] * 2,
        [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)], interpret,
        "longctx_tpu_flash_dkv",
    )(*args)
    return jnp.swapaxes(dq, 1, 2), jnp.swapaxes(dk, 1, 2), jnp.swapaxes(dv, 1, 2)
  return grads


def chunk_forward(q_BCHD, k_BSKD, v_BSKD, mq, mk, **kw):
  """(out_BCHD, lse_BCH), float32, of a query chunk attending a key chunk (`forward_for`)."""
  return forward_for(q_BCHD, mq, **kw)(k_BSKD, v_BSKD, mk)


def chunk_backward(q_BCHD, k_BSKD, v_BSKD, do_BCHD, lse_BCH, delta_BCH, mq, mk, **kw):
  """(dq_BCHD, dk_BSKD, dv_BSKD), float32 (`backward_for`)."""
  return backward_for(q_BCHD, do_BCHD, lse_BCH, delta_BCH, mq, **kw)(k_BSKD, v_BSKD, mk)
