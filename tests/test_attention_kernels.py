"""Inner kernels by name: the Pallas GPU (Triton) and TPU (Mosaic) kernels against the dense
oracle and the pure-JAX kernel ("xla"). Off their platform the Pallas kernels run in Pallas'
interpreter (the same kernel code, not its Triton / Mosaic compile); their lowering for CUDA and
for TPU is checked on the CPU too.

Legend: B batch, L sequence, C chunk, H query heads, K kv heads, D head dim, P devices.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from longctx.attention import tiled_attention, context_parallel_attention, dense_attention
from longctx.attention.online_softmax import chunk_backward, chunk_forward, output_delta
from longctx.attention.tiles import TokenMeta, natural_meta, tile_config
from longctx.attention.kernels import check_kernel, check_vma, interpret, pallas_gpu, pallas_tpu
from longctx.attention.reference import MaskSpec
from longctx.attention.shifted_sparse import (context_parallel_shifted_sparse_attention,
                                              s2_dense_attention)
from tests.bench_scripts import run_bench
from tests.helpers import random_segments

TOL = 2e-5
L, D = 64, 16
PALLAS = dict(kernel="pallas_gpu", block_q=16, block_k=16)
# per kernel: its module, the smallest blocks it takes, and a length of 4 such blocks
KERNEL_CASES = {"pallas_gpu": (pallas_gpu, 16, 64), "pallas_tpu": (pallas_tpu, 128, 512)}


def inputs(rng, b=2, l=L, h=4, kh=2, d=D, dtype=jnp.float32):
  return tuple(jnp.asarray(rng.normal(size=(b, l, n, d)), dtype) for n in (h, kh, kh))


def segments(rng, b=2, l=L):
  """Documents crossing block and chunk boundaries, then padding."""
  return random_segments(rng, b, l)


def assert_close(want, got, tol=TOL):
  for name, w, g in zip(["out", "dq", "dk", "dv"], want, got):
    err = float(jnp.abs(w.astype(jnp.float32) - g.astype(jnp.float32)).max())
    assert err < tol, (name, err)


def value_and_vjp(attn, q, k, v, ct):
  out, vjp = jax.vjp(attn, q, k, v)
  return (out,) + vjp(ct)


def test_kernel_names():
  assert check_kernel(None) == "xla" and check_kernel("Pallas_GPU") == "pallas_gpu"
  assert check_kernel("blockwise") == "xla"  # the old name (docs/DESIGN.md, "Glossary")
  with pytest.raises(ValueError, match="unknown attention kernel 'flash9000'"):
    check_kernel("flash9000")
  with pytest.raises(NotImplementedError, match="does not return the lse"):
    check_kernel("cudnn")
  assert interpret("pallas_gpu", "cpu") and interpret("pallas_gpu", "tpu")
  assert not interpret("pallas_gpu", "gpu") and not interpret("pallas_tpu", "tpu")
  assert check_vma("xla") and not check_vma("pallas_gpu")  # this test runs on CPU
  assert tile_config(MaskSpec(), 1.0, 1024, 1024, kernel="pallas_gpu").block_q == 128
  assert tile_config(MaskSpec(), 1.0, 1024, 1024, kernel="pallas_tpu").block_k == 512


def test_pallas_blocks_the_compilers_can_take():
  with pytest.raises(ValueError, match="power of two"):
    pallas_gpu.check_blocks(96, 96, 16, 48, 16)
  with pytest.raises(ValueError, match="head_dim=24"):
    pallas_gpu.check_blocks(64, 64, 24, 16, 16)
  q, k, v = inputs(np.random.default_rng(0), d=24)
  with pytest.raises(ValueError, match="head_dim=24"):
    tiled_attention(q, k, v, **PALLAS)
  with pytest.raises(ValueError, match="block_q=64 must be a multiple of 128"):
    tiled_attention(*inputs(np.random.default_rng(0)), kernel="pallas_tpu")


@pytest.mark.pallas
@pytest.mark.parametrize("kernel", KERNEL_CASES)
@pytest.mark.parametrize("spec,heads", [
    (MaskSpec(True), (4, 2)), (MaskSpec(False), (4, 4)), (MaskSpec(True, 32, 16), (4, 1))],
                         ids=["causal-gqa", "full-mha", "s2-shifted-mqa"])
def test_pallas_chunk_pair_matches_xla_kernel(rng, kernel, spec, heads):
  """One query chunk against another device's key chunk (shuffled original indices, documents
  and padding): out, lse and the gradients equal the pure-JAX kernel's."""
  module, block, l = KERNEL_CASES[kernel]
  c = l // 2
  q, k, v = inputs(rng, l=c, h=heads[0], kh=heads[1])
  seg = segments(rng, l=l)
  idx = jnp.asarray(np.stack([rng.permutation(l) for _ in range(2)]), jnp.int32)
  mq, mk = TokenMeta(idx[:, :c], seg[:, :c]), TokenMeta(idx[:, c:], seg[:, c:])
  spec = spec if spec.group_size is None else MaskSpec(True, 4 * block, 2 * block)
  cfg = tile_config(spec, 0.25, c, c, block, block)
  o_ref, lse_ref, _ = chunk_forward(cfg, q, k, v, mq, mk)
  kw = dict(mask_spec=spec, scale=0.25, block_q=block, block_k=block, interpret=True)
  o, lse = module.chunk_forward(q, k, v, mq, mk, **kw)
  assert float(jnp.abs(o - o_ref).max()) < TOL
  finite = jnp.isfinite(lse_ref)
  assert bool(jnp.all(finite == jnp.isfinite(lse)))
  assert float(jnp.abs(jnp.where(finite, lse - lse_ref, 0)).max()) < TOL
  do = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  delta = output_delta(do, o_ref)
  want = chunk_backward(cfg, q, k, v, do, lse_ref, delta, mq, mk)
  got = module.chunk_backward(q, k, v, do, lse, delta, mq, mk, **kw)
  assert_close((o_ref,) + want, (o,) + got)


