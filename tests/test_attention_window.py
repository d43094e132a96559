"""Sliding-window attention (`MaskSpec.window`) against a brute-force mask and the dense oracle:
the tiled kernel, the Pallas kernels (interpreted), every context-parallel strategy and layout,
windows smaller than, equal to and larger than a device's chunk, packed documents with padding,
MHA / GQA / MQA, P = 2, 4, 8; tiles outside the window skipped; bad windows refused.

Legend: B batch, L sequence, H query heads, K kv heads, D head dim, P devices, W window.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as PS

from longctx.attention import (AttentionSpec, Layout, MaskSpec, context_parallel_attention,
                               Tiles, dense_attention, tiled_attention)
from longctx.attention.strategies import plan
from tests.helpers import make_inputs, random_segments

TOL = 2e-5
L = 32
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1), "h8k2": (8, 2)}


def brute_mask(seg, w, causal=True):
  """[B, L, L] allowed pairs written out: same non-zero segment, key ≤ query (causal), and the
  key among the W − 1 before the query or the query itself."""
  seg = np.asarray(seg)
  b, l = seg.shape
  out = np.zeros((b, l, l), bool)
  for r in range(b):
    for i in range(l):
      for j in range(l):
        out[r, i, j] = (seg[r, i] == seg[r, j] != 0 and (not causal or j <= i)
                        and (w is None or i - j < w))
  return out


def test_dense_window_is_the_brute_force_mask(rng):
  q, k, v = make_inputs(rng, h=4, kh=2)
  seg = random_segments(rng, 2, L)
  for w, causal in ((1, True), (5, True), (8, False), (40, True)):
    mask = brute_mask(seg, w, causal)
    s = jnp.einsum("blkgd,bskd->bkgls", q.reshape(2, L, 2, 2, 8), k) / np.sqrt(8)
    s = jnp.where(mask[:, None, None], s, -jnp.inf)
    p = jnp.nan_to_num(jax.nn.softmax(s, axis=-1))
    want = jnp.einsum("bkgls,bskd->blkgd", p, v).reshape(q.shape)
    got = dense_attention(q, k, v, seg, mask_spec=MaskSpec(causal=causal, window=w))
    assert float(jnp.abs(want - got).max()) < TOL, (w, causal)


def _grads(fn, q, k, v, ct):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out,) + vjp(ct)


def _assert_close(want, got, what):
  for name, w, g in zip(["out", "dq", "dk", "dv"], want, got):
    err = float(jnp.abs(w - g).max())
    assert err < TOL, (what, name, err)


@pytest.mark.parametrize("w", [1, 3, 8, 13, 31, 64])
def test_tiled_window_matches_dense(rng, w):
  q, k, v = make_inputs(rng, h=4, kh=2)
  seg = random_segments(rng, 2, L)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  mask = MaskSpec(window=w)
  want = jax.jit(lambda q, k, v: _grads(
      lambda *a: dense_attention(*a, seg, mask_spec=mask), q, k, v, ct))(q, k, v)
  got = jax.jit(lambda q, k, v: _grads(
      lambda *a: tiled_attention(*a, seg, mask_spec=mask, block_q=4, block_k=4),
      q, k, v, ct))(q, k, v)
  _assert_close(want, got, w)


def test_ring_hops_stop_once_no_device_needs_the_chunk():
  """(forward, backward) hops. Contiguous: a window within one chunk needs one hop, W ≤ k·C
  needs k; zigzag finds a late half-chunk's predecessor on the next device, one hop backward;
  striped needs W − 1 hops (token t − k is k devices back); no window: P − 1, and non-causal
  (the window bounds keys from below only)."""
  from longctx.attention.ring import ring_hops
  hops = lambda layout, w, causal=True: ring_hops(layout, 8, 32768, 8,
                                                  MaskSpec(causal=causal, window=w))
  assert [hops("contiguous", w) for w in (1, 2, 4096, 4097, 8193, 32768)] == [
      (0, 0), (1, 0), (1, 0), (1, 0), (2, 0), (7, 0)]
  assert [hops("zigzag", w) for w in (1, 2, 2048, 2049, 4096)] == [
      (0, 0), (1, 1), (1, 1), (1, 1), (2, 2)]
  assert [hops("striped", w) for w in (2, 5, 8, 9, 4096)] == [
      (1, 0), (4, 0), (7, 0), (7, 0), (7, 0)]
  assert hops("contiguous", None) == hops("contiguous", 4096, causal=False) == (7, 0)
  # the hybrid's ring of 4 over a layout of 8 devices: ring chunk r = layout chunks 2r, 2r + 1
  assert ring_hops("contiguous", 8, 32768, 4, MaskSpec(window=8192)) == (1, 0)
  assert ring_hops("zigzag", 8, 32768, 4, MaskSpec(window=2048)) == (1, 1)


def test_tiles_outside_the_window_are_skipped():
  """The tiles computed grow with L·W: at L = 64, 4-token tiles and W = 4 a causal ring on one
  device computes the 16 diagonal tiles and the 15 just below them, against 136 causal."""
  from longctx.attention.ring import ring_tiles_computed
  mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
  x = jnp.zeros((1, 64, 2, 8), jnp.float32)
  idx = jnp.arange(64, dtype=jnp.int32)[None]

  def count(mask):
    fn = jax.shard_map(lambda x, i: ring_tiles_computed(x, x, x, None, i, block_q=4, block_k=4,
                                                        mask_spec=mask),
                       mesh=mesh, in_specs=(PS(None, "seq"), PS(None, "seq")), out_specs=PS("seq"))
    return int(jax.jit(fn)(x, idx)[0])
  assert count(MaskSpec()) == 136
  assert count(MaskSpec(window=4)) == 16 + 15
  assert count(MaskSpec(window=5)) == 16 + 15  # query 4t sees back to 4t − 4 only
  assert count(MaskSpec(window=6)) == 16 + 15 + 14  # query 4t sees 4t − 5, two tiles back


@functools.lru_cache(maxsize=4)  # reused across one test's layouts; bounded: ~80 programs
def local_program(strategy, p, h, kh, window, causal, layout=None):
  """Jitted per-device (out, dq, dk, dv) of `strategy` on rows in layout order, the original
  indices passed as data (as the trainer calls it), and the devices the layout balances. With
  `layout` a ring knows the rows' layout and stops after `ring_hops`."""
  if strategy == "hybrid":
    mesh = Mesh(np.array(jax.devices()[:p]).reshape(2, p // 2), ("u", "r"))
    axis, seq = ("u", "r"), ("r", "u")
  else:
    mesh, axis, seq = Mesh(np.array(jax.devices()[:p]), ("seq",)), "seq", "seq"
  resolved = plan(strategy, mesh, axis, h, mask_spec=MaskSpec(causal=causal, window=window),
                  block_q=4, block_k=4, layout=layout)
  act, tok = PS(None, seq, None, None), PS(None, seq)

  def run(q, k, v, seg, idx, ct):
    return _grads(lambda q, k, v: resolved.local(q, k, v, seg, idx), q, k, v, ct)
  return (jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(act, act, act, tok, tok, act),
                                out_specs=(act,) * 4)), resolved.layout_devices)


