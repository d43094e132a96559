"""Pallas (Triton) flash-attention kernels for NVIDIA GPUs, in the chunk contract of the ring.

Legend: B batch, C query chunk, S key chunk, H query heads, K kv heads, G = H / K, D head dim.

`chunk_forward` attends a query chunk to a key chunk and returns the normalised output and the
log-sum-exp, float32, so partial results over several key chunks merge (`merge_partials`);
`chunk_backward` takes the *final* lse and delta = Σ_d do·o and returns (dq, dk, dv) float32.
The mask is `reference.make_mask` on each (query block, key block) (`kernels.block_mask`):
segment ids, causal by each token's original index (so any ring layout and any ring step), and
S²-Attn groups. A block pair is first classified from the ranges of its metadata
(`tiles.tile_full_empty`, 1-D reductions); one the mask certainly empties is skipped
(`lax.cond`) before its mask or any load of K/V. GQA: the forward and dq kernels read kv head
h // G; the dk/dv kernel runs per kv head and sums its G query heads under one mask, so K/V are
never repeated.

Three kernels, as in FlashAttention-2: forward (grid C/bq × B × H, loop over key blocks), dq
(same grid) and dk/dv (grid S/bk × B × K, loop over query blocks, the G heads unrolled). Dots
take bfloat16 or float32 inputs and accumulate in float32 (float32 at `Precision.HIGHEST`:
IEEE, no TF32 and no tensor cores, so float32 values match the fallback within the tests'
tolerance but run much slower than bfloat16). Not yet measured on a GPU: whether Triton's
pipeliner prefetches the K/V loads inside the skip branch is open.

`interpret=True` runs the same kernels through Pallas' interpreter on any backend: that is how
CI (CPU only) checks their values and gradients against the dense oracle. Triton needs power-of-
two block sizes and head dim; `check_blocks` says so before a GPU compile would fail.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from longctx.attention.kernels.base import block_mask, out_struct as _out
from longctx.attention.reference import MaskSpec
from longctx.attention.tiles import TileStats, tile_full_empty

_NEG = -1e30  # finite "minus infinity" for masked scores: exp underflows to 0, no inf − inf


def _dot(a, b, trans_a=False, trans_b=False):
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=prec)


def _ranges(index, segment):
  """TileStats of a block from its 1-D metadata: cheap reductions over block_q or block_k
  tokens, so a block pair is classified before any [bq, bk] work."""
  return TileStats(jnp.min(index), jnp.max(index), jnp.min(segment), jnp.max(segment))


def _run(mask_spec, rq, rk):
  """False when the ranges prove a block pair empty (`tiles.tile_full_empty`)."""
  return jnp.logical_not(tile_full_empty(mask_spec, rq, rk)[1])


def _over_key_blocks(mask_spec, iq, sq, ik_ref, sk_ref, block_k, attend, init):
  """Folds attend(carry, key block slice, [bq, bk] mask) over the key blocks of the refs,
  skipping (`lax.cond`, before the mask or any K/V load) the blocks the ranges prove empty."""
  rq = _ranges(iq, sq)

  def body(j, carry):
    ks = pl.ds(j * block_k, block_k)
    ik, sk = ik_ref[ks], sk_ref[ks]
    run = lambda c: attend(c, ks, block_mask(mask_spec, iq[:, None], sq[:, None], ik[None, :],
                                             sk[None, :]))
    return lax.cond(_run(mask_spec, rq, _ranges(ik, sk)), run, lambda c: c, carry)
  return lax.fori_loop(0, ik_ref.shape[0] // block_k, body, init)


def _forward_kernel(q_ref, k_ref, v_ref, iq_ref, sq_ref, ik_ref, sk_ref, o_ref, lse_ref, *,
                    mask_spec, scale, block_k):
  q = q_ref[...]
  bq, d = q.shape

  def attend(carry, ks, mask):
    acc, m, l = carry
    k, v = k_ref[ks, :], v_ref[ks, :]
    s = jnp.where(mask, _dot(q, k, trans_b=True) * scale, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    corr = jnp.exp(m - m_new)
    return (acc * corr[:, None] + _dot(p.astype(v.dtype), v), m_new,
            l * corr + jnp.sum(p, axis=1))

  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), _NEG, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = _over_key_blocks(mask_spec, iq_ref[...], sq_ref[...], ik_ref, sk_ref, block_k, attend,
                               init)
  seen = l > 0
  o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, iq_ref, sq_ref, ik_ref, sk_ref,
               dq_ref, *, mask_spec, scale, block_k):
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]

  def grad(dq, ks, mask):
    k, v = k_ref[ks, :], v_ref[ks, :]
    p = jnp.where(mask, jnp.exp(_dot(q, k, trans_b=True) * scale - lse[:, None]), 0.0)
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k) * scale

  dq_ref[...] = _over_key_blocks(mask_spec, iq_ref[...], sq_ref[...], ik_ref, sk_ref, block_k, grad,
                                 jnp.zeros(q.shape, jnp.float32))


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, iq_ref, sq_ref, ik_ref, sk_ref,
                dk_ref, dv_ref, *, mask_spec, scale, block_q, groups):
  k, v = k_ref[...], v_ref[...]
  ik, sk = ik_ref[...], sk_ref[...]
  rk = _ranges(ik, sk)

  def body(i, carry):
    qs = pl.ds(i * block_q, block_q)
    iq, sq = iq_ref[qs], sq_ref[qs]

    def grad(carry):
      mask = block_mask(mask_spec, iq[:, None], sq[:, None], ik[None, :], sk[None, :])
      dk, dv = carry
      for g in range(groups):  # static: the kv head's G query heads share the mask
        q, do = q_ref[qs, g, :], do_ref[qs, g, :]
        lse, delta = lse_ref[g, qs], delta_ref[g, qs]
        p = jnp.where(mask, jnp.exp(_dot(q, k, trans_b=True) * scale - lse[:, None]), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True) * scale
      return dk, dv
    return lax.cond(_run(mask_spec, _ranges(iq, sq), rk), grad, lambda c: c, carry)

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk_ref[...], dv_ref[...] = lax.fori_loop(0, q_ref.shape[0] // block_q, body, carry)


def _params(d):
  return plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def check_blocks(c: int, s: int, d: int, block_q: int, block_k: int):
  """Raises ValueError unless the blocks divide the chunks and Triton can take the shapes."""
  for name, n, blk in (("block_q", c, block_q), ("block_k", s, block_k)):
    if n % blk:
      raise ValueError(f"pallas_gpu kernel: {name}={blk} must divide the chunk length {n}")
    if blk & (blk - 1) or blk < 16:
      raise ValueError(f"pallas_gpu kernel: {name}={blk} must be a power of two >= 16 (Triton)")
  if d & (d - 1) or d < 16:
    raise ValueError(f"pallas_gpu kernel: head_dim={d} must be a power of two >= 16 (Triton)")


def forward_for(q_BCHD, mq, *, mask_spec: MaskSpec, scale: float, block_q: int, block_k: int,
                interpret: bool = False):
  """attend(k_BSKD, v_BSKD, mk) -> (out_BCHD, lse_BCH), float32, of this query chunk (mq, mk:
  TokenMeta) against a key chunk."""
  b, c, h, d = q_BCHD.shape
  kernel = functools.partial(_forward_kernel, mask_spec=mask_spec, scale=scale, block_k=block_k)
  qspec = pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  mqspec = pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, i))

  def attend(k_BSKD, v_BSKD, mk):
    s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
    g = h // kh
    kvspec = pl.BlockSpec((None, s, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0))
    mkspec = pl.BlockSpec((None, s), lambda i, bi, hi: (bi, 0))
    o, lse_BHC = pl.pallas_call(
        kernel, grid=(c // block_q, b, h),
        in_specs=[qspec, kvspec, kvspec, mqspec, mqspec, mkspec, mkspec],
        out_specs=[qspec, pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[_out((b, c, h, d), q_BCHD), _out((b, h, c), q_BCHD)],
        compiler_params=_params(d), interpret=interpret, name="longctx_flash_forward",
    )(q_BCHD, k_BSKD, v_BSKD, mq.index, mq.segment, mk.index, mk.segment)
    return o, jnp.swapaxes(lse_BHC, 1, 2)
  return attend


def backward_for(q_BCHD, do_BCHD, lse_BCH, delta_BCH, mq, *, mask_spec: MaskSpec, scale: float,
                 block_q: int, block_k: int, interpret: bool = False):
  """grads(k_BSKD, v_BSKD, mk) -> (dq_BCHD, dk_BSKD, dv_BSKD), float32, of this query chunk
  against a key chunk; lse_BCH is the final lse (−inf rows allowed). The query side (do in q's
  dtype, lse and delta head-major) is prepared once, here."""
  b, c, h, d = q_BCHD.shape
  do_BCHD = do_BCHD.astype(q_BCHD.dtype)
  lse_BHC = jnp.swapaxes(jnp.where(jnp.isneginf(lse_BCH), 0.0, lse_BCH), 1, 2)
  delta_BHC = jnp.swapaxes(delta_BCH.astype(jnp.float32), 1, 2)
  qspec = pl.BlockSpec((None, block_q, None, d), lambda i, bi, hi: (bi, i, hi, 0))
  rowspec = pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))
  mqspec = pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, i))
  mqall = pl.BlockSpec((None, c), lambda j, bi, ki: (bi, 0))

  def grads(k_BSKD, v_BSKD, mk):
    s, kh = k_BSKD.shape[1], k_BSKD.shape[2]
    g = h // kh
    metas = (mq.index, mq.segment, mk.index, mk.segment)
    kvspec = pl.BlockSpec((None, s, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0))
    mkspec = pl.BlockSpec((None, s), lambda i, bi, hi: (bi, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, mask_spec=mask_spec, scale=scale, block_k=block_k),
        grid=(c // block_q, b, h),
        in_specs=[qspec, kvspec, kvspec, qspec, rowspec, rowspec, mqspec, mqspec, mkspec,
                  mkspec],
        out_specs=qspec, out_shape=_out((b, c, h, d), q_BCHD),
        compiler_params=_params(d), interpret=interpret, name="longctx_flash_dq",
    )(q_BCHD, k_BSKD, v_BSKD, do_BCHD, lse_BHC, delta_BHC, *metas)

    # dk/dv: one program per (key block, batch row, kv head); it reads the G query heads of its
    # group (heads kv·G .. kv·G + G − 1) whole along C
    qgspec = pl.BlockSpec((None, c, g, d), lambda j, bi, ki: (bi, 0, ki, 0))
    rowgspec = pl.BlockSpec((None, g, c), lambda j, bi, ki: (bi, ki, 0))
    kspec = pl.BlockSpec((None, block_k, None, d), lambda j, bi, ki: (bi, j, ki, 0))
    mkblk = pl.BlockSpec((None, block_k), lambda j, bi, ki: (bi, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, mask_spec=mask_spec, scale=scale, block_q=block_q, groups=g),
        grid=(s // block_k, b, kh),
        in_specs=[qgspec, kspec, kspec, qgspec, rowgspec, rowgspec, mqall, mqall, mkblk, mkblk],
        out_specs=[kspec, kspec],
        out_shape=[_out((b, s, kh, d), q_BCHD)] * 2,
        compiler_params=_params(d), interpret=interpret, name="longctx_flash_dkv",
    )(q_BCHD, k_BSKD, v_BSKD, do_BCHD, lse_BHC, delta_BHC, *metas)
    return dq, dk, dv
  return grads


def chunk_forward(q_BCHD, k_BSKD, v_BSKD, mq, mk, **kw):
  """(out_BCHD, lse_BCH), float32, of a query chunk attending a key chunk (`forward_for`)."""
  return forward_for(q_BCHD, mq, **kw)(k_BSKD, v_BSKD, mk)


def chunk_backward(q_BCHD, k_BSKD, v_BSKD, do_BCHD, lse_BCH, delta_BCH, mq, mk, **kw):
  """(dq_BCHD, dk_BSKD, dv_BSKD), float32 (`backward_for`)."""
  return backward_for(q_BCHD, do_BCHD, lse_BCH, delta_BCH, mq, **kw)(k_BSKD, v_BSKD, mk)
