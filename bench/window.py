"""Sliding-window attention on 8 emulated CPU devices: windowed vs full causal, every layout.

    python bench/window.py                          # L 32768, W 4096, 8 heads, D 64, MHA
    python bench/window.py --length 8192 --window 1024 --repeats 1     # a quick look

For each layout (contiguous, zigzag, striped): the forward+backward time of the ring on rows
already in the layout (the trainer permutes once per step), full causal and windowed; the
bytes every collective moves per device in the compiled program (`costs.collective_bytes`)
beside `costs.strategy_bytes`; the ring's (forward, backward) hops (`ring.ring_hops`); the
tiles each device computes (max and max / mean: the load balance, which an emulated mesh on 2
shared cores cannot show in time). Then all_gather and Ulysses with the window, and the
Gemma-like mix: 5 windowed layers and 1 global layer in sequence (each layer's output is the
next one's query, each layer's K/V its own), forward+backward, for every layout. Timings: best of --repeats executions
after ahead-of-time compilation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as PS  # noqa: E402

from longctx.attention import Layout, MaskSpec, original_index  # noqa: E402
from longctx.attention.costs import collective_bytes, strategy_bytes  # noqa: E402
from longctx.attention.ring import ring_hops, ring_tiles_computed  # noqa: E402
from longctx.attention.strategies import plan  # noqa: E402
from timing import best_seconds  # noqa: E402  (bench/timing.py)

ACT, TOK = PS(None, "seq", None, None), PS(None, "seq")
P = 8


def attention_of(strategy, mesh, heads, mask, layout):
  """The per-device attention of `strategy` with `mask`, told the rows' layout."""
  return plan(strategy, mesh, "seq", heads, mask_spec=mask, layout=layout).local


def program(strategy, mesh, heads, masks, layout):
  """jitted fwd+bwd of a stack of attention layers (one per mask, each layer's output the
  next one's query) on rows in `layout`, under shard_map over the 8 devices."""
  layers = [attention_of(strategy, mesh, heads, m, layout) for m in masks]

  def local(q, k, v, seg, idx):
    def loss(q, k, v):
      x = q
      for i, attend in enumerate(layers):  # each layer its own K/V, as in a model
        x = attend(x, k * (1 + i / 8), v * (1 - i / 16), seg, idx)
      return jnp.sum(x.astype(jnp.float32) ** 2)
    return jax.grad(loss, (0, 1, 2))(q, k, v)
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(ACT, ACT, ACT, TOK, TOK),
                               out_specs=(ACT,) * 3))


def inputs(args, layout):
  rng = np.random.default_rng(0)
  l, h, kh, d = args.length, args.heads, args.kv_heads, args.head_dim
  q = jnp.asarray(rng.normal(size=(1, l, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, l, kh, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, l, kh, d)), jnp.float32)
  return (q, k, v, jnp.ones((1, l), jnp.int32), original_index(layout, 1, l, P))


def measure(fn, args, layout):
  x = inputs(args, layout)
  compiled = fn.lower(*x).compile()
  moved = collective_bytes(compiled.as_text())
  return best_seconds(compiled, x, args.repeats), moved


def tiles(mesh, args, mask, layout):
  """Tiles each device computes in the forward ring: (max, max / mean)."""
  l, h, kh, d = args.length, args.heads, args.kv_heads, args.head_dim
  fn = jax.shard_map(lambda q, k, v, s, i: ring_tiles_computed(q, k, v, s, i, mask_spec=mask,
                                                               layout=layout),
                     mesh=mesh, in_specs=(ACT, ACT, ACT, TOK, TOK), out_specs=PS("seq"))
  got = np.asarray(jax.jit(fn)(jnp.zeros((1, l, h, d)), jnp.zeros((1, l, kh, d)),
                               jnp.zeros((1, l, kh, d)), jnp.ones((1, l), jnp.int32),
                               original_index(layout, 1, l, P)))
  return int(got.max()), float(got.max() / max(got.mean(), 1))


def formula(strategy, args, mask, layout):
  return sum(strategy_bytes(strategy, 1, args.length, args.heads, args.kv_heads, args.head_dim,
                            4, P, grad=True, regather=False, mask_spec=mask,
                            layout=layout).values())


def row(strategy, layout, what, seconds, moved, want, extra=""):
  mib = lambda x: f"{x / 2 ** 20:.2f}"
  print(f"| {strategy} | {layout.value} | {what} | {seconds:.2f} | {mib(sum(moved.values()))} | "
        f"{mib(want)} | {extra} |", flush=True)
  return dict(strategy=strategy, layout=layout.value, what=what, seconds=seconds,
              collective_bytes=sum(moved.values()), formula_bytes=want, extra=extra)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--length", type=int, default=32768)
  ap.add_argument("--window", type=int, default=4096)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv_heads", type=int, default=8)
  ap.add_argument("--head_dim", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--json", default="", help="also write the rows to this file")
  args = ap.parse_args()
  mesh = Mesh(np.array(jax.devices()[:P]), ("seq",))
  causal, window = MaskSpec(), MaskSpec(window=args.window)
  h = args.heads
  print(f"L={args.length} W={args.window} Hq={h} Hkv={args.kv_heads} D={args.head_dim} P={P} "
        f"jax {jax.__version__}\n")
  print("| strategy | layout | layers | fwd+bwd s | collective MiB (HLO) | formula MiB | "
        "ring hops, tiles max (max/mean) |\n|---|---|---|---|---|---|---|")
  rows = []
  for layout in Layout:
    for what, mask in (("causal", causal), (f"window {args.window}", window)):
      s, moved = measure(program("ring", mesh, h, [mask], layout), args, layout)
      hops = ring_hops(layout, P, args.length, P, mask)
      top, balance = tiles(mesh, args, mask, layout)
      rows.append(row("ring", layout, what, s, moved, formula("ring", args, mask, layout),
                      f"{hops}, {top} ({balance:.2f})"))
  for strategy in ("all_gather", "ulysses"):
    for what, mask in (("causal", causal), (f"window {args.window}", window)):
      s, moved = measure(program(strategy, mesh, h, [mask], Layout.ZIGZAG), args, Layout.ZIGZAG)
      rows.append(row(strategy, Layout.ZIGZAG, what, s, moved,
                      formula(strategy, args, mask, Layout.ZIGZAG)))
  mix = [window] * 5 + [causal]
  for layout in Layout:
    s, moved = measure(program("ring", mesh, h, mix, layout), args, layout)
    want = 5 * formula("ring", args, window, layout) + formula("ring", args, causal, layout)
    rows.append(row("ring", layout, "5 window : 1 causal", s, moved, want))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
