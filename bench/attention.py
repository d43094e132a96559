"""Attention benchmark on 8 emulated CPU devices (issue 3, item 7).

    pip install -r requirements-bench.txt          # the peer, ringattention 0.1.2
    python bench/attention.py                      # L = 4k, 8k, 16k, 32k; 8 heads, D 64
    python bench/attention.py --lengths 4096 8192 --heads 4 --kv-heads 4 --head-dim 64
    python bench/attention.py --tile-sweep 512x512/512x512 256x256/256x256   # tiles, 1 device

For each L: forward+backward time of our ring (contiguous, zigzag, striped), the other
context-parallel strategies (all_gather, ulysses, hybrid = Ulysses over 2 × ring over 4; zigzag),
blockwise on one device, dense (while its L² scores fit), and the peer `ringattention` (PyPI,
haoliuhl; MHA only; skipped with a message if not installed); per-device compiled memory from
`.lower(...).compile().memory_analysis()`; the bytes of every collective per layer from the
compiled HLO (`costs.collective_bytes`) beside the formula (`costs.strategy_bytes`); tiles
computed per device for each layout. Attention FLOPs: 4·L²·Hq·D forward, half when
causal, 3× that for forward+backward. Timings: best of --repeats executions after
ahead-of-time compilation (the 2 CPU cores are shared, so single runs are noisy).

Ours runs with the library's default tiles (--block overrides); the peer with each of
--peer-blocks at the criterion L (its best counts), the first elsewhere. Blockwise runs twice:
on one of the 8 emulated devices, and in a child process that has a single CPU device (no
emulation flag), where a program on one device runs ~1.5x faster on the same HLO; each is
compared with a float32 2048² matmul timed just before and after it in the same process (the
larger of the two). The last lines state the issue's speed criterion.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_FLAG = "--xla_force_host_platform_device_count=8"
_WORKER = "--single-device-worker"  # the child process: blockwise and matmul on one CPU device
if _WORKER not in sys.argv and _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as PS  # noqa: E402

from longctx.attention import (Layout, tiled_attention, dense_attention,  # noqa: E402
                               original_index, ring_attention)
from longctx.attention.tiles import (BLOCK_K, BLOCK_K_BWD, BLOCK_Q, BLOCK_Q_BWD,  # noqa: E402
                                     tile_config)
from longctx.attention.reference import MaskSpec  # noqa: E402
from longctx.attention.costs import collective_bytes, strategy_bytes  # noqa: E402
from longctx.attention.strategies import plan as plan_strategy  # noqa: E402
from longctx.attention.ring import ring_tiles_computed  # noqa: E402
from timing import best_seconds  # noqa: E402  (bench/timing.py)

ACT, TOK = PS(None, "seq", None, None), PS(None, "seq")


def load_peer():
  """The peer's pure-JAX ring attention, or None with the reason printed."""
  try:
    import jax.lib
    if not hasattr(jax.lib, "xla_bridge"):  # current JAX dropped it; the peer reads the platform
      from jax.extend import backend
      jax.lib.xla_bridge = types.SimpleNamespace(get_backend=backend.get_backend)
    from ringattention.ringattention_jax import ring_attention as peer
    return peer
  except Exception as e:  # noqa: BLE001 - any import failure means "skip the peer", reported
    print(f"# peer ringattention skipped: {type(e).__name__}: {e}")
    return None


def flops(l, h, d, causal=True):
  fwd = 4 * l * l * h * d * (0.5 if causal else 1.0)
  return 3 * fwd


def loss_of(attn):
  return lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32) ** 2)


def ring_fn(mesh, layout, block, grad=True):
  """fwd+bwd (or fwd) of our ring on arrays already in `layout` (the trainer permutes once per
  step)."""
  def local(q, k, v, seg, idx):
    f = lambda q, k, v: ring_attention(q, k, v, seg, idx, axis="seq", **blocks_of(block))
    return jax.grad(loss_of(f), (0, 1, 2))(q, k, v) if grad else f(q, k, v)
  return jax.shard_map(local, mesh=mesh, in_specs=(ACT, ACT, ACT, TOK, TOK),
                       out_specs=(ACT, ACT, ACT) if grad else ACT)


