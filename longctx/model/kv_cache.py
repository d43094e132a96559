"""The KV cache for decoding: one part per kind of layer (`ModelConfig.windows`).

Full layers keep every token: keys/values [N_full, B, S, K, D] in slots [0, length), with the
slots' segment ids and positions [B, S] (a context-parallel prefill leaves the prompt's slots in
its layout order and shards them along S). A windowed kind with window W keeps a ring buffer of
R = min(W, the cache's slots) slots per row, [N_kind, B, R, K, D] with its own segment ids and
positions [B, R]: the token at position p lives at slot p mod R of its row (every row of a
left-padded batch has its own slots), an empty slot has segment id 0. A query at position p
sees the ring's tokens at positions > p − W; a token at p is overwritten only by one at
p + R ≥ p + W, which no later query of its row can see (R < W only when a row never holds more
than R tokens, and then nothing is overwritten). A row holds one document in its rings (unique
positions), as generation makes them; of a packed row only the last document is kept.

The layers run in one scan (model.llama), and parts of different shapes cannot be one scanned
input: each layer gets a `LayerCache` (every kind's (k, v) stack, its row in its kind's stack,
and what the scan broadcasts). A prefill carries the stacks through the scan and each layer
writes its row (`LayerCache.fill`: a scatter whose row is out of range, so dropped, for the
other kinds); nothing reads them inside the loop, so XLA writes them in place. Decoding
broadcasts them: each layer reads its row in its kind's `lax.switch` branch
(`LayerCache.decode`), the scan stacks the new tokens' keys/values [N, B, T, K, D], and
`end_decode` writes them after the scan. (A loop iteration that reads a carried buffer and
updates it makes XLA copy the whole buffer, every layer of every step.)

A prefill writes the prompt's keys/values: a full layer all L slots, a windowed layer only the
R tokens of each row with the highest positions among its real ones (segment id != 0),
scattered (in any slot order of the prompt) to slot position mod R. Under context parallelism
each device scatters its chunk into a zero ring and one all-reduce (a sum: every slot gets one
token) of R slots completes it, replicated on every device. The whole prompt's keys of a
windowed layer exist only as that layer's own [B, L, K, D] (L/n per device) while it runs,
which its attention needs anyway; no stack of them is kept.

Legend: N layers of a kind, B batch, S full slots, R ring slots, T new tokens, K kv heads,
D head dim, H query heads, L prompt length.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from longctx.model.config import ModelConfig


class RingCache(NamedTuple):
  """One windowed kind's ring: k, v [N_kind, B, R, K, D] (post-RoPE); segment_ids, positions
  [B, R] (segment id 0: an empty slot)."""
  k_NBRKD: jax.Array
  v_NBRKD: jax.Array
  segment_ids_BR: jax.Array
  positions_BR: jax.Array


class KVCache(NamedTuple):
  """Keys and values of every layer for decoding.

  k, v: the full layers' [N_full, B, S, K, D] (post-RoPE keys; N_full = 0 when every layer is
  windowed); slots [0, length) are filled. segment_ids: [B, S] (0 = empty or padding);
  positions: [B, S], each slot's token position (the prompt's slots may be in any order, as a
  context-parallel prefill leaves them); length: int32 scalar, the number of filled slots (the
  same for every row; it counts every token, windowed layers' too).
  rings: one `RingCache` per windowed kind, in the order of `config.windows`; a windowed layer
  keeps min(W, S) slots, not S (see the module docstring).
  """
  k_NBSKD: jax.Array
  v_NBSKD: jax.Array
  segment_ids_BS: jax.Array
  positions_BS: jax.Array
  length: jax.Array
  rings: tuple[RingCache, ...] = ()

  def with_new_slots(self, count: int, segment_id: int = 1) -> "KVCache":
    """The cache with `count` more empty full slots whose segment id is already `segment_id`
    (the new tokens' segment: decoding expects it written; see `Llama`)."""
    b = self.segment_ids_BS.shape[0]
    pad = ((0, 0), (0, 0), (0, count), (0, 0), (0, 0))
    return self._replace(
        k_NBSKD=jnp.pad(self.k_NBSKD, pad), v_NBSKD=jnp.pad(self.v_NBSKD, pad),
        segment_ids_BS=jnp.concatenate(
            [self.segment_ids_BS, jnp.full((b, count), segment_id, jnp.int32)], axis=1),
        positions_BS=jnp.pad(self.positions_BS, ((0, 0), (0, count))))


class Shared(NamedTuple):
  """What the scan over layers broadcasts to every layer (tuples aligned with config.windows).

  length: where a full layer writes the new tokens (0 in a prefill); full_keys: the full slots'
  (segment ids, positions) after the new tokens' are written, None in a prefill; ring_slots:
  per windowed kind each new token's ring slot [B, T] (R: not kept); ring_keys: per windowed
  kind the ring's (segment ids, positions) before the new tokens, None in a prefill.
  """
  length: jax.Array
  full_keys: tuple | None
  ring_slots: tuple
  ring_keys: tuple | None


class LayerCache(NamedTuple):
  """One layer's view inside the scan: stacks ((k, v) per kind, carried), index (its row in
  its kind's stack, scanned), shared (broadcast)."""
  stacks: tuple
  index: jax.Array
  shared: Shared

  @property
  def prefill(self) -> bool:
    return self.shared.ring_keys is None

  def fill(self, windows, kind, k_BLKD, v_BLKD):
    """A prefill's write of this layer's prompt keys/values into its kind's stack (the scan
    carries the stacks; nothing reads them there, so XLA writes them in place); returns the
    stacks."""
    return tuple(
        tuple(_fill_row(stack, self._row(kind, i), x, self.shared.ring_slots[i])
              for stack, x in zip(self.stacks[i], (k_BLKD, v_BLKD)))
        for i in range(len(windows)))

  def decode(self, windows, kind, q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, positions_BT):
    """Attends the new tokens over this layer's cache (its kind's branch of a `lax.switch`
    reads its row of the stacks); returns (out_BTHD, (k_BTKD, v_BTKD)): the new keys/values,
    which the scan stacks [N, B, T, K, D] for `end_decode` to write."""
    def branch(i):
      def run(stacks, *args):
        k_BSKD, v_BSKD = (jax.lax.dynamic_index_in_dim(x, self.index, 0, keepdims=False)
                          for x in stacks[i])
        if windows[i] is None:
          return cached_attention(*args, (k_BSKD, v_BSKD, *self.shared.full_keys,
                                          self.shared.length))
        return ring_attention(*args, (k_BSKD, v_BSKD, *self.shared.ring_keys[i]), windows[i])
      return run
    out_BTHD = _switch(kind, [branch(i) for i in range(len(windows))], self.stacks, q_BTHD,
                       k_BTKD, v_BTKD, segment_ids_BT, positions_BT)
    return out_BTHD, (k_BTKD, v_BTKD)

  def _row(self, kind, i):
    """The layer's row in kind i's stack; out of range (a write there is dropped) when the
    layer is of another kind."""
    if kind is None:
      return self.index
    return jnp.where(kind == i, self.index, self.stacks[i][0].shape[0])


def _fill_row(stack_NBXKD, row, x_BLKD, slot_BL):
  """stack[row] = the layer's prompt keys (or values): all L of them for a full layer
  (slot_BL None), else those of ring slot < R scattered there. Nothing when row is out of
  range (the layer is of another kind)."""
  x_BLKD = x_BLKD.astype(stack_NBXKD.dtype)
  if slot_BL is not None:
    x_BLKD = _scatter_add(jnp.zeros((x_BLKD.shape[0], *stack_NBXKD.shape[2:]), x_BLKD.dtype),
                          slot_BL, x_BLKD)
  return stack_NBXKD.at[row].set(x_BLKD, mode="drop")


def _switch(kind, branches, *args):
  if kind is None:
    (branch,) = branches
    return branch(*args)
  return jax.lax.switch(kind, branches, *args)


def _scatter_add(ring_BR, slot_BT, x_BT):
  """ring[b, slot[b, t]] += x[b, t] (slot out of range: dropped). Into zeros, with one token per
  slot, this is a write that a row sharded along T computes locally and sums across devices."""
  return jax.vmap(lambda r, s, x: r.at[s].add(x, mode="drop"))(ring_BR, slot_BT, x_BT)


def _scatter_set(ring_BR, slot_BT, x_BT):
  """ring[b, slot[b, t]] = x[b, t] (slot out of range: dropped)."""
  return jax.vmap(lambda r, s, x: r.at[s].set(x, mode="drop"))(ring_BR, slot_BT, x_BT)


def ring_slots(positions_BT, segment_ids_BT, ring_size: int):
  """Each token's ring slot, position mod R, for a row's R real tokens of highest position;
  R (out of range: not kept) for the others and for padding. In a row of several documents
  (packed: positions restart) only its last one's, the highest segment id, which decoding
  would continue: two documents' tokens would share slots."""
  last_B1 = jnp.max(segment_ids_BT, axis=1, keepdims=True)
  real_BT = (segment_ids_BT == last_B1) & (segment_ids_BT != 0)
  latest_B1 = jnp.max(jnp.where(real_BT, positions_BT, -1), axis=1, keepdims=True)
  keep_BT = real_BT & (positions_BT > latest_B1 - ring_size)
  return jnp.where(keep_BT, positions_BT % ring_size, ring_size).astype(jnp.int32)


def cached_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, positions_BT, layer_cache):
  """A full layer: the new tokens at slots [length, length+T) attend over the cache (this
  layer's k, v [B, S, K, D] with them written); a query at slot length+t sees filled slots up
  to its own in its own segment. Returns out_BTHD."""
  from longctx.attention.reference import masked_dense_attention
  del positions_BT  # the slots' order is causal order
  k_BSKD, v_BSKD, seg_BS, _, length = layer_cache
  t = q_BTHD.shape[1]
  k_BSKD = jax.lax.dynamic_update_slice(k_BSKD, k_BTKD.astype(k_BSKD.dtype), (0, length, 0, 0))
  v_BSKD = jax.lax.dynamic_update_slice(v_BSKD, v_BTKD.astype(v_BSKD.dtype), (0, length, 0, 0))
  slot_q_T = length + jnp.arange(t, dtype=jnp.int32)
  slot_S = jnp.arange(k_BSKD.shape[1], dtype=jnp.int32)
  mask_BTS = ((segment_ids_BT[:, :, None] == seg_BS[:, None, :])
              & (segment_ids_BT[:, :, None] != 0)
              & (slot_S[None, None, :] <= slot_q_T[None, :, None]))
  out_BTHD, _ = masked_dense_attention(q_BTHD, k_BSKD, v_BSKD, mask_BTS)
  return out_BTHD


def ring_attention(q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, positions_BT, ring, window: int):
  """A windowed layer: the new tokens attend over the ring's tokens (all earlier) and each
  other (causally), keys at positions > the query's − window in its segment.
  ring: this layer's (k_BRKD, v_BRKD) and the ring's (segment_ids_BR, positions_BR) before
  them. Returns out_BTHD."""
  from longctx.attention.reference import masked_dense_attention
  k_BRKD, v_BRKD, seg_BR, pos_BR = ring
  t = q_BTHD.shape[1]
  seg_q_BT1 = segment_ids_BT[:, :, None]
  near = lambda pos_BXS: pos_BXS > positions_BT[:, :, None] - window
  old_BTR = (seg_q_BT1 == seg_BR[:, None, :]) & near(pos_BR[:, None, :])
  causal_TT = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]
  new_BTT = ((seg_q_BT1 == segment_ids_BT[:, None, :]) & near(positions_BT[:, None, :])
             & causal_TT[None])
  mask_BTX = jnp.concatenate([old_BTR, new_BTT], axis=2) & (seg_q_BT1 != 0)
  keys = [jnp.concatenate([old, new.astype(old.dtype)], axis=1)
          for old, new in ((k_BRKD, k_BTKD), (v_BRKD, v_BTKD))]
  out_BTHD, _ = masked_dense_attention(q_BTHD, *keys, mask_BTX)
  return out_BTHD