@pytest.mark.pallas
@pytest.mark.parametrize("kernel", KERNEL_CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_pallas_tiled_matches_dense(rng, kernel, causal):
  _, block, l = KERNEL_CASES[kernel]
  q, k, v = inputs(rng, l=l)
  seg = segments(rng, l=l)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  want = value_and_vjp(lambda q, k, v: dense_attention(q, k, v, seg, causal=causal), q, k, v, ct)
  got = value_and_vjp(lambda q, k, v: tiled_attention(
      q, k, v, seg, causal=causal, kernel=kernel, block_q=block, block_k=block), q, k, v, ct)
  assert_close(want, got)


@pytest.mark.pallas
@pytest.mark.parametrize("kernel,p,layout,heads", [
    ("pallas_gpu", 2, "zigzag", (4, 2)), ("pallas_gpu", 4, "striped", (4, 1)),
    ("pallas_gpu", 4, "zigzag", (4, 4)), ("pallas_tpu", 2, "zigzag", (4, 2)),
    ("pallas_tpu", 4, "contiguous", (4, 1))],
    ids=["gpu-p2-gqa", "gpu-p4-mqa", "gpu-p4-mha", "tpu-p2-gqa", "tpu-p4-mqa"])
def test_pallas_ring_matches_dense(rng, kernel, p, layout, heads):
  """The ring with a Pallas kernel at each step (merging through the lse), documents that
  cross device chunks, padding."""
  _, block, l = KERNEL_CASES[kernel]
  l = max(l, 2 * p * block) if layout == "zigzag" else max(l, p * block)
  q, k, v = inputs(rng, b=1, l=l, h=heads[0], kh=heads[1])
  seg = segments(rng, b=1, l=l)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  mesh = Mesh(np.array(jax.devices()[:p]), ("seq",))
  want = value_and_vjp(lambda q, k, v: dense_attention(q, k, v, seg), q, k, v, ct)
  got = value_and_vjp(lambda q, k, v: context_parallel_attention(
      q, k, v, seg, mesh=mesh, layout=layout, kernel=kernel, block_q=block, block_k=block),
                      q, k, v, ct)
  assert_close(want, got)
  assert np.all(np.asarray(got[0])[np.asarray(seg) == 0] == 0)


@pytest.mark.pallas
def test_pallas_s2_ring_matches_s2_reference(rng):
  q, k, v = inputs(rng, b=1)
  ct = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  mesh = Mesh(np.array(jax.devices()[:4]), ("seq",))
  want = value_and_vjp(lambda q, k, v: s2_dense_attention(q, k, v, group_size=32), q, k, v,
                       ct)
  got = value_and_vjp(lambda q, k, v: context_parallel_shifted_sparse_attention(
      q, k, v, mesh=mesh, group_size=32, **PALLAS), q, k, v, ct)
  assert_close(want, got)


@pytest.mark.pallas
@pytest.mark.parametrize("kernel", KERNEL_CASES)
def test_pallas_bfloat16_error_at_most_twice_dense(rng, kernel):
  _, block, l = KERNEL_CASES[kernel]
  q32, k32, v32 = inputs(rng, l=l)
  exact = dense_attention(q32, k32, v32)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q32, k32, v32))
  err = lambda out: float(jnp.abs(out.astype(jnp.float32) - exact).max())
  out = tiled_attention(q, k, v, kernel=kernel, block_q=block, block_k=block)
  assert out.dtype == jnp.bfloat16
  assert err(out) <= 2 * err(dense_attention(q, k, v))


