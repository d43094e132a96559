"""`python -m longctx.plan --config=configs/NAME.py [--json] [--max_len=H100] [--config.key=value]`.

Per-device memory of every stage of the configured run, before launching: the train step is
compiled for the configured mesh and sequence length from abstract shapes only (nothing is
materialised; longctx.train.memory), and the plan gives per device the parameters, optimizer
state, batch, temporaries (with the gradients and saved activations in them), the total on the
device, what is offloaded to host memory, the largest temporaries by the op that makes them, and
whether that fits each named accelerator.

  --json            one JSON object on stdout: {"stages": [{"stage", "mesh", "total_bytes",
                    "fits": {"H100 80GB": bool, ...}, ...}], "headroom", "config", "devices"}
  --max_len=NAME    per stage, the longest data.max_len whose plan fits the named accelerator
                    (a substring of its name, e.g. H100), by bisection over compiles
  --native          compile for this host's accelerators instead of emulated CPU devices

On a CPU-only machine the devices are emulated (`--num_devices`, default: the mesh's size), so
the figure is XLA:CPU's buffer assignment for the same program: GPU and TPU compilers fuse and
schedule differently, so treat it as an estimate (and keep headroom: the runtime, NCCL buffers
and fragmentation are not in it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from longctx.cli import absl_flags_parser, old_spellings
from longctx.parallel.devices import ACCELERATORS
from longctx.train.memory import StagePlan, describe, gb, plan_stage

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "devices to plan for (default: the "
                                    "mesh's size; needed when a mesh axis is -1)")
_HEADROOM = flags.DEFINE_float("headroom", 0.9, "fraction of an accelerator's memory usable")
_JSON = flags.DEFINE_bool("json", False, "print one JSON object instead of text")
_MAX_LEN = flags.DEFINE_string("max_len", None, "name (or part of it) of an accelerator in "
                               f"{[n for n, _ in ACCELERATORS]}: find each stage's longest "
                               "data.max_len that fits it")
_REPORT = flags.DEFINE_bool("report", True, "name the largest temporaries (from the compiler's "
                            "buffer-assignment dump)")
_AS_ACCELERATOR = flags.DEFINE_bool(
    "accelerator_estimate", True, "on CPU, compile a bfloat16 model as float16 (same sizes): "
    "XLA:CPU emulates bfloat16 dynamic-(update-)slice in float32 and would count float32 copies "
    "of the saved activations that GPU and TPU compilers do not make (longctx.train.memory)")

MAX_SEARCH_LEN = 1 << 26  # 64M tokens, above the 16M of a 32-device 8B recipe: the search stops here


def plan(config, num_devices: int | None = None, report: bool = False,
         accelerator_estimate: bool = True) -> list[StagePlan]:
  stages, mesh = _stages_and_mesh(config, num_devices)
  plans = []
  for s in stages:
    p = plan_stage(s, mesh, int(config.seed), report=report,
                   accelerator_estimate=accelerator_estimate)
    traffic = strategy_traffic(s, mesh, p.batch_shape)
    plans.append(dataclasses.replace(p, attention_traffic=traffic, attention_strategy=(
        s.attention.strategy.value if traffic else "")))
  return plans


def _stages_and_mesh(config, num_devices):
  import jax

  from longctx.parallel.mesh import make_mesh
  from longctx.train.config import mesh_config, read_stages
  stages = read_stages(config)
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  return stages, make_mesh(dataclasses.asdict(mesh_config(config)), devices)


def accelerator(name: str) -> tuple[str, float]:
  hits = [(n, cap) for n, cap in ACCELERATORS if name.lower() in n.lower()]
  if len(hits) != 1:
    raise app.UsageError(f"--max_len={name!r}: expected (part of) one name among "
                         f"{[n for n, _ in ACCELERATORS]}, found {len(hits)} matches")
  return hits[0]


def length_granule(stage, seq: int) -> int:
  """Every planned length is a multiple of this: the layout's split, the token chunks and the
  ring's default tile on each device (a row splits into whole tiles)."""
  from longctx.attention.tiles import BLOCK_K
  parts = stage.attention.layout.parts(seq)
  granule = math.lcm(parts * (stage.attention.tiles.block_k or BLOCK_K), stage.data.pad_multiple)
  for chunk in (stage.train.loss_chunk, stage.model.mlp_chunk):
    granule = math.lcm(granule, seq * max(chunk, 1))
  return granule


