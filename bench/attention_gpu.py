"""The Pallas GPU attention kernel on one device: check against the fallback, then time it.

    python bench/attention_gpu.py                         # on a GPU: L = 4k..32k, bf16 and f32
    python bench/attention_gpu.py --lengths 256 --heads 4 --kv-heads 2 --head-dim 32 \
        --dtypes float32                                  # anywhere (interpreted off GPU: slow)

For each L and dtype: values and gradients (dq, dk, dv) of `kernel="pallas_gpu"` against the
pure-JAX blockwise kernel (the fallback) and, while its L² scores fit, the dense oracle, with
packed documents and padding; then fwd+bwd time of pallas_gpu, the blockwise fallback, cuDNN
through `jax.nn.dot_product_attention` (GPU only, bfloat16, causal, no documents: what cuDNN
takes) and dense XLA. The check passes when float32 errors are < 2e-5 and bfloat16 errors are
at most 2x dense bfloat16's (beyond --dense-max-len: 2x the bfloat16 fallback's, against the
float32 fallback); the script exits 1 otherwise. float32 runs at full precision (IEEE dots:
no TF32, no tensor cores), so compare speeds in bfloat16. FLOPs: 4·L²·Hq·D forward, half when
causal, 3x for fwd+bwd.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from longctx.attention import tiled_attention, dense_attention  # noqa: E402
from longctx.attention.kernels import interpret  # noqa: E402
from timing import best_seconds  # noqa: E402  (bench/timing.py)

F32_TOL = 2e-5
# float32 oracles in float32 (on GPU the default would be TF32)
jax.config.update("jax_default_matmul_precision", "highest")


def documents(rng, l):
  """Four documents of random lengths, then padding (1/16 of the row)."""
  cuts = np.sort(rng.choice(np.arange(1, l - l // 16), size=3, replace=False))
  row = np.searchsorted(cuts, np.arange(l), side="right") + 1
  row[l - l // 16:] = 0
  return jnp.asarray(row[None], jnp.int32)


def fwd_bwd(attn, seg):
  """jitted (q, k, v, ct) -> (out, dq, dk, dv) of attn(q, k, v, seg)."""
  def f(q, k, v, ct):
    out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, seg), q, k, v)
    return (out,) + vjp(ct)
  return jax.jit(f)


def max_err(a, b):
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
             for x, y in zip(a, b))


def parse_args() -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
  ap.add_argument("--heads", type=int, default=32)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--head-dim", type=int, default=128)
  ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
  ap.add_argument("--dense-max-len", type=int, default=8192)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--no-timing", action="store_true", help="only check values and gradients")
  return ap.parse_args()


def check(args, l, dtype, pallas, fallback, seg, inputs) -> tuple[str, bool]:
  """One cell's values and gradients: the Pallas kernel against the best oracle that runs."""
  to_f32 = [x.astype(jnp.float32) for x in inputs]
  got, want = pallas(*inputs), fallback(*inputs)
  err = max_err(got, want)
  line = f"# L={l} {dtype.name}: |pallas - blockwise| = {err:.2e}"
  if l <= args.dense_max_len:
    exact = fwd_bwd(dense_attention, seg)(*to_f32)
    dense_err = max_err(fwd_bwd(dense_attention, seg)(*inputs), exact)
    err_exact = max_err(got, exact)
    passed = err_exact < F32_TOL if dtype == jnp.float32 else err_exact <= 2 * dense_err
    line += (f"; |pallas - dense f32| = {err_exact:.2e} (dense {dtype.name}: {dense_err:.2e}) "
             f"{'PASS' if passed else 'FAIL'}")
  elif dtype == jnp.float32:
    passed = err < F32_TOL
    line += f" {'PASS' if passed else 'FAIL'}"
  else:  # beyond dense: the float32 fallback is the oracle (it equals dense within 2e-5)
    exact = fallback(*to_f32)
    fallback_err, err_exact = max_err(want, exact), max_err(got, exact)
    passed = err_exact <= 2 * fallback_err
    line += (f"; |pallas - blockwise f32| = {err_exact:.2e} (blockwise {dtype.name}: "
             f"{fallback_err:.2e}) {'PASS' if passed else 'FAIL'}")
  return line, passed


def timings(args, l, dtype, pallas, fallback, seg, inputs) -> list[str]:
  """One cell's fwd+bwd time per implementation, as table rows; a failure is a row too."""
  flops = 3 * 4 * l * l * args.heads * args.head_dim / 2
  impls = [("pallas_gpu", pallas), ("blockwise (XLA)", fallback)]
  if jax.default_backend() == "gpu" and dtype == jnp.bfloat16:
    cudnn = lambda q, k, v, s: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            implementation="cudnn")
    impls.append(("cuDNN, no documents", fwd_bwd(cudnn, None)))
  if l <= args.dense_max_len:
    impls.append(("dense (XLA)", fwd_bwd(dense_attention, seg)))
  rows = []
  for impl, fn in impls:
    try:
      secs = best_seconds(fn, inputs, args.repeats, warmup=True)
      rows.append(f"| {l} | {dtype.name} | {impl} | {secs * 1e3:.2f} | {flops / secs / 1e12:.1f} |")
    except Exception as e:  # noqa: BLE001 - report and go on with the other implementations
      rows.append(f"| {l} | {dtype.name} | {impl} | failed: {type(e).__name__}: {str(e)[:80]} | |")
    print(rows[-1], flush=True)
  return rows


def main():
  args = parse_args()
  h, kh, d = args.heads, args.kv_heads, args.head_dim
  print(f"# {jax.devices()[0].device_kind} ({jax.default_backend()}); pallas_gpu "
        f"{'interpreted' if interpret() else 'compiled by Triton'}; Hq={h} Hkv={kh} D={d} B=1 "
        f"causal; best of {args.repeats}")
  rng = np.random.default_rng(0)
  ok, rows = True, []
  for l in args.lengths:
    seg = documents(rng, l)
    for name in args.dtypes:
      dtype = jnp.dtype(name)
      inputs = tuple(jnp.asarray(rng.normal(size=(1, l, n, d)), dtype) for n in (h, kh, kh, h))
      pallas = fwd_bwd(lambda q, k, v, s: tiled_attention(q, k, v, s, kernel="pallas_gpu"),
                       seg)
      fallback = fwd_bwd(lambda q, k, v, s: tiled_attention(q, k, v, s), seg)
      line, passed = check(args, l, dtype, pallas, fallback, seg, inputs)
      ok &= passed
      print(line, flush=True)
      if not args.no_timing:
        rows += timings(args, l, dtype, pallas, fallback, seg, inputs)
  if rows:
    print("\n| L | dtype | impl | fwd+bwd ms | TFLOP/s |\n|---|---|---|---|---|")
    print("\n".join(rows))
  print(f"\n# check: {'PASS' if ok else 'FAIL'}")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
