"""Ring attention inside `jax.shard_map` (Ring Attention, arXiv 2310.01889; METHODS.md §5).

Legend: B batch, C local chunk, H query heads, K kv heads, D head dim, P ring size.

Each device holds C tokens of Q, K, V (in some layout, see layouts.py) and each token's
original index. For P steps it attends its Q to the K/V chunk it holds, merges through the
log-sum-exp, and passes K, V (at K heads) with their segment ids and indices to the next device
by `lax.ppermute`. The send of the next chunk is issued before the current chunk's compute, so
XLA can overlap them. The backward is a second ring carrying K, V and the dK, dV accumulators,
which arrive back at their owner after P hops. Tiles that the mask empties are skipped inside
the kernel, so fully masked ring steps cost only their range tests.

The ring is one XLA loop of P − 1 steps that send the chunk on, then one step that does not
(`_loop`: the same loop at P = 2, so per-device memory at fixed C is the same for P = 2, 4,
8); two chunks are alive at a time and compile time does not grow with P. Whole chunks travel:
splitting them into sub-chunks doubles the steps, each a rendezvous of all devices, and was
~15% slower on the emulated CPU mesh (bench/RESULTS.md).

Two inner-kernel paths share that loop (`_forward_ring`, `_backward_ring`). The pure-JAX
kernel ("xla") lays Q, K and V out in tiles once per layer and runs the online softmax
on across ring steps, unnormalised. A Pallas kernel (`kernels`) attends a whole chunk pair per
step and returns a normalised output and its lse, merged step by step (`merge_partials`).
`costs.collective_permute_bytes` reads the bytes moved from the compiled HLO, multiplying loop
bodies by their trip counts (`costs.collective_bytes` reads every collective).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longctx.attention.online_softmax import (key_tiles, merge_partials, output_delta, query_tiles,
                                         rows_tiles, safe_lse, softmax_finish, softmax_init,
                                         tie_inputs, tiled_backward, tiled_forward, untile_heads,
                                         untile_kv_t, untile_rows, varying_like)
from longctx.attention.kernels import Kernel, query_backward, query_forward
from longctx.attention.reference import MaskSpec, check_inputs, default_scale
from longctx.attention.tiles import TileConfig, TokenMeta, fitted_tiles, tile_config


def _shift(tree, axis, size, by: int = 1):
  """Sends every array of `tree` `by` devices on along the ring (the next one by default)."""
  perm = [(i, (i + by) % size) for i in range(size)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), tree)


@functools.lru_cache(maxsize=256)
def ring_hops(layout, layout_devices: int, length: int, ring_size: int,
              mask_spec: MaskSpec) -> tuple[int, int]:
  """(forward, backward): how many hops the ring's K/V chunks make each way.

  Ring device r holds, at forward hop t, chunk r − t, and at backward hop t chunk r + t; chunk r
  is slots [r·L/P, (r+1)·L/P) of `layout`'s permutation over `layout_devices` (ring-major, as
  the hybrid shards it). Without a window every offset may be needed: (P − 1, 0), the plain
  ring. With one, a chunk whose keys all lie W or more before every query of a device is masked
  there whatever the documents (positions differ within a document as the original indices
  do), so only the offsets some device needs are covered, by the fewest hops over both ways:
  contiguous with W ≤ C needs (1, 0); zigzag, whose late half-chunks find their predecessors
  on the next device, (1, 1); striped min(W − 1, P − 1) forward.
  """
  if mask_spec.window is None or ring_size == 1:
    return ring_size - 1, 0
  needed = _needed_offsets(layout, layout_devices, length, ring_size, mask_spec)
  best = (max(needed, default=0), 0)
  for fwd in range(ring_size):
    later = [t for t in needed if t > fwd]
    bwd = ring_size - min(later) if later else 0
    if fwd + bwd < sum(best):
      best = (fwd, bwd)
  return best


def _needed_offsets(layout, layout_devices, length, ring_size, mask_spec) -> list[int]:
  """The offsets t in 1..P−1 at which some ring device's queries may attend chunk r − t."""
  import numpy as np
  from longctx.attention.layouts import Layout
  chunks = Layout.parse(layout).permutation(length, layout_devices).reshape(ring_size, -1)
  chunks, w = np.sort(chunks, axis=1), mask_spec.window

  def needs(queries, keys):  # some key s with s ≤ q < s + W (causal), or s > q − W
    if not mask_spec.causal:
      return keys[-1] > queries[0] - w
    at = np.searchsorted(queries, keys)  # the first query ≥ each key
    ok = at < len(queries)
    return bool(np.any(queries[np.minimum(at, len(queries) - 1)][ok] - keys[ok] < w))

  return [t for t in range(1, ring_size)
          if any(needs(chunks[r], chunks[(r - t) % ring_size]) for r in range(ring_size))]


