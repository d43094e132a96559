"""Where blockwise attention spends its time on XLA:CPU: a jax.profiler trace of one call.

    python bench/attention_profile.py                         # fwd, L = 8192, default tiles
    python bench/attention_profile.py --block 512 --grad      # fwd+bwd, 512 x 512 tiles
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/attention_profile.py

Runs blockwise attention (causal MHA, float32, B = 1) once to compile and once under
`jax.profiler.trace`, then prints, for the compiled program's operations (fusions, loops,
conditionals), how many times each ran, their summed and mean wall time as the trace records
them (on whichever intra-op thread ran them; a dot's own helper threads are not added), what
each computes (the op of its fused computation and its output shape) and, for the tile
products, their GFLOP/s. Rows of loops and conditionals (`while`, `cond`) include the time of
the operations they ran, which have rows of their own. Also prints how many XLA intra-op
threads the process has: one per core on a single device, and at least one per device when
devices are emulated, which is why a program on one of 8 emulated devices of a 2-core machine
runs slower than alone.
"""
from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from longctx.attention import tiled_attention  # noqa: E402

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) fusion\(.*?calls=%([\w.\-]+)")
_COMP = re.compile(r"^%([\w.\-]+) \((.*)\) -> (\S+) \{")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def _size(shape: str) -> int:
  dims = _SHAPE.match(shape)
  return math.prod(int(x) for x in dims.group(1).split(",") if x) if dims else 0


def describe_fusions(hlo: str):
  """{fusion instruction name: (label, flops or 0)} from compiled HLO text. A fusion whose
  computation holds a dot is labelled `dot` with the product's FLOPs (2·|out|·K, K read off the
  first operand); others by their computation's root op."""
  comps, current = {}, None
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m:
      params = [p.split(": ")[1] for p in m.group(2).split(", ") if ": " in p]
      current = comps[m.group(1)] = {"params": params, "out": m.group(3), "ops": [], "root": ""}
    elif current is not None and line.startswith("}"):
      current = None
    elif current is not None:
      op = re.search(r"= \S+ ([\w\-]+)\(", line)
      if op:
        current["ops"].append(op.group(1))
        if "ROOT" in line:
          current["root"] = op.group(1)
  out = {}
  for line in hlo.splitlines():
    m = _INSTR.match(line)
    if not m or m.group(3) not in comps:
      continue
    name, shape, comp = m.group(1), m.group(2), comps[m.group(3)]
    flops = 0
    if "dot" in comp["ops"] and comp["params"]:
      rows = int(_SHAPE.match(shape).group(1).split(",")[0])
      flops = 2 * _size(shape) * _size(comp["params"][0]) // rows
    label = "dot" if flops else (comp["root"] or "fusion")
    out[name] = (f"{label} {shape}", flops)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--length", type=int, default=8192)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--block", type=int, default=None, help="tiles block x block (default: ours)")
  p.add_argument("--grad", action="store_true", help="profile forward + backward")
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args()

  shape = (1, args.length, args.heads, args.head_dim)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(3))
  blocks = {} if args.block is None else dict(block_q=args.block, block_k=args.block)
  attn = lambda q, k, v: tiled_attention(q, k, v, **blocks)
  fn = (jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) ** 2), argnums=(0, 1, 2)) if args.grad
        else attn)
  compiled = jax.jit(fn).lower(q, k, v).compile()
  fusions = describe_fusions(compiled.as_text())
  jax.block_until_ready(compiled(q, k, v))

  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      jax.block_until_ready(compiled(q, k, v))
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb",
                                                        recursive=True)[0])
  total, calls, threads, wall = collections.Counter(), collections.Counter(), set(), 0
  for plane in data.planes:
    for line in plane.lines:
      if line.name.startswith("tf_XLAEigen"):
        threads.add(line.name)
      for ev in line.events:
        if ev.name == "ThunkExecutor::Execute (wait for completion)":
          wall = max(wall, ev.duration_ns)
        elif line.name.startswith("tf_XLA") and not ev.name.startswith(("ThunkExecutor",
                                                                          "Slinky")):
          total[ev.name] += ev.duration_ns
          calls[ev.name] += 1

  fl = 4 * args.length ** 2 * args.heads * args.head_dim / 2 * (3 if args.grad else 1)
  print(f"# blockwise {'fwd+bwd' if args.grad else 'fwd'}, L={args.length}, {args.heads} heads, "
        f"D={args.head_dim}, tiles {args.block or 'default'}; {jax.device_count()} device(s), "
        f"{len(threads)} XLA intra-op threads")
  print(f"# program wall {wall / 1e6:.1f} ms = {fl / wall:.1f} GFLOP/s (attention FLOPs)")
  print("| op | computes | calls | total ms | mean us | GFLOP/s |")
  print("|---|---|---|---|---|---|")
  for name, ns in total.most_common(args.top):
    label, flops = fusions.get(name, ("", 0))
    rate = f"{flops * calls[name] / ns:.0f}" if flops else ""
    print(f"| {name} | {label} | {calls[name]} | {ns / 1e6:.1f} | {ns / calls[name] / 1e3:.1f} "
          f"| {rate} |")


if __name__ == "__main__":
  main()
