"""Inner kernels by name: the Pallas GPU (Triton) kernel against the dense oracle and the pure-JAX
blockwise kernel. Off a GPU the Pallas kernel runs in Pallas' interpreter (the same kernel code,
not its Triton compile); its lowering to Triton for CUDA is checked on the CPU too.

Legend: B batch, L sequence, C chunk, H query heads, K kv heads, D head dim, P devices.
"""
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from longctx.attention import blockwise_attention, context_parallel_attention, dense_attention
from longctx.attention.blockwise import (TokenMeta, chunk_backward, chunk_forward, natural_meta,
                                         output_delta, tile_config)
from longctx.attention.kernels import check_kernel, check_vma, interpret, pallas_gpu
from longctx.attention.reference import MaskSpec
from longctx.attention.shifted_sparse import (context_parallel_shifted_sparse_attention,
                                              s2_dense_attention)

TOL = 2e-5
L, D = 64, 16
PALLAS = dict(kernel="pallas_gpu", block_q=16, block_k=16)


def inputs(rng, b=2, l=L, h=4, kh=2, d=D, dtype=jnp.float32):
  return tuple(jnp.asarray(rng.normal(size=(b, l, n, d)), dtype) for n in (h, kh, kh))


def segments(rng, b=2, l=L):
  """Documents crossing every 16-token block and chunk boundary, then padding."""
  rows = []
  for _ in range(b):
    n_pad = int(rng.integers(1, l // 4))
    cuts = np.sort(rng.choice(np.arange(1, l - n_pad), size=3, replace=False))
    row = np.searchsorted(cuts, np.arange(l), side="right") + 1
    row[l - n_pad:] = 0
    rows.append(row)
  return jnp.asarray(np.stack(rows), jnp.int32)


def assert_close(want, got, tol=TOL):
  for name, w, g in zip(["out", "dq", "dk", "dv"], want, got):
    err = float(jnp.abs(w.astype(jnp.float32) - g.astype(jnp.float32)).max())
    assert err < tol, (name, err)


def value_and_vjp(attn, q, k, v, ct):
  out, vjp = jax.vjp(attn, q, k, v)
  return (out,) + vjp(ct)


def test_kernel_names():
  assert check_kernel(None) == "blockwise" and check_kernel("Pallas_GPU") == "pallas_gpu"
  with pytest.raises(ValueError, match="unknown attention kernel 'flash9000'"):
    check_kernel("flash9000")
  with pytest.raises(NotImplementedError, match="no TPU kernel yet"):
    check_kernel("pallas_tpu")
  assert interpret("cpu") and interpret("tpu") and not interpret("gpu")
  assert check_vma("blockwise") and not check_vma("pallas_gpu")  # this test runs on CPU
  assert tile_config(MaskSpec(), 1.0, 1024, 1024, kernel="pallas_gpu").block_q == 128


def test_pallas_blocks_triton_can_take():
  with pytest.raises(ValueError, match="power of two"):
    pallas_gpu.check_blocks(96, 96, 16, 48, 16)
  with pytest.raises(ValueError, match="head_dim=24"):
    pallas_gpu.check_blocks(64, 64, 24, 16, 16)
  q, k, v = inputs(np.random.default_rng(0), d=24)
  with pytest.raises(ValueError, match="head_dim=24"):
    blockwise_attention(q, k, v, **PALLAS)


@pytest.mark.parametrize("spec", [MaskSpec(True), MaskSpec(False), MaskSpec(True, 16, 8)],
                         ids=["causal", "full", "s2-shifted"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_pallas_chunk_pair_matches_blockwise_kernel(rng, spec, heads):
  """One query chunk against another device's key chunk (zigzag-like original indices,
  documents and padding): out, lse and the gradients equal the pure-JAX kernel's."""
  q, k, v = inputs(rng, l=32, h=heads[0], kh=heads[1])
  seg = segments(rng, l=64)
  idx = jnp.asarray(np.stack([rng.permutation(64) for _ in range(2)]), jnp.int32)
  mq, mk = TokenMeta(idx[:, :32], seg[:, :32]), TokenMeta(idx[:, 32:], seg[:, 32:])
  cfg = tile_config(spec, 0.25, 32, 32, 16, 16)
  o_ref, lse_ref, _ = chunk_forward(cfg, q, k, v, mq, mk)
  o, lse = pallas_gpu.chunk_forward(q, k, v, mq, mk, spec=spec, scale=0.25, block_q=16,
                                    block_k=16, interpret=True)
  assert float(jnp.abs(o - o_ref).max()) < TOL
  finite = jnp.isfinite(lse_ref)
  assert bool(jnp.all(finite == jnp.isfinite(lse)))
  assert float(jnp.abs(jnp.where(finite, lse - lse_ref, 0)).max()) < TOL
  do = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  delta = output_delta(do, o_ref)
  want = chunk_backward(cfg, q, k, v, do, lse_ref, delta, mq, mk)
  got = pallas_gpu.chunk_backward(q, k, v, do, lse, delta, mq, mk, spec=spec, scale=0.25,
                                  block_q=16, block_k=16, interpret=True)
  assert_close((o_ref,) + want, (o,) + got)


@pytest.mark.parametrize("causal", [True, False])
def test_pallas_blockwise_matches_dense(rng, causal):
  q, k, v = inputs(rng)
  seg = segments(rng)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  want = value_and_vjp(lambda q, k, v: dense_attention(q, k, v, seg, causal=causal), q, k, v, ct)
  got = value_and_vjp(lambda q, k, v: blockwise_attention(q, k, v, seg, causal=causal, **PALLAS),
                      q, k, v, ct)
  assert_close(want, got)


@pytest.mark.parametrize("p,layout,heads", [(2, "zigzag", (4, 2)), (4, "striped", (4, 1)),
                                            (4, "zigzag", (4, 4))], ids=["p2-gqa", "p4-mqa",
                                                                         "p4-mha"])
def test_pallas_ring_matches_dense(rng, p, layout, heads):
  """The ring with the Pallas kernel at each step (merging through the lse), documents that
  cross device chunks, padding."""
  q, k, v = inputs(rng, h=heads[0], kh=heads[1])
  seg = segments(rng)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  mesh = Mesh(np.array(jax.devices()[:p]), ("seq",))
  want = value_and_vjp(lambda q, k, v: dense_attention(q, k, v, seg), q, k, v, ct)
  got = value_and_vjp(lambda q, k, v: context_parallel_attention(
      q, k, v, seg, mesh=mesh, layout=layout, **PALLAS), q, k, v, ct)
  assert_close(want, got)
  assert np.all(np.asarray(got[0])[np.asarray(seg) == 0] == 0)


def test_pallas_s2_ring_matches_s2_reference(rng):
  q, k, v = inputs(rng, b=1)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
  want = value_and_vjp(lambda q, k, v: s2_dense_attention(q, k, v, group_size=32), q, k, v,
                       ct)
  got = value_and_vjp(lambda q, k, v: context_parallel_shifted_sparse_attention(
      q, k, v, mesh=mesh, group_size=32, **PALLAS), q, k, v, ct)
  assert_close(want, got)


def test_pallas_bfloat16_error_at_most_twice_dense(rng):
  q32, k32, v32 = inputs(rng)
  exact = dense_attention(q32, k32, v32)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))
  err = lambda out: float(jnp.abs(out.astype(jnp.float32) - exact).max())
  dense_err = err(dense_attention(q, k, v))
  assert blockwise_attention(q, k, v, **PALLAS).dtype == jnp.bfloat16
  assert err(blockwise_attention(q, k, v, **PALLAS)) <= 2 * dense_err


def test_pallas_lowers_to_triton_for_cuda():
  """Forward and backward lower for a CUDA target without a GPU: three Triton kernels (forward,
  dq, dk/dv). This checks Pallas' Triton lowering of our kernels, not their PTX compile."""
  b, l, h, kh, d = 1, 256, 4, 2, 64
  q = jax.ShapeDtypeStruct((b, l, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, l, kh, d), jnp.bfloat16)

  def step(q, k, v, seg):
    meta = natural_meta(seg, b, l)
    kw = dict(spec=MaskSpec(True), scale=d ** -0.5, block_q=128, block_k=64)
    o, lse = pallas_gpu.chunk_forward(q, k, v, meta, meta, **kw)
    do = o.astype(q.dtype)
    return pallas_gpu.chunk_backward(q, k, v, do, lse, output_delta(do, o), meta, meta, **kw)

  text = jax.jit(step).trace(q, kv, kv, jax.ShapeDtypeStruct((b, l), jnp.int32)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert len(re.findall(r"xla\.gpu\.triton", text)) == 3


def test_gpu_check_script_runs_interpreted():
  """bench/attention_gpu.py (the check to run on a GPU) works end to end, here interpreted."""
  done = subprocess.run(
      [sys.executable, "bench/attention_gpu.py", "--lengths", "128", "--heads", "4",
       "--kv-heads", "2", "--head-dim", "16", "--no-timing"],
      capture_output=True, text=True, timeout=600,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stdout + done.stderr
  assert "# check: PASS" in done.stdout
