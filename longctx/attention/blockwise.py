"""Blockwise (online-softmax) attention with a recomputing custom_vjp.

Legend: B batch, C query chunk, S key chunk, H query heads, K kv heads, G = H // K,
D head dim, Q query tile, T key tile, N number of tiles.

`chunk_forward` / `chunk_backward` attend one query chunk to one key chunk, tile by tile, and
skip every (query tile, key tile) pair whose mask is empty (causal, segment or S² group mask),
so causal attention does about half the tile work. Whether a pair is empty, fully visible or
partial is decided from the tiles' index / segment ranges, so only partial tiles (the causal
diagonal, document boundaries) build a mask. They are the inner kernel of both the
single-device `blockwise_attention` and the ring (ring.py). Memory is O(C·T) per tile, never
O(C·S) for scores; the backward recomputes scores from (q, k, v, lse) as in FlashAttention-2.
K/V stay at K heads: query heads are grouped [B, ., K, G, D] rather than K/V repeated.
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
  """[B, C, H, D] -> [N, B, K, G, Q, D]: query tiles, heads grouped by kv head, laid out once
  so that every tile product is a plain batched matmul."""
  b, c, h, d = x_BCHD.shape
  return x_BCHD.reshape(b, n, c // n, kh, h // kh, d).transpose(1, 0, 3, 4, 2, 5)


def untile_heads(x_NBKGQD):
  """Inverse of `_heads_tiles`: [N, B, K, G, Q, D] -> [B, C, H, D]."""
  n, b, kh, g, nq, d = x_NBKGQD.shape
  return x_NBKGQD.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * nq, kh * g, d)


def _rows_tiles(x_BCH, kh: int, n: int):
  """[B, C, H] -> [N, B, K, G, Q] (per-query statistics, like `_heads_tiles`)."""
  b, c, h = x_BCH.shape
  return x_BCH.reshape(b, n, c // n, kh, h // kh).transpose(1, 0, 3, 4, 2)


def untile_rows(x_NBKGQ):
  """Inverse of `_rows_tiles`: [N, B, K, G, Q] -> [B, C, H]."""
  n, b, kh, g, nq = x_NBKGQ.shape
  return x_NBKGQ.transpose(1, 0, 4, 2, 3).reshape(b, n * nq, kh * g)


def _kv_tiles(x_BSKD, n: int):
  """[B, S, K, D] -> [N, B, K, T, D]."""
  b, s, kh, d = x_BSKD.shape
  return x_BSKD.reshape(b, n, s // n, kh, d).transpose(1, 0, 3, 2, 4)


def untile_kv(x_NBKTD):
  """Inverse of `_kv_tiles`: [N, B, K, T, D] -> [B, S, K, D]."""
  n, b, kh, t, d = x_NBKTD.shape
  return x_NBKTD.transpose(1, 0, 3, 2, 4).reshape(b, n * t, kh, d)


def _scores(q_BKGQD, k_BKTD):
  """Unscaled scores q·k, float32. The softmax scale is applied inside the consumers' fusions
  (or to the small dq / dk tiles), so no scaled copy of the scores is ever written."""
  return jnp.einsum("bkgqd,bktd->bkgqt", q_BKGQD, k_BKTD, preferred_element_type=jnp.float32)


def _masked(s_BKGQT, mask_BQT):
  return jnp.where(mask_BQT[:, None, None], s_BKGQT, NEG_INF)


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


def _fwd_q_tile(cfg: TileConfig, q_BKGQD, mq: TokenMeta, sq: TileStats, init, k_NBKTD, v_NBKTD,
                mk_N: TokenMeta, sk_N: TileStats):
  """Online softmax of one query tile over all key tiles, continuing from init = (acc, m, l);
  returns ((acc, m, l), tiles computed)."""

  def update(carry, s_BKGQT, v_BKTD, may_be_empty):
    acc_BKGQD, m_BKGQ, l_BKGQ = carry  # m: running max of the *unscaled* scores (scale > 0)
    m_new = jnp.maximum(m_BKGQ, s_BKGQT.max(axis=-1))
    # a row fully masked so far has m = −inf; a FULL tile makes every row finite
    m_ref = jnp.where(jnp.isneginf(m_new), 0.0, m_new) if may_be_empty else m_new
    p_BKGQT = jnp.exp((s_BKGQT - m_ref[..., None]) * cfg.scale)
    corr_BKGQ = jnp.exp((m_BKGQ - m_ref) * cfg.scale)
    pv_BKGQD = jnp.einsum("bkgqt,bktd->bkgqd", p_BKGQT.astype(v_BKTD.dtype), v_BKTD,
                          preferred_element_type=jnp.float32)
    return (acc_BKGQD * corr_BKGQ[..., None] + pv_BKGQD, m_new,
            l_BKGQ * corr_BKGQ + p_BKGQT.sum(axis=-1))

  def step(state, xs):
    carry, count = state
    k_BKTD, v_BKTD, mk, sk = xs
    s_fn = lambda: _scores(q_BKGQD, k_BKTD)
    carry, computed = _switch(
        _tile_kind(cfg.spec, sq, sk), lambda _: carry,
        lambda: update(carry, s_fn(), v_BKTD, False),
        lambda mask_BQT: update(carry, _masked(s_fn(), mask_BQT), v_BKTD, True),
        lambda: make_mask(mq.index, mq.segment, mk.index, mk.segment, cfg.spec))
    return (carry, count + computed.astype(jnp.int32)), None

  count = varying_like(varying_like(jnp.zeros((), jnp.int32), q_BKGQD), k_NBKTD)
  (out, count), _ = jax.lax.scan(step, (init, count), (k_NBKTD, v_NBKTD, mk_N, sk_N))
  return out, count


class QueryTiles(NamedTuple):
  """A query chunk laid out once for the kernel: q [N, B, K, G, Q, D], metadata [N, B, Q] and
  its tile ranges. The ring builds it once per layer, not once per ring step."""
  q: jax.Array
  meta: TokenMeta
  stats: TileStats


class KeyTiles(NamedTuple):
  """A key chunk laid out for the kernel: k, v [N, B, K, T, D] and metadata [N, B, T] (what
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
  """Per-query statistics [B, C, H] in the layout of `query_tiles`: [N, B, K, G, Q]."""
  return _rows_tiles(x_BCH, kv_heads, x_BCH.shape[1] // cfg.block_q)


def softmax_init(qt: QueryTiles):
  """The online-softmax state (acc [N, B, K, G, Q, D], m, l [N, B, K, G, Q]) before any key: it
  is carried from key chunk to key chunk (and ring step to ring step) unnormalised, so partial
  results need no normalise-and-merge in between. m is the running max of unscaled scores."""
  init = (jnp.zeros(qt.q.shape, jnp.float32), jnp.full(qt.q.shape[:-1], NEG_INF, jnp.float32),
          jnp.zeros(qt.q.shape[:-1], jnp.float32))
  return jax.tree.map(lambda x: varying_like(x, qt.q), init)


def softmax_finish(cfg: TileConfig, state):
  """(out [N, B, K, G, Q, D] f32, lse [N, B, K, G, Q]) from an online-softmax state."""
  acc, m, l = state
  empty = l == 0
  o_N = acc / jnp.where(empty, 1.0, l)[..., None]
  lse_N = jnp.where(empty, NEG_INF, m * cfg.scale + jnp.log(jnp.where(empty, 1.0, l)))
  return o_N, lse_N


def tiled_forward(cfg: TileConfig, qt: QueryTiles, kt: KeyTiles, state):
  """Continues the online softmax `state` (see `softmax_init`) of the query tiles over one key
  chunk; returns (state, tiles computed)."""
  sk_N = _stats(kt.meta)

  def one_q_tile(xs):
    q_BKGQD, mq_t, sq, init = xs
    return _fwd_q_tile(cfg, q_BKGQD, mq_t, sq, init, kt.k, kt.v, kt.meta, sk_N)

  state, counts = jax.lax.map(one_q_tile, tuple(qt) + (state,))
  return state, counts.sum()


def chunk_forward(cfg: TileConfig, q_BCHD, k_BSKD, v_BSKD, mq: TokenMeta, mk: TokenMeta):
  """Attention of a query chunk to a key chunk.

  Returns (out_BCHD float32, normalised; lse_BCH float32, −inf where nothing is attended;
  tiles computed, int32 scalar).
  """
  qt = query_tiles(cfg, q_BCHD, k_BSKD.shape[2], mq)
  state, count = tiled_forward(cfg, qt, key_tiles(cfg, k_BSKD, v_BSKD, mk), softmax_init(qt))
  o_N, lse_N = softmax_finish(cfg, state)
  return untile_heads(o_N), untile_rows(lse_N), count


def _tile_grads(cfg, q_BKGQD, do_BKGQD, lse_BKGQ, delta_BKGQ, k_BKTD, v_BKTD, mask_BQT=None):
  """(dq, dk, dv) of one tile pair (FlashAttention-2's backward); mask_BQT None = FULL tile.

  Works key-major: scores, P and dS are built as [.., T, G, Q], the layout in which dv = Pᵀ·dO
  and dk = dSᵀ·Q are plain matmuls and dq comes out as (K·dSᵀ)ᵀ, so no T×Q matrix is ever
  transposed (only the small T×D and Q×D tiles are). P is computed once and reused.
  """
  sT_BKTGQ = jnp.einsum("bktd,bkgqd->bktgq", k_BKTD, q_BKGQD,
                        preferred_element_type=jnp.float32)
  if mask_BQT is not None:
    maskT_B1T1Q = jnp.swapaxes(mask_BQT, 1, 2)[:, None, :, None, :]
    sT_BKTGQ = jnp.where(maskT_B1T1Q, sT_BKTGQ, NEG_INF)
  pT_BKTGQ = jnp.exp(sT_BKTGQ * cfg.scale - lse_BKGQ[:, :, None])
  dv_BKTD = jnp.einsum("bktgq,bkgqd->bktd", pT_BKTGQ.astype(do_BKGQD.dtype), do_BKGQD,
                       preferred_element_type=jnp.float32)
  dpT_BKTGQ = jnp.einsum("bktd,bkgqd->bktgq", v_BKTD, do_BKGQD,
                         preferred_element_type=jnp.float32)
  dsT_BKTGQ = pT_BKTGQ * (dpT_BKTGQ - delta_BKGQ[:, :, None])  # dS / scale
  dq_BKGQD = jnp.einsum("bktd,bktgq->bkgqd", k_BKTD, dsT_BKTGQ.astype(k_BKTD.dtype),
                        preferred_element_type=jnp.float32) * cfg.scale
  dk_BKTD = jnp.einsum("bktgq,bkgqd->bktd", dsT_BKTGQ.astype(q_BKGQD.dtype), q_BKGQD,
                       preferred_element_type=jnp.float32) * cfg.scale
  return dq_BKGQD, dk_BKTD, dv_BKTD


def tiled_backward(cfg: TileConfig, qt: QueryTiles, do_N, lse_N, delta_N, kt: KeyTiles,
                   grads=None):
  """`chunk_backward` on laid-out tiles (do like qt.q; lse, delta from `rows_tiles`, lse with
  −inf replaced by 0): (dq like qt.q, dk, dv like kt.k), float32, added to `grads` (the same
  triple; None = zeros) in place, so the ring needs no separate accumulation.

  Key tiles outside, query tiles inside (FlashAttention-2): dk, dv of a key tile stay in the
  loop carry and each query tile's dq is added in place into the [N, ...] dq buffer.
  """
  q_side = (jnp.arange(qt.q.shape[0]), qt.q, do_N, lse_N, delta_N, qt.meta, qt.stats)

  def one_k_tile(dq_NBKGQD, xs):
    k_BKTD, v_BKTD, mk, sk, dk0, dv0 = xs

    def step(carry, xs):
      dk_BKTD, dv_BKTD, dq_NBKGQD = carry
      i, q_BKGQD, do_BKGQD, lse_BKGQ, delta_BKGQ, mq, sq = xs
      grads = functools.partial(_tile_grads, cfg, q_BKGQD, do_BKGQD, lse_BKGQ, delta_BKGQ,
                                k_BKTD, v_BKTD)
      skip = lambda _: (varying_like(jnp.zeros(q_BKGQD.shape, jnp.float32), dq_NBKGQD),
                        jnp.zeros_like(dk_BKTD), jnp.zeros_like(dv_BKTD))
      (dq, dk, dv), _ = _switch(
          _tile_kind(cfg.spec, sq, sk), skip, grads, grads,
          lambda: make_mask(mq.index, mq.segment, mk.index, mk.segment, cfg.spec))
      dq_NBKGQD = dq_NBKGQD.at[i].add(dq)
      return (dk_BKTD + dk, dv_BKTD + dv, dq_NBKGQD), None

    (dk, dv, dq_NBKGQD), _ = jax.lax.scan(step, (dk0, dv0, dq_NBKGQD), q_side)
    return dq_NBKGQD, (dk, dv)

  if grads is None:
    zeros = lambda x: varying_like(varying_like(jnp.zeros(x.shape, jnp.float32), qt.q), kt.k)
    grads = (zeros(qt.q), zeros(kt.k), zeros(kt.k))
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
  kh = k_BSKD.shape[2]
  qt = query_tiles(cfg, q_BCHD, kh, mq)
  dq_N, dk_N, dv_N = tiled_backward(
      cfg, qt, query_tiles(cfg, do_BCHD, kh, mq).q, rows_tiles(cfg, safe_lse(lse_BCH), kh),
      rows_tiles(cfg, delta_BCH, kh), key_tiles(cfg, k_BSKD, v_BSKD, mk))
  return untile_heads(dq_N), untile_kv(dk_N), untile_kv(dv_N)


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