@functools.lru_cache(maxsize=8)
def dense_program(window, causal):
  mask = MaskSpec(causal=causal, window=window)
  return jax.jit(lambda q, k, v, seg, ct: _grads(
      lambda *a: dense_attention(*a, seg, mask_spec=mask), q, k, v, ct))


def check_strategy(rng, strategy, p, heads, window, causal=True):
  h, kh = HEADS[heads]
  q, k, v = make_inputs(rng, h=h, kh=kh)
  seg = random_segments(rng, 2, L)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  want = dense_program(window, causal)(q, k, v, seg, ct)
  for layout in Layout:
    # the ring and the hybrid are told the layout, so they stop after the hops needed
    told = layout if strategy in ("ring", "hybrid") else None
    program, parts = local_program(strategy, p, h, kh, window, causal, told)
    perm = layout.permutation(L, parts)
    idx = jnp.asarray(np.broadcast_to(perm, (2, L)))
    got = program(*(x[:, perm] for x in (q, k, v, seg)), idx, ct[:, perm])
    _assert_close([w[:, perm] for w in want], got, (strategy, p, heads, window, layout.value))
    assert np.all(np.asarray(got[0])[np.asarray(seg)[:, perm] == 0] == 0)


# windows below, at and above the chunk L/P (8 at P = 4); the first case of each is quick
MATRIX = ([(s, 4, hd, w) for s in ("ring", "all_gather", "ulysses") for hd in ("mha", "gqa", "mqa")
           for w in (3, 8, 13)]
          + [(s, p, "gqa", w) for s in ("ring", "all_gather") for p in (2, 8) for w in (3, 4, 16, 20)]
          + [("ulysses", 2, "mqa", 5), ("ulysses", 8, "h8k2", 5), ("ulysses", 8, "h8k2", 17)]
          + [("hybrid", p, "gqa", w) for p in (4, 8) for w in (2, 4, 11)])