# ---- the cache around the scan over layers ------------------------------------------------------

class ScanCache(NamedTuple):
  """The cache as `Llama` hands it to the scan over layers: stacks ((k, v) per kind: a
  prefill's carry, which the layers fill, or decoding's broadcast, which they read), shared
  (the broadcast `Shared`), index_N (each layer's row in its kind's stack, scanned)."""
  stacks: tuple
  shared: Shared
  index_N: jax.Array

  @property
  def prefill(self) -> bool:
    return self.shared.ring_keys is None


def kind_rows(config: ModelConfig) -> np.ndarray:
  """Each layer's row in its kind's stack, int32 [N]."""
  layer_windows = config.layer_windows
  return np.asarray([layer_windows[:i].count(w) for i, w in enumerate(layer_windows)], np.int32)


def _kind_layers(config: ModelConfig) -> list[int]:
  return [config.layer_windows.count(w) for w in config.windows]


def ring_size(window: int, cache_slots: int | None) -> int:
  """R: a windowed layer's slots, min(W, the cache's slots)."""
  return window if cache_slots is None else min(window, cache_slots)


def begin_prefill(config: ModelConfig, positions_BL, segment_ids_BL, cache_slots: int | None,
                  dtype) -> ScanCache:
  """Empty stacks for a prefill of the [B, L] prompt: L slots per full layer, R per windowed
  one (`cache_slots`: the slots the decoding cache will hold, None: W)."""
  b, length = positions_BL.shape
  kv = (config.num_kv_heads, config.head_dim)
  stacks, slots = [], []
  for window, n in zip(config.windows, _kind_layers(config)):
    size = length if window is None else ring_size(window, cache_slots)
    stacks.append((jnp.zeros((n, b, size, *kv), dtype),) * 2)
    slots.append(None if window is None else ring_slots(positions_BL, segment_ids_BL, size))
  shared = Shared(jnp.int32(0), None, tuple(slots), None)
  return ScanCache(tuple(stacks), shared, jnp.asarray(kind_rows(config)))


