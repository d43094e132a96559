"""Blockwise (online-softmax) attention with a recomputing custom_vjp.

Legend: B batch, C query chunk, S key chunk, H query heads, K kv heads, G = H // K,
D head dim, Q query tile, T key tile, N number of tiles; in tiles, M = B·K (the matmul batch)
and R = G·Q (a kv head's query rows).

`chunk_forward` / `chunk_backward` attend one query chunk to one key chunk, tile by tile, and
skip every (query tile, key tile) pair whose mask is empty (causal, segment or S² group mask),
so causal attention does about half the tile work. Whether a pair is empty, fully visible or
partial is decided from the tiles' index / segment ranges, so only partial tiles (the causal
diagonal, document boundaries) build a mask. They are the inner kernel of both the
single-device `blockwise_attention` and the ring (ring.py). Memory is O(C·T) per tile, never
O(C·S) for scores; the backward recomputes scores from (q, k, v, lse) as in FlashAttention-2.
K/V stay at K heads: a kv head's G query heads are rows of one matmul (R = G·Q) rather than
K/V repeated.
bfloat16 inputs are multiplied with float32 accumulation.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from longctx.attention.reference import (NEG_INF, MaskSpec, check_inputs, default_scale,
                                         make_mask)


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Static settings of the inner kernel: mask, softmax scale and tile sizes."""
  spec: MaskSpec
  scale: float
  block_q: int
  block_k: int


class TokenMeta(NamedTuple):
  """Per-token metadata used for masking: original index and segment id, both [B, C] int32."""
  index: jax.Array
  segment: jax.Array


def fit_block(length: int, block: int) -> int:
  """The largest tile size <= block that divides length."""
  block = max(1, min(block, length))
  while length % block:
    block -= 1
  return block


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", frozenset()))


def varying_like(x, ref):
  """Marks x as varying over the mesh axes that ref varies over (shard_map's check_vma), so
  loop carries and cond branches built from constants type-check inside shard_map."""
  missing = tuple(_varying_axes(ref) - _varying_axes(x))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


SKIP, FULL, MASKED = 0, 1, 2  # what a (query tile, key tile) pair needs; see `_tile_kind`


class TileStats(NamedTuple):
  """Per-tile ranges of the token metadata, each [N, B] int32: enough to tell, without building
  the mask, that a tile pair is certainly empty or certainly fully visible."""
  lo: jax.Array
  hi: jax.Array
  seg_lo: jax.Array
  seg_hi: jax.Array


