"""S²-Attn (LongLoRA shifted sparse attention, no wrap-around) against dense attention under
the S² mask, on one device and inside the ring with groups straddling device chunks.

Legend: B batch, L sequence, H query heads, K kv heads, D head dim, G group size.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from longctx.attention import (context_parallel_shifted_sparse_attention, s2_dense_attention,
                               shifted_sparse_attention)
from longctx.attention.online_softmax import chunk_forward
from longctx.attention.tiles import TileConfig, TokenMeta
from longctx.attention.reference import MaskSpec, dense_attention, make_mask
from longctx.attention.shifted_sparse import s2_specs

TOL = 2e-5


def make_inputs(rng, b=2, l=32, h=4, kh=2, d=8):
  return tuple(jnp.asarray(rng.normal(size=(b, l, n, d)), jnp.float32) for n in (h, kh, kh))


def segments(l):
  return jnp.asarray([[1] * (l // 2 + 3) + [2] * (l // 2 - 5) + [0] * 2, [1] * l], jnp.int32)


def test_s2_masks_have_no_wraparound():
  l, g = 16, 8
  idx = jnp.arange(l, dtype=jnp.int32)[None]
  ones = jnp.ones((1, l), jnp.int32)
  plain, shifted = (np.asarray(make_mask(idx, ones, idx, ones, s))[0] for s in s2_specs(g))
  groups_plain = [range(0, 8), range(8, 16)]
  groups_shift = [range(0, 4), range(4, 12), range(12, 16)]  # half-length ends, no wrap
  for mask, groups in ((plain, groups_plain), (shifted, groups_shift)):
    want = np.zeros((l, l), bool)
    for grp in groups:
      for i in grp:
        for j in grp:
          want[i, j] = j <= i
    np.testing.assert_array_equal(mask, want)
  assert not shifted[:4, 12:].any() and not shifted[12:, :4].any()


def value_and_grads(fn, q, k, v, ct):
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(ct)
  return jax.jit(run)(q, k, v)


def assert_close(want, got):
  for name, w, g in zip(["out", "dq", "dk", "dv"], want, got):
    err = float(jnp.abs(w - g).max())
    assert err < TOL, (name, err)


@pytest.mark.parametrize("heads", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
def test_s2_tiled_matches_dense_s2(rng, heads):
  q, k, v = make_inputs(rng, h=heads[0], kh=heads[1])
  seg = segments(32)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  want = value_and_grads(lambda q, k, v: s2_dense_attention(q, k, v, seg, group_size=8), q, k, v,
                         ct)
  got = value_and_grads(lambda q, k, v: shifted_sparse_attention(
      q, k, v, seg, group_size=8, block_q=4, block_k=4), q, k, v, ct)
  assert_close(want, got)


@pytest.mark.matrix
@pytest.mark.parametrize("p,layout", [(4, "zigzag"), (8, "striped"), (2, "contiguous")])
def test_s2_ring_matches_dense_s2(rng, p, layout):
  """L = 32, G = 8: shifted groups [4, 12), [12, 20), … straddle every chunk boundary."""
  q, k, v = make_inputs(rng, h=4, kh=2)
  seg = segments(32)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  mesh = Mesh(np.array(jax.devices()[:p]), ("seq",))
  want = value_and_grads(lambda q, k, v: s2_dense_attention(q, k, v, seg, group_size=8), q, k, v,
                         ct)
  got = value_and_grads(lambda q, k, v: context_parallel_shifted_sparse_attention(
      q, k, v, seg, mesh=mesh, group_size=8, layout=layout, block_q=2, block_k=2), q, k, v, ct)
  assert_close(want, got)


def s2_per_head_oracle(q, k, v, seg, group_size):
  """Dense attention head by head, each head's S² mask chosen from its kv group alone: of K > 1
  kv groups the last ⌊K/2⌋ are shifted; with K = 1 the second half of the query heads."""
  hq, hk = q.shape[2], k.shape[2]
  plain, shifted = s2_specs(group_size)
  outs = []
  for h in range(hq):
    g = h // (hq // hk)
    is_shifted = h >= hq // 2 if hk == 1 else g >= hk - hk // 2
    outs.append(dense_attention(q[:, :, h:h + 1], k[:, :, g:g + 1], v[:, :, g:g + 1], seg,
                                mask_spec=shifted if is_shifted else plain))
  return jnp.concatenate(outs, axis=2)


@pytest.mark.slow
@pytest.mark.parametrize("heads", [(9, 3), (6, 3), (4, 2), (4, 1)],
                         ids=["smollm2-9-3", "odd-kv-6-3", "gqa-4-2", "mqa-4-1"])
def test_s2_splits_heads_by_kv_group(rng, heads):
  """Odd kv head counts (SmolLM2's 9 / 3) split by kv group; even ones as LongLoRA's halves."""
  q, k, v = make_inputs(rng, h=heads[0], kh=heads[1])
  seg = segments(32)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  want = value_and_grads(lambda q, k, v: s2_per_head_oracle(q, k, v, seg, 8), q, k, v, ct)
  for fn in (lambda q, k, v: s2_dense_attention(q, k, v, seg, group_size=8),
             lambda q, k, v: shifted_sparse_attention(q, k, v, seg, group_size=8, block_q=4,
                                                      block_k=4)):
    assert_close(want, value_and_grads(fn, q, k, v, ct))
  mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
  assert_close(want, value_and_grads(lambda q, k, v: context_parallel_shifted_sparse_attention(
      q, k, v, seg, mesh=mesh, group_size=8, block_q=2, block_k=2), q, k, v, ct))


def test_s2_does_quarter_of_causal_work_at_group_quarter_length():
  l, block = 64, 4
  q = jnp.zeros((1, l, 1, 4), jnp.float32)
  meta = TokenMeta(jnp.arange(l, dtype=jnp.int32)[None], jnp.ones((1, l), jnp.int32))

  def tiles(spec):
    return int(chunk_forward(TileConfig(spec, 1.0, block, block), q, q, q, meta, meta)[2])

  full = tiles(MaskSpec(causal=True))
  s2 = sum(tiles(s) for s in s2_specs(l // 4)) / 2  # per head, averaged over the two halves
  assert abs(s2 / full - 0.25) < 0.05, (s2, full)


def test_s2_bad_group_size_raises(rng):
  q, k, v = make_inputs(rng)
  with pytest.raises(ValueError, match="group size"):
    shifted_sparse_attention(q, k, v, group_size=12)
  with pytest.raises(ValueError, match="halves"):
    shifted_sparse_attention(q[:, :, :3], k[:, :, :1], v[:, :, :1], group_size=8)