def max_len(stage, mesh, capacity: float, headroom: float, seed: int = 0,
            accelerator_estimate: bool = True, log=lambda *_: None) -> tuple[int, StagePlan]:
  """(the longest max_len that fits, its plan): double from data.max_len until a plan does not
  fit (or MAX_SEARCH_LEN), then bisect between the last fit and the first miss to within 1/64
  (or one granule). Raises ValueError when even one granule does not fit."""
  granule = length_granule(stage, mesh.shape["seq"])
  plans: dict[int, StagePlan] = {}

  def fits(length: int) -> bool:
    plans[length] = plan_stage(stage, mesh, seed, length=length, residuals=False,
                               accelerator_estimate=accelerator_estimate)
    log(f"  max_len {length:,}: {gb(plans[length].total_bytes)} per device")
    return plans[length].fits(capacity, headroom)

  length = max(granule, stage.data.max_len // granule * granule)
  if fits(length):
    lo, hi = length, None
    while hi is None and lo < MAX_SEARCH_LEN:
      nxt = min(2 * lo, MAX_SEARCH_LEN)
      lo, hi = (nxt, None) if fits(nxt) else (lo, nxt)
    if hi is None:
      return lo, plans[lo]
  else:
    hi, lo = length, None
    while lo is None and hi > granule:
      nxt = max(granule, hi // 2 // granule * granule)
      lo, hi = (nxt, hi) if fits(nxt) else (None, nxt)
    if lo is None:
      raise ValueError(
          f"stage {stage.name}: no data.max_len fits: the shortest planned, {granule:,} tokens "
          f"(one granule: layout, token chunks and tiles over seq={mesh.shape['seq']}), needs "
          f"{gb(plans[granule].total_bytes)} per device against {gb(capacity * headroom)} "
          f"({headroom:.0%} of {gb(capacity)}); the state alone is "
          f"{gb(plans[granule].params_bytes + plans[granule].optimizer_bytes)}")
  while hi - lo > max(granule, lo // 64):
    mid = (lo + hi) // 2 // granule * granule
    if mid in (lo, hi):
      break
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo, plans[lo]


def strategy_traffic(stage, mesh, batch_shape) -> dict[str, int | str]:
  """{strategy: bytes} one device moves for attention in one train step, forward and backward
  of every layer and micro-batch (`attention.costs.strategy_bytes`), for each strategy the
  trainer can run; a string instead of bytes where the strategy cannot split these heads. Empty
  without context parallelism. Not counted: the forward's collectives again when remat
  recomputes attention in the backward (the same factor for every strategy)."""
  from longctx.attention.costs import strategy_bytes
  from longctx.attention.strategies import ONE_AXIS, Strategy
  from longctx.train.runner import head_axis
  seq, spec, m = mesh.shape["seq"], stage.attention, stage.model
  if seq == 1 or not spec.context_parallel:
    return {}
  tensor = mesh.shape["tensor"] if head_axis(stage, mesh) else 1
  h, kh = m.num_heads // tensor, m.num_kv_heads // tensor
  micro, rows, length = batch_shape
  rows //= mesh.shape["data"] * mesh.shape["fsdp"]
  nbytes = 4 if m.dtype == "float32" else 2
  u = spec.ulysses_devices
  out: dict[str, int | str] = {}
  for strategy in ONE_AXIS + ((Strategy.HYBRID,) if u else ()):  # the hybrid: as configured
    name = strategy.value
    size = (u, seq // u) if name == "hybrid" else seq
    if name in ("ulysses", "hybrid") and h % (u if name == "hybrid" else seq):
      out[name] = f"cannot: {h} query heads per device over {u if name == 'hybrid' else seq}"
      continue
    out[name] = micro * sum(
        sum(strategy_bytes(name, rows, length, h, kh, m.head_dim, nbytes, size, grad=True,
                           mask_spec=spec.mask(w), layout=spec.layout,
                           layout_devices=seq).values())
        for w in m.layer_windows)  # a windowed ring stops early (`ring.ring_hops`)
  return out


def traffic_line(traffic: dict, configured) -> str:
  """One line naming each strategy's bytes and the one that moves the fewest."""
  sized = {k: v for k, v in traffic.items() if isinstance(v, int)}
  best = min(sized, key=sized.get)
  parts = [f"{k} {gb(v) if isinstance(v, int) else v}" for k, v in traffic.items()]
  return (f"  attention traffic per device per step (formulas, remat recompute not counted): "
          f"{', '.join(parts)} — fewest: {best} (configured: {configured})")


def _mesh_size(config) -> int | None:
  sizes = [int(config.mesh[a]) for a in ("data", "fsdp", "seq", "tensor")]
  return None if -1 in sizes else math.prod(sizes)


def _print_plan(p: StagePlan, headroom: float) -> None:
  print()
  for line in describe(p):
    print(line)
  if p.attention_traffic:
    print(traffic_line(p.attention_traffic, p.attention_strategy))
  fits = [f"{name}: {'fits' if p.fits(cap, headroom) else 'does NOT fit'}"
          for name, cap in ACCELERATORS]
  print(f"  at {headroom:.0%} of memory — " + "; ".join(fits))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/NAME.py is required")
  n = _NUM_DEVICES.value or _mesh_size(config)
  import jax
  if os.environ.get("JAX_PLATFORMS") == "cpu":
    if n is None:
      raise app.UsageError("the mesh has an axis = -1: give --num_devices=N to plan for N devices")
    jax.config.update("jax_num_cpu_devices", n)
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if _JSON.value else \
      (lambda *a: print(*a, flush=True))
  say(f"planning {name} for {n or jax.device_count()} {jax.devices()[0].platform} devices "
      "(compiling abstract shapes)")
  headroom = _HEADROOM.value
  if _MAX_LEN.value:
    target, capacity = accelerator(_MAX_LEN.value)
    stages, mesh = _stages_and_mesh(config, n)
    found = []
    for stage in stages:
      say(f"stage {stage.name}: the longest data.max_len that fits {target} at {headroom:.0%}")
      try:
        length, p = max_len(stage, mesh, capacity, headroom, int(config.seed),
                            _AS_ACCELERATOR.value, log=say)
      except ValueError as e:
        raise app.UsageError(str(e)) from None
      found.append((stage.name, length, p))
      say(f"stage {stage.name}: max_len {length:,} fits {target} ({gb(p.total_bytes)} per "
          "device)")
    if _JSON.value:
      print(json.dumps({"accelerator": target, "headroom": headroom, "config": name,
                        "stages": [dict(p.to_json(headroom), max_len=length)
                                   for _, length, p in found]}, indent=2))
    return
  plans = plan(config, n, report=_REPORT.value, accelerator_estimate=_AS_ACCELERATOR.value)
  if _JSON.value:
    print(json.dumps({"config": name, "devices": n or jax.device_count(), "headroom": headroom,
                      "stages": [p.to_json(headroom) for p in plans]}, indent=2))
    return
  for p in plans:
    _print_plan(p, headroom)


if __name__ == "__main__":
  # Plan on emulated CPU devices (a login node will do) unless --native: this host's accelerators,
  # which must then number at least the mesh's size.
  if "--native" not in sys.argv:
    os.environ["JAX_PLATFORMS"] = "cpu"
  else:
    sys.argv.remove("--native")
  app.run(main, flags_parser=absl_flags_parser(__doc__, old_spellings("--max_len")))