def _fwd_bwd_step(module, b, l, d, spec, block_q, block_k):
  def step(q, k, v, seg):
    meta = natural_meta(seg, b, l)
    kw = dict(mask_spec=spec, scale=d ** -0.5, block_q=block_q, block_k=block_k)
    o, lse = module.chunk_forward(q, k, v, meta, meta, **kw)
    do = o.astype(q.dtype)
    return module.chunk_backward(q, k, v, do, lse, output_delta(do, o), meta, meta, **kw)
  return step


def _lowered_text(step, platform, b, l, h, kh, d, dtype):
  q = jax.ShapeDtypeStruct((b, l, h, d), dtype)
  kv = jax.ShapeDtypeStruct((b, l, kh, d), dtype)
  return jax.jit(step).trace(q, kv, kv, jax.ShapeDtypeStruct((b, l), jnp.int32)).lower(
      lowering_platforms=(platform,)).as_text()


def test_pallas_gpu_lowers_to_triton_for_cuda():
  """Forward and backward lower for a CUDA target without a GPU: three Triton kernels (forward,
  dq, dk/dv). This checks Pallas' Triton lowering of our kernels, not their PTX compile."""
  step = _fwd_bwd_step(pallas_gpu, 1, 256, 64, MaskSpec(True), 128, 64)
  text = _lowered_text(step, "cuda", 1, 256, 4, 2, 64, jnp.bfloat16)
  assert len(re.findall(r"xla\.gpu\.triton", text)) == 3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("spec", [MaskSpec(True), MaskSpec(True, 256, 128)], ids=["causal", "s2"])
def test_pallas_tpu_lowers_to_mosaic(monkeypatch, spec, dtype):
  """Forward and backward lower to three Mosaic kernels for a TPU target without a TPU (as a
  v5e: a few lowering rules ask for the chip). This checks Pallas' Mosaic lowering, not
  Mosaic's own compile in libtpu."""
  from jax._src.pallas.mosaic import tpu_info  # private: there is no public way to pick a chip
  monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind, lambda: (
      tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1)))
  step = _fwd_bwd_step(pallas_tpu, 1, 512, 128, spec, 128, 128)
  text = _lowered_text(step, "tpu", 1, 512, 4, 2, 128, dtype)
  assert text.count("tpu_custom_call") == 3


@pytest.mark.pallas
def test_gpu_check_script_runs_interpreted():
  """bench/attention_gpu.py (the check to run on a GPU) works end to end, here interpreted."""
  done = run_bench("attention_gpu.py", "--lengths", "128", "--heads", "4", "--kv-heads", "2",
                   "--head-dim", "16", "--no-timing")
  assert "# check: PASS" in done.stdout