def end_prefill(config: ModelConfig, scan: ScanCache, stacks, positions_BL,
                segment_ids_BL) -> KVCache:
  """The cache after a prefill: the full layers' L slots (length L) and the filled rings."""
  b, length = positions_BL.shape
  full, rings = _full_stacks(config, stacks, (b, length)), []
  for i, window in enumerate(config.windows):
    if window is not None:
      slot_BL, size = scan.shared.ring_slots[i], stacks[i][0].shape[2]
      seg_BR, pos_BR = (_scatter_add(jnp.zeros((b, size), jnp.int32), slot_BL,
                                     x.astype(jnp.int32)) for x in (segment_ids_BL, positions_BL))
      rings.append(RingCache(*stacks[i], seg_BR, pos_BR))
  return KVCache(*full, segment_ids_BL.astype(jnp.int32), positions_BL.astype(jnp.int32),
                 jnp.int32(length), tuple(rings))


def _full_stacks(config: ModelConfig, stacks, shape_BS):
  """The full layers' (k, v) stacks, or empty ones [0, B, S, K, D] when there are none."""
  if None in config.windows:
    return stacks[0]
  dtype = stacks[0][0].dtype
  return (jnp.zeros((0, *shape_BS, config.num_kv_heads, config.head_dim), dtype),) * 2