def _loop(body, carry, trips: int):
  """`carry = body(carry)`, `trips` times, as one XLA loop.

  A loop of one trip (P = 2) gets an opaque trip count: XLA would otherwise inline it and
  assign its buffers differently, so per-device memory at fixed C would differ between P = 2
  and P > 2. The count is 1 then, so reading bytes per trip from the HLO stays exact.
  """
  if trips != 1:
    return jax.lax.scan(lambda c, _: (body(c), None), carry, None, length=trips)[0]
  one = jax.lax.optimization_barrier(jnp.int32(1))
  return jax.lax.fori_loop(0, one, lambda _, c: body(c), carry)


def _forward_ring(attend, init, kt, axis, size, hops):
  """Attends the chunk held, and the chunks met on `hops` = (forward, backward) hops
  (`ring_hops`; (P − 1, 0) without a window): each step sends the chunk on, then attends it.
  The first backward send is issued before the forward steps, which it can overlap.
  `attend(state, kt) -> state`."""
  fwd, bwd = hops

  def step(by):
    def body(carry):
      state, kt = carry
      nxt = _shift(kt, axis, size, by)  # issued before the compute that it can overlap
      return attend(state, kt), nxt
    return body

  back = _shift(kt, axis, size, -1) if bwd else None
  state, kt = _loop(step(1), (init, kt), fwd) if fwd else (init, kt)
  state = attend(state, kt)
  if bwd:
    state, back = _loop(step(-1), (state, back), bwd - 1) if bwd > 1 else (state, back)
    state = attend(state, back)
  return state


def _backward_ring(attend, dq, kt, dkv, axis, size, hops):
  """dq stays; each chunk `kt` makes the forward's hops with its (dk, dv) accumulators, which
  then go home in one more permute each way (by P − forward: the next device on the plain
  ring). `dkv`: zero accumulators. `attend(dq, kt, dkv) -> (dq, dkv)`."""
  fwd, bwd = hops

  def step(by):
    def body(carry):
      dq, kt, acc = carry
      kt_next = _shift(kt, axis, size, by)
      dq, acc = attend(dq, kt, acc)
      return dq, kt_next, _shift(acc, axis, size, by)
    return body

  back = _shift(kt, axis, size, -1) if bwd else None
  dq, kt, acc = _loop(step(1), (dq, kt, dkv), fwd) if fwd else (dq, kt, dkv)
  dq, acc = attend(dq, kt, acc)  # the last visit: the chunk's (dk, dv) go home
  home = _shift(acc, axis, size, -fwd) if fwd else acc
  if bwd:
    dq, back, acc = (_loop(step(-1), (dq, back, dkv), bwd - 1) if bwd > 1 else (dq, back, dkv))
    dq, acc = attend(dq, back, acc)
    home = jax.tree.map(jnp.add, home, _shift(acc, axis, size, bwd))
  return dq, home


def _ring_forward(cfg: TileConfig, axis, ring, q_BCHD, k_BCKD, v_BCKD, meta: TokenMeta):
  """Forward ring: returns (out_BCHD float32, lse_BCH, tiles computed on this device).

  Q and K/V are laid out in tiles once, outside the loop, and the online softmax runs on
  across ring steps unnormalised (no per-step normalise-and-merge).
  """
  if Kernel(cfg.kernel).pallas:
    return _ring_forward_pairs(cfg, axis, ring, q_BCHD, k_BCKD, v_BCKD, meta)
  qt = query_tiles(cfg, q_BCHD, k_BCKD.shape[2], meta)

  def attend(carry, kt):
    state, count = carry
    state, n = tiled_forward(cfg, qt, kt, state)
    return state, count + n

  init = (softmax_init(qt), varying_like(jnp.zeros((), jnp.int32), q_BCHD))
  state, count = _forward_ring(attend, init, key_tiles(cfg, k_BCKD, v_BCKD, meta), axis, *ring)
  o, lse = softmax_finish(cfg, state)
  b, _, h, _ = q_BCHD.shape
  return untile_heads(o, b, h), untile_rows(lse, b, h), count