STRATEGIES = {"all_gather": ((8,), ("seq",), "seq"), "ulysses": ((8,), ("seq",), "seq"),
              "hybrid": ((2, 4), ("u", "r"), ("u", "r"))}  # mesh shape, names, axis


def strategy_fn(strategy, heads, block, grad=True):
  """(mesh, fwd+bwd or fwd of `strategy`'s per-device function on arrays already in the layout
  (zigzag), the number of devices the layout balances)."""
  shape, names, axis = STRATEGIES[strategy]
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), names)
  resolved = plan_strategy(strategy, mesh, axis, heads, **blocks_of(block))
  seq = resolved.seq_axes[0] if len(resolved.seq_axes) == 1 else resolved.seq_axes
  act, tok = PS(None, seq, None, None), PS(None, seq)

  def local(q, k, v, seg, idx):
    f = lambda q, k, v: resolved.local(q, k, v, seg, idx)
    return jax.grad(loss_of(f), (0, 1, 2))(q, k, v) if grad else f(q, k, v)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(act, act, act, tok, tok),
                     out_specs=(act, act, act) if grad else act)
  return mesh, (act, tok), fn, resolved.layout_devices


def formula_mib(name, l, args):
  """The bytes `costs.strategy_bytes` predicts for a run (fwd+bwd, one call), MiB; None for
  runs without a formula (the peer, one-device runs)."""
  strategy = "ring" if name.startswith("ring") else name.split()[0]
  if strategy not in ("ring",) + tuple(STRATEGIES):
    return None
  size = STRATEGIES[strategy][0] if strategy == "hybrid" else 8
  return sum(strategy_bytes(strategy, 1, l, args.heads, args.kv_heads, args.head_dim, 4, size,
                            grad=True, regather=False).values()) / 2 ** 20


def peer_fn(peer, mesh, block, grad=True):
  kwargs = dict(causal_block_size=1, deterministic=True, dropout_rng=None, attn_pdrop=0.0,
                query_chunk_size=block, key_chunk_size=block,
                policy=jax.checkpoint_policies.nothing_saveable, dtype=jnp.float32,
                precision=None, prevent_cse=True)

  def local(q, k, v, seg):
    f = lambda q, k, v: peer(q, k, v, None, seg, None, "seq", True, kwargs)
    return jax.grad(loss_of(f), (0, 1, 2))(q, k, v) if grad else f(q, k, v)
  return jax.shard_map(local, mesh=mesh, in_specs=(ACT, ACT, ACT, TOK),
                       out_specs=(ACT, ACT, ACT) if grad else ACT, check_vma=False)


def blocks_of(block):
  """Tile arguments of our attention: the library defaults (None), block × block (an int), or
  a dict of tile arguments (`parse_tiles`)."""
  if isinstance(block, dict):
    return block
  return {} if block is None else dict(block_q=block, block_k=block)


def parse_tiles(text):
  """"512x512/256x256" -> forward 512 × 512, backward 256 × 256 tile arguments."""
  try:
    (bq, bk), (bqb, bkb) = (map(int, half.split("x")) for half in text.split("/"))
  except ValueError:
    raise SystemExit(f"--tile-sweep: expected QxK/QxK (forward/backward), e.g. 512x512/512x512; "
                     f"found {text!r}") from None
  return dict(block_q=bq, block_k=bk, block_q_bwd=bqb, block_k_bwd=bkb)


def blockwise_fn(block, grad=True):
  f = lambda q, k, v: tiled_attention(q, k, v, **blocks_of(block))
  return jax.grad(loss_of(f), (0, 1, 2)) if grad else f