def begin_decode(config: ModelConfig, cache: KVCache, positions_BT,
                 segment_ids_BT) -> tuple[KVCache, ScanCache]:
  """(the cache with the new tokens' positions written into the full slots, the scan's view)."""
  positions_BT = positions_BT.astype(jnp.int32)
  cache = cache._replace(positions_BS=jax.lax.dynamic_update_slice(
      cache.positions_BS, positions_BT, (0, cache.length)))
  stacks, slots, keys, rings = [], [], [], iter(cache.rings)
  for window in config.windows:
    if window is None:
      stacks.append((cache.k_NBSKD, cache.v_NBSKD))
      slots.append(None)
      keys.append(None)
    else:
      ring = next(rings)
      stacks.append((ring.k_NBRKD, ring.v_NBRKD))
      slots.append(ring_slots(positions_BT, segment_ids_BT, ring.k_NBRKD.shape[2]))
      keys.append((ring.segment_ids_BR, ring.positions_BR))
  shared = Shared(cache.length, (cache.segment_ids_BS, cache.positions_BS), tuple(slots),
                  tuple(keys))
  return cache, ScanCache(tuple(stacks), shared, jnp.asarray(kind_rows(config)))


def end(config: ModelConfig, cache: KVCache | None, scan: ScanCache, kv, positions_BT,
        segment_ids_BT) -> KVCache:
  """The cache after the scan over layers: `end_prefill` (cache None) or `end_decode`."""
  if scan.prefill:
    return end_prefill(config, scan, kv, positions_BT, segment_ids_BT)
  return end_decode(config, cache, scan, kv, positions_BT, segment_ids_BT)