def _ring_backward(cfg: TileConfig, axis, ring, q_BCHD, k_BCKD, v_BCKD, meta: TokenMeta,
                   do_BCHD, lse_BCH, delta_BCH):
  """Backward ring: (dq, dk, dv) float32 of this device's chunk."""
  if Kernel(cfg.kernel).pallas:
    return _ring_backward_pairs(cfg, axis, ring, q_BCHD, k_BCKD, v_BCKD, meta, do_BCHD,
                                lse_BCH, delta_BCH)
  kh = k_BCKD.shape[2]
  qt = query_tiles(cfg, q_BCHD, kh, meta)
  do = query_tiles(cfg, do_BCHD, kh, meta).q
  lse, delta = rows_tiles(cfg, safe_lse(lse_BCH), kh), rows_tiles(cfg, delta_BCH, kh)

  def attend(dq, kt, dkv):
    dq, dk, dv = tiled_backward(cfg, qt, do, lse, delta, kt, (dq,) + tuple(dkv))
    return dq, (dk, dv)

  kt = key_tiles(cfg, k_BCKD, v_BCKD, meta)
  zeros = varying_like(jnp.zeros(jnp.swapaxes(kt.k, -1, -2).shape, jnp.float32), q_BCHD)
  dq0 = varying_like(jnp.zeros(qt.q.shape, jnp.float32), q_BCHD)
  dq, (dkT, dvT) = _backward_ring(attend, dq0, kt, (zeros, zeros), axis, *ring)
  b, _, h, _ = q_BCHD.shape
  return untile_heads(dq, b, h), untile_kv_t(dkT, b), untile_kv_t(dvT, b)


def _ring_forward_pairs(cfg: TileConfig, axis, ring, q_BCHD, k_BCKD, v_BCKD, meta: TokenMeta):
  """The forward ring for a kernel that attends whole chunk pairs (`kernels.query_forward`:
  the Pallas kernels): each step's normalised output merges through the lse. The third result,
  tiles computed, is −1: these kernels do not count them (`ring_tiles_computed` uses the
  pure-JAX kernel)."""
  attend_kv = query_forward(cfg, q_BCHD, meta)  # the query side laid out once, not per step

  def attend(state, kt):
    return merge_partials(*state, *attend_kv(*kt))

  b, c, h, _ = q_BCHD.shape
  init = (varying_like(jnp.zeros(q_BCHD.shape, jnp.float32), q_BCHD),
          varying_like(jnp.full((b, c, h), -jnp.inf, jnp.float32), q_BCHD))
  o, lse = _forward_ring(attend, init, (k_BCKD, v_BCKD, meta), axis, *ring)
  return o, lse, jnp.int32(-1)


def _ring_backward_pairs(cfg: TileConfig, axis, ring, q_BCHD, k_BCKD, v_BCKD, meta: TokenMeta,
                         do_BCHD, lse_BCH, delta_BCH):
  """The backward ring for a chunk-pair kernel (`kernels.query_backward`)."""
  grads_kv = query_backward(cfg, q_BCHD, do_BCHD, lse_BCH, delta_BCH, meta)  # laid out once

  def attend(dq, kt, dkv):
    dq_s, dk_s, dv_s = grads_kv(*kt)
    return dq + dq_s, (dkv[0] + dk_s, dkv[1] + dv_s)

  zeros = varying_like(jnp.zeros(k_BCKD.shape, jnp.float32), q_BCHD)
  dq0 = varying_like(jnp.zeros(q_BCHD.shape, jnp.float32), q_BCHD)
  dq, (dk, dv) = _backward_ring(attend, dq0, (k_BCKD, v_BCKD, meta), (zeros, zeros), axis, *ring)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ring(cfg, axis, ring, q_BCHD, k_BCKD, v_BCKD, meta):
  """ring: (P, (forward, backward) hops), `_ring_of`."""
  return _ring_fwd(cfg, axis, ring, q_BCHD, k_BCKD, v_BCKD, meta)[0]


def _ring_fwd(cfg, axis, ring, q_BCHD, k_BCKD, v_BCKD, meta):
  # tied: not loop-invariant in a scan over layers (see `online_softmax.tie_inputs`); the residuals
  # are the untied inputs, which a scan forwards instead of stacking
  o_BCHD, lse_BCH, _ = _ring_forward(cfg, axis, ring, *tie_inputs((q_BCHD, k_BCKD, v_BCKD, meta)))
  o_BCHD = o_BCHD.astype(q_BCHD.dtype)
  return o_BCHD, (q_BCHD, k_BCKD, v_BCKD, meta, o_BCHD, lse_BCH)


