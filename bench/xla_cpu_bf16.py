"""Why `python -m longctx.plan` compiles a bfloat16 model as float16 on CPU.

  python bench/xla_cpu_bf16.py

The smallest program with the pattern of a remat'd decoder: a scan over 8 layers whose carry is a
16-bit [4096, 512] activation, each layer under jax.checkpoint(nothing_saveable), differentiated.
Autodiff saves the 8 layer inputs as one stacked [8, 4096, 512] buffer (32 MiB in 16 bits). The
script prints XLA:CPU's temporaries and largest buffers for the carry in bfloat16, float16 and
float32: in bfloat16 XLA:CPU adds a float32 copy of the whole stack (its float-normalization pass
rewrites bfloat16 dynamic-slice / dynamic-update-slice in float32), in float16 it does not.
Results: bench/RESULTS.md ("Memory per token").
"""
from __future__ import annotations

import os
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from longctx.train.hlo_report import read_buffer_report  # noqa: E402

N, T, E = 8, 4096, 512


def layer(x_TE, w_EE):
  return x_TE + jnp.tanh(x_TE @ w_EE.astype(x_TE.dtype)) @ w_EE.T.astype(x_TE.dtype)


def loss(ws_NEE, x_TE, dtype):
  fn = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
  y_TE, _ = jax.lax.scan(lambda c, w: (fn(c, w), None), x_TE.astype(dtype), ws_NEE)
  return jnp.sum(y_TE.astype(jnp.float32) ** 2)


def main() -> None:
  ws = jax.ShapeDtypeStruct((N, E, E), jnp.float32)
  x = jax.ShapeDtypeStruct((T, E), jnp.float32)
  print(f"# stack of saved layer inputs: [{N}, {T}, {E}] = {N * T * E * 2 / 2**20:.0f} MiB in "
        f"16 bits; {jax.devices()[0].platform}")
  print("| carry dtype | temporaries | largest buffers |")
  print("|---|---|---|")
  for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
    lowered = jax.jit(jax.grad(loss), static_argnums=2).lower(ws, x, dtype)
    with tempfile.TemporaryDirectory() as tmp:
      compiled = lowered.compile({"xla_dump_to": tmp})
      top = read_buffer_report(tmp, top=2)
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    largest = "; ".join(f"{t['bytes'] / 2**20:.0f} MiB {t['shape']} ({t['name']})" for t in top)
    print(f"| {jnp.dtype(dtype).name} | {temp:.0f} MiB | {largest} |")


if __name__ == "__main__":
  main()