def end_decode(config: ModelConfig, cache: KVCache, scan: ScanCache, new_kv, positions_BT,
               segment_ids_BT) -> KVCache:
  """The cache after decoding T tokens: every layer's new keys/values (new_kv: k, v
  [N, B, T, K, D], as the scan stacked them) written, the full layers' at slots
  [length, length+T), the windowed layers' at their ring slots (with the rings' segment ids and
  positions); length + T. Written here, after the scan that read the stacks, XLA updates them
  in place (a loop that reads and writes the same buffer copies it in every layer)."""
  positions_BT, segment_ids_BT = (x.astype(jnp.int32) for x in (positions_BT, segment_ids_BT))
  b_B1 = jnp.arange(positions_BT.shape[0])[:, None]
  full, rings, old = (cache.k_NBSKD, cache.v_NBSKD), [], iter(cache.rings)
  for i, window in enumerate(config.windows):
    layers = np.flatnonzero([w == window for w in config.layer_windows])
    rows = [x if len(layers) == config.num_layers else x[layers] for x in new_kv]
    stacks = scan.stacks[i]
    if window is None:
      full = tuple(jax.lax.dynamic_update_slice(stack, row.astype(stack.dtype),
                                                (0, 0, cache.length, 0, 0))
                   for stack, row in zip(stacks, rows))
      continue
    ring, slot_BT = next(old), scan.shared.ring_slots[i]
    k_NBRKD, v_NBRKD = (stack.at[:, b_B1, slot_BT].set(row.astype(stack.dtype), mode="drop")
                        for stack, row in zip(stacks, rows))
    rings.append(RingCache(k_NBRKD, v_NBRKD,
                           _scatter_set(ring.segment_ids_BR, slot_BT, segment_ids_BT),
                           _scatter_set(ring.positions_BR, slot_BT, positions_BT)))
  return cache._replace(k_NBSKD=full[0], v_NBSKD=full[1], rings=tuple(rings),
                        length=cache.length + positions_BT.shape[1])


def cache_bytes(config: ModelConfig, batch: int, slots: int, itemsize: int,
                shards: int = 1) -> int:
  """Bytes of a cache of `slots` slots on one device: the full layers' slots split over
  `shards` devices (context parallel), the windowed layers' min(W, slots) ring slots on each."""
  per_slot = 2 * batch * config.num_kv_heads * config.head_dim * itemsize
  full = sum(1 for w in config.layer_windows if w is None) * slots
  ring = sum(ring_size(w, slots) for w in config.layer_windows if w is not None)
  return -(-full * per_slot // shards) + ring * per_slot