def timed(jitted, args, repeats):
  """(compiled, best seconds over `repeats` executions, per-device bytes)."""
  compiled = jitted.lower(*args).compile()
  m = compiled.memory_analysis()
  mem = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  jax.block_until_ready(args)
  return compiled, best_seconds(compiled, args, repeats), mem


def matmul_flops_per_s(n=2048, repeats=3):
  """Best FLOP/s of a float32 n x n matmul on one device (the speed criterion's yardstick)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a).lower(a).compile()
  return 2 * n ** 3 / best_seconds(f, (a,), repeats, warmup=True)


def tiles_row(mesh, l, h, kh, d, block):
  p = mesh.shape["seq"]
  q = jax.ShapeDtypeStruct((1, l, h, d), jnp.float32)
  kv = jnp.zeros((1, l, kh, d), jnp.float32)
  out = {}
  for layout in Layout:
    fn = jax.shard_map(lambda q, k, v, s, i: ring_tiles_computed(
        q, k, v, s, i, axis="seq", **blocks_of(block)), mesh=mesh,
                       in_specs=(ACT, ACT, ACT, TOK, TOK), out_specs=PS("seq"))
    tiles = np.asarray(jax.jit(fn)(jnp.zeros(q.shape), kv, kv, jnp.ones((1, l), jnp.int32),
                                   original_index(layout, 1, l, p)))
    out[layout.value] = (tiles.tolist(), float(tiles.max() / tiles.mean()))
  return out


def memory_at_fixed_chunk(c, h, kh, d, block, sizes=(2, 4, 8)):
  """Per-device compiled bytes of the ring's fwd+bwd (zigzag) at chunk c for each P: the
  memory criterion (within 5% from P = 2 to 8). Compile only."""
  out = {}
  for p in sizes:
    mesh = Mesh(np.array(jax.devices()[:p]), ("seq",))
    q = jax.ShapeDtypeStruct((1, c * p, h, d), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, c * p, kh, d), jnp.float32)
    tok = jax.ShapeDtypeStruct((1, c * p), jnp.int32)
    compiled = jax.jit(ring_fn(mesh, Layout.ZIGZAG, block)).lower(q, kv, kv, tok, tok).compile()
    m = compiled.memory_analysis()
    out[p] = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
  return out


def single_device_worker(lengths, h, kh, d, blocks, repeats):
  """In the child process (one CPU device): blockwise fwd+bwd and fwd seconds and the matmul
  yardstick around them, per L and per tile setting in `blocks`, printed as one JSON line."""
  rng = np.random.default_rng(0)
  out = []
  for l in lengths:
    a = tuple(jnp.asarray(rng.normal(size=(1, l, n, d)), jnp.float32) for n in (h, kh, kh))
    for block in blocks:
      mm_before = matmul_flops_per_s()
      _, secs, mem = timed(jax.jit(blockwise_fn(block)), a, repeats)
      fsecs = best_seconds(jax.jit(blockwise_fn(block, grad=False)).lower(*a).compile(), a, repeats)
      out.append(dict(l=l, secs=secs, fsecs=fsecs, mem=mem,
                      matmul=max(mm_before, matmul_flops_per_s())))
  print(json.dumps(out))


def run_single_device(lengths, args, sweep=()):
  """Runs `single_device_worker` in a child process without the 8-device emulation flag: one
  result per L (our tiles), or per tile setting of `sweep` at each L."""
  if not lengths:
    return []
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(_FLAG, "").strip()
  cmd = [sys.executable, os.path.abspath(__file__), _WORKER, "--lengths", *map(str, lengths),
         "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim",
         str(args.head_dim), "--repeats", str(args.repeats)]
  if args.block is not None:
    cmd += ["--block", str(args.block)]
  if sweep:
    cmd += ["--tile-sweep", *sweep]
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def tile_sweep(args):
  """Blockwise fwd+bwd in a 1-device process at the criterion L for each --tile-sweep setting."""
  l, h, d = args.criterion_len, args.heads, args.head_dim
  print(f"# blockwise, 1-device process, L={l}, Hq={h} Hkv={args.kv_heads} D={d}, float32 "
        f"causal, best of {args.repeats}")
  print("| tiles fwd / bwd | fwd+bwd s | fwd s | GFLOP/s | matmul GFLOP/s (same process) |")
  print("|---|---|---|---|---|")
  for text, r in zip(args.tile_sweep, run_single_device([l], args, args.tile_sweep)):
    print(f"| {text} | {r['secs']:.2f} | {r['fsecs']:.2f} | {flops(l, h, d) / r['secs'] / 1e9:.1f} "
          f"| {r['matmul'] / 1e9:.1f} |", flush=True)


def parse_args():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--kv-heads", type=int, default=8)
  ap.add_argument("--head-dim", type=int, default=64)
  ap.add_argument("--block", type=int, default=None,
                  help="our tiles, block x block in both passes (default: the library's)")
  ap.add_argument("--peer-blocks", type=int, nargs="+", default=[256, 512],
                  help="the peer's query/key chunk sizes: all at the criterion L (best counts), "
                       "the first elsewhere")
  ap.add_argument("--full-max-len", type=int, default=8192,
                  help="above this L run only ring zigzag, the peer and blockwise (time budget)")
  ap.add_argument("--blockwise-max-len", type=int, default=16384)
  ap.add_argument("--repeats", type=int, default=2, help="timed executions; the best is shown")
  ap.add_argument("--dense-max-len", type=int, default=8192)
  ap.add_argument("--fixed-chunks", type=int, nargs="*", default=[2048, 8192],
                  help="chunks c at which per-device ring memory is compiled for P = 2, 4, 8")
  ap.add_argument("--criterion-len", type=int, default=16384,
                  help="L of the issue's speed criterion (ring vs peer, blockwise vs matmul)")
  ap.add_argument("--tile-sweep", nargs="+", default=[], metavar="QxK/QxK",
                  help="only time blockwise at the criterion L in a 1-device process for each "
                       "forward/backward tile setting, e.g. 512x512/512x512 1024x512/512x512")
  ap.add_argument(_WORKER, action="store_true", help=argparse.SUPPRESS)
  return ap.parse_args()


def runs_at(l, args, mesh, peer, rng):
  """The implementations timed at length l: (name, fwd+bwd fn, fwd fn or None, args, is_ring)."""
  h, kh, d, block, p = args.heads, args.kv_heads, args.head_dim, args.block, mesh.shape["seq"]
  q = jnp.asarray(rng.normal(size=(1, l, h, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, l, kh, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(1, l, kh, d)), jnp.float32)
  seg = jnp.ones((1, l), jnp.int32)
  shard = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  runs = []
  for layout in Layout:
    qp, kp, vp = (jnp.take(x, layout.permutation(l, p), axis=1) for x in (q, k, v))
    a = (shard(qp, ACT), shard(kp, ACT), shard(vp, ACT), shard(seg, TOK),
         shard(original_index(layout, 1, l, p), TOK))
    fwd = jax.jit(ring_fn(mesh, layout, block, grad=False)) if layout is Layout.ZIGZAG else None
    runs.append((f"ring {layout.value}", jax.jit(ring_fn(mesh, layout, block)), fwd, a, True))
  for strategy in STRATEGIES:
    if strategy != "all_gather" and h % STRATEGIES[strategy][0][0]:
      print(f"# {strategy} skipped: Hq={h} is not divisible by its Ulysses axis")
      continue
    smesh, (act, tok), fn, n = strategy_fn(strategy, h, block)
    perm = Layout.ZIGZAG.permutation(l, n)
    a = tuple(jax.device_put(jnp.take(x, perm, axis=1), NamedSharding(smesh, spec)) for x, spec in
              ((q, act), (k, act), (v, act), (seg, tok),
               (original_index(Layout.ZIGZAG, 1, l, n), tok)))
    fwd = jax.jit(strategy_fn(strategy, h, block, grad=False)[2])
    runs.append((f"{strategy} zigzag", jax.jit(fn), fwd, a, True))
  if peer is not None:
    a = (shard(q, ACT), shard(k, ACT), shard(v, ACT), shard(seg, TOK))
    for pb in (args.peer_blocks if l == args.criterion_len else args.peer_blocks[:1]):
      runs.append((f"peer ringattention (chunk {pb})", jax.jit(peer_fn(peer, mesh, pb)),
                   jax.jit(peer_fn(peer, mesh, pb, grad=False)), a, True))
  a1 = tuple(jax.device_put(x, jax.devices()[0]) for x in (q, k, v))
  if l <= args.blockwise_max_len:
    runs.append(("blockwise 1 of 8 emulated devices", jax.jit(blockwise_fn(block)),
                 jax.jit(blockwise_fn(block, grad=False)), a1, False))
  if l <= args.dense_max_len:
    runs.append(("dense 1 device", jax.jit(jax.grad(loss_of(dense_attention), (0, 1, 2))), None,
                 a1, False))
  if l > args.full_max_len:
    runs = [r for r in runs if r[0].startswith(("ring zigzag", "peer", "blockwise") +
                                                tuple(STRATEGIES))]
  return runs


def measure(l, runs, args):
  """Times each run, prints its table row; returns {name: fwd+bwd seconds, "matmul": FLOP/s}."""
  times = {}
  for name, fn, fwd, a, is_ring in runs:
    try:
      mm_before = matmul_flops_per_s() if name.startswith("blockwise") else None
      compiled, secs, mem = timed(fn, a, args.repeats)
      fsecs = best_seconds(fwd.lower(*a).compile(), a, args.repeats) if fwd is not None else None
      if mm_before is not None:  # the yardstick, measured around the run: the larger counts
        times["matmul"] = max(mm_before, matmul_flops_per_s())
    except Exception as e:  # noqa: BLE001 - report and go on with the other implementations
      print(f"| {l} | {name} | failed: {type(e).__name__}: {str(e)[:120]} | | | | | | |")
      continue
    times[name] = secs
    hlo = sum(collective_bytes(compiled.as_text()).values()) / 2 ** 20 if is_ring else 0.0
    formula = formula_mib(name, l, args)
    ftxt = f"{fsecs:.2f} | {(secs - fsecs) / fsecs:.2f}" if fsecs else " | "
    print(f"| {l} | {name} | {secs:.2f} | {ftxt} | "
          f"{flops(l, args.heads, args.head_dim) / secs / 1e9:.1f} | {mem / 2 ** 20:.1f} | "
          f"{hlo:.2f} | {'' if formula is None else f'{formula:.2f}'} |", flush=True)
  return times


def criterion_lines(summary, single, args):
  """The issue's speed criterion per L, from the table's timings and the 1-device runs."""
  h, d = args.heads, args.head_dim
  print("\n# speed criterion (issue 3): ring fwd+bwd >= 1.5x faster than the peer (its best "
        "chunk); blockwise >= 50% of the float32 2048^2 matmul FLOP/s measured around it in the "
        "same process (larger of before/after)")
  for l, times in summary:
    parts = []
    peers = {n: t for n, t in times.items() if n.startswith("peer")}
    if "ring zigzag" in times and peers:
      best = min(peers, key=peers.get)
      parts.append(f"{best} / ring zigzag = {peers[best] / times['ring zigzag']:.2f}x")
    if "blockwise 1 of 8 emulated devices" in times:
      bw = flops(l, h, d) / times["blockwise 1 of 8 emulated devices"]
      parts.append(f"blockwise on 1 of 8 emulated devices {bw / 1e9:.1f} GFLOP/s vs matmul "
                   f"{times['matmul'] / 1e9:.1f} = {100 * bw / times['matmul']:.0f}%")
    if l in single:
      r = single[l]
      bw = flops(l, h, d) / r["secs"]
      parts.append(f"in a 1-device process {bw / 1e9:.1f} GFLOP/s vs matmul "
                   f"{r['matmul'] / 1e9:.1f} = {100 * bw / r['matmul']:.0f}%")
    print(f"# L={l}: " + "; ".join(parts)
          + ("  <- criterion L" if l == args.criterion_len else ""))


def main():
  args = parse_args()
  h, kh, d, block = args.heads, args.kv_heads, args.head_dim, args.block
  if getattr(args, _WORKER.strip("-").replace("-", "_")):
    blocks = [parse_tiles(t) for t in args.tile_sweep] or [block]
    single_device_worker(args.lengths, h, kh, d, blocks, args.repeats)
    return
  if args.tile_sweep:
    tile_sweep(args)
    return
  mesh = Mesh(np.array(jax.devices()[:8]), ("seq",))
  peer = load_peer() if h == kh else None
  if h != kh:
    print("# peer ringattention skipped: it cannot do GQA (Hq != Hkv)")
  tiles = (f"{BLOCK_Q}x{BLOCK_K} fwd, {BLOCK_Q_BWD}x{BLOCK_K_BWD} bwd (defaults: query tile / G, "
           "at most C/2 in the ring)" if block is None else f"{block}x{block}")
  print(f"# devices: {len(jax.devices())} x {jax.devices()[0].platform}; Hq={h} Hkv={kh} D={d} "
        f"B=1 float32 causal; ours: tiles {tiles}; peer: chunks {args.peer_blocks}; "
        f"best of {args.repeats}")
  print("| L | impl | fwd+bwd s | fwd s | bwd/fwd | GFLOP/s (fwd+bwd) | per-device MiB | "
        "collective MiB (HLO, fwd+bwd) | formula MiB |")
  print("|---|---|---|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  summary = [(l, measure(l, runs_at(l, args, mesh, peer, rng), args)) for l in args.lengths]
  single = {r["l"]: r for r in run_single_device(
      [l for l in args.lengths if l <= args.blockwise_max_len], args)}
  for l, r in single.items():
    print(f"| {l} | blockwise, 1-device process | {r['secs']:.2f} | {r['fsecs']:.2f} | "
          f"{(r['secs'] - r['fsecs']) / r['fsecs']:.2f} | {flops(l, h, d) / r['secs'] / 1e9:.1f} | "
          f"{r['mem'] / 2 ** 20:.1f} | 0.00 | |", flush=True)
  criterion_lines(summary, single, args)
  l = args.lengths[0]
  c = l // mesh.shape["seq"]
  cfg = tile_config(MaskSpec(), 1.0, c, c, **blocks_of(block), group=h // kh, cap=c // 2)
  print(f"\n# tiles computed per device (forward, causal, L={l}, C={c}, the ring's tiles "
        f"{cfg.block_q}x{cfg.block_k}): layout: per device, max/mean")
  for name, (tiles_, ratio) in tiles_row(mesh, l, h, kh, d, block).items():
    print(f"# {name}: {tiles_}  max/mean {ratio:.3f}")
  if args.fixed_chunks:
    print("\n# per-device compiled MiB of the ring (zigzag, fwd+bwd) at fixed chunk c: "
          "c: P=2, P=4, P=8, max/min")
  for c in args.fixed_chunks:
    mem = memory_at_fixed_chunk(c, h, kh, d, block)
    print(f"# c={c}: " + ", ".join(f"{m / 2 ** 20:.1f}" for m in mem.values())
          + f", max/min {max(mem.values()) / min(mem.values()):.3f}")

if __name__ == "__main__":
  main()
