"""Online-softmax attention over tiles with a recomputing custom_vjp.

Legend: B batch, C query chunk, S key chunk, H query heads, K kv heads, G = H // K,
D head dim, Q query tile, T key tile, N number of tiles; in tiles, M = B·K (the heads the
kernel loops over) and R = G·Q (a kv head's query rows).

`chunk_forward` / `chunk_backward` attend one query chunk to one key chunk, tile by tile, and
skip every (query tile, key tile) pair whose mask is empty (causal, segment or S² group mask),
so causal attention does about half the tile work. Whether a pair is empty, fully visible or
partial is decided from the tiles' index / segment ranges, so only partial tiles (the causal
diagonal, document boundaries) build a mask; tiles.py holds the tile sizes, the token metadata
and those range tests. The two functions are the pure-JAX inner kernel of the single-device
`local.tiled_attention`, the ring (ring.py) and the other strategies (kernels.KERNELS names
the others). Memory is O(C·T) per tile, never
O(C·S) for scores; the backward recomputes scores from (q, k, v, lse) as in FlashAttention-2.
K/V stay at K heads: a kv head's G query heads are rows of one matmul (R = G·Q) rather than
K/V repeated.
bfloat16 inputs are multiplied with float32 accumulation.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from longctx.attention.reference import NEG_INF, MaskSpec, make_mask
from longctx.attention.tiles import TileConfig, TileStats, TokenMeta, tile_full_empty


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


def _meta_tiles(meta: TokenMeta, n: int) -> TokenMeta:
  """[B, C] metadata -> [B, N, C/N] tiles."""
  b, c = meta.index.shape
  return TokenMeta(*(x.reshape(b, n, c // n) for x in meta))


def _per_head(meta_BN: TokenMeta, kh: int) -> TokenMeta:
  """[B, N, Q] tile metadata -> [M, N, Q], one copy per kv head of each batch row (M = B·K).
  Metadata travels the ring per batch row; the kernel loops over M."""
  return TokenMeta(*(jnp.repeat(x, kh, axis=0) for x in meta_BN))


def _stats(meta: TokenMeta) -> TileStats:
  return TileStats(meta.index.min(-1), meta.index.max(-1), meta.segment.min(-1),
                   meta.segment.max(-1))


def _tile_kind(mask_spec: MaskSpec, sq: TileStats, sk: TileStats):
  """SKIP, FULL or MASKED from `tile_full_empty`."""
  full, empty = tile_full_empty(mask_spec, sq, sk)
  return jnp.where(full, FULL, jnp.where(empty, SKIP, MASKED))


def _heads_tiles(x_BCHD, kh: int, n: int):
  """[B, C, H, D] -> [M, N, R, D]: M = B·K (batch row × kv head) outermost, the kernel's loop;
  each tile's rows R = G·Q are the kv head's G query heads × the tile's Q queries, so GQA
  multiplies one K/V tile by all its query heads at once, without repeating it."""
  b, c, h, d = x_BCHD.shape
  g, nq = h // kh, c // n
  return (x_BCHD.reshape(b, n, nq, kh, g, d).transpose(0, 3, 1, 4, 2, 5)
          .reshape(b * kh, n, g * nq, d))


def untile_heads(x_MNRD, b: int, h: int):
  """Inverse of `_heads_tiles`: [M, N, R, D] -> [B, C, H, D] (b batch rows, h query heads)."""
  m, n, r, d = x_MNRD.shape
  kh = m // b
  g = h // kh
  return (x_MNRD.reshape(b, kh, n, g, r // g, d).transpose(0, 2, 4, 1, 3, 5)
          .reshape(b, n * (r // g), h, d))


def _rows_tiles(x_BCH, kh: int, n: int):
  """[B, C, H] -> [M, N, R] (per-query statistics, like `_heads_tiles`)."""
  return _heads_tiles(x_BCH[..., None], kh, n)[..., 0]


def untile_rows(x_MNR, b: int, h: int):
  """Inverse of `_rows_tiles`: [M, N, R] -> [B, C, H]."""
  return untile_heads(x_MNR[..., None], b, h)[..., 0]


def _kv_tiles(x_BSKD, n: int):
  """[B, S, K, D] -> [M, N, T, D]."""
  b, s, kh, d = x_BSKD.shape
  return x_BSKD.reshape(b, n, s // n, kh, d).transpose(0, 3, 1, 2, 4).reshape(b * kh, n, s // n, d)


def untile_kv_t(x_MNDT, b: int):
  """Key-side gradients, kept transposed ([M, N, D, T], see `tiled_backward`) -> [B, S, K, D]."""
  m, n, d, t = x_MNDT.shape
  return x_MNDT.reshape(b, m // b, n, d, t).transpose(0, 2, 4, 1, 3).reshape(b, n * t, m // b, d)


def _t(x):
  """Swaps the last two axes: [.., T, D] <-> [.., D, T]."""
  return jnp.swapaxes(x, -1, -2)


def _scores(q_RD, kT_DT):
  """Unscaled scores q·k, float32, with K given transposed ([D, T]) so the product is a
  row-major matmul. The softmax scale is applied inside the consumers' fusions (or to the
  small dq / dk tiles), so no scaled copy of the scores is ever written."""
  return jnp.dot(q_RD, kT_DT, preferred_element_type=jnp.float32)


def _mask(mask_spec: MaskSpec, mq: TokenMeta, mk: TokenMeta, rows: int):
  """The [R, T] mask of one tile pair: the [Q, T] mask of `reference.make_mask`, repeated for
  each of the R / Q query heads in the tile's rows."""
  mask_QT = make_mask(mq.index[None], mq.segment[None], mk.index[None], mk.segment[None],
                      mask_spec)[0]
  return jnp.tile(mask_QT, (rows // mask_QT.shape[0], 1))


def _switch(kind, skip, full, masked, mask_fn):
  """Runs skip / full / masked by tile kind, and says whether the tile was computed.

  A MASKED tile whose mask turns out empty is still computed (harmlessly: all its scores are
  −inf, so it adds nothing) but not counted; a nested cond to skip it would add a third copy of
  the tile code to every loop for tiles the range tests (`_tile_kind`) rarely leave undecided.
  """
  def partial(_):
    mask_RT = mask_fn()
    return masked(mask_RT), mask_RT.any()
  return jax.lax.switch(kind, [lambda _: (skip(None), kind < 0), lambda _: (full(), kind >= 0),
                               partial], None)


def _fwd_q_tile(cfg: TileConfig, q_RD, mq: TokenMeta, sq: TileStats, init, kT_NDT, v_NTD,
                mk_N: TokenMeta, sk_N: TileStats):
  """Online softmax of one query tile of one head over all key tiles, continuing from
  init = (acc, m, l); returns ((acc, m, l), tiles computed)."""

  def update(carry, s_RT, v_TD, may_be_empty):
    acc_RD, m_R, l_R = carry  # m: running max of the *unscaled* scores (scale > 0)
    m_new = jnp.maximum(m_R, s_RT.max(axis=-1))
    # a row fully masked so far has m = −inf; a FULL tile makes every row finite
    m_ref = jnp.where(jnp.isneginf(m_new), 0.0, m_new) if may_be_empty else m_new
    p_RT = jnp.exp((s_RT - m_ref[:, None]) * cfg.scale)
    corr_R = jnp.exp((m_R - m_ref) * cfg.scale)
    pv_RD = jnp.dot(p_RT.astype(v_TD.dtype), v_TD, preferred_element_type=jnp.float32)
    return acc_RD * corr_R[:, None] + pv_RD, m_new, l_R * corr_R + p_RT.sum(axis=-1)

  def step(state, xs):
    carry, count = state
    kT_DT, v_TD, mk, sk = xs
    s_fn = lambda: _scores(q_RD, kT_DT)
    carry, computed = _switch(
        _tile_kind(cfg.mask_spec, sq, sk), lambda _: carry,
        lambda: update(carry, s_fn(), v_TD, False),
        lambda mask_RT: update(carry, jnp.where(mask_RT, s_fn(), NEG_INF), v_TD, True),
        lambda: _mask(cfg.mask_spec, mq, mk, q_RD.shape[0]))
    return (carry, count + computed.astype(jnp.int32)), None

  count = varying_like(varying_like(jnp.zeros((), jnp.int32), q_RD), kT_NDT)
  (out, count), _ = jax.lax.scan(step, (init, count), (kT_NDT, v_NTD, mk_N, sk_N))
  return out, count


class QueryTiles(NamedTuple):
  """A query chunk laid out once for the kernel: q [M, N, R, D], metadata [M, N, Q] and its
  tile ranges [M, N]. The ring builds it once per layer, not once per ring step."""
  q: jax.Array
  meta: TokenMeta
  stats: TileStats


class KeyTiles(NamedTuple):
  """A key chunk laid out for the kernel: k, v [M, N, T, D] and metadata [B, N, T] (what
  travels the ring: metadata per batch row, not per head; expanded and its ranges recomputed on
  arrival)."""
  k: jax.Array
  v: jax.Array
  meta: TokenMeta


def query_tiles(cfg: TileConfig, x_BCHD, kv_heads: int, mq: TokenMeta) -> QueryTiles:
  """Lays out a query chunk (or its output cotangent: use `.q`) for the kernel."""
  n = x_BCHD.shape[1] // cfg.block_q
  meta_M = _per_head(_meta_tiles(mq, n), kv_heads)
  return QueryTiles(_heads_tiles(x_BCHD, kv_heads, n), meta_M, _stats(meta_M))


def key_tiles(cfg: TileConfig, k_BSKD, v_BSKD, mk: TokenMeta) -> KeyTiles:
  """Lays out a key chunk for the kernel."""
  n = k_BSKD.shape[1] // cfg.block_k
  return KeyTiles(_kv_tiles(k_BSKD, n), _kv_tiles(v_BSKD, n), _meta_tiles(mk, n))


def rows_tiles(cfg: TileConfig, x_BCH, kv_heads: int):
  """Per-query statistics [B, C, H] in the layout of `query_tiles`: [M, N, R]."""
  return _rows_tiles(x_BCH, kv_heads, x_BCH.shape[1] // cfg.block_q)


def softmax_init(qt: QueryTiles):
  """The online-softmax state (acc [M, N, R, D], m, l [M, N, R]) before any key: it is
  carried from key chunk to key chunk (and ring step to ring step) unnormalised, so partial
  results need no normalise-and-merge in between. m is the running max of unscaled scores."""
  init = (jnp.zeros(qt.q.shape, jnp.float32), jnp.full(qt.q.shape[:-1], NEG_INF, jnp.float32),
          jnp.zeros(qt.q.shape[:-1], jnp.float32))
  return jax.tree.map(lambda x: varying_like(x, qt.q), init)


def softmax_finish(cfg: TileConfig, state):
  """(out [M, N, R, D] f32, lse [M, N, R]) from an online-softmax state."""
  acc, m, l = state
  empty = l == 0
  o = acc / jnp.where(empty, 1.0, l)[..., None]
  lse = jnp.where(empty, NEG_INF, m * cfg.scale + jnp.log(jnp.where(empty, 1.0, l)))
  return o, lse


def _key_side(qt: QueryTiles, kt: KeyTiles):
  """The key chunk's metadata per head [M, N, T] and its tile ranges, and the number of kv
  heads K (tiles are counted once per batch row, not once per head)."""
  kh = qt.q.shape[0] // kt.meta.index.shape[0]
  mk_M = _per_head(kt.meta, kh)
  return mk_M, _stats(mk_M), kh


def tiled_forward(cfg: TileConfig, qt: QueryTiles, kt: KeyTiles, state):
  """Continues the online softmax `state` (see `softmax_init`) of the query tiles over one key
  chunk; returns (state, tiles computed, summed over batch rows).

  One head (M) at a time, then query tiles, then key tiles: every product is a plain 2-D
  matmul of one R×T score tile (4 MiB at 1024 × 1024 float32), where a batch over heads would
  stream 8 such tiles through memory for every elementwise pass.
  """
  mk_M, sk_M, kh = _key_side(qt, kt)
  kT_M = _t(kt.k)  # once per key chunk: O(S·D), against O(C·S·D) of products

  def one_head(xs):
    q_NRD, mq_N, sq_N, state_N, kT_NDT, v_NTD, mk_N, sk_N = xs

    def one_q_tile(xs):
      q_RD, mq, sq, init = xs
      return _fwd_q_tile(cfg, q_RD, mq, sq, init, kT_NDT, v_NTD, mk_N, sk_N)
    return jax.lax.map(one_q_tile, (q_NRD, mq_N, sq_N, state_N))

  state, counts = jax.lax.map(one_head, tuple(qt) + (state, kT_M, kt.v, mk_M, sk_M))
  return state, counts.sum() // kh


def chunk_forward(cfg: TileConfig, q_BCHD, k_BSKD, v_BSKD, mq: TokenMeta, mk: TokenMeta):
  """Attention of a query chunk to a key chunk.

  Returns (out_BCHD float32, normalised; lse_BCH float32, −inf where nothing is attended;
  tiles computed, int32 scalar, summed over batch rows).
  """
  b, _, h, _ = q_BCHD.shape
  qt = query_tiles(cfg, q_BCHD, k_BSKD.shape[2], mq)
  state, count = tiled_forward(cfg, qt, key_tiles(cfg, k_BSKD, v_BSKD, mk), softmax_init(qt))
  o, lse = softmax_finish(cfg, state)
  return untile_heads(o, b, h), untile_rows(lse, b, h), count


def _tile_grads(cfg, q_RD, qT_DR, do_RD, doT_DR, lse_R, delta_R, k_TD, kT_DT, vT_DT,
                mask_RT=None):
  """(dq [R, D], dkᵀ, dvᵀ [D, T]) of one tile pair (FlashAttention-2's backward);
  mask_RT None = FULL tile.

  Every product is a row-major matmul of operands laid out for it (q, do, k and their
  transposes, all small R×D or T×D tiles): dvᵀ = dOᵀ·P and dkᵀ = Qᵀ·dS come out transposed
  rather than contracting P or dS over their rows, which XLA:CPU runs at half speed or after
  transposing the R×T matrix. P is computed once and reused.
  """
  s_RT = _scores(q_RD, kT_DT)
  if mask_RT is not None:
    s_RT = jnp.where(mask_RT, s_RT, NEG_INF)
  p_RT = jnp.exp(s_RT * cfg.scale - lse_R[:, None])
  dvT_DT = jnp.dot(doT_DR, p_RT.astype(doT_DR.dtype), preferred_element_type=jnp.float32)
  dp_RT = jnp.dot(do_RD, vT_DT, preferred_element_type=jnp.float32)
  ds_RT = p_RT * (dp_RT - delta_R[:, None])  # dS / scale
  dq_RD = jnp.dot(ds_RT.astype(k_TD.dtype), k_TD, preferred_element_type=jnp.float32) * cfg.scale
  dkT_DT = jnp.dot(qT_DR, ds_RT.astype(qT_DR.dtype),
                   preferred_element_type=jnp.float32) * cfg.scale
  return dq_RD, dkT_DT, dvT_DT


def tiled_backward(cfg: TileConfig, qt: QueryTiles, do_M, lse_M, delta_M, kt: KeyTiles,
                   grads=None):
  """`chunk_backward` on laid-out tiles (do like qt.q; lse, delta from `rows_tiles`, lse with
  −inf replaced by 0): (dq like qt.q, dkᵀ, dvᵀ [M, N, D, T]), float32, added to `grads` (the
  same triple; None = zeros) in place, so the ring needs no separate accumulation. dk and dv
  stay transposed until `untile_kv_t` (see `_tile_grads`).

  One head at a time (see `tiled_forward`); in a head, key tiles outside and query tiles
  inside (FlashAttention-2): dk, dv of a key tile stay in the loop carry and each query tile's
  dq is added in place into the head's [N, R, D] dq buffer.
  """
  mk_M, sk_M, _ = _key_side(qt, kt)
  if grads is None:
    zeros = lambda shape: varying_like(varying_like(jnp.zeros(shape, jnp.float32), qt.q), kt.k)
    grads = (zeros(qt.q.shape), zeros(_t(kt.k).shape), zeros(_t(kt.k).shape))

  def one_head(xs):
    q_NRD, do_NRD, lse_NR, delta_NR, mq_N, sq_N, k_NTD, v_NTD, mk_N, sk_N, grads = xs
    dq_NRD, dk_NDT, dv_NDT = grads
    q_side = (jnp.arange(q_NRD.shape[0]), q_NRD, _t(q_NRD), do_NRD, _t(do_NRD), lse_NR,
              delta_NR, mq_N, sq_N)

    def one_k_tile(dq_NRD, xs):
      k_TD, v_TD, mk, sk, dk0, dv0 = xs
      kT_DT, vT_DT = _t(k_TD), _t(v_TD)

      def step(carry, xs):
        dkT_DT, dvT_DT, dq_NRD = carry
        i, q_RD, qT_DR, do_RD, doT_DR, lse_R, delta_R, mq, sq = xs
        grads = functools.partial(_tile_grads, cfg, q_RD, qT_DR, do_RD, doT_DR, lse_R, delta_R,
                                  k_TD, kT_DT, vT_DT)
        skip = lambda _: (varying_like(jnp.zeros(q_RD.shape, jnp.float32), dq_NRD),
                          jnp.zeros_like(dkT_DT), jnp.zeros_like(dvT_DT))
        (dq, dk, dv), _ = _switch(_tile_kind(cfg.mask_spec, sq, sk), skip, grads, grads,
                                  lambda: _mask(cfg.mask_spec, mq, mk, q_RD.shape[0]))
        dq_NRD = dq_NRD.at[i].add(dq)
        return (dkT_DT + dk, dvT_DT + dv, dq_NRD), None

      (dk, dv, dq_NRD), _ = jax.lax.scan(step, (dk0, dv0, dq_NRD), q_side)
      return dq_NRD, (dk, dv)

    dq_NRD, (dk_NDT, dv_NDT) = jax.lax.scan(one_k_tile, dq_NRD,
                                            (k_NTD, v_NTD, mk_N, sk_N, dk_NDT, dv_NDT))
    return dq_NRD, dk_NDT, dv_NDT

  return jax.lax.map(one_head, (qt.q, do_M, lse_M, delta_M, qt.meta, qt.stats, kt.k, kt.v, mk_M,
                                sk_M, grads))


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
  dq, dkT, dvT = tiled_backward(
      cfg, qt, query_tiles(cfg, do_BCHD, kh, mq).q, rows_tiles(cfg, safe_lse(lse_BCH), kh),
      rows_tiles(cfg, delta_BCH, kh), key_tiles(cfg, k_BSKD, v_BSKD, mk))
  return untile_heads(dq, b, h), untile_kv_t(dkT, b), untile_kv_t(dvT, b)


def merge_partials(o_a_BCHD, lse_a_BCH, o_b_BCHD, lse_b_BCH):
  """Merges two normalised partial attentions over disjoint key sets through their lse."""
  lse_BCH = jnp.logaddexp(lse_a_BCH, lse_b_BCH)
  lse_safe = jnp.where(jnp.isneginf(lse_BCH), 0.0, lse_BCH)
  w_a = jnp.exp(lse_a_BCH - lse_safe)[..., None]
  w_b = jnp.exp(lse_b_BCH - lse_safe)[..., None]
  return o_a_BCHD * w_a + o_b_BCHD * w_b, lse_BCH


def output_delta(do_BCHD, o_BCHD):
  """delta = Σ_d do·o, float32, the softmax-gradient correction term.

  As a contraction, not `sum(do * o, -1)`: XLA:CPU runs that multiply-and-reduce over rows of
  D = 64 at ~10 ns per element, ~5% of a tiled fwd+bwd (bench/RESULTS.md)."""
  return jnp.einsum("bchd,bchd->bch", do_BCHD.astype(jnp.float32), o_BCHD.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


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
