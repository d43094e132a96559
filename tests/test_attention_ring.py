"""Ring attention under shard_map against the dense oracle: every layout, P = 1..8, causal and
not, packed documents crossing device boundaries with padding, MHA / GQA / MQA, gradients.

Legend: B batch, L sequence, C local chunk, H query heads, K kv heads, D head dim, P devices.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as PS

from longctx.attention import (Layout, context_parallel_attention, dense_attention,
                               original_index, permute_batch, ring_attention, unpermute)
from tests.helpers import make_inputs, random_segments

TOL = 2e-5
L = 32


def mesh_of(p):
  return Mesh(np.array(jax.devices()[:p]), ("seq",))


def check_against_dense(rng, p, layout, causal, h=4, kh=4, segments=True, block=4, **blocks):
  q, k, v = make_inputs(rng, h=h, kh=kh)
  seg = random_segments(rng, 2, L) if segments else None
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  mesh = mesh_of(p)

  def both(q, k, v):
    want, vjp_w = jax.vjp(lambda q, k, v: dense_attention(q, k, v, seg, causal=causal), q, k, v)
    got, vjp_g = jax.vjp(lambda q, k, v: context_parallel_attention(
        q, k, v, seg, mesh=mesh, causal=causal, layout=layout,
        **(blocks or dict(block_q=block, block_k=block))),
                         q, k, v)
    return (want,) + vjp_w(ct), (got,) + vjp_g(ct)

  want, got = jax.jit(both)(q, k, v)
  for name, w, g in zip(["out", "dq", "dk", "dv"], want, got):
    err = float(jnp.abs(w - g).max())
    assert err < TOL, (name, err)
  if segments:
    assert np.all(np.asarray(got[0])[np.asarray(seg) == 0] == 0)


CASES = [(1, "contiguous", c) for c in (True, False)] + [
    (p, lay, c) for p in (2, 4, 8) for lay in ("contiguous", "zigzag", "striped")
    for c in (True, False)]


@pytest.mark.matrix
@pytest.mark.parametrize("p,layout,causal", CASES)
def test_ring_matches_dense_mha(rng, p, layout, causal):
  check_against_dense(rng, p, layout, causal)


@pytest.mark.matrix
@pytest.mark.parametrize("p,layout,causal,heads", [
    (4, "zigzag", True, (4, 2)), (4, "zigzag", True, (4, 1)), (8, "striped", False, (4, 2)),
    (2, "contiguous", True, (4, 1))], ids=["gqa-zz", "mqa-zz", "gqa-striped", "mqa-contig"])
def test_ring_matches_dense_gqa_mqa(rng, p, layout, causal, heads):
  check_against_dense(rng, p, layout, causal, h=heads[0], kh=heads[1])


def test_ring_without_segments_whole_chunk_tiles(rng):
  check_against_dense(rng, 8, Layout.ZIGZAG, True, segments=False, block=512)


@pytest.mark.slow
def test_ring_warns_when_chunk_has_no_tile_size(rng):
  """A chunk of 2 × 97 tokens would be tiled by 2: still exact, but the ring says so and how
  far to pad (single-device tiled attention pads by itself)."""
  q, k, v = make_inputs(rng, b=1, l=4 * 97, h=2, kh=2)
  with pytest.warns(UserWarning, match="chunk on each device: 194 tokens .* padded to 256"):
    out = context_parallel_attention(q, k, v, mesh=mesh_of(2), block_q=64, block_k=64)
  assert float(jnp.abs(out - dense_attention(q, k, v)).max()) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [dict(block_q=8, block_k=2, block_q_bwd=2, block_k_bwd=4), {}],
                         ids=["8x2-bwd-2x4", "defaults"])
def test_ring_backward_tiles_differ_from_forward(rng, blocks):
  check_against_dense(rng, 4, Layout.ZIGZAG, True, h=4, kh=2, **blocks)


@pytest.mark.slow
@pytest.mark.parametrize("p", [2, 8])
def test_ring_bfloat16_error_bounded_and_flat_in_p(rng, p):
  q, k, v = make_inputs(rng, b=1)
  exact = dense_attention(q, k, v)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  err_dense = float(jnp.abs(dense_attention(qb, kb, vb).astype(jnp.float32) - exact).max())
  got = context_parallel_attention(qb, kb, vb, mesh=mesh_of(p), layout="zigzag", block_q=4,
                                   block_k=4)
  assert got.dtype == jnp.bfloat16
  err = float(jnp.abs(got.astype(jnp.float32) - exact).max())
  assert err <= 2 * err_dense, (err, err_dense)


@pytest.mark.slow
def test_model_inside_shard_map_with_permuted_batch(rng):
  """The trainer's path: permute the batch dict once, call the ring inside shard_map with
  document positions as the mask index (causal + segment ids), unpermute the output."""
  p, layout = 4, "zigzag"
  q, k, v = make_inputs(rng, h=4, kh=2)
  seg = random_segments(rng, 2, L)
  starts = np.asarray(seg)[:, 1:] != np.asarray(seg)[:, :-1]
  pos = np.zeros((2, L), np.int32)
  for b in range(2):
    for t in range(1, L):
      pos[b, t] = 0 if starts[b, t - 1] else pos[b, t - 1] + 1
  batch = {"q": q, "k": k, "v": v, "segment_ids": seg, "positions": jnp.asarray(pos),
           "index": original_index("contiguous", 2, L, 1)}
  perm = permute_batch(batch, layout, p)
  assert np.array_equal(np.asarray(perm["index"]), np.asarray(original_index(layout, 2, L, p)))
  act, tok = PS(None, "seq", None, None), PS(None, "seq")

  def local(q, k, v, seg, pos):
    return ring_attention(q, k, v, seg, pos, axis="seq", block_q=4, block_k=4)

  out = jax.shard_map(local, mesh=mesh_of(p), in_specs=(act, act, act, tok, tok), out_specs=act)(
      perm["q"], perm["k"], perm["v"], perm["segment_ids"], perm["positions"])
  got = unpermute(out, layout, p)
  assert float(jnp.abs(got - dense_attention(q, k, v, seg)).max()) < TOL


def test_layout_permutations():
  assert Layout.parse("ZigZag") is Layout.ZIGZAG
  np.testing.assert_array_equal(Layout.ZIGZAG.permutation(8, 2), [0, 1, 6, 7, 2, 3, 4, 5])
  np.testing.assert_array_equal(Layout.STRIPED.permutation(8, 2), [0, 2, 4, 6, 1, 3, 5, 7])
  for lay in Layout:
    perm = lay.permutation(32, 4)
    np.testing.assert_array_equal(perm[lay.inverse(32, 4)], np.arange(32))


def test_bad_inputs_raise(rng):
  q, k, v = make_inputs(rng, l=24)
  mesh = mesh_of(8)
  with pytest.raises(ValueError, match="multiple of 16"):
    context_parallel_attention(q, k, v, mesh=mesh, layout="zigzag")
  with pytest.raises(ValueError, match="unknown layout"):
    context_parallel_attention(q, k, v, mesh=mesh_of(4), layout="spiral")
  with pytest.raises(ValueError, match="no axis"):
    context_parallel_attention(q, k, v, mesh=mesh, axis="sequence")
  with pytest.raises(ValueError, match="multiple of kv heads"):
    context_parallel_attention(q, k[:, :, :3], v[:, :, :3], mesh=mesh_of(4))
  with pytest.raises(ValueError, match="dtypes differ"):
    context_parallel_attention(q, k.astype(jnp.bfloat16), v, mesh=mesh_of(4))
  with pytest.raises(ValueError, match="sequence length"):
    permute_batch({"a": jnp.zeros((1, 8)), "b": jnp.zeros((1, 16))}, "striped", 2)