def _meta_tiles(meta: TokenMeta, n: int) -> TokenMeta:
  """[B, C] metadata -> [N, B, C/N] tiles."""
  b, c = meta.index.shape
  return TokenMeta(*(x.reshape(b, n, c // n).transpose(1, 0, 2) for x in meta))


def _stats(meta_N: TokenMeta) -> TileStats:
  return TileStats(meta_N.index.min(-1), meta_N.index.max(-1), meta_N.segment.min(-1),
                   meta_N.segment.max(-1))


def _tile_kind(spec: MaskSpec, sq: TileStats, sk: TileStats):
  """SKIP, FULL or MASKED for one tile pair, from the tiles' index and segment ranges ([B]).

  Both tests are sufficient conditions, so a tile called empty is empty and one called full is
  full (see `reference.make_mask`); anything else is MASKED and builds its mask. In causal
  attention only tiles on the diagonal are MASKED: the others skip the mask and its `where`.
  """
  full = ((sq.seg_lo == sq.seg_hi) & (sk.seg_lo == sk.seg_hi) & (sq.seg_lo == sk.seg_lo)
          & (sq.seg_lo != 0))
  empty = (sq.seg_hi < sk.seg_lo) | (sk.seg_hi < sq.seg_lo) | ((sq.seg_lo == 0) & (sq.seg_hi == 0))
  if spec.causal:
    full &= sk.hi <= sq.lo
    empty |= sk.lo > sq.hi
  if spec.group_size is not None:
    gq_lo, gq_hi, gk_lo, gk_hi = ((x + spec.group_shift) // spec.group_size
                                  for x in (sq.lo, sq.hi, sk.lo, sk.hi))
    full &= (gq_lo == gq_hi) & (gk_lo == gk_hi) & (gq_lo == gk_lo)
    empty |= (gq_hi < gk_lo) | (gk_hi < gq_lo)
  return jnp.where(full.all(), FULL, jnp.where(empty.all(), SKIP, MASKED))


def _heads_tiles(x_BCHD, kh: int, n: int):
  """[B, C, H, D] -> [N, M, R, D]: query tiles with M = B·K (batch × kv head) as the matmul
  batch and R = G·Q (the kv head's G query heads × the tile's Q queries) as its rows, laid out
  once so that every tile product is a plain [M] batch of row-major matmuls (no unit dims
  that XLA would copy around, no T×Q matrix transposed)."""
  b, c, h, d = x_BCHD.shape
  g, nq = h // kh, c // n
  return (x_BCHD.reshape(b, n, nq, kh, g, d).transpose(1, 0, 3, 4, 2, 5)
          .reshape(n, b * kh, g * nq, d))


def untile_heads(x_NMRD, b: int, h: int):
  """Inverse of `_heads_tiles`: [N, M, R, D] -> [B, C, H, D] (b batch rows, h query heads)."""
  n, m, r, d = x_NMRD.shape
  kh = m // b
  g = h // kh
  return (x_NMRD.reshape(n, b, kh, g, r // g, d).transpose(1, 0, 4, 2, 3, 5)
          .reshape(b, n * (r // g), h, d))


def _rows_tiles(x_BCH, kh: int, n: int):
  """[B, C, H] -> [N, M, R] (per-query statistics, like `_heads_tiles`)."""
  return _heads_tiles(x_BCH[..., None], kh, n)[..., 0]


def untile_rows(x_NMR, b: int, h: int):
  """Inverse of `_rows_tiles`: [N, M, R] -> [B, C, H]."""
  return untile_heads(x_NMR[..., None], b, h)[..., 0]


def _kv_tiles(x_BSKD, n: int):
  """[B, S, K, D] -> [N, M, T, D]."""
  b, s, kh, d = x_BSKD.shape
  return x_BSKD.reshape(b, n, s // n, kh, d).transpose(1, 0, 3, 2, 4).reshape(n, b * kh, s // n, d)


def untile_kv_t(x_NMDT, b: int):
  """Key-side gradients, kept transposed ([N, M, D, T], see `tiled_backward`) -> [B, S, K, D]."""
  n, m, d, t = x_NMDT.shape
  return x_NMDT.reshape(n, b, m // b, d, t).transpose(1, 0, 4, 2, 3).reshape(b, n * t, m // b, d)


def _t(x):
  """Swaps the last two axes: [.., T, D] <-> [.., D, T]."""
  return jnp.swapaxes(x, -1, -2)


def _scores(q_MRD, kT_MDT):
  """Unscaled scores q·k, float32, with K given transposed ([M, D, T]) so the product is a
  row-major matmul. The softmax scale is applied inside the consumers' fusions (or to the
  small dq / dk tiles), so no scaled copy of the scores is ever written."""
  return jnp.einsum("mrd,mdt->mrt", q_MRD, kT_MDT, preferred_element_type=jnp.float32)


def _masked(s_MRT, mask_BQT):
  """Scores with the disallowed pairs set to −inf; the [B, Q, T] mask is broadcast over the
  kv heads and the group's query heads of M = B·K, R = G·Q."""
  m, r, t = s_MRT.shape
  b, nq, _ = mask_BQT.shape
  mask_MRT = jnp.broadcast_to(mask_BQT[:, None, None], (b, m // b, r // nq, nq, t))
  return jnp.where(mask_MRT.reshape(m, r, t), s_MRT, NEG_INF)


def _switch(kind, skip, full, masked, mask_fn):
  """Runs skip / full / masked by tile kind, and says whether the tile was computed.

  A MASKED tile whose mask turns out empty is still computed (harmlessly: all its scores are
  −inf, so it adds nothing) but not counted; a nested cond to skip it would add a third copy of
  the tile code to every loop for tiles the range tests (`_tile_kind`) rarely leave undecided.
  """
  def partial(_):
    mask_BQT = mask_fn()
    return masked(mask_BQT), mask_BQT.any()
  return jax.lax.switch(kind, [lambda _: (skip(None), kind < 0), lambda _: (full(), kind >= 0),
                               partial], None)


def _fwd_q_tile(cfg: TileConfig, q_MRD, mq: TokenMeta, sq: TileStats, init, kT_NMDT, v_NMTD,
                mk_N: TokenMeta, sk_N: TileStats):
  """Online softmax of one query tile over all key tiles, continuing from init = (acc, m, l);
  returns ((acc, m, l), tiles computed)."""

  def update(carry, s_MRT, v_MTD, may_be_empty):
    acc_MRD, m_MR, l_MR = carry  # m: running max of the *unscaled* scores (scale > 0)
    m_new = jnp.maximum(m_MR, s_MRT.max(axis=-1))
    # a row fully masked so far has m = −inf; a FULL tile makes every row finite
    m_ref = jnp.where(jnp.isneginf(m_new), 0.0, m_new) if may_be_empty else m_new
    p_MRT = jnp.exp((s_MRT - m_ref[..., None]) * cfg.scale)
    corr_MR = jnp.exp((m_MR - m_ref) * cfg.scale)
    pv_MRD = jnp.einsum("mrt,mtd->mrd", p_MRT.astype(v_MTD.dtype), v_MTD,
                        preferred_element_type=jnp.float32)
    return acc_MRD * corr_MR[..., None] + pv_MRD, m_new, l_MR * corr_MR + p_MRT.sum(axis=-1)

  def step(state, xs):
    carry, count = state
    kT_MDT, v_MTD, mk, sk = xs
    s_fn = lambda: _scores(q_MRD, kT_MDT)
    carry, computed = _switch(
        _tile_kind(cfg.spec, sq, sk), lambda _: carry,
        lambda: update(carry, s_fn(), v_MTD, False),
        lambda mask_BQT: update(carry, _masked(s_fn(), mask_BQT), v_MTD, True),
        lambda: make_mask(mq.index, mq.segment, mk.index, mk.segment, cfg.spec))
    return (carry, count + computed.astype(jnp.int32)), None

  count = varying_like(varying_like(jnp.zeros((), jnp.int32), q_MRD), kT_NMDT)
  (out, count), _ = jax.lax.scan(step, (init, count), (kT_NMDT, v_NMTD, mk_N, sk_N))
  return out, count


class QueryTiles(NamedTuple):
  """A query chunk laid out once for the kernel: q [N, M, R, D], metadata [N, B, Q] and its
  tile ranges. The ring builds it once per layer, not once per ring step."""
  q: jax.Array
  meta: TokenMeta
  stats: TileStats


class KeyTiles(NamedTuple):
  """A key chunk laid out for the kernel: k, v [N, M, T, D] and metadata [N, B, T] (what
  travels the ring; its ranges are recomputed on arrival rather than sent)."""
  k: jax.Array
  v: jax.Array
  meta: TokenMeta


def query_tiles(cfg: TileConfig, x_BCHD, kv_heads: int, mq: TokenMeta) -> QueryTiles:
  """Lays out a query chunk (or its output cotangent: use `.q`) for the kernel."""
  n = x_BCHD.shape[1] // cfg.block_q
  meta_N = _meta_tiles(mq, n)
  return QueryTiles(_heads_tiles(x_BCHD, kv_heads, n), meta_N, _stats(meta_N))


def key_tiles(cfg: TileConfig, k_BSKD, v_BSKD, mk: TokenMeta) -> KeyTiles:
  """Lays out a key chunk for the kernel."""
  n = k_BSKD.shape[1] // cfg.block_k
  return KeyTiles(_kv_tiles(k_BSKD, n), _kv_tiles(v_BSKD, n), _meta_tiles(mk, n))


def rows_tiles(cfg: TileConfig, x_BCH, kv_heads: int):
  """Per-query statistics [B, C, H] in the layout of `query_tiles`: [N, M, R]."""
  return _rows_tiles(x_BCH, kv_heads, x_BCH.shape[1] // cfg.block_q)


def softmax_init(qt: QueryTiles):
  """The online-softmax state (acc [N, M, R, D], m, l [N, M, R]) before any key: it is
  carried from key chunk to key chunk (and ring step to ring step) unnormalised, so partial
  results need no normalise-and-merge in between. m is the running max of unscaled scores."""
  init = (jnp.zeros(qt.q.shape, jnp.float32), jnp.full(qt.q.shape[:-1], NEG_INF, jnp.float32),
          jnp.zeros(qt.q.shape[:-1], jnp.float32))
  return jax.tree.map(lambda x: varying_like(x, qt.q), init)


def softmax_finish(cfg: TileConfig, state):
  """(out [N, M, R, D] f32, lse [N, M, R]) from an online-softmax state."""
  acc, m, l = state
  empty = l == 0
  o_N = acc / jnp.where(empty, 1.0, l)[..., None]
  lse_N = jnp.where(empty, NEG_INF, m * cfg.scale + jnp.log(jnp.where(empty, 1.0, l)))
  return o_N, lse_N


def tiled_forward(cfg: TileConfig, qt: QueryTiles, kt: KeyTiles, state):
  """Continues the online softmax `state` (see `softmax_init`) of the query tiles over one key
  chunk; returns (state, tiles computed)."""
  sk_N = _stats(kt.meta)
  kT_N = _t(kt.k)  # once per key chunk: O(S·D), against O(C·S·D) of products

  def one_q_tile(xs):
    q_MRD, mq_t, sq, init = xs
    return _fwd_q_tile(cfg, q_MRD, mq_t, sq, init, kT_N, kt.v, kt.meta, sk_N)

  state, counts = jax.lax.map(one_q_tile, tuple(qt) + (state,))
  return state, counts.sum()


def chunk_forward(cfg: TileConfig, q_BCHD, k_BSKD, v_BSKD, mq: TokenMeta, mk: TokenMeta):
  """Attention of a query chunk to a key chunk.

  Returns (out_BCHD float32, normalised; lse_BCH float32, −inf where nothing is attended;
  tiles computed, int32 scalar).
  """
  b, _, h, _ = q_BCHD.shape
  qt = query_tiles(cfg, q_BCHD, k_BSKD.shape[2], mq)
  state, count = tiled_forward(cfg, qt, key_tiles(cfg, k_BSKD, v_BSKD, mk), softmax_init(qt))
  o_N, lse_N = softmax_finish(cfg, state)
  return untile_heads(o_N, b, h), untile_rows(lse_N, b, h), count


def _tile_grads(cfg, q_MRD, qT_MDR, do_MRD, doT_MDR, lse_MR, delta_MR, k_MTD, kT_MDT, vT_MDT,
                mask_BQT=None):
  """(dq [M, R, D], dkᵀ, dvᵀ [M, D, T]) of one tile pair (FlashAttention-2's backward);
  mask_BQT None = FULL tile.

  Every product is a row-major matmul of operands laid out for it (q, do, k and their
  transposes, all small R×D or T×D tiles): dvᵀ = dOᵀ·P and dkᵀ = Qᵀ·dS come out transposed
  rather than contracting P or dS over their rows, which XLA:CPU runs at half speed or after
  transposing the R×T matrix. P is computed once and reused.
  """
  s_MRT = _scores(q_MRD, kT_MDT)
  if mask_BQT is not None:
    s_MRT = _masked(s_MRT, mask_BQT)
  p_MRT = jnp.exp(s_MRT * cfg.scale - lse_MR[..., None])
  dvT_MDT = jnp.einsum("mdr,mrt->mdt", doT_MDR, p_MRT.astype(doT_MDR.dtype),
                       preferred_element_type=jnp.float32)
  dp_MRT = jnp.einsum("mrd,mdt->mrt", do_MRD, vT_MDT, preferred_element_type=jnp.float32)
  ds_MRT = p_MRT * (dp_MRT - delta_MR[..., None])  # dS / scale
  dq_MRD = jnp.einsum("mrt,mtd->mrd", ds_MRT.astype(k_MTD.dtype), k_MTD,
                      preferred_element_type=jnp.float32) * cfg.scale
  dkT_MDT = jnp.einsum("mdr,mrt->mdt", qT_MDR, ds_MRT.astype(qT_MDR.dtype),
                       preferred_element_type=jnp.float32) * cfg.scale
  return dq_MRD, dkT_MDT, dvT_MDT


def tiled_backward(cfg: TileConfig, qt: QueryTiles, do_N, lse_N, delta_N, kt: KeyTiles,
                   grads=None):
  """`chunk_backward` on laid-out tiles (do like qt.q; lse, delta from `rows_tiles`, lse with
  −inf replaced by 0): (dq like qt.q, dkᵀ, dvᵀ [N, M, D, T]), float32, added to `grads` (the
  same triple; None = zeros) in place, so the ring needs no separate accumulation. dk and dv
  stay transposed until `untile_kv_t` (see `_tile_grads`).

  Key tiles outside, query tiles inside (FlashAttention-2): dk, dv of a key tile stay in the
  loop carry and each query tile's dq is added in place into the [N, ...] dq buffer.
  """
  q_side = (jnp.arange(qt.q.shape[0]), qt.q, _t(qt.q), do_N, _t(do_N), lse_N, delta_N, qt.meta,
            qt.stats)

  def one_k_tile(dq_NMRD, xs):
    k_MTD, v_MTD, mk, sk, dk0, dv0 = xs
    kT_MDT, vT_MDT = _t(k_MTD), _t(v_MTD)

    def step(carry, xs):
      dkT_MDT, dvT_MDT, dq_NMRD = carry
      i, q_MRD, qT_MDR, do_MRD, doT_MDR, lse_MR, delta_MR, mq, sq = xs
      grads = functools.partial(_tile_grads, cfg, q_MRD, qT_MDR, do_MRD, doT_MDR, lse_MR,
                                delta_MR, k_MTD, kT_MDT, vT_MDT)
      skip = lambda _: (varying_like(jnp.zeros(q_MRD.shape, jnp.float32), dq_NMRD),
                        jnp.zeros_like(dkT_MDT), jnp.zeros_like(dvT_MDT))
      (dq, dk, dv), _ = _switch(
          _tile_kind(cfg.spec, sq, sk), skip, grads, grads,
          lambda: make_mask(mq.index, mq.segment, mk.index, mk.segment, cfg.spec))
      dq_NMRD = dq_NMRD.at[i].add(dq)
      return (dkT_MDT + dk, dvT_MDT + dv, dq_NMRD), None

    (dk, dv, dq_NMRD), _ = jax.lax.scan(step, (dk0, dv0, dq_NMRD), q_side)
    return dq_NMRD, (dk, dv)

  if grads is None:
    zeros = lambda shape: varying_like(varying_like(jnp.zeros(shape, jnp.float32), qt.q), kt.k)
    grads = (zeros(qt.q.shape), zeros(_t(kt.k).shape), zeros(_t(kt.k).shape))
  dq_N, dk_N, dv_N = grads
  dq_N, (dk_N, dv_N) = jax.lax.scan(one_k_tile, dq_N,
                                    (kt.k, kt.v, kt.meta, _stats(kt.meta), dk_N, dv_N))
  return dq_N, dk_N, dv_N


def safe_lse(lse):
  """lse with −inf (rows that attend nothing) replaced by 0, as the backward needs it."""
  return jnp.where(jnp.isneginf(lse), 0.0, lse)


def chunk_backward(cfg: TileConfig, q_BCHD, k_BSKD, v_BSKD, do_BCHD, lse_BCH, delta_BCH,
                   mq: TokenMeta, mk: TokenMeta):
  """Gradients (dq_BCHD, dk_BSKD, dv_BSKD), float32, of a query chunk against a key chunk.

  lse_BCH is the *final* log-sum-exp of each query over all keys, delta_BCH = Σ_d do·out.
  """
  b, _, h, _ = q_BCHD.shape
  kh = k_BSKD.shape[2]
  qt = query_tiles(cfg, q_BCHD, kh, mq)
  dq_N, dkT_N, dvT_N = tiled_backward(
      cfg, qt, query_tiles(cfg, do_BCHD, kh, mq).q, rows_tiles(cfg, safe_lse(lse_BCH), kh),
      rows_tiles(cfg, delta_BCH, kh), key_tiles(cfg, k_BSKD, v_BSKD, mk))
  return untile_heads(dq_N, b, h), untile_kv_t(dkT_N, b), untile_kv_t(dvT_N, b)


def merge_partials(o_a_BCHD, lse_a_BCH, o_b_BCHD, lse_b_BCH):
  """Merges two normalised partial attentions over disjoint key sets through their lse."""
  lse_BCH = jnp.logaddexp(lse_a_BCH, lse_b_BCH)
  lse_safe = jnp.where(jnp.isneginf(lse_BCH), 0.0, lse_BCH)
  w_a = jnp.exp(lse_a_BCH - lse_safe)[..., None]
  w_b = jnp.exp(lse_b_BCH - lse_safe)[..., None]
  return o_a_BCHD * w_a + o_b_BCHD * w_b, lse_BCH


def output_delta(do_BCHD, o_BCHD):
  """delta = Σ_d do·o, float32, the softmax-gradient correction term."""
  return jnp.sum(do_BCHD.astype(jnp.float32) * o_BCHD.astype(jnp.float32), axis=-1)


def tie_inputs(args):
  """Passes an attention forward's inputs through one `optimization_barrier`, so that none of
  them is loop-invariant in a `lax.scan` over layers unless all of them are.

  Why: when `jax.grad` linearizes a scan, JAX hoists the part of the body's primal computation
  that depends only on the scan's constants out of the loop (`_scan_known_hoisting` in
  jax/_src/lax/control_flow/loops.py). The layers' segment ids and token indices are such
  constants, so the tile kinds and masks built from them are hoisted, and partial evaluation of
  the tile loops (`lax.scan`, `lax.switch`) splits them too: every tile's mask and −inf fill,
  [N_q, N_k, B, K, G, Q, T], becomes a stacked input of the loop, O(L²) memory although the
  custom_vjp saves only O(L) residuals (L = 8192, 4 heads: 1.6 GB of temp for the gradient of
  two scanned layers, 80 MB with the barrier). The barrier is one primitive: as soon as one
  input depends on the carry, all its outputs do, and the whole forward stays in the loop. It
  costs no compute (it only keeps XLA from moving code across it).
  """
  return jax.lax.optimization_barrier(args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blockwise(cfg: TileConfig, q_BLHD, k_BLKD, v_BLKD, meta: TokenMeta):
  return _blockwise_fwd(cfg, q_BLHD, k_BLKD, v_BLKD, meta)[0]


def _blockwise_fwd(cfg, q_BLHD, k_BLKD, v_BLKD, meta):
  q_t, k_t, v_t, meta_t = tie_inputs((q_BLHD, k_BLKD, v_BLKD, meta))
  o_BLHD, lse_BLH, _ = chunk_forward(cfg, q_t, k_t, v_t, meta_t, meta_t)
  out = (o_BLHD.astype(q_BLHD.dtype), lse_BLH)
  # the untied inputs: a scan forwards residuals that are its own inputs instead of stacking them
  return out, (q_BLHD, k_BLKD, v_BLKD, meta, out[0], lse_BLH)


def _blockwise_bwd(cfg, res, cts):
  q_BLHD, k_BLKD, v_BLKD, meta, o_BLHD, lse_BLH = res
  do_BLHD = cts[0]  # the lse output is for merging only; its cotangent is not propagated
  delta_BLH = output_delta(do_BLHD, o_BLHD)
  dq, dk, dv = chunk_backward(cfg, q_BLHD, k_BLKD, v_BLKD, do_BLHD, lse_BLH, delta_BLH, meta,
                              meta)
  return dq.astype(q_BLHD.dtype), dk.astype(k_BLKD.dtype), dv.astype(v_BLKD.dtype), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def natural_meta(segment_ids_BL, b: int, l: int) -> TokenMeta:
  """Metadata of a natural-order sequence: index 0..L-1, segment ids (all 1 if None)."""
  seg = jnp.ones((b, l), jnp.int32) if segment_ids_BL is None else segment_ids_BL.astype(jnp.int32)
  idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32)[None, :], (b, l))
  return TokenMeta(idx, seg)


def blockwise_attention_with_lse(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL=None, *, causal=True,
                                 scale=None, block_q=512, block_k=512, spec=None):
  """Like `blockwise_attention` but returns (out_BLHD, lse_BLH); lse carries no gradient."""
  check_inputs(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL)
  b, l, _, d = q_BLHD.shape
  spec = MaskSpec(causal=causal) if spec is None else spec
  cfg = TileConfig(spec, default_scale(d, scale), fit_block(l, block_q), fit_block(l, block_k))
  return _blockwise(cfg, q_BLHD, k_BLKD, v_BLKD, natural_meta(segment_ids_BL, b, l))


def blockwise_attention(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL=None, *, causal=True, scale=None,
                        block_q=512, block_k=512, spec=None):
  """Memory-efficient attention on one device; same contract as `dense_attention`.

  block_q, block_k: tile sizes (reduced to the largest divisor of L). Tiles the mask empties
  are skipped. Gradients recompute tiles: memory O(L·block), not O(L²).
  """
  return blockwise_attention_with_lse(q_BLHD, k_BLKD, v_BLKD, segment_ids_BL, causal=causal,
                                      scale=scale, block_q=block_q, block_k=block_k,
                                      spec=spec)[0]