def _ring_bwd(cfg, axis, ring, res, do_BCHD):
  q_BCHD, k_BCKD, v_BCKD, meta, o_BCHD, lse_BCH = res
  delta_BCH = output_delta(do_BCHD, o_BCHD)
  dq, dk, dv = _ring_backward(cfg.backward(), axis, ring, q_BCHD, k_BCKD, v_BCKD, meta,
                              do_BCHD, lse_BCH, delta_BCH)
  return dq.astype(q_BCHD.dtype), dk.astype(k_BCKD.dtype), dv.astype(v_BCKD.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


def chunk_config(q_BCHD, k_BCKD, mask_spec, scale, blocks, kernel=None,
                 what="ring attention, the chunk on each device") -> TileConfig:
  """The tiles of a C-token chunk (capped at C/2: zigzag half-chunks never share a tile);
  `what` names the caller in the warning of `tiles.fitted_tiles`."""
  c, d = q_BCHD.shape[1], q_BCHD.shape[3]
  tiles = functools.partial(tile_config, mask_spec, default_scale(d, scale), kernel=kernel,
                            group=q_BCHD.shape[2] // k_BCKD.shape[2], cap=c // 2,
                            **dict(zip(("block_q", "block_k", "block_q_bwd", "block_k_bwd"),
                                       blocks)))
  return fitted_tiles(c, tiles, what)


def chunk_meta(segment_ids_BC, index_BC) -> TokenMeta:
  """TokenMeta of a local chunk: index [B, C] and segment ids (all 1 when None), int32."""
  b, c = index_BC.shape
  # None: ones, varying like the index, or they could not travel in the ring's loop carry
  seg = (varying_like(jnp.ones((b, c), jnp.int32), index_BC) if segment_ids_BC is None
         else segment_ids_BC)
  return TokenMeta(index_BC.astype(jnp.int32), seg.astype(jnp.int32))


def ring_attention(q_BCHD, k_BCKD, v_BCKD, segment_ids_BC, index_BC, *, axis="seq", causal=True,
                   scale=None, block_q=None, block_k=None, block_q_bwd=None, block_k_bwd=None,
                   mask_spec: MaskSpec | None = None, kernel=None, layout=None,
                   layout_devices: int | None = None):
  """Ring attention on already-permuted local chunks; call inside `jax.shard_map` over `axis`.

  q: [B, C, Hq, D]; k, v: [B, C, Hkv, D]; segment_ids: [B, C] int (0 = padding) or None;
  index: [B, C] int, each token's original (natural-order) index — `layouts.original_index`
  sharded like q, or document positions when segment ids separate documents (causal only).
  Returns out [B, C, Hq, D] in q.dtype, equal to the dense reference at those tokens.
  Tiles are block_q × block_k in the forward, block_q_bwd × block_k_bwd in the backward
  (reduced to divisors of C; None = defaults, see `tiles.tile_config`); with zigzag, a
  block dividing C/2 lets the empty half-chunk tiles be skipped. kernel: the inner kernel of
  each ring step (`kernels.KERNELS`; None = "xla", pure JAX). layout / layout_devices: the
  layout the rows are in, over that many devices (None: the ring's); given with a windowed
  `mask_spec`, the ring stops after the hops some device still needs (`ring_hops`).
  Raises ValueError on bad shapes or dtypes.
  """
  check_inputs(q_BCHD, k_BCKD, v_BCKD, segment_ids_BC)
  if index_BC.shape != q_BCHD.shape[:2]:
    raise ValueError(f"index must be [B, C] = {q_BCHD.shape[:2]}; got {index_BC.shape}")
  mask_spec = MaskSpec(causal=causal) if mask_spec is None else mask_spec
  cfg = chunk_config(q_BCHD, k_BCKD, mask_spec, scale, (block_q, block_k, block_q_bwd, block_k_bwd),
                     kernel)
  ring = _ring_of(axis, q_BCHD.shape[1], mask_spec, layout, layout_devices)
  return _ring(cfg, axis, ring, q_BCHD, k_BCKD, v_BCKD, chunk_meta(segment_ids_BC, index_BC))


def _ring_of(axis, chunk: int, mask_spec: MaskSpec, layout, layout_devices):
  """(P, (forward, backward) hops) of the ring over `axis` (`ring_hops`; (P − 1, 0) without a
  layout)."""
  size = jax.lax.axis_size(axis)
  if layout is None:
    return size, (size - 1, 0)
  return size, ring_hops(layout, layout_devices or size, chunk * size, size, mask_spec)


def ring_tiles_computed(q_BCHD, k_BCKD, v_BCKD, segment_ids_BC, index_BC, *, axis="seq",
                        causal=True, block_q=None, block_k=None, mask_spec: MaskSpec | None = None,
                        layout=None):
  """Number of (query tile, key tile) blocks this device computes in the forward ring, [1]."""
  mask_spec = MaskSpec(causal=causal) if mask_spec is None else mask_spec
  cfg = chunk_config(q_BCHD, k_BCKD, mask_spec, None, (block_q, block_k))
  meta = chunk_meta(segment_ids_BC, index_BC)
  ring = _ring_of(axis, q_BCHD.shape[1], mask_spec, layout, None)
  return _ring_forward(cfg, axis, ring, q_BCHD, k_BCKD, v_BCKD, meta)[2][None]
