"""Dense oracle and single-device tiled attention: values, gradients, padding, bad input.

Legend: B batch, L sequence, H query heads, K kv heads, D head dim.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.attention import (tiled_attention, tiled_attention_with_lse,
                               dense_attention, merge_partials)
from longctx.attention.tiles import (BLOCK_K, BLOCK_K_BWD, BLOCK_Q, BLOCK_Q_BWD, tile_config,
                                     tiled_length)
from longctx.attention.reference import MaskSpec, masked_dense_attention
from tests.bench_scripts import run_bench

TOL = 2e-5


def make_inputs(rng, b=2, l=16, h=4, kh=2, d=8, dtype=jnp.float32):
  q = jnp.asarray(rng.normal(size=(b, l, h, d)), dtype)
  k = jnp.asarray(rng.normal(size=(b, l, kh, d)), dtype)
  v = jnp.asarray(rng.normal(size=(b, l, kh, d)), dtype)
  return q, k, v


def packed_segments(b, l):
  """Row 0: three documents then padding; row 1: one document then padding."""
  row0 = [1] * (l // 4) + [2] * (l // 2 - 1) + [3] * (l // 8 + 1) + [0] * (l - l // 4 - l // 2 - l // 8)
  row1 = [1] * (l - 3) + [0] * 3
  return jnp.asarray([row0, row1][:b], jnp.int32)


def value_and_grads(fn, q, k, v, ct):
  """(out, dq, dk, dv) of fn with output cotangent ct, under one jit."""
  def run(q, k, v):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(ct)
  return jax.jit(run)(q, k, v)


def naive_attention(q, k, v, seg, causal):
  """Per-head NumPy loop with K/V repeated: an independent check of the oracle."""
  q, k, v, seg = map(np.asarray, (q, k, v, seg))
  b, l, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros((b, l, h, d))
  for bi in range(b):
    for hi in range(h):
      for i in range(l):
        allowed = [j for j in range(l) if seg[bi, i] != 0 and seg[bi, j] == seg[bi, i]
                   and (not causal or j <= i)]
        if not allowed:
          continue
        s = np.array([q[bi, i, hi] @ k[bi, j, hi // g] for j in allowed]) / np.sqrt(d)
        p = np.exp(s - s.max())
        p /= p.sum()
        out[bi, i, hi] = p @ v[bi, allowed, hi // g]
  return out


@pytest.mark.parametrize("causal", [True, False])
def test_dense_matches_naive_loop(rng, causal):
  q, k, v = make_inputs(rng, l=8, h=4, kh=2)
  seg = packed_segments(2, 8)
  got = dense_attention(q, k, v, seg, causal=causal)
  assert np.abs(np.asarray(got) - naive_attention(q, k, v, seg, causal)).max() < TOL


@pytest.mark.matrix
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [True, False])
def test_tiled_matches_dense(rng, heads, causal):
  h, kh = heads
  q, k, v = make_inputs(rng, h=h, kh=kh)
  seg = packed_segments(2, 16)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  want = value_and_grads(lambda q, k, v: dense_attention(q, k, v, seg, causal=causal), q, k, v, ct)
  got = value_and_grads(lambda q, k, v: tiled_attention(q, k, v, seg, causal=causal,
                                                            block_q=4, block_k=8), q, k, v, ct)
  for name, w, g in zip(["out", "dq", "dk", "dv"], want, got):
    assert float(jnp.abs(w - g).max()) < TOL, name


def test_tiled_no_segments_and_scale(rng):
  q, k, v = make_inputs(rng, b=1)
  want = dense_attention(q, k, v, causal=True, scale=0.3)
  got = tiled_attention(q, k, v, causal=True, scale=0.3, block_q=8, block_k=4)
  assert float(jnp.abs(want - got).max()) < TOL


def test_padding_rows_output_zero_and_gradients_zero(rng):
  q, k, v = make_inputs(rng)
  seg = packed_segments(2, 16)
  pad = np.asarray(seg) == 0
  ct = jnp.ones(q.shape, jnp.float32)
  for fn in (dense_attention, lambda *a: tiled_attention(*a, block_q=4, block_k=4)):
    out, dq, dk, dv = value_and_grads(lambda q, k, v: fn(q, k, v, seg), q, k, v, ct)
    for x in (out, dq, dk, dv):
      assert np.isfinite(np.asarray(x)).all()
    assert np.all(np.asarray(out)[pad] == 0)
    for x in (dq, dk, dv):
      assert np.all(np.asarray(x)[pad] == 0)  # padding neither attends nor is attended


def test_future_keys_have_zero_gradient(rng):
  q, k, v = make_inputs(rng, b=1)
  grad = jax.grad(lambda k: tiled_attention(q, k, v, block_q=4, block_k=4)[:, 5].sum())(k)
  assert np.all(np.asarray(grad)[:, 6:] == 0) and np.abs(np.asarray(grad)[:, :6]).max() > 0


@pytest.mark.slow
def test_lse_merges_partials(rng):
  """Two halves of the keys, merged through their lse, equal attention over all keys."""
  q, k, v = make_inputs(rng, b=1, l=8)
  half = jnp.arange(8)[None, None, :] < 4
  full = jnp.ones((1, 8, 8), bool)
  o_a, lse_a = masked_dense_attention(q, k, v, jnp.broadcast_to(half, (1, 8, 8)))
  o_b, lse_b = masked_dense_attention(q, k, v, jnp.broadcast_to(~half, (1, 8, 8)))
  o, lse = merge_partials(o_a, lse_a, o_b, lse_b)
  o_full, lse_full = masked_dense_attention(q, k, v, full)
  assert float(jnp.abs(o - o_full).max()) < TOL and float(jnp.abs(lse - lse_full).max()) < TOL
  _, lse_bw = tiled_attention_with_lse(q, k, v, causal=False, block_q=4, block_k=4)
  assert float(jnp.abs(lse_bw - lse_full).max()) < TOL


@pytest.mark.slow
def test_bfloat16_error_at_most_twice_dense(rng):
  q, k, v = make_inputs(rng, b=1, l=32)
  exact = dense_attention(q, k, v)
  qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
  dense_bf16 = dense_attention(qb, kb, vb)
  block_bf16 = tiled_attention(qb, kb, vb, block_q=8, block_k=8)
  assert block_bf16.dtype == jnp.bfloat16
  err_dense = float(jnp.abs(dense_bf16.astype(jnp.float32) - exact).max())
  err_block = float(jnp.abs(block_bf16.astype(jnp.float32) - exact).max())
  assert err_block <= 2 * err_dense, (err_block, err_dense)


@pytest.mark.slow
@pytest.mark.parametrize("heads", [(4, 4), (4, 1)], ids=["mha", "mqa"])
def test_backward_tiles_differ_from_forward(rng, heads):
  """Forward tiles 8 × 2, backward 4 × 16 (and the tuned defaults): still the dense values and
  gradients."""
  h, kh = heads
  q, k, v = make_inputs(rng, l=32, h=h, kh=kh)
  seg = packed_segments(2, 32)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  want = value_and_grads(lambda q, k, v: dense_attention(q, k, v, seg), q, k, v, ct)
  for blocks in (dict(block_q=8, block_k=2, block_q_bwd=4, block_k_bwd=16), {}):
    got = value_and_grads(lambda q, k, v: tiled_attention(q, k, v, seg, **blocks), q, k, v,
                          ct)
    for name, w, g in zip(["out", "dq", "dk", "dv"], want, got):
      assert float(jnp.abs(w - g).max()) < TOL, (name, blocks)


@pytest.mark.slow
@pytest.mark.parametrize("segments", [False, True], ids=["plain", "packed"])
def test_awkward_length_is_padded(rng, segments):
  """A prime length (97) would be tiled by 1 token; it runs padded to 128 with segment-0 tokens
  and equals dense attention, values, lse and gradients, with and without segment ids."""
  l = 97
  tiles = functools.partial(tile_config, MaskSpec(), 1.0, block_q=64, block_k=64)
  assert tile_config(MaskSpec(), 1.0, l, l, block_q=64).block_q == 1
  assert tiled_length(l, tiles) == 128 and tiled_length(96, tiles) == 96
  q, k, v = make_inputs(rng, b=2, l=l, h=6, kh=2)
  seg = packed_segments(2, l) if segments else None
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  want = value_and_grads(lambda q, k, v: dense_attention(q, k, v, seg), q, k, v, ct)
  fn = lambda q, k, v: tiled_attention(q, k, v, seg, block_q=64, block_k=64)
  got = value_and_grads(fn, q, k, v, ct)
  for name, w, g in zip(["out", "dq", "dk", "dv"], want, got):
    assert g.shape == w.shape and float(jnp.abs(w - g).max()) < TOL, name
  _, lse = tiled_attention_with_lse(q, k, v, seg, block_q=64, block_k=64)
  _, lse_full = tiled_attention_with_lse(q, k, v, seg, block_q=97, block_k=97)
  assert lse.shape == (2, l, 6)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_full), atol=TOL)


def test_tile_config_defaults():
  """No blocks: the tuned pairs; forward blocks given: the backward follows them; each block
  reduced to a divisor of its length."""
  spec = MaskSpec(causal=True)
  cfg = tile_config(spec, 1.0, 8192, 4096)
  assert (cfg.block_q, cfg.block_k) == (BLOCK_Q, BLOCK_K)
  assert (cfg.backward().block_q, cfg.backward().block_k) == (BLOCK_Q_BWD, BLOCK_K_BWD)
  # GQA: the G heads of a kv head share a tile's rows, so the default query tile is 1/G
  cfg = tile_config(spec, 1.0, 8192, 4096, group=4)
  assert (cfg.block_q, cfg.block_k) == (BLOCK_Q // 4, BLOCK_K)
  assert cfg.backward().block_q == BLOCK_Q_BWD // 4
  assert tile_config(spec, 1.0, 8192, 4096, block_q=128, group=4).block_q == 128
  # cap (the ring's C/2, so a zigzag chunk's halves never share a tile) bounds defaults only
  cfg = tile_config(spec, 1.0, 1024, 1024, cap=512)
  assert (cfg.block_q, cfg.block_k, cfg.backward().block_q) == (512, 512, 512)
  assert tile_config(spec, 1.0, 1024, 1024, block_q=1024, cap=512).block_q == 1024
  assert tile_config(spec, 1.0, 128, 128, kernel="pallas_tpu", cap=64).block_q == 128
  cfg = tile_config(spec, 1.0, 8192, 4096, block_q=128, block_k=64)
  assert (cfg.backward().block_q, cfg.backward().block_k) == (128, 64)
  cfg = tile_config(spec, 1.0, 8192, 4096, block_q=128, block_k=64, block_k_bwd=256)
  assert (cfg.backward().block_q, cfg.backward().block_k) == (128, 256)
  cfg = tile_config(spec, 1.0, 96, 96, block_q=64, block_q_bwd=40)
  assert (cfg.block_q, cfg.backward().block_q) == (48, 32)
  with pytest.raises(ValueError, match="block_k_bwd must be a positive tile size"):
    tile_config(spec, 1.0, 64, 64, block_k_bwd=0)


@pytest.mark.parametrize("fn", [dense_attention, tiled_attention])
def test_bad_inputs_raise(rng, fn):
  q, k, v = make_inputs(rng, h=4, kh=2)
  with pytest.raises(ValueError, match="multiple of kv heads"):
    fn(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
  with pytest.raises(ValueError, match="disagree"):
    fn(q, k[:, :8], v[:, :8])
  with pytest.raises(ValueError, match="dtypes differ"):
    fn(q, k.astype(jnp.bfloat16), v)
  with pytest.raises(ValueError, match="segment_ids"):
    fn(q, k, v, jnp.ones((2, 15), jnp.int32))
  with pytest.raises(ValueError, match="k and v shapes differ"):
    fn(q, k, v[..., :4])


@pytest.mark.slow
def test_profile_script_runs():
  """bench/attention_profile.py traces one fwd+bwd and names the tile products."""
  out = run_bench("attention_profile.py", "--length", "512", "--heads", "2", "--block", "128",
                  "--grad", "--top", "40").stdout
  assert "XLA intra-op threads" in out
  assert "| dot f32[128,128]" in out, out