@pytest.mark.matrix
@pytest.mark.parametrize("strategy,p,heads,window", MATRIX,
                         ids=["-".join(map(str, c)) for c in MATRIX])
def test_strategy_window_matches_dense_every_layout(rng, strategy, p, heads, window):
  check_strategy(rng, strategy, p, heads, window)


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "hybrid"])
def test_strategy_window_quick(rng, strategy):
  """One window below the chunk, each layout, in the quick loop (the matrix is slow)."""
  check_strategy(rng, strategy, 4, "gqa", 5)


def test_non_causal_window_on_the_ring(rng):
  check_strategy(rng, "ring", 4, "gqa", 6, causal=False)


@pytest.mark.parametrize("impl,strategy,permuted", [
    ("dense", "ring", False), ("tiled", "ring", False), ("context_parallel", "ring", False),
    ("context_parallel", "ring", True), ("context_parallel", "ulysses", True),
    ("context_parallel", "all_gather", True)])
def test_spec_function_takes_the_layers_window(rng, impl, strategy, permuted):
  """`AttentionSpec.function(window=W)` on natural and on permuted rows (positions as index,
  packed documents: the window is taken within each document)."""
  from longctx.attention import permute, unpermute
  q, k, v = make_inputs(rng, h=4, kh=2)
  seg = random_segments(rng, 2, L)
  pos = jnp.asarray(np.stack([_doc_positions(r) for r in np.asarray(seg)]))
  want = dense_attention(q, k, v, seg, mask_spec=MaskSpec(window=6))
  spec = AttentionSpec(impl=impl, strategy=strategy, tiles=Tiles(block_q=4, block_k=4))
  mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
  fn = spec.function(mesh if impl == "context_parallel" else None, permuted=permuted, window=6)
  if permuted:
    got = unpermute(fn(*(permute(x, spec.layout, 4) for x in (q, k, v, seg, pos))),
                    spec.layout, 4)
  else:
    got = fn(q, k, v, seg, pos)
  assert float(jnp.abs(want - got).max()) < TOL


def _doc_positions(seg_row):
  """0, 1, … within each run of equal segment ids (packing's positions)."""
  pos, last, n = [], None, 0
  for s in seg_row:
    n = n + 1 if s == last else 0
    pos.append(n)
    last = s
  return np.array(pos, np.int32)


def test_public_entry_point_with_window(rng):
  q, k, v = make_inputs(rng, h=4, kh=1)
  mesh = Mesh(np.array(jax.devices()[:8]), ("seq",))
  mask = MaskSpec(window=7)
  got = context_parallel_attention(q, k, v, mesh=mesh, layout="zigzag", mask_spec=mask,
                                   block_q=2, block_k=2)
  assert float(jnp.abs(dense_attention(q, k, v, mask_spec=mask) - got).max()) < TOL


@pytest.mark.parametrize("window,match", [(0, "window must be ≥ 1"), (-3, "window must be ≥ 1")])
def test_bad_mask_window(window, match):
  with pytest.raises(ValueError, match=match):
    MaskSpec(window=window)


def test_bad_layer_window():
  with pytest.raises(ValueError, match="positive number of tokens or None, found 0"):
    AttentionSpec().function(Mesh(np.array(jax.devices()[:2]), ("seq",)), window=0)
  with pytest.raises(ValueError, match=r"sliding window \(64\) with S²-Attn \(s2_group=8\)"):
    AttentionSpec(impl="tiled", s2_group=8).function(window=64)


@pytest.mark.pallas
@pytest.mark.parametrize("kernel,block", [("pallas_gpu", 16), ("pallas_tpu", 128)])
def test_pallas_window_matches_dense(rng, kernel, block):
  """Both Pallas kernels, interpreted, on a 2-device ring (zigzag) with a window inside a
  chunk and one spanning several tiles."""
  l = 4 * block
  q, k, v = make_inputs(rng, l=l, h=4, kh=2, d=16)  # Triton: head_dim ≥ 16
  seg = random_segments(rng, 2, l)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  mesh = Mesh(np.array(jax.devices()[:2]), ("seq",))
  for w in (block // 2 + 1, 2 * block + 3):
    mask = MaskSpec(window=w)
    want = _grads(lambda *a: dense_attention(*a, seg, mask_spec=mask), q, k, v, ct)
    got = _grads(lambda *a: context_parallel_attention(
        *a, seg, mesh=mesh, layout="zigzag", mask_spec=mask, kernel=kernel, block_q=block,
        block_k=block), q, k, v, ct)
    _assert_close(want, got, (kernel, w))


@pytest.mark.parametrize("strategy,p,layout,window", [
    ("ring", 4, "contiguous", 5), ("ring", 8, "contiguous", 9), ("ring", 4, "striped", 3),
    ("ring", 4, "zigzag", 5), ("hybrid", 8, "contiguous", 5)])
def test_windowed_ring_hlo_bytes_match_formula(strategy, p, layout, window):
  """The compiled fwd+bwd program of a ring told its layout moves the bytes of `ring_hops`
  hops, as `costs.strategy_bytes` counts them (contiguous, W ≤ C: one hop of K/V each pass,
  dK/dV two; zigzag one each way)."""
  from longctx.attention.costs import collective_bytes, strategy_bytes
  from longctx.attention.ring import ring_hops
  program, _ = local_program(strategy, p, 4, 2, window, True, Layout(layout))
  q = jax.ShapeDtypeStruct((2, L, 4, 8), jnp.float32)
  kv = jax.ShapeDtypeStruct((2, L, 2, 8), jnp.float32)
  tok = jax.ShapeDtypeStruct((2, L), jnp.int32)
  got = collective_bytes(program.lower(q, kv, kv, tok, tok, q).compile().as_text())
  size = (2, p // 2) if strategy == "hybrid" else p
  mask = MaskSpec(window=window)
  want = strategy_bytes(strategy, 2, L, 4, 2, 8, 4, size, grad=True, mask_spec=mask,
                        layout=layout, regather=False)  # one call: see costs.strategy_bytes
  full = strategy_bytes(strategy, 2, L, 4, 2, 8, 4, size, grad=True)
  for kind in want:
    assert abs(got[kind] - want[kind]) <= 0.02 * want[kind], (kind, got, want)
  ring = p // 2 if strategy == "hybrid" else p
  if sum(ring_hops(layout, ring, L, ring, mask)) < ring - 1:
    assert want["collective-permute"] < full["collective-permute"]
